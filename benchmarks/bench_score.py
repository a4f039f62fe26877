"""Scoring overhead: the hooked scoring pass against a plain forward pass over the same tokens, and its peak memory.

Both passes run in this one process, interleaved, so machine noise hits them alike; the ratio is what counts."""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from pathlib import Path

import torch

TIME_TARGET = 1.15
RSS_TARGET = 1.25


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed load-time buffers back so they don't count
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def main(n_samples: int = 8, seq_len: int = 512, batch_size: int = 2, rounds: int = 3) -> dict:
    from dropquant.model.loading import load_model, resolve_source
    from dropquant.prune.scoring import score_model

    model = load_model(resolve_source("embedded"))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = torch.randint(0, model.config.vocab_size, (n_samples, seq_len), generator=torch.Generator().manual_seed(0))

    @torch.inference_mode()
    def plain():
        for batch in tokens.split(batch_size):
            model.model(input_ids=batch, use_cache=False)

    def scored():
        score_model(model, tokens, batch_size, progress=False)

    _reset_peak_rss()
    rss_with_model = _status_kib("VmRSS") * 1024
    scored()  # warm-up, and the peak-memory measurement
    peak = _status_kib("VmHWM") * 1024
    plain()
    times = {"plain": [], "score": []}
    for _ in range(rounds):
        for name, fn in (("plain", plain), ("score", scored)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    t_plain, t_score = statistics.median(times["plain"]), statistics.median(times["score"])
    time_ratio = t_score / t_plain
    # What scoring adds on top of the loaded model, counted against the model: the interpreter, the libraries
    # and the loader's own leftovers are the same with or without scoring and are left out.
    rss_ratio = (model_bytes + peak - rss_with_model) / model_bytes
    print(f"score bench: {tokens.numel()} tokens, batch {batch_size}, median of {rounds} interleaved rounds")
    print(f"  plain forward {t_plain:.2f} s, scoring pass {t_score:.2f} s -> ratio {time_ratio:.3f} "
          f"(target <= {TIME_TARGET}) {'OK' if time_ratio <= TIME_TARGET else 'MISSED'}")
    print(f"  model {model_bytes / 2**20:.0f} MiB, peak RSS during scoring {(peak - rss_with_model) / 2**20:.0f} MiB "
          f"above the loaded model -> (model + that) / model = {rss_ratio:.3f} "
          f"(target <= {RSS_TARGET}) {'OK' if rss_ratio <= RSS_TARGET else 'MISSED'}")
    return {"time_ratio": time_ratio, "rss_ratio": rss_ratio}


if __name__ == "__main__":
    main()
