"""Fidelity of a variant to the base model on held-out text: perplexity, KL divergence and top-1 agreement.

Definitions follow llama.cpp's perplexity tool (`--kl-divergence`): the text is cut into chunks of n_ctx
tokens, each chunk starts with BOS, and only the second half of each chunk is scored (every scored token
then has at least n_ctx/2 tokens of context). At each scored position:
  - perplexity = exp(mean negative log-likelihood of the actual next token),
  - KLD = sum_v P_base(v) (log P_base(v) - log P_variant(v)), averaged over positions,
  - top-1 agreement = fraction of positions where both models' most likely token is the same.

The base's distributions are computed once (baseline_eval stage) and stored compactly: storing them whole
would take vocab x positions floats (49152 x 4080 x 4 B = 800 MB for 8192 tokens). We keep, per position,
the base's top-k log-probs and their token ids (k=64 by default: 2 MB). KL is computed over the k tokens
plus one bucket for all other tokens; merging outcomes can only lower a KL divergence, so this is a lower
bound that is exact when the tail is empty, and 0 exactly for identical models. The bound's gap is measured
in tests/test_evaluation.py and docs/evaluate.md.
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


def chunks(tokens: list[int], n_tokens: int, bos: int, n_ctx: int = FIDELITY_CTX) -> list[list[int]]:
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


def _chunk_logprobs(llama, chunk: list[int]) -> np.ndarray:
    llama.reset()
    llama.eval(chunk)
    first, last, _ = _scored(chunk)
    return _log_softmax(llama.scores[first:last])


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
                    top_k: int = TOP_K, n_ctx: int = FIDELITY_CTX) -> Reference:
    llama = open_llama(base_path, n_ctx, threads)
    tokens = llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    cs = chunks(tokens, n_tokens, llama.token_bos(), n_ctx)
    nll, ids, logps, top1 = [], [], [], []
    for c in tqdm(cs, desc="fidelity: base"):
        lp = _chunk_logprobs(llama, c)
        _, _, target = _scored(c)
        nll.append(-lp[np.arange(len(target)), target])
        top1.append(lp.argmax(axis=-1))
        top = np.argpartition(-lp, top_k - 1, axis=-1)[:, :top_k]
        top_lp = np.take_along_axis(lp, top, axis=-1)
        order = np.argsort(-top_lp, axis=-1, kind="stable")
        ids.append(np.take_along_axis(top, order, axis=-1))
        logps.append(np.take_along_axis(top_lp, order, axis=-1))
    return Reference(np.asarray(cs, dtype=np.int32), np.concatenate(nll).astype(np.float32),
                     np.concatenate(ids).astype(np.int32), np.concatenate(logps).astype(np.float32),
                     np.concatenate(top1).astype(np.int32), source)


def bucketed_kl(top_logp: np.ndarray, top_ids: np.ndarray, var_logp: np.ndarray) -> np.ndarray:
    """Per-position KL(base || variant) over the base's top-k tokens plus one 'all other tokens' bucket."""
    pb_log = top_logp.astype(np.float64)
    pv_log = np.take_along_axis(var_logp, top_ids.astype(np.int64), axis=-1)
    pb = np.exp(pb_log)
    kl = (pb * (pb_log - pv_log)).sum(axis=-1)
    rest_b = np.clip(1.0 - pb.sum(axis=-1), 0.0, 1.0)
    rest_v = np.clip(1.0 - np.exp(pv_log).sum(axis=-1), 1e-30, 1.0)
    tail = np.where(rest_b > 1e-12, rest_b * (np.log(np.maximum(rest_b, 1e-30)) - np.log(rest_v)), 0.0)
    return kl + tail


def compare(variant_path: str | Path, ref: Reference, threads: int = 2) -> dict:
    """Perplexity of the variant, KL divergence from the base and top-1 agreement, on the reference's tokens."""
    n_ctx = ref.chunks.shape[1]
    llama = open_llama(variant_path, n_ctx, threads)
    if llama.n_vocab() <= int(ref.top_ids.max()):
        raise DropquantError(f"{variant_path}: vocabulary of {llama.n_vocab()} tokens does not match the base model's")
    nll, kl, agree = [], [], []
    pos = 0
    for c in tqdm(ref.chunks.tolist(), desc="fidelity: variant"):
        lp = _chunk_logprobs(llama, c)
        _, _, target = _scored(c)
        sl = slice(pos, pos + len(target))
        pos += len(target)
        nll.append(-lp[np.arange(len(target)), target])
        kl.append(bucketed_kl(ref.top_logp[sl], ref.top_ids[sl], lp))
        agree.append(lp.argmax(axis=-1) == ref.top1[sl])
    nll, kl, agree = np.concatenate(nll), np.concatenate(kl), np.concatenate(agree)
    return {
        "ppl": float(np.exp(nll.mean())),
        "base_ppl": ref.ppl,
        "kld": float(kl.mean()),
        "kld_p99": float(np.percentile(kl, 99)),
        "top1_agree": float(agree.mean()),
        "fidelity_tokens": int(len(nll)),
        "fidelity_text": ref.source,
    }
