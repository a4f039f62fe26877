"""The cheap fidelity estimate of a drop: KL divergence of the pruned torch model from the unpruned one on held-out
tokens, through the layer-wise runner, without exporting anything.

Many drops are estimated in one pass: every drop is its own residual stream beside the unpruned one, each layer
is read once (or streamed from disk once) and applied to every stream with the halves that drop keeps. Only the
scored positions of llama-perplexity's convention (the second half of every chunk) enter the KL, as in the
measured figure the estimate stands for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dropquant.model.layerwise import LayerPass, layer_output, walk_layers
from dropquant.prune.surgery import attention_half, mlp_half


@dataclass(frozen=True)
class Drop:
    """What one stream leaves out: attention and MLP halves, and whole blocks, by layer."""
    attn: frozenset = frozenset()
    mlp: frozenset = frozenset()
    blocks: frozenset = frozenset()

    @classmethod
    def of(cls, plan) -> "Drop":
        return cls(frozenset(plan.attn), frozenset(plan.mlp), frozenset(plan.blocks))

    def apply(self, i: int, layer, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if i in self.blocks:
            return x
        h = x if i in self.attn else attention_half(layer, x, **kwargs)
        return h if i in self.mlp else mlp_half(layer, h)


def _scored(n_ctx: int) -> slice:
    return slice(n_ctx // 2, n_ctx - 1)


@torch.inference_mode()
def estimate_kl(stack, chunks: torch.Tensor, drops: dict[str, Optional[Drop]], base: Optional[torch.Tensor] = None,
                batch_size: int = 1, progress: bool = True) -> tuple[dict[str, float], torch.Tensor]:
    """Mean KL(unpruned || dropped) per named drop (None: the stack as it is, e.g. a healed model), and the
    unpruned model's log-probabilities at the scored positions, [chunks, positions, vocab] (computed here when
    `base` is None, `stack` then being the unpruned model)."""
    names = list(drops)
    streams = (*(["base"] if base is None else []), *names)
    last = len(stack.layers) - 1
    head = stack.head()
    sc = _scored(chunks.shape[1])
    sums = {name: 0.0 for name in names}
    count = 0
    base_logp = [None] * chunks.shape[0] if base is None else None

    def visit(i: int, layer, lp: LayerPass) -> None:
        nonlocal count
        for sl, kw in lp.batches():
            outs = {}
            if base is None:
                outs["base"] = layer_output(layer, lp.read("base", sl), kw)
            for name in names:
                x = lp.read(name, sl)
                drop = drops[name]
                outs[name] = layer_output(layer, x, kw) if drop is None else drop.apply(i, layer, x, kw)
            for name, y in outs.items():
                lp.write(name, sl, y)
            if i != last:
                continue
            if base is None:
                ref = torch.log_softmax(head(outs["base"][:, sc]).float(), dim=-1).cpu()
                for k, row in zip(range(sl.start, sl.start + ref.shape[0]), ref):
                    base_logp[k] = row
            else:
                ref = base[sl]
            p = ref.exp()
            for name in names:
                lv = torch.log_softmax(head(outs[name][:, sc]).float(), dim=-1).cpu()
                sums[name] += float((p * (ref - lv)).sum(dim=-1).double().sum())
            count += ref.shape[0] * ref.shape[1]

    walk_layers(stack, chunks, visit, tuple(streams), batch_size, progress, f"estimating {len(names)} drop(s)")
    if base is None:
        base = torch.stack(base_logp)
    return {name: sums[name] / count for name in names}, base
