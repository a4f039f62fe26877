"""Speed and memory in llama.cpp (flash attention on), variant against base, measured in interleaved A/B rounds.

Each measurement runs in a fresh subprocess (`python -m dropquant.evaluation.speed MODEL`) so that peak RSS
belongs to one model and no warm state leaks between models. Rounds alternate the order (AB, BA, AB, ...)
so slow drift of the machine (thermal, other load) hits both models alike; absolute numbers are medians over
rounds and each ratio is the median of the per-round ratios, paired measurements being what survives noise.

What one subprocess measures, as llama-bench does (random tokens, no sampling, one warm-up):
  pp512, pp2048  prompt processing tok/s of a 512- and a 2048-token prompt (empty cache)
  tg0, tg2048    generation tok/s, one token per decode, after 0 and after 2048 tokens of context
  kv_cache_bytes the KV cache llama.cpp allocates at 4096 tokens of context (from its own log line)
  peak_rss_bytes the process's peak resident memory (model mapped in, cache and compute buffers)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..errors import DropquantError
from ..quantization import kv_cache_mib_from_log

log = logging.getLogger(__name__)

SPEED_CTX = 4096
TG_TOKENS = 32
METRICS = ("pp512", "pp2048", "tg0", "tg2048")


def _measure(model_path: str, threads: int, tg_tokens: int) -> dict:
    import random

    from llama_cpp import Llama

    llama = Llama(model_path=model_path, n_ctx=SPEED_CTX, n_batch=512, n_ubatch=512, logits_all=False,
                  flash_attn=True, n_threads=threads, n_threads_batch=threads, verbose=True, seed=0)
    rng = random.Random(0)
    vocab = llama.n_vocab()
    prompt = [rng.randrange(vocab) for _ in range(2048)]
    gen = [rng.randrange(vocab) for _ in range(tg_tokens)]

    def pp(n: int) -> float:
        llama.reset()
        t = time.perf_counter()
        llama.eval(prompt[:n])
        return n / (time.perf_counter() - t)

    def tg() -> float:
        t = time.perf_counter()
        for tok in gen:
            llama.eval([tok])
        return len(gen) / (time.perf_counter() - t)

    pp(64)  # warm-up: first-call allocations and page faults of the mapped weights
    out = {"pp512": pp(512)}
    llama.reset()
    llama.eval(prompt[:1])
    out["tg0"] = tg()
    out["pp2048"] = pp(2048)
    out["tg2048"] = tg()
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def peak_rss_bytes() -> int:
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux carries that over exec from the forking
    parent, so a child of a large process would report the parent's size. VmHWM starts anew at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_once(model_path: str | Path, threads: int = 2, tg_tokens: int = TG_TOKENS, timeout: int = 600) -> dict:
    """One fresh-process measurement of one model."""
    cmd = [sys.executable, "-m", "dropquant.evaluation.speed", str(model_path), "--threads", str(threads),
           "--tg-tokens", str(tg_tokens)]
    root = str(Path(__file__).resolve().parents[2])  # so the child imports this same dropquant
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise DropquantError(f"speed measurement of {model_path} failed (exit {proc.returncode}): {tail}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    kv = kv_cache_mib_from_log(proc.stderr)
    result["kv_cache_bytes"] = int(round(kv * 2**20)) if kv is not None else None
    return result


def ab_compare(variant: str | Path, base: str | Path, rounds: int = 3, threads: int = 2,
               tg_tokens: int = TG_TOKENS) -> dict:
    """Interleaved A/B rounds; medians per model and medians of the per-round variant/base ratios."""
    if rounds < 1:
        raise DropquantError(f"eval.speed_rounds must be >= 1 (got {rounds})")
    runs = {"variant": [], "base": []}
    for r in range(rounds):
        order = ("variant", "base") if r % 2 == 0 else ("base", "variant")
        for who in order:
            path = variant if who == "variant" else base
            log.info("speed round %d/%d: %s (%s)", r + 1, rounds, who, path)
            runs[who].append(measure_once(path, threads, tg_tokens))
    out: dict = {"rounds": rounds, "threads": threads, "n_ctx": SPEED_CTX, "flash_attn": True, "runs": runs}
    for who in runs:
        out[who] = {m: statistics.median(x[m] for x in runs[who]) for m in METRICS}
        out[who]["peak_rss_bytes"] = max(x["peak_rss_bytes"] for x in runs[who])
        kv = [x["kv_cache_bytes"] for x in runs[who] if x["kv_cache_bytes"] is not None]
        out[who]["kv_cache_bytes"] = kv[0] if kv else None
        out[who]["file_bytes"] = os.path.getsize(variant if who == "variant" else base)
    out["speedup"] = {m: statistics.median(v[m] / b[m] for v, b in zip(runs["variant"], runs["base"]))
                      for m in METRICS}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="measure one GGUF's llama.cpp speed; prints one JSON line")
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tg-tokens", type=int, default=TG_TOKENS)
    args = parser.parse_args(argv)
    result = _measure(args.model, args.threads, args.tg_tokens)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
