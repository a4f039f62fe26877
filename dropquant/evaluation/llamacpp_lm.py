"""An lm-evaluation-harness model over llama-cpp-python, for GGUF files, that evaluates a shared context once.

Multiple-choice tasks ask for log P(choice | context) for every choice of an item: the naive way evaluates
context + choice from scratch each time. Here the requests are sorted by their tokens and laid out as a prefix
tree (each request shares the longest prefix it has with the previous one), and a whole item, its context and
all its choices, is evaluated in one llama_decode call: a token shared by several requests is evaluated once
and belongs to all their llama.cpp sequences (a token may carry several sequence ids; the attention mask lets a
token see only cells of its own first sequence, and the ids of a shared token are a superset of its
descendants'), each branch of the tree gets its own sequence id, and logits are computed only for the
positions a request scores. One KV cache of n_ctx cells serves all sequences (`kv_unified`). Between items,
the prefix an item shares with the previous one (a few-shot prompt, a task's template) stays in the cache.

Measured (docs/evaluate.md): the speed-up over the naive adapter is the ratio of tokens evaluated; llama.cpp's
cost per token on this model falls little beyond ~64-token batches, so packing several items per batch bought
~10% and, on a quantized model, changed rounding more than one item per batch does.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..errors import DropquantError
from .generation import generate_batched, generate_sequential, prepare
from .prefix import common_prefix

log = logging.getLogger(__name__)

MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ


def row_stats(rows: np.ndarray, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """logsumexp (float64) and argmax of each row of float32 logits. exp in float32, sums in float64: the
    log-probabilities are within ~1e-6 nats of a float64 computation, at a fraction of its memory traffic."""
    lse = np.empty(len(rows), dtype=np.float64)
    top = np.empty(len(rows), dtype=np.int64)
    for s in range(0, len(rows), block):
        r = rows[s:s + block]
        m = r.max(axis=-1, keepdims=True)
        lse[s:s + block] = m[:, 0] + np.log(np.exp(r - m).sum(axis=-1, dtype=np.float64))
        top[s:s + block] = r.argmax(axis=-1)
    return lse, top


def open_llama(model_path: str | Path, n_ctx: int, threads: int, *, logits_all: bool = True, verbose: bool = False,
               n_seq_max: int = 1, n_batch: int = 512, kv_unified: bool = True, gpu_layers: int = 0):
    """A llama_cpp.Llama with flash attention; `n_seq_max` > 1 gives it one KV cache of n_ctx cells shared by
    up to n_seq_max sequences (Llama() itself only makes single-sequence contexts), or with kv_unified=False
    one stream of n_ctx / n_seq_max cells per sequence (each token then attends over its own stream only).
    `gpu_layers`: llama.cpp's n_gpu_layers (-1: every layer; dropquant.evaluation.device)."""
    from llama_cpp import Llama
    from llama_cpp import _internals as internals

    path = Path(model_path)
    if not path.is_file():
        raise DropquantError(f"GGUF file not found: {path}")
    n_batch = min(n_batch, n_ctx)
    llama = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, logits_all=logits_all,
                  n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=verbose, seed=0,
                  n_gpu_layers=gpu_layers)
    n_seq_max = min(n_seq_max, n_batch)  # llama.cpp reserves max(n_batch, n_seq_max) output rows at most
    if n_seq_max > 1:
        params = llama.context_params
        params.n_seq_max = n_seq_max
        params.kv_unified = kv_unified
        llama._ctx.close()
        llama._ctx = llama._stack.enter_context(contextlib.closing(
            internals.LlamaContext(model=llama._model, params=params, verbose=verbose)))
    return llama


