"""How much of the drop's KL a heal took back, measured on the held-out calibration samples.

The unhealed (pruned) checkpoint and the healed one are both scored against the unpruned model on the same
tokens, the `heal.holdout` calibration samples no fit or distillation step saw, with the distillation's own
measure (KL over the teacher's top-k tokens plus one bucket for the rest, in float32 before any
quantization). Both figures share that scale, so their ratio is the share recovered; the evaluate stage
reports it beside the healed GGUF's own KL. Cost: one pass of the base and of each checkpoint over those
samples (seconds on the embedded model).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch


def recovered_share(unhealed: float, healed: float) -> float | None:
    """1 - healed/unhealed: 1 = all of the drop's KL taken back, 0 = none, negative = the heal made it worse."""
    return None if unhealed <= 0 else 1.0 - healed / unhealed


def heldout_recovery(open_base: Callable, pruned_dir: Path, healed_dir: Path, holdout: torch.Tensor, topk: int,
                     device: str = "cpu", batch_size: int = 2) -> dict:
    """KL of the unhealed and of the healed checkpoint from the base on `holdout`, and the share recovered."""
    from dropquant.heal.distill import heldout_kl, teacher_targets
    from dropquant.prune.pruned_checkpoint import load_pruned

    targets = teacher_targets(open_base(), holdout, topk, batch_size=batch_size, progress=False)
    kl = {}
    # One checkpoint in memory at a time: a large model's two copies may not fit together.
    for name, directory in (("unhealed", pruned_dir), ("healed", healed_dir)):
        model = load_pruned(directory, torch.float32, device)
        kl[name] = heldout_kl(model, targets, device)
        del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the next checkpoint gets the memory this one held
    return {"tokens": int(holdout.numel()), "samples": int(holdout.shape[0]), "measure": f"top-{topk} bucketed KL",
            "unhealed": round(kl["unhealed"], 6), "healed": round(kl["healed"], 6),
            "recovered": recovered_share(kl["unhealed"], kl["healed"])}
