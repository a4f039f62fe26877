"""Heal a pruned model: linear stand-ins for what the drop removed, fitted in closed form, no training.

A dropped attention `X + Attn(LN(X))` becomes `X + W·LN(X)` (the layer's own input_layernorm, W hidden x
hidden): llama.cpp's `deci` "linear attention", which keeps no KV cache. A dropped block becomes the same
linear layer with no MLP. W is fitted by ridge least squares, layer by layer in model order, through the
one layer-wise runner with two residual streams side by side: the unpruned model's (the target) and the
healed model's (the inputs W sees, `fit_on: healed`), so each stand-in also absorbs the drift the layers
before it left; `fit_on: base` fits on the unpruned model's own activations instead (the simpler baseline).

The target of a stand-in is the unpruned model's residual stream after the part it replaces: after the
attention for an attention drop (the layer's MLP then runs on the healed stream), after the whole block
for a block drop. A dropped MLP has no stand-in (llama.cpp's FFN is gated, so no linear form is exact).

The healed checkpoint has the pruned checkpoint's format: its record gains `linear_attn` (the kept-layer
indices of stand-ins; dropped blocks come back as layers with attention and MLP dropped and a stand-in)
and `heal_id` (`dropquant.heal.apply` writes the heal record that names it).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from dropquant.errors import DropquantError
from dropquant.model.checkpoint import Checkpoint
from dropquant.model.layerwise import LayerPass, layer_output, walk_layers
from dropquant.model.loading import build_skeleton
from dropquant.prune.pruned_checkpoint import _write_pruned, config_from_checkpoint, read_record, side_files
from dropquant.prune.surgery import apply_layout, attention_half, mlp_half

log = logging.getLogger(__name__)

HEAL_ID = "heal_id"  # the pruning-record key naming the heal a checkpoint came from
STANDIN_KEY = "linear_attn.weight"


# --- which layers get a stand-in, and the healed layout ------------------------------------------------------

def standin_layers(plan) -> list[int]:
    """Original indices of the layers whose attention the plan drops (alone, with the MLP, or as a block)."""
    return sorted(set(plan.attn) | set(plan.blocks))


def healed_record(plan, pruned_record: dict, linear: list[int]) -> dict:
    """The pruning record of the healed layout: the plan's drops, with a stand-in at each of `linear`
    (original indices); a layer that lost both halves is kept when it has a stand-in."""
    attn_gone = set(plan.attn) | set(plan.blocks)
    mlp_gone = set(plan.mlp) | set(plan.blocks)
    linear = set(linear)
    kept = [i for i in range(plan.num_layers) if not (i in attn_gone and i in mlp_gone) or i in linear]
    return {
        **pruned_record,
        "kept_layers": kept,
        "dropped_attn": [k for k, i in enumerate(kept) if i in attn_gone],
        "dropped_mlp": [k for k, i in enumerate(kept) if i in mlp_gone],
        "linear_attn": [k for k, i in enumerate(kept) if i in linear],
    }


# --- the closed-form fit -------------------------------------------------------------------------------------

@dataclass
class LinearFit:
    """Fitted stand-ins by original layer index: W [hidden, hidden] and the layer's input norm."""

    weights: dict[int, torch.Tensor] = field(default_factory=dict)
    norms: dict[int, torch.Tensor] = field(default_factory=dict)
    explained: dict[int, float] = field(default_factory=dict)  # share of the target's energy W reproduces
    tokens: int = 0
    seconds: float = 0.0


class _Normal:
    """The normal equations of Y ≈ Z Wᵀ, accumulated batch by batch (float64 sums of float32 products)."""

    def __init__(self, hidden: int, device, n_out: Optional[int] = None):
        self.ztz = torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
        self.zty = torch.zeros(hidden, n_out or hidden, dtype=torch.float64, device=device)
        self.yty = 0.0

    def add(self, z: torch.Tensor, y: torch.Tensor) -> None:
        z = z.reshape(-1, z.shape[-1]).float()
        y = y.reshape(-1, y.shape[-1]).float()
        self.ztz += (z.T @ z).double()
        self.zty += (z.T @ y).double()
        self.yty += float((y.double() ** 2).sum())

    def solve(self, ridge: float, layer: int) -> tuple[torch.Tensor, float]:
        h = self.ztz.shape[0]
        lam = ridge * float(torch.trace(self.ztz)) / h
        a = self.ztz + lam * torch.eye(h, dtype=self.ztz.dtype, device=self.ztz.device)
        try:
            wt = torch.linalg.solve(a, self.zty)  # [in, out]
        except RuntimeError:  # torch raises a LinAlgError (a RuntimeError) on a singular system
            raise DropquantError(f"layer {layer}: the stand-in's least-squares system is singular "
                                 "(too few calibration tokens for the hidden size?); set heal.ridge > 0") from None
        residual = self.yty - 2 * float((wt * self.zty).sum()) + float((wt * (self.ztz @ wt)).sum())
        return wt.T.contiguous(), 1.0 - residual / self.yty if self.yty > 0 else 1.0


