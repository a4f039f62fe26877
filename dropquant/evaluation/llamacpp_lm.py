"""An lm-evaluation-harness model over llama-cpp-python, for GGUF files, that evaluates a shared context once.

Multiple-choice tasks ask for log P(choice | context) for every choice of an item: the naive way evaluates
context + choice from scratch each time. Here requests are ordered so that sequences with a common prefix
are neighbours (lexicographic order of their tokens), and each one evaluates only the tokens after the
longest prefix it shares with what is already in the KV cache: llama-cpp-python's `eval` drops the cache
cells past `n_tokens` (llama_memory_seq_rm), so rewinding is setting `n_tokens`. The logits of the cached
prefix stay valid in `Llama.scores` (logits_all=True), so a continuation's first token needs no re-evaluation.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..errors import DropquantError

log = logging.getLogger(__name__)


def log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64, copy=False)
    m = rows.max(axis=-1, keepdims=True)
    return rows - (m + np.log(np.exp(rows - m).sum(axis=-1, keepdims=True)))


def common_prefix(a: np.ndarray, b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.nonzero(a[:n] != np.asarray(b[:n], dtype=a.dtype))[0]
    return int(diff[0]) if len(diff) else n


def open_llama(model_path: str | Path, n_ctx: int, threads: int, *, logits_all: bool = True, verbose: bool = False):
    from llama_cpp import Llama

    path = Path(model_path)
    if not path.is_file():
        raise DropquantError(f"GGUF file not found: {path}")
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(512, n_ctx), logits_all=logits_all,
                 n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=verbose, seed=0)


class LlamaCppLM(TemplateLM):
    """lm-eval model for a GGUF file. `reuse_kv=False` gives the naive one-evaluation-per-request adapter."""

    def __init__(self, model_path: str | Path, n_ctx: int = 2048, threads: int = 2, reuse_kv: bool = True,
                 max_gen_toks: int = 256, llama=None) -> None:
        super().__init__()
        self.model_path = str(model_path)
        # Logits are kept here, not in Llama.scores: only the rows a request needs are computed and copied.
        self.llama = llama if llama is not None else open_llama(model_path, n_ctx, threads, logits_all=False)
        self.n_ctx = self.llama.n_ctx()
        self.n_vocab = self.llama.n_vocab()
        self._rows = np.empty((self.n_ctx, self.n_vocab), dtype=np.float32)  # pages committed only when written
        self._has = np.zeros(self.n_ctx, dtype=bool)
        self._tokens = np.full(self.n_ctx, -1, dtype=np.int64)
        self._n = 0
        self.reuse_kv = reuse_kv
        self.max_gen_toks = max_gen_toks
        self.tokens_evaluated = 0  # how much work the cache saved: compare with the requests' total length

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
        return self.llama.tokenize(string.encode("utf-8"), add_bos=bool(add_special_tokens), special=False)

    def _is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self.llama._model.vocab, token))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.llama.detokenize(tokens).decode("utf-8", errors="ignore")

    # -- the cached evaluation ------------------------------------------------------------------------------
    def _decode(self, tokens: list[int], want_from: int) -> None:
        """Append tokens to the cache, computing logits only for positions >= want_from (the output layer is
        a fifth of this size of model's work per token, and context rows are rarely needed)."""
        import llama_cpp

        llama, batch = self.llama, self.llama._batch.batch
        n_batch = llama.n_batch
        for s in range(0, len(tokens), n_batch):
            part = tokens[s:s + n_batch]
            n_past = self._n
            batch.n_tokens = len(part)
            outputs = []
            for i, tok in enumerate(part):
                pos = n_past + i
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.seq_id[i][0] = 0
                batch.n_seq_id[i] = 1
                batch.logits[i] = pos >= want_from
                if pos >= want_from:
                    outputs.append(pos)
            llama._ctx.decode(llama._batch)
            if outputs:
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llama._ctx.ctx),
                                               shape=(len(outputs) * self.n_vocab,))
                self._rows[outputs[0]:outputs[-1] + 1] = logits.reshape(len(outputs), self.n_vocab)
                self._has[outputs[0]:outputs[-1] + 1] = True
            self._tokens[n_past:n_past + len(part)] = part
            self._n += len(part)
        self.tokens_evaluated += len(tokens)

    def _eval_sequence(self, tokens: list[int], need_from: int, need_to: int) -> None:
        """Make self._rows[need_from:need_to] hold the logits of `tokens` evaluated as one sequence."""
        keep = common_prefix(self._tokens[: self._n], tokens) if self.reuse_kv else 0
        missing = np.nonzero(~self._has[need_from:min(keep, need_to)])[0]
        if len(missing):
            keep = need_from + int(missing[0])  # a cached prefix whose needed logits were never computed
        if keep >= need_to:
            return
        self.llama._ctx.kv_cache_seq_rm(0, keep, -1)
        self._n = keep
        self._has[keep:] = False
        self._decode(tokens[keep:need_to], need_from)

    def _score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        full = (ctx + cont)[-self.n_ctx:]
        if len(cont) >= len(full):
            raise DropquantError(f"a continuation of {len(cont)} tokens does not fit a {self.n_ctx}-token context")
        start = len(full) - len(cont)
        # The logits that predict cont are those of positions start-1 .. len(full)-2: the last token needs no eval.
        self._eval_sequence(full, start - 1, len(full) - 1)
        logp = log_softmax(self._rows[start - 1: len(full) - 1])
        idx = np.arange(len(cont))
        target = np.asarray(cont)
        return float(logp[idx, target].sum()), bool((logp.argmax(axis=-1) == target).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        seqs = [list(ctx) + list(cont) for _, ctx, cont in requests]
        order = sorted(range(len(requests)), key=lambda i: seqs[i]) if self.reuse_kv else range(len(requests))
        results: list = [None] * len(requests)
        for i in tqdm(order, desc="loglikelihood", disable=disable_tqdm, total=len(requests)):
            key, ctx, cont = requests[i]
            results[i] = self._score(list(ctx), list(cont))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, results[i])
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
        out = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            text = self.greedy_until(context, gen_kwargs.get("until") or [],
                                     int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def greedy_until(self, context: str, until: list[str] | str, max_gen_toks: int) -> str:
        """Greedy decoding that stops at the first stop string (cut off), at end-of-generation, or at the budget."""
        until = [until] if isinstance(until, str) else list(until)
        ctx = self.tok_encode(context) or [self.prefix_token_id]
        ctx = ctx[-max(1, self.n_ctx - max_gen_toks):]
        self._eval_sequence(ctx, len(ctx) - 1, len(ctx))
        if self._n > len(ctx):
            self.llama._ctx.kv_cache_seq_rm(0, len(ctx), -1)
            self._n = len(ctx)
            self._has[len(ctx):] = False
        generated: list[int] = []
        text = ""
        while len(generated) < max_gen_toks and self._n < self.n_ctx:
            token = int(np.argmax(self._rows[self._n - 1]))
            if self._is_eog(token):
                break
            generated.append(token)
            text = self.tok_decode(generated)
            hits = [text.find(s) for s in until if s and s in text]
            if hits:
                return text[: min(hits)]
            self._decode([token], self._n)
        return text