class _Batch:
    """A llama_batch whose arrays are numpy buffers, so that a chunk is written with slices, not token by token.
    (llama_batch_init's per-token seq_id arrays would need one ctypes call per sequence id.)"""

    def __init__(self, size: int, n_seq_max: int) -> None:
        import llama_cpp

        self.size = size
        self.token = np.zeros(size, dtype=np.int32)
        self.pos = np.zeros(size, dtype=np.int32)
        self.n_seq_id = np.ones(size, dtype=np.int32)
        self.seq_id = np.zeros((size, n_seq_max), dtype=np.int32)
        self.logits = np.zeros(size, dtype=np.int8)
        i32 = ctypes.POINTER(ctypes.c_int32)
        self._rows = (i32 * size)(*[ctypes.cast(self.seq_id[i].ctypes.data, i32) for i in range(size)])
        self.batch = llama_cpp.llama_batch(0, self.token.ctypes.data_as(i32), None, self.pos.ctypes.data_as(i32),
                                           self.n_seq_id.ctypes.data_as(i32), self._rows,
                                           self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)))


@dataclass
class _Pack:
    """Requests evaluated together: a prefix tree flattened in creation order (a node after its parent)."""

    tokens: list = field(default_factory=list)
    pos: list = field(default_factory=list)
    seqs: list = field(default_factory=list)  # per node: the ids of the sequences (branches) through it
    out: list = field(default_factory=list)   # per node: are its logits needed
    n_seq: int = 0
    reqs: list = field(default_factory=list)  # the requests laid out in it, in order
    last_seq: int = 0  # the sequence id of its last request
    reuse: int = 0     # leading positions already in the KV cache, left there by the previous pack
    keep_seq: int = 0  # the previous pack's sequence whose cells hold them
    pair_node: list = field(default_factory=list)    # one entry per scored token:
    pair_target: list = field(default_factory=list)  # the node whose logits predict it, the token,
    pair_req: list = field(default_factory=list)     # and the request it belongs to


def plan_packs(evals: list[list[int]], need_from: list[int], targets: list[list[int]], order, max_cells: int,
               max_seqs: int, pack_cells: Optional[int] = None, share: bool = True) -> list[_Pack]:
    """Lay the requests (in `order`, sorted by their tokens) out as prefix trees of at most max_cells nodes and
    max_seqs branches. Request i evaluates evals[i]; its positions need_from[i].. score targets[i] (a token each).

    A pack is closed before an item (requests sharing one context) that would take it past pack_cells, so that
    an item's context is not evaluated in two packs; an item larger than pack_cells gets a pack of its own.
    A pack starts from the prefix it shares with the previous pack, left in the cache (`_reuse_prefix`).
    share=False gives every request its own pack: one full evaluation per request."""
    pack_cells = min(pack_cells or max_cells, max_cells)
    order = list(order)
    # cells an item takes on its own: its first request whole, then what each next one adds
    lcp = [0] + [common_prefix(evals[a], evals[b]) for a, b in zip(order, order[1:])] if share else [0] * len(order)
    item_cells = [0] * len(order)
    for j in range(len(order) - 1, -1, -1):
        i = order[j]
        item_cells[j] = len(evals[i])
        if j + 1 < len(order) and lcp[j + 1] >= need_from[order[j + 1]]:  # the next request shares this context
            item_cells[j] += item_cells[j + 1] - lcp[j + 1]

    packs: list[_Pack] = []
    cur: Optional[_Pack] = None
    prev: list[int] = []
    path: list[int] = []
    sid = -1
    for j, i in enumerate(order):
        e = evals[i]
        k = lcp[j] if cur is not None else 0
        branch = k < len(prev) or cur is None  # a new branch of the tree, or the previous one extended
        if cur is not None:
            n = len(cur.tokens)
            if (not share or n + len(e) - k > max_cells or (branch and cur.n_seq >= max_seqs)
                    or (k < need_from[i] and n + item_cells[j] > pack_cells)):
                packs.append(cur)
                cur = None
        if cur is None:
            cur, k, branch = _Pack(), 0, True
        if branch:
            sid, cur.n_seq = cur.n_seq, cur.n_seq + 1
        first = len(cur.tokens)
        path = path[:k] + list(range(first, first + len(e) - k))
        cur.tokens += e[k:]
        cur.pos += range(k, len(e))
        cur.seqs += [[] for _ in range(len(e) - k)]
        cur.out += [False] * (len(e) - k)
        for node in path:
            s = cur.seqs[node]
            if not s or s[-1] != sid:  # sequence ids are added in increasing order
                s.append(sid)
        for j2, d in enumerate(range(need_from[i], len(e))):
            cur.out[path[d]] = True
            cur.pair_node.append(path[d])
            cur.pair_target.append(targets[i][j2])
            cur.pair_req.append(i)
        cur.reqs.append(i)
        cur.last_seq = sid
        prev = e
    if cur is not None:
        packs.append(cur)
    if share:
        for before, pack in zip(packs, packs[1:]):
            _reuse_prefix(before, pack, evals, need_from)
    return packs