@torch.inference_mode()
def fit_linear(stack, plan, input_ids: torch.Tensor, *, ridge: float, fit_on: str = "healed", batch_size: int = 2,
               progress: bool = True, scratch: Optional[Path] = None) -> LinearFit:
    """Fit a stand-in for every layer of `standin_layers(plan)` on `input_ids`, `stack` being the unpruned model."""
    if plan.num_layers != len(stack.layers):
        raise DropquantError(f"the drop plan is for a {plan.num_layers}-layer model, the model has "
                             f"{len(stack.layers)} layers")
    attn_gone = set(plan.attn) | set(plan.blocks)
    mlp_gone = set(plan.mlp) | set(plan.blocks)
    fit = LinearFit()
    start = time.perf_counter()

    def healed_rest(layer, i, mid: torch.Tensor) -> torch.Tensor:
        return mid if i in mlp_gone else mlp_half(layer, mid)

    # Fitted on the base's own activations, no stand-in ever sees the healed stream: it is not computed.
    healed = fit_on == "healed"

    def visit(i: int, layer, lp: LayerPass) -> None:
        if i not in attn_gone:  # the healed layer is the base layer, its MLP possibly dropped
            for sl, kw in lp.batches():
                lp.write("base", sl, layer_output(layer, lp.read("base", sl), kw))
                if healed:
                    xh = lp.read("healed", sl)
                    lp.write("healed", sl, healed_rest(layer, i, attention_half(layer, xh, **kw)))
            return
        normal = _Normal(int(stack.config.hidden_size), lp.device)
        norm = layer.input_layernorm
        for sl, kw in lp.batches():
            xb = lp.read("base", sl)
            mid = attention_half(layer, xb, **kw)
            yb = mlp_half(layer, mid)
            x = lp.read("healed", sl) if healed else xb
            normal.add(norm(x), (yb if i in mlp_gone else mid) - x)
            lp.write("base", sl, yb)
        w, explained = normal.solve(ridge, i)
        fit.weights[i] = w.to("cpu", torch.float32)
        fit.explained[i] = explained
        # The drop removed the layer's input_layernorm with its attention; the stand-in brings it back.
        fit.norms[i] = norm.weight.detach().to("cpu", torch.float32).clone()
        w = w.to(norm.weight.dtype)
        if healed:
            for sl, kw in lp.batches():
                xh = lp.read("healed", sl)
                lp.write("healed", sl, healed_rest(layer, i, xh + norm(xh) @ w.T))
        log.info("layer %d: stand-in explains %.1f%% of the %s it replaces", i, 100 * explained,
                 "block" if i in mlp_gone else "attention")

    fit.tokens = walk_layers(stack, input_ids, visit, ("base", "healed") if healed else ("base",), batch_size,
                             progress, "fitting stand-ins", scratch)
    fit.seconds = time.perf_counter() - start
    return fit


# --- writing the healed checkpoint ---------------------------------------------------------------------------

# The projection a merged map folds into, by the host's half: its output is H, so H·T is this weight's Tᵀ·W.
FOLD_INTO = {"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}


def write_healed(pruned_dir: Path, out_dir: Path, plan, heal_id: str, fit: Optional[LinearFit] = None,
                 folded: Optional[dict[tuple[int, str], tuple[str, torch.Tensor]]] = None) -> dict:
    """The pruned checkpoint plus the fitted stand-ins `fit`, with the merged fits `folded` ((original layer,
    "attn" | "mlp") → (form, X), dropquant.heal.merged) written into their host's output projection; tensor by
    tensor (no model is loaded)."""
    from transformers import GenerationConfig

    fit = fit or LinearFit()
    folded = folded or {}
    config = config_from_checkpoint(pruned_dir)
    pruned_record = read_record(config)
    record = {**healed_record(plan, pruned_record, sorted(fit.weights)), HEAL_ID: heal_id}
    dtype = getattr(config, "dtype", None) or Checkpoint(pruned_dir).floating_dtype()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    config.num_hidden_layers = len(record["kept_layers"])
    skeleton = build_skeleton(config, dtype)
    apply_layout(skeleton, record)

    pruned = Checkpoint(pruned_dir)
    in_pruned = {orig: k for k, orig in enumerate(pruned_record["kept_layers"])}
    extra = {}
    for k, orig in enumerate(record["kept_layers"]):
        if orig in fit.weights:
            extra[f"model.layers.{k}.{STANDIN_KEY}"] = fit.weights[orig]
        if orig in fit.norms:
            extra[f"model.layers.{k}.input_layernorm.weight"] = fit.norms[orig]
    state = skeleton.state_dict()

    def load(name: str):
        if name in extra:
            return extra[name].to(state[name].dtype)
        parts = name.split(".")
        if name.startswith("model.layers."):
            orig = record["kept_layers"][int(parts[2])]
            parts[2] = str(in_pruned[orig])
            tensor = pruned.get(".".join(parts))
            for (host, half), (form, x) in folded.items():
                if host == orig and len(parts) == 6 and ".".join(parts[3:5]) == FOLD_INTO[half]:
                    if form == "projection":  # the refitted projection z·X (+ the bias as it was)
                        return tensor if parts[5] == "bias" else x.T.to(tensor.dtype).contiguous()
                    # out·T with out = z·Wᵀ + b: the weight becomes Tᵀ·W and the bias Tᵀ·b.
                    return (x.double().T @ tensor.double()).to(tensor.dtype)
            return tensor
        return pruned.get(".".join(parts))

    try:
        generation = GenerationConfig.from_pretrained(str(pruned_dir))
    except OSError:
        generation = None
    return _write_pruned(skeleton, out_dir, load, generation, None, side_files(pruned_dir))


def standin_parameters(fit: LinearFit) -> int:
    return sum(w.numel() for w in fit.weights.values()) + sum(n.numel() for n in fit.norms.values())


