"""Fidelity of a variant to the base model on held-out text: perplexity, KL divergence and top-1 agreement.

Definitions and conventions are llama.cpp's perplexity tool's (`llama-perplexity --kl-divergence`): the text is
tokenized as it does (BOS first when the vocabulary asks for one), cut into chunks of n_ctx tokens whose first
token is replaced by BOS, and only the second half of each chunk is scored (positions n_ctx/2 .. n_ctx-2, each
predicting the next token, so every scored token has at least n_ctx/2 tokens of context). At each scored position:
  - perplexity = exp(mean negative log-likelihood of the actual next token),
  - KLD = sum over the whole vocabulary of P_base(v) (log P_base(v) - log P_variant(v)); the mean over positions
    is `kld`, and llama.cpp's percentiles of the per-position values are reported too,
  - top-1 agreement (llama.cpp's "Same top p") = fraction of positions where both models' most likely token is
    the same; RMS dp = root mean square of P_variant(next token) - P_base(next token).

The full KL needs the base's whole distribution at every scored position (vocab x positions floats: 800 MB for
4096 tokens of a 49152-token vocabulary), which llama.cpp writes to a file. Here the variant stage runs the base
and the variant chunk by chunk in one pass instead (`compare(..., base_path=...)`), so only one chunk's
distributions are ever in memory, processed in blocks of rows.

The baseline_eval stage also stores a compact reference: the tokens, the base's NLL and argmax, and its top-64
log-probs per position (~1 MB). From it alone, `kld="top64-bound"` computes a cheaper KL over those 64 tokens
plus one bucket for all others, without running the base again. Merging outcomes can only lower a KL divergence,
so that is a lower bound (`kld_top64_bound`; 12-15% low on the embedded model's drops), never reported as `kld`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from ..atomic import atomic_path
from ..errors import DropquantError
from .llamacpp_lm import open_llama

log = logging.getLogger(__name__)

FIDELITY_CTX = 512  # llama.cpp perplexity's default
TOP_K = 64
KLD_MODES = ("full", "top64-bound")
ROW_BLOCK = 64  # rows of logits turned into float64 distributions at a time: bounds memory for large vocabularies
# llama-perplexity's "KL divergence statistics" (percent of positions below): name -> percentile
KLD_PERCENTILES = {"max": 100.0, "p99.9": 99.9, "p99": 99.0, "p95": 95.0, "p90": 90.0, "median": 50.0,
                   "p10": 10.0, "p5": 5.0, "p1": 1.0, "p0.1": 0.1, "min": 0.0}


def heldout_text(data_dir: Optional[Path]) -> tuple[str, str]:
    """WikiText-2 test (raw): from data_dir, else the hub, else a deterministic offline default."""
    if data_dir is not None:
        path = data_dir / "wikitext2" / "wiki.test.raw-lines.txt"
        if path.is_file():
            return path.read_text(encoding="utf-8"), str(path)
        log.warning("fidelity: %s not found; trying the Hugging Face hub", path)
    try:
        import datasets

        ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")
        return "\n".join(t for t in ds["text"] if t.strip()), "hf:Salesforce/wikitext/wikitext-2-raw-v1/test"
    except Exception as err:  # offline, or the hub is unreachable
        log.warning("fidelity: WikiText-2 is not available (%s); using the offline default text "
                    "(Python standard library docstrings) instead", type(err).__name__)
    return _offline_text(), "offline:python-stdlib-docstrings"


def _offline_text() -> str:
    """English prose that ships with every Python install, fixed for a Python version, never calibration text."""
    import importlib

    parts = []
    for name in ("argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
                 "email", "functools", "http.client", "inspect", "itertools", "json", "logging", "os", "pathlib",
                 "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess",
                 "tarfile", "threading", "typing", "unittest", "urllib.request", "zipfile"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for obj in [mod, *(getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_"))]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200 and doc not in parts:
                parts.append(doc.strip())
    return "\n\n".join(parts)


def tokenize(llama, text: str) -> tuple[list[int], int]:
    """The text's tokens and the BOS id to start each chunk with (-1: none), as llama-perplexity tokenizes:
    `common_tokenize(ctx, text, add_special=true, parse_special=false)`, so BOS leads the text when the
    vocabulary's add_bos flag is set, and a chunk's first token becomes BOS only then."""
    tokens = llama.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    add_bos = bool(llama._model.add_bos_token())
    return tokens, (llama.token_bos() if add_bos else -1)


def chunks(tokens: list[int], n_tokens: int, bos: int, n_ctx: int = FIDELITY_CTX) -> list[list[int]]:
    """The first n_tokens // n_ctx chunks of n_ctx tokens (llama-perplexity --chunks), each starting with BOS."""
    n_chunks = min(len(tokens), n_tokens) // n_ctx
    if n_chunks == 0:
        raise DropquantError(f"eval.fidelity_tokens={n_tokens}: need at least {n_ctx} tokens of held-out text "
                             f"(have {len(tokens)})")
    out = []
    for i in range(n_chunks):
        c = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if bos >= 0:
            c[0] = bos
        out.append(c)
    return out


