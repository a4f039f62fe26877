"""Calibration tokens: texts from a source, joined by EOS and cut into n_samples x seq_len blocks (the paper's "pt" mode)."""
from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from .errors import DropquantError
from .workspace import workspace_path

log = logging.getLogger(__name__)

GENERATED = "generated"
HF_PREFIX = "hf:"


def check_seq_len(config, seq_len: int) -> None:
    """Blocks longer than the model's position range would score positions it never saw in training (and
    sampling them from the model costs hours): refused before any work."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise DropquantError(f"calibration.seq_len={seq_len} is longer than the model's context: "
                             f"max_position_embeddings is {limit}")


def resolve_files(pattern: str) -> list[Path]:
    """A path or glob of .txt / .jsonl files (relative: from the workspace, dropquant.workspace), sorted so the order
    never depends on the file system."""
    matches = sorted(Path(p) for p in glob.glob(str(workspace_path(pattern)), recursive=True))
    files = [p for p in matches if p.is_file()]
    if not files:
        raise DropquantError(f"calibration.source: no file matches '{pattern}'")
    bad = [str(p) for p in files if p.suffix not in (".txt", ".jsonl")]
    if bad:
        raise DropquantError(f"calibration.source: unsupported file type {bad[:3]} (use .txt or .jsonl)")
    return files


def iter_file_texts(files: list[Path], text_field: str) -> Iterator[str]:
    for path in files:
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")
            continue
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DropquantError(f"{path}:{lineno}: not valid JSON: {err}") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise DropquantError(f"{path}:{lineno}: no field '{text_field}' (set calibration.text_field)")
                yield str(record[text_field])


def iter_hf_texts(dataset_id: str, config: str | None, split: str, text_field: str, seed: int) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, config, split=split, streaming=True)
    except Exception as err:  # datasets raises many types for a missing/unreachable dataset
        raise DropquantError(f"calibration.source: cannot stream dataset '{dataset_id}' "
                             f"(config {config}, split {split}): {err}") from None
    for record in ds.shuffle(seed=seed, buffer_size=1000):
        if text_field not in record:
            raise DropquantError(f"calibration.source: dataset '{dataset_id}' has no field '{text_field}' "
                                 f"(fields: {', '.join(record)})")
        yield record[text_field]


def pack(texts: Iterable[str], tokenizer, n_samples: int, seq_len: int) -> tuple[torch.Tensor, int]:
    """Join tokenized texts with EOS and cut the stream into blocks, without padding. Returns (blocks, texts used)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DropquantError("the model's tokenizer has no EOS token to join calibration texts with")
    need = n_samples * seq_len
    stream: list[int] = []
    used = 0
    for text in texts:
        if not text.strip():
            continue
        if stream:
            stream.append(eos)
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        used += 1
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise DropquantError(f"the calibration source yields {len(stream)} tokens; "
                             f"calibration.n_samples x seq_len = {n_samples} x {seq_len} needs {need}")
    return torch.tensor(stream[:need], dtype=torch.int64).view(n_samples, seq_len), used