def _reuse_prefix(before: _Pack, pack: _Pack, evals: list[list[int]], need_from: list[int]) -> None:
    """Let `pack` start from the prefix that all its requests share with the previous pack's last request (a
    few-shot prompt or template shared by consecutive items): those cells stay in the KV cache, so the nodes are
    dropped from the pack. They are the first nodes of its first request's chain, shared by every sequence. A
    position whose logits are scored is never reused (its logits are not kept)."""
    last = evals[before.reqs[-1]]
    k = min(min(common_prefix(last, evals[i]), need_from[i]) for i in pack.reqs)
    if k <= 0:
        return
    pack.reuse, pack.keep_seq = k, before.last_seq
    pack.tokens, pack.pos, pack.seqs, pack.out = pack.tokens[k:], pack.pos[k:], pack.seqs[k:], pack.out[k:]
    pack.pair_node = [n - k for n in pack.pair_node]


class LlamaCppLM(TemplateLM):
    """lm-eval model for a GGUF file. `reuse_kv=False` gives the naive adapter: one full evaluation of context +
    continuation per request, from an empty cache (same decoding and scoring code, no sharing, no packing).

    `parallel`: how many prompts generate_until decodes together (1: one at a time). `chat=True` for prompts
    rendered by the model's chat template (`apply_chat_template`): their special-token text (<|im_start|>, ...)
    is read as the special tokens it stands for, as Hugging Face tokenizers do."""

    def __init__(self, model_path: str | Path, n_ctx: int = 2048, threads: int = 2, reuse_kv: bool = True,
                 max_gen_toks: int = 256, llama=None, n_batch: int = 512, n_seq_max: int = MAX_SEQUENCES,
                 pack_cells: Optional[int] = None, parallel: Optional[int] = None, chat: bool = False,
                 kv_unified: bool = True, gpu_layers: int = 0) -> None:
        import llama_cpp

        super().__init__()
        self.model_path = str(model_path)
        n_seq_max = min(n_seq_max, llama_cpp.llama_max_parallel_sequences()) if reuse_kv else 1
        self.llama = llama if llama is not None else open_llama(model_path, n_ctx, threads, logits_all=False,
                                                                n_seq_max=n_seq_max, n_batch=n_batch,
                                                                kv_unified=kv_unified, gpu_layers=gpu_layers)
        self._ctx = self.llama._ctx.ctx
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self.n_ctx = self.llama.n_ctx()
        self.n_vocab = self.llama.n_vocab()
        self.n_batch = self.llama.n_batch
        self.n_seq_max = int(llama_cpp.llama_n_seq_max(self._ctx))
        self.seq_ctx = int(llama_cpp.llama_n_ctx_seq(self._ctx))  # cells one sequence can use
        self.unified = self.seq_ctx == self.n_ctx
        self._batch = _Batch(self.n_batch, self.n_seq_max)
        # Items (requests sharing a context) are not mixed in one batch by default: on quantized models that
        # moved llama.cpp's rounding 2.5x further from the naive adapter's for ~10% speed (docs/evaluate.md).
        # pack_cells=n packs items up to n cells per batch.
        self.pack_cells = pack_cells or 1
        self.reuse_kv = reuse_kv
        self.max_gen_toks = max_gen_toks
        self.parallel = min(parallel or self.n_seq_max, self.n_seq_max)
        self.chat = chat
        self.generations: list = []  # the last generate_until call's, with why each stopped
        self.tokens_evaluated = 0  # how much work the cache saved: compare with the requests' total length
        self.decode_calls = 0
        self.tokens_reused = 0  # prefix tokens a pack found in the cache, left by the previous pack

    # -- tokenization ---------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.llama.token_eos()

    @property
    def prefix_token_id(self) -> int:
        bos = self.llama.token_bos()
        return bos if bos >= 0 else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.n_ctx

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        # Like lm-eval's HF model: no BOS added to task text; an empty context gets prefix_token_id instead.
        # A chat prompt gets the BOS its template writes, or the one the vocabulary asks for (`chat_template`).
        return self.llama.tokenize(string.encode("utf-8"), add_bos=bool(add_special_tokens), special=self.chat)

    # -- chat ----------------------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return Path(self.model_path).name

    def chat_template(self, chat_template: bool | str = False) -> Optional[str]:
        from .chat import template_of

        return template_of(self.llama) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        from .chat import render

        return render(self.llama, chat_history, add_generation_prompt)

    def _is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self.llama._model.vocab, token))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.llama.detokenize(tokens).decode("utf-8", errors="ignore")

    # -- decoding -------------------------------------------------------------------------------------------
    def _clear(self) -> None:
        import llama_cpp

        llama_cpp.llama_memory_clear(self._mem, False)

    def _decode(self, tokens, pos, out, seqs=None):
        """Decode nodes in chunks of n_batch; yields (first node of the chunk, its out flags, logits of its
        output rows). The logits are llama.cpp's buffer: valid until the next chunk is decoded."""
        import llama_cpp

        b = self._batch
        for s in range(0, len(tokens), self.n_batch):
            e = min(s + self.n_batch, len(tokens))
            n = e - s
            b.token[:n] = tokens[s:e]
            b.pos[:n] = pos[s:e]
            flags = out[s:e]
            b.logits[:n] = flags
            if seqs is None:
                b.n_seq_id[:n] = 1
                b.seq_id[:n, 0] = 0
            else:
                for j, ids in enumerate(seqs[s:e]):
                    b.n_seq_id[j] = len(ids)
                    b.seq_id[j, :len(ids)] = ids
            b.batch.n_tokens = n
            rc = llama_cpp.llama_decode(self._ctx, b.batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc}) on {n} tokens")
            self.decode_calls += 1
            self.tokens_evaluated += n
            n_out = int(np.count_nonzero(flags))
            logits = None
            if n_out:
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._ctx), shape=(n_out * self.n_vocab,))
                logits = logits.reshape(n_out, self.n_vocab)
            yield s, flags, logits

    def _keep_prefix(self, pack: _Pack) -> None:
        """Reduce the cache to the previous pack's cells for positions < pack.reuse, owned by all of pack's
        sequences (every one of them passes through that prefix)."""
        import llama_cpp

        keep = pack.keep_seq
        llama_cpp.llama_memory_seq_keep(self._mem, keep)
        llama_cpp.llama_memory_seq_rm(self._mem, keep, pack.reuse, -1)
        for sid in range(pack.n_seq):
            if sid != keep:
                llama_cpp.llama_memory_seq_cp(self._mem, keep, sid, -1, -1)
        if keep >= pack.n_seq:
            llama_cpp.llama_memory_seq_rm(self._mem, keep, -1, -1)
        self.tokens_reused += pack.reuse

    def _run_pack(self, pack: _Pack, loglik: np.ndarray, greedy: np.ndarray) -> None:
        if pack.reuse:
            self._keep_prefix(pack)
        else:
            self._clear()
        tokens = np.asarray(pack.tokens, dtype=np.int32)
        pos = np.asarray(pack.pos, dtype=np.int32)
        out = np.asarray(pack.out, dtype=bool)
        pn = np.asarray(pack.pair_node, dtype=np.int64)
        srt = np.argsort(pn, kind="stable")
        pn, pt, pr = pn[srt], np.asarray(pack.pair_target, dtype=np.int64)[srt], np.asarray(pack.pair_req)[srt]
        for s, flags, logits in self._decode(tokens, pos, out, pack.seqs if pack.n_seq > 1 else None):
            if logits is None:
                continue
            a, b = np.searchsorted(pn, s), np.searchsorted(pn, s + len(flags))
            if a == b:
                continue
            lse, top = row_stats(logits)
            row = (np.cumsum(flags) - 1)[pn[a:b] - s]
            tgt = pt[a:b]
            np.add.at(loglik, pr[a:b], logits[row, tgt].astype(np.float64) - lse[row])
            np.logical_and.at(greedy, pr[a:b], top[row] == tgt)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        evals, need_from, targets = [], [], []
        for _, ctx, cont in requests:
            full = (list(ctx) + list(cont))[-self.n_ctx:]
            if len(cont) >= len(full):
                raise DropquantError(f"a continuation of {len(cont)} tokens does not fit a {self.n_ctx}-token context")
            # The logits that predict cont are those of positions start-1 .. len(full)-2: the last token needs no eval.
            evals.append(full[:-1])
            need_from.append(len(full) - len(cont) - 1)
            targets.append(list(cont))
        order = sorted(range(len(requests)), key=lambda i: evals[i]) if self.reuse_kv else range(len(requests))
        packs = plan_packs(evals, need_from, targets, order, self.n_ctx, self.n_seq_max, self.pack_cells,
                           share=self.reuse_kv)
        loglik = np.zeros(len(requests), dtype=np.float64)
        greedy = np.ones(len(requests), dtype=bool)
        with tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm) as bar:
            for pack in packs:
                self._run_pack(pack, loglik, greedy)
                bar.update(len(set(pack.pair_req)))
        results = [(float(x), bool(g)) for x, g in zip(loglik, greedy)]
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.n_ctx - 1, context_len=1)]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows], disable_tqdm=True)
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy, all requests decoded together (`generation.generate_batched`); `parallel=1` gives the
        one-at-a-time reference."""
        seqs = []
        for req in requests:
            context, gen_kwargs = req.args
            seqs.append(prepare(self, self.tok_encode(context), gen_kwargs.get("until"),
                                int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))))
        if self.parallel == 1:
            gens = [generate_sequential(self, s) for s in tqdm(seqs, desc="generate_until", disable=disable_tqdm)]
        else:
            gens = generate_batched(self, seqs, self.parallel, progress=not disable_tqdm, desc="generate_until")
        self.generations = gens
        for req, g in zip(requests, gens):
            self.cache_hook.add_partial("generate_until", req.args, g.text)
        return [g.text for g in gens]

    def _last_logits(self, tokens: list[int], start: int) -> np.ndarray:
        """Append tokens at positions start.. to sequence 0; the logits after the last one."""
        out = np.zeros(len(tokens), dtype=bool)
        out[-1] = True
        row = None
        for _, _, logits in self._decode(tokens, np.arange(start, start + len(tokens)), out):
            if logits is not None:
                row = logits[-1].copy()
        return row

    def greedy_until(self, context: str, until: list[str] | str, max_gen_toks: int) -> str:
        """One prompt, greedy, one token per llama_decode (the reference for the batched path)."""
        return generate_sequential(self, prepare(self, self.tok_encode(context), until, max_gen_toks)).text