def _scored(chunk: list[int]) -> tuple[int, int, np.ndarray]:
    """Positions whose logits are scored (second half, as llama.cpp) and the tokens they predict."""
    first, last = len(chunk) // 2, len(chunk) - 1
    return first, last, np.asarray(chunk[first + 1:last + 1])


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    m = rows.max(axis=-1, keepdims=True)
    return rows - (m + np.log(np.exp(rows - m).sum(axis=-1, keepdims=True)))


def _chunk_logits(llama, chunk: list[int]) -> np.ndarray:
    """Raw logits (float32) at the chunk's scored positions, evaluated from an empty cache."""
    llama.reset()
    llama.eval(chunk)
    first, last, _ = _scored(chunk)
    return np.array(llama.scores[first:last], dtype=np.float32)


def _blocks(n: int):
    for s in range(0, n, ROW_BLOCK):
        yield slice(s, min(s + ROW_BLOCK, n))


@dataclass
class Reference:
    """What the variant is compared against: the base's scored tokens and its top-k distributions."""

    chunks: np.ndarray     # int32 [n_chunks, n_ctx]
    nll: np.ndarray        # float32 [positions]: base negative log-likelihood of the actual next token
    top_ids: np.ndarray    # int32 [positions, k], most likely first
    top_logp: np.ndarray   # float32 [positions, k]
    top1: np.ndarray       # int32 [positions]: argmax (first index on ties, as the variant's)
    source: str = ""

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, chunks=self.chunks, nll=self.nll, top_ids=self.top_ids,
                                    top_logp=self.top_logp, top1=self.top1, source=np.array(self.source))

    @classmethod
    def load(cls, path: Path) -> "Reference":
        if not Path(path).is_file():
            raise DropquantError(f"fidelity reference not found: {path} (run the baseline_eval stage)")
        z = np.load(path)
        return cls(z["chunks"], z["nll"], z["top_ids"], z["top_logp"], z["top1"], str(z["source"]))

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll.astype(np.float64).mean()))


