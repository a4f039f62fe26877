"""Heal cost: the linear stand-in fit, the teacher pass and distillation steps against the scoring pass on the
same tokens, each with its peak memory above the loaded model.

All phases run in this one process, interleaved round by round, so machine noise hits them alike; each ratio
is the median of the per-round ratios, with their min-max spread, flagged when the spread is wide."""
from __future__ import annotations

import copy
import statistics
import time

import torch

from benchmarks.bench_score import _reset_peak_rss, _status_kib

ATTN_8 = [5, 6, 7, 9, 25, 26, 28, 29]  # the embedded model's attention-8 plan (docs/heal.md)
NOISY = 0.25  # (max - min) / median of the per-round ratios above this: interference could have made it


def _summary(ratios: list[float]) -> tuple[float, float, str]:
    """(median, relative spread, the flag to print) of per-round ratios."""
    med = statistics.median(ratios)
    spread = (max(ratios) - min(ratios)) / med
    return med, spread, "  NOISY: interference could have made this" if spread > NOISY else ""


def main(n_samples: int = 8, seq_len: int = 512, batch_size: int = 2, distill_steps: int = 5, rounds: int = 3) -> dict:
    from dropquant.heal.distill import bf16_supported, distill, teacher_targets
    from dropquant.heal.linear import fit_linear
    from dropquant.model.layerwise import InMemoryStack
    from dropquant.model.loading import load_model, resolve_source
    from dropquant.prune.surgery import prune_model
    from dropquant.prune.scoring import score_model
    from dropquant.prune.selection import DropPlan

    model = load_model(resolve_source("embedded"))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = torch.randint(0, model.config.vocab_size, (n_samples, seq_len), generator=torch.Generator().manual_seed(0))
    plan = DropPlan(method="attn", n=len(ATTN_8), selection="importance", attn=ATTN_8,
                    num_layers=model.config.num_hidden_layers)
    pruned = prune_model(copy.deepcopy(model), plan)
    targets = teacher_targets(InMemoryStack(model), tokens, 64, batch_size=batch_size, progress=False)

    def distill_steps_run(precision="float32"):
        # Steps only: the held-out evaluations (every eval_every steps) are left out by an eval_every past the end.
        distill(copy.deepcopy(pruned), targets.select(slice(1, None)), targets.select(slice(0, 1)), what="lora",
                lora_rank=16, steps=distill_steps, lr=5e-4, batch_size=1, hidden_weight=0.0,
                eval_every=distill_steps + 1, patience=3, seed=0, precision=precision, progress=False)

    phases = {
        "score": lambda: score_model(model, tokens, batch_size, progress=False),
        "linear fit": lambda: fit_linear(InMemoryStack(model), plan, tokens, ridge=1e-3, fit_on="base",
                                         batch_size=batch_size, progress=False),
        "teacher top-k": lambda: teacher_targets(InMemoryStack(model), tokens, 64, batch_size=batch_size,
                                                 progress=False),
        f"distill {distill_steps} steps": distill_steps_run,
    }
    bf16 = f"distill {distill_steps} bf16"
    if bf16_supported("cpu"):
        phases[bf16] = lambda: distill_steps_run("bfloat16")
    times = {name: [] for name in phases}
    peaks = {}
    for name, fn in phases.items():  # warm-up, and each phase's peak memory above the loaded models
        _reset_peak_rss()
        before = _status_kib("VmRSS") * 1024
        fn()
        peaks[name] = _status_kib("VmHWM") * 1024 - before
    for _ in range(rounds):
        for name, fn in phases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    print(f"heal bench: {tokens.numel()} tokens, batch {batch_size}, attention-8 plan {ATTN_8}, {rounds} interleaved "
          f"rounds; ratios to the scoring pass: median of the per-round ratios [min-max]")
    out = {}
    for name in phases:
        ratios = [t / s for t, s in zip(times[name], times["score"])]
        med, spread, flag = _summary(ratios)
        print(f"  {name:<18} {statistics.median(times[name]):7.2f} s  ×{med:6.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
              f"  peak +{peaks[name] / 2**20:5.0f} MiB ({(model_bytes + peaks[name]) / model_bytes:.2f}× the model)"
              f"{flag}")
        out[name] = {"seconds": statistics.median(times[name]), "ratio": med, "spread": spread,
                     "peak_bytes": peaks[name]}
    f32 = f"distill {distill_steps} steps"
    per_step = out[f32]["seconds"] / distill_steps
    print(f"  one distillation step (1 × {seq_len} tokens, LoRA r16): {per_step:.2f} s")
    if bf16 in out:  # heal.precision=bfloat16 against float32, per round, side by side
        ratios = [a / b for a, b in zip(times[f32], times[bf16])]
        med, _, flag = _summary(ratios)
        print(f"  bfloat16 training forward: ×{med:.2f} [{min(ratios):.2f}-{max(ratios):.2f}] faster per step than "
              f"float32{flag}")
        out["bf16_speedup"] = {"ratio": med, "min": min(ratios), "max": max(ratios)}
    return out


if __name__ == "__main__":
    main()