def _start_token(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


@torch.inference_mode()
def generate_tokens(model, tokenizer, n_samples: int, seq_len: int, seed: int, progress: bool = True) -> torch.Tensor:
    """Data-free calibration: sample n_samples sequences from the model itself, starting from BOS.

    Sampling at temperature 1 follows the model's own distribution, so the activations it produces are
    ones the model really sees; EOS tokens it emits join texts just as in packed data."""
    from tqdm import tqdm

    start = _start_token(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.full((n_samples, 1), start, dtype=torch.int64)
    out = model(input_ids=ids.to(device), use_cache=True)
    cache, tokens = out.cache, [ids]
    for _ in tqdm(range(seq_len - 1), desc="sampling calibration text", disable=not progress, unit="tok"):
        # Sampled on the CPU with a CPU generator, so the tokens do not depend on the device.
        probs = torch.softmax(out.logits[:, -1].float().cpu(), dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        tokens.append(nxt)
        out = model(input_ids=nxt.to(device), cache=cache, use_cache=True)
        cache = out.cache
    return torch.cat(tokens, dim=1)


# Sampling in llama.cpp, for GGUF sources (the embedded default): torch float32 sampling of the embedded model,
# 32 x 512 tokens, took ~204 s of `make run` (one float32 forward of 30 layers per token step, and a KV cache
# concatenated anew at every step). llama.cpp runs the GGUF's own quantized weights, keeps one KV stream per
# sequence (kv_unified off: a token attends over its own sequence's cells only) and advances every sequence by
# one token per llama_decode call: docs/performance.md, "Calibration", for the times.
#
# Deterministic for a seed:
#   - the random numbers are drawn up front, one numpy PCG64 stream per sequence (SeedSequence(seed).spawn), so
#     sequence i's draws depend on (seed, i) only;
#   - a token is drawn from the float64 softmax of llama.cpp's logits by inverse CDF (sample_rows): sequential
#     cumulative sums, no parallel reduction;
#   - llama.cpp's CPU kernels compute each output row in one thread, so the thread count does not change the
#     logits (tested), and ThreadChooser may pick 1 thread or all cores step by step as the machine's load
#     makes one faster; flash attention, batch and context sizes are fixed here, not left to "auto".
# The model runs on the CPU whatever model.device says, so the tokens do not depend on the device. They are not
# torch's tokens: llama.cpp multiplies quantized weights by 8-bit-quantized activations and keeps K/V in F16, so
# the distribution is the same to within that rounding and the draws are other draws.

# Sequences decoded together: the default calibration (32 samples) is one group. A constant, not the machine's
# core count, so the kernels llama.cpp picks for a batch (and so the logits) are the same everywhere.
SAMPLE_GROUP = 32


def sample_rows(logits: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One token per row of `logits` [n, vocab] at temperature 1, by inverse CDF of the softmax with uniforms
    u [n] in [0, 1): token k is chosen when cdf[k-1] <= u * total < cdf[k] (a token of probability 0 never is)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    cdf = np.cumsum(x, axis=1)
    target = np.asarray(u, dtype=np.float64) * cdf[:, -1]
    idx = np.array([np.searchsorted(cdf[r], target[r], side="right") for r in range(len(cdf))], dtype=np.int64)
    return np.minimum(idx, logits.shape[1] - 1)


def sample_uniforms(seed: int, n_samples: int, steps: int) -> np.ndarray:
    """[n_samples, steps] uniforms in [0, 1): row i from its own stream of SeedSequence(seed), so it does not
    depend on n_samples or on how sequences are grouped."""
    streams = np.random.SeedSequence(seed).spawn(n_samples)
    out = np.empty((n_samples, steps), dtype=np.float64)
    for i, ss in enumerate(streams):
        out[i] = np.random.Generator(np.random.PCG64(ss)).random(steps)
    return out


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class ThreadChooser:
    """The thread count for each decode step: every `period` steps, `probe` steps with each of 1 and `threads`
    threads, then the faster one (least time of its probe steps) until the next probe. llama.cpp with as many
    threads as cores collapses when another process takes a core (measured here: 32 x 32 tokens of the embedded
    model, 2 threads 256 s, 1 thread 51 s under load) and is faster alone; the tokens are the same either way."""

    def __init__(self, threads: int, period: int = 64, probe: int = 2) -> None:
        self.options = sorted({1, max(1, threads)})
        self.period, self.probe = period, probe
        self.best = self.options[-1]
        self.times: dict[int, float] = {}

    def threads(self, step: int) -> int:
        phase = step % self.period
        n_probe = self.probe * len(self.options)
        if len(self.options) > 1 and phase < n_probe:
            return self.options[phase // self.probe]
        return self.best

    def record(self, step: int, threads: int, seconds: float) -> None:
        phase = step % self.period
        n_probe = self.probe * len(self.options)
        if len(self.options) == 1 or phase >= n_probe:
            return
        if phase % self.probe == 0:
            self.times[threads] = seconds
        else:
            self.times[threads] = min(self.times[threads], seconds)
        if phase == n_probe - 1:
            self.best = min(self.options, key=lambda t: self.times[t])


class _LlamaCppDecoder:
    """A llama.cpp context of `n_seq` sequences of `seq_len` cells each, one stream per sequence."""

    def __init__(self, path: Path, n_seq: int, seq_len: int, threads: int) -> None:
        import llama_cpp

        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise DropquantError(f"llama.cpp cannot load {path} to sample calibration text from")
        self.ctx = None
        self.batch = None
        try:
            self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = n_seq * seq_len
            cparams.n_batch = cparams.n_ubatch = max(n_seq, 1)
            cparams.n_seq_max = n_seq
            cparams.kv_unified = False
            cparams.n_threads = cparams.n_threads_batch = threads
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            cparams.no_perf = True
            self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
            if not self.ctx:
                raise DropquantError(f"llama.cpp cannot make a context of {n_seq} x {seq_len} tokens for {path}")
            if llama_cpp.llama_n_ctx_seq(self.ctx) < seq_len:
                raise DropquantError(f"llama.cpp gives {llama_cpp.llama_n_ctx_seq(self.ctx)} cells a sequence, "
                                     f"calibration.seq_len is {seq_len}")
            self.batch = llama_cpp.llama_batch_init(n_seq, 0, 1)
        except BaseException:
            self.close()
            raise
        self.n_seq = n_seq
        self.n_threads = threads

    def set_threads(self, n: int) -> None:
        if n != self.n_threads:
            self.lib.llama_set_n_threads(self.ctx, n, n)
            self.n_threads = n

    def step(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        """Token `pos` of every sequence (tokens[i] for sequence i); returns a copy of the logits [n_seq, vocab]."""
        b = self.batch
        for i, t in enumerate(tokens.tolist()):
            b.token[i] = t
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = i
            b.logits[i] = 1
        b.n_tokens = len(tokens)
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise DropquantError(f"llama.cpp decode failed ({rc}) at position {pos} while sampling calibration text")
        ptr = self.lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                     shape=(len(tokens), self.n_vocab)).copy()

    def close(self) -> None:
        if self.batch is not None:
            self.lib.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None


def sample_gguf(path: str | Path, start: int, n_samples: int, seq_len: int, seed: int, threads: int | None = None,
                progress: bool = True) -> torch.Tensor:
    """n_samples x seq_len tokens (torch int64) sampled at temperature 1 from the GGUF at `path`, every sequence
    starting with token `start` (BOS); EOS tokens the model emits are kept and sampling goes on, as in packed data."""
    from tqdm import tqdm

    path = Path(path)
    if not path.is_file():
        raise DropquantError(f"GGUF file not found: {path}")
    threads = threads or default_threads()
    u = sample_uniforms(seed, n_samples, seq_len - 1)
    out = np.empty((n_samples, seq_len), dtype=np.int64)
    out[:, 0] = start
    bar = tqdm(total=n_samples * (seq_len - 1), desc="sampling calibration text (llama.cpp)", unit="tok",
               disable=not progress)
    for lo in range(0, n_samples, SAMPLE_GROUP):
        hi = min(lo + SAMPLE_GROUP, n_samples)
        dec = _LlamaCppDecoder(path, hi - lo, seq_len, threads)
        try:
            chooser = ThreadChooser(threads)
            for pos in range(seq_len - 1):
                n = chooser.threads(pos)
                dec.set_threads(n)
                t0 = time.perf_counter()
                logits = dec.step(out[lo:hi, pos], pos)
                chooser.record(pos, n, time.perf_counter() - t0)
                out[lo:hi, pos + 1] = sample_rows(logits, u[lo:hi, pos])
                bar.update(hi - lo)
        finally:
            dec.close()
    bar.close()
    return torch.from_numpy(out)


def generate_tokens_gguf(path: str | Path, tokenizer, n_samples: int, seq_len: int, seed: int,
                         threads: int | None = None, progress: bool = True) -> torch.Tensor:
    """generate_tokens for a GGUF source: the same start token and temperature, sampled in llama.cpp."""
    return sample_gguf(path, _start_token(tokenizer), n_samples, seq_len, seed, threads, progress)


def source_texts(source: str, hf_config, split: str, text_field: str, seed: int) -> Iterator[str]:
    """The texts of calibration.source in the order they are packed. Local files are read (and a source with no
    text refused) at once; a dataset streams."""
    if source.startswith(HF_PREFIX):
        return iter_hf_texts(source[len(HF_PREFIX):], hf_config, split, text_field, seed)
    files = resolve_files(source)
    texts = list(iter_file_texts(files, text_field))
    if not any(t.strip() for t in texts):
        what = "its file is" if len(files) == 1 else f"its {len(files)} files are"
        raise DropquantError(f"calibration.source: '{source}' holds no text ({what} empty, or every line or "
                             f"'{text_field}' field blank)")
    random.Random(seed).shuffle(texts)  # a seed picks which documents; file order alone would always take the first
    return iter(texts)


def tokens_digest(input_ids: torch.Tensor) -> str:
    return hashlib.sha256(input_ids.numpy().tobytes()).hexdigest()


def make_calibration(params, source, config, *, tokenizer=None, model=None,
                     texts: Optional[list[str]] = None) -> tuple[torch.Tensor, dict]:
    """The calibrate stage's tokens and manifest for `params.calibration` and the model at `source`.

    `model`: an already loaded model to sample from (data-free calibration) instead of loading `source`'s;
    `tokenizer`: its tokenizer, else `source`'s is loaded; `texts`: the text source, when already read.
    Shared by the stage and `dropquant.calibrate`."""
    from .model.layerwise import should_stream
    from .model.loading import checkpoint_dir, load_model, load_tokenizer, model_identity, resolve_device, resolve_dtype

    log = logging.getLogger("dropquant.calibrate")  # the stage's log lines, wherever they are made
    c = params.calibration
    check_seq_len(config, c.seq_len)
    identity = model_identity(config, source)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source)
    if c.source == GENERATED:
        sampler = "llama.cpp" if model is None and source.gguf_path is not None else "torch"
        if model is None:
            dtype, device = resolve_dtype(params.model.dtype, source), resolve_device(params.model.device)
            if should_stream(params.model.stream, checkpoint_dir(source), dtype, device, source.spec):
                raise DropquantError("calibration.source=generated samples text from the whole model, which does not "
                                     "fit in memory here (or model.stream is true): use a text source (a .txt/.jsonl "
                                     "path or hf:<dataset>)")
        log.info("data-free calibration: sampling %d x %d tokens from %s in %s", c.n_samples, c.seq_len, source.spec,
                 sampler)
        if sampler == "llama.cpp":  # the GGUF itself, in llama.cpp: docs/performance.md#calibration
            input_ids = generate_tokens_gguf(source.gguf_path, tokenizer, c.n_samples, c.seq_len, c.seed)
        else:
            input_ids = generate_tokens(model if model is not None else load_model(source, dtype, device), tokenizer,
                                        c.n_samples, c.seq_len, c.seed)
        texts_used = None
    else:
        sampler = None
        log.info("packing %d x %d tokens from %s", c.n_samples, c.seq_len, c.source)
        if texts is None:
            texts = source_texts(c.source, c.hf_config, c.split, c.text_field, c.seed)
        input_ids, texts_used = pack(texts, tokenizer, c.n_samples, c.seq_len)
    manifest = {
        "source": c.source, "split": c.split if c.source.startswith(HF_PREFIX) else None,
        "n_samples": c.n_samples, "seq_len": c.seq_len, "n_tokens": input_ids.numel(), "seed": c.seed,
        "texts_used": texts_used, "sampler": sampler, "sha256": tokens_digest(input_ids), "model": identity,
    }
    return input_ids, manifest