def build_reference(base_path: str | Path, text: str, n_tokens: int, threads: int = 2, *, source: str = "",
                    top_k: int = TOP_K, n_ctx: int = FIDELITY_CTX, keep_logits: Optional[list] = None,
                    gpu_layers: int = 0) -> Reference:
    """The compact reference of the base GGUF on the text's first n_tokens. `keep_logits`: a list that receives the
    raw logits of every chunk's scored positions, for `compare(cached_base=...)` to compare many variants with one
    base run (vocab x positions floats: ~400 MB for 4096 tokens of a 49152-token vocabulary)."""
    llama = open_llama(base_path, n_ctx, threads, gpu_layers=gpu_layers)
    tokens, bos = tokenize(llama, text)
    cs = chunks(tokens, n_tokens, bos, n_ctx)
    nll, ids, logps, top1 = [], [], [], []
    for c in tqdm(cs, desc="fidelity: base"):
        logits = _chunk_logits(llama, c)
        if keep_logits is not None:
            keep_logits.append(logits)
        _, _, target = _scored(c)
        top1.append(logits.argmax(axis=-1))
        for sl in _blocks(len(target)):
            lp = _log_softmax(logits[sl])
            nll.append(-lp[np.arange(len(lp)), target[sl]])
            top = np.argpartition(-lp, top_k - 1, axis=-1)[:, :top_k]
            top_lp = np.take_along_axis(lp, top, axis=-1)
            order = np.argsort(-top_lp, axis=-1, kind="stable")
            ids.append(np.take_along_axis(top, order, axis=-1))
            logps.append(np.take_along_axis(top_lp, order, axis=-1))
    return Reference(np.asarray(cs, dtype=np.int32), np.concatenate(nll).astype(np.float32),
                     np.concatenate(ids).astype(np.int32), np.concatenate(logps).astype(np.float32),
                     np.concatenate(top1).astype(np.int32), source)


def full_kl(base_logp: np.ndarray, var_logp: np.ndarray) -> np.ndarray:
    """Per-position KL(base || variant) over the whole vocabulary, from log-probabilities [positions, vocab]."""
    base_logp, var_logp = np.asarray(base_logp, np.float64), np.asarray(var_logp, np.float64)
    return (np.exp(base_logp) * (base_logp - var_logp)).sum(axis=-1)


def bucketed_kl(top_logp: np.ndarray, top_ids: np.ndarray, var_logp: np.ndarray) -> np.ndarray:
    """Per-position KL(base || variant) over the base's top-k tokens plus one 'all other tokens' bucket: a lower
    bound of the full KL (merging outcomes never increases a KL divergence)."""
    pb_log = top_logp.astype(np.float64)
    pv_log = np.take_along_axis(var_logp, top_ids.astype(np.int64), axis=-1)
    pb = np.exp(pb_log)
    kl = (pb * (pb_log - pv_log)).sum(axis=-1)
    rest_b = np.clip(1.0 - pb.sum(axis=-1), 0.0, 1.0)
    rest_v = np.clip(1.0 - np.exp(pv_log).sum(axis=-1), 1e-30, 1.0)
    tail = np.where(rest_b > 1e-12, rest_b * (np.log(np.maximum(rest_b, 1e-30)) - np.log(rest_v)), 0.0)
    return kl + tail


def kld_stats(kl: np.ndarray) -> dict:
    """llama-perplexity's KL divergence statistics: mean, its standard error, and percentiles (linear
    interpolation between sorted values, as llama.cpp's `percentile`; the median averages the middle two)."""
    kl = np.asarray(kl, np.float64)
    n = len(kl)
    stats = {"mean": float(kl.mean()),
             "stderr": float(np.sqrt(max(kl.var(), 0.0) / (n - 1))) if n > 10 else 0.0}
    stats.update({name: float(np.percentile(kl, q)) for name, q in KLD_PERCENTILES.items()})
    return stats


def summarize(*, nll: np.ndarray, base_nll: np.ndarray, agree: np.ndarray, kl: Optional[np.ndarray],
              kl_bound: np.ndarray, mode: str, n_ctx: int, source: str) -> dict:
    """The fidelity figures from per-position values (float64 means, as llama.cpp's sums)."""
    nll, base_nll = np.asarray(nll, np.float64), np.asarray(base_nll, np.float64)
    dp = np.exp(-nll) - np.exp(-base_nll)  # llama.cpp's Δp: P_variant(next token) - P_base(next token)
    full = kld_stats(kl) if kl is not None else None
    return {
        "ppl": float(np.exp(nll.mean())),
        "base_ppl": float(np.exp(base_nll.mean())),
        "ln_ppl_ratio": float(nll.mean() - base_nll.mean()),
        "kld": full["mean"] if full else None,
        "kld_mode": mode,
        "kld_median": full["median"] if full else None,
        "kld_p99": full["p99"] if full else None,
        "kld_stats": full,
        "kld_top64_bound": float(np.mean(kl_bound)),
        "top1_agree": float(np.mean(agree)),
        "same_top_p": float(np.mean(agree)),  # llama.cpp's name for the same figure
        "mean_dp": float(dp.mean()),
        "rms_dp": float(np.sqrt((dp * dp).mean())),
        "fidelity_tokens": int(len(nll)),
        "fidelity_ctx": int(n_ctx),
        "fidelity_text": source,
    }


def compare(variant_path: str | Path, ref: Reference, threads: int = 2, *, base_path: str | Path | None = None,
            kld: str = "full", cached_base: Optional[list[np.ndarray]] = None, gpu_layers: int = 0) -> dict:
    """Perplexity of the variant, KL divergence from the base and top-1 agreement, on the reference's tokens.

    kld="full": the base GGUF (`base_path`, the file the reference was made from) and the variant are evaluated
    chunk by chunk in one pass and the KL is taken over the whole vocabulary (llama-perplexity --kl-divergence).
    kld="top64-bound": the base is not run; only the reference's top-64 bound is computed (`kld` is null).
    cached_base: the base's logits kept by `build_reference`, used instead of running base_path again.
    gpu_layers: llama.cpp's n_gpu_layers for both models (-1: every layer)."""
    if kld not in KLD_MODES:
        raise DropquantError(f"eval.kld={kld!r}: expected one of {', '.join(KLD_MODES)}")
    if kld == "full" and base_path is None and cached_base is None:
        raise DropquantError("the full KL divergence needs the base GGUF (base_path)")
    n_ctx = ref.chunks.shape[1]
    llama = open_llama(variant_path, n_ctx, threads, gpu_layers=gpu_layers)
    full = kld == "full"
    base = open_llama(base_path, n_ctx, threads, gpu_layers=gpu_layers) if full and cached_base is None else None
    n_vocab = llama.n_vocab()
    base_vocab = base.n_vocab() if base is not None else (cached_base[0].shape[-1] if full else n_vocab)
    if n_vocab <= int(ref.top_ids.max()) or base_vocab != n_vocab:
        raise DropquantError(f"{variant_path}: vocabulary of {n_vocab} tokens does not match the base model's")
    nll, base_nll, kl, kl_bound, agree = [], [], [], [], []
    pos = 0
    for k, c in enumerate(tqdm(ref.chunks.tolist(), desc="fidelity: base + variant" if base is not None
                               else "fidelity: variant")):
        _, _, target = _scored(c)
        v_logits = _chunk_logits(llama, c)
        b_logits = None if not full else cached_base[k] if cached_base is not None else _chunk_logits(base, c)
        ref_sl = slice(pos, pos + len(target))
        pos += len(target)
        top1_b = b_logits.argmax(axis=-1) if full else ref.top1[ref_sl]
        agree.append(v_logits.argmax(axis=-1) == top1_b)
        for sl in _blocks(len(target)):
            rows = np.arange(sl.stop - sl.start)
            lv = _log_softmax(v_logits[sl])
            nll.append(-lv[rows, target[sl]])
            r = slice(ref_sl.start + sl.start, ref_sl.start + sl.stop)
            kl_bound.append(bucketed_kl(ref.top_logp[r], ref.top_ids[r], lv))
            if full:
                lb = _log_softmax(b_logits[sl])
                base_nll.append(-lb[rows, target[sl]])
                kl.append(full_kl(lb, lv))
    nll = np.concatenate(nll)
    if full:
        base_nll = np.concatenate(base_nll)
        drift = float(np.abs(base_nll - ref.nll).max())
        if drift > 1e-2:
            log.warning("fidelity: the base GGUF's log-likelihoods differ from the reference's by up to %.3g nats: "
                        "was the reference made from another file?", drift)
    else:
        base_nll = ref.nll
    return summarize(nll=nll, base_nll=base_nll, agree=np.concatenate(agree),
                     kl=np.concatenate(kl) if kl else None, kl_bound=np.concatenate(kl_bound), mode=kld,
                     n_ctx=n_ctx, source=ref.source)
