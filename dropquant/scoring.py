"""Module importance (He et al. 2024): 1 - cos(X, Y) per token, averaged over all calibration tokens.

X and Y are the residual stream around each unit, read with hooks in one pass over the unpruned model:
  attention: X = decoder-layer input,          Y = input of post_attention_layernorm (= X + attn(LN(X)))
  MLP:       X = input of post_attention_layernorm, Y = decoder-layer output
  block:     X = decoder-layer input,          Y = decoder-layer output
Only one layer's tensors are held at a time (plus the normalized block boundaries, for contiguous spans),
so peak memory is the model plus one batch's activations."""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .models import decoder_layers

log = logging.getLogger(__name__)
UNITS = ("attn", "mlp", "block")


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


class _Accumulator:
    """Running sums of per-token cosine and angular distance, in float64 so long runs don't drift."""

    def __init__(self, n_layers: int):
        self.cos = {u: torch.zeros(n_layers, dtype=torch.float64) for u in UNITS}
        self.ang = {u: torch.zeros(n_layers, dtype=torch.float64) for u in UNITS}
        self.span = torch.zeros(n_layers + 1, n_layers + 1, dtype=torch.float64)
        self.tokens = 0

    def add(self, unit: str, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        cos = F.cosine_similarity(x.float(), y.float(), dim=-1)
        self.cos[unit][layer] += cos.sum(dtype=torch.float64)
        self.ang[unit][layer] += angular(cos).sum(dtype=torch.float64)

    def add_boundary(self, j: int, unit_states: list[torch.Tensor]) -> None:
        """unit_states[i] is the L2-normalized residual stream at boundary i; add distances from j to every i < j."""
        yj = unit_states[j]
        for i in range(j):
            cos = (unit_states[i] * yj).sum(dim=-1)
            self.span[i, j] += angular(cos).sum(dtype=torch.float64)


def angular(cos: torch.Tensor) -> torch.Tensor:
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


@torch.inference_mode()
def score_model(model, input_ids: torch.Tensor, batch_size: int = 4, metric: str = "cosine",
                spans: bool = True, progress: bool = True) -> dict:
    """Importance of every attention layer, MLP layer and block of a Llama-style model."""
    from tqdm import tqdm

    layers = decoder_layers(model)
    n_layers = len(layers)
    acc = _Accumulator(n_layers)
    state: dict = {}
    boundaries: list[Optional[torch.Tensor]] = []

    def on_layer_input(i):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            state["x"] = x
            if spans:
                boundaries.append(F.normalize(x.float(), dim=-1))
                acc.add_boundary(i, boundaries)
        return hook

    def on_mlp_input(module, args):
        state["mid"] = args[0]

    def on_layer_output(i):
        def hook(module, args, output):
            x, mid, y = state.pop("x"), state.pop("mid"), _hidden(output)
            acc.add("attn", i, x, mid)
            acc.add("mlp", i, mid, y)
            acc.add("block", i, x, y)
            if spans and i == n_layers - 1:
                boundaries.append(F.normalize(y.float(), dim=-1))
                acc.add_boundary(n_layers, boundaries)
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(on_layer_input(i), with_kwargs=True))
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(on_mlp_input))
        handles.append(layer.register_forward_hook(on_layer_output(i)))
    try:
        batches = input_ids.split(batch_size)
        for batch in tqdm(batches, desc="scoring", unit="batch", disable=not progress):
            boundaries.clear()
            # The base model only: the LM head's logits are not needed and would dominate memory.
            model.model(input_ids=batch, use_cache=False)
            acc.tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
        boundaries.clear()

    n = acc.tokens
    cosine = {u: (acc.cos[u] / n).tolist() for u in UNITS}
    ang = {u: (acc.ang[u] / n).tolist() for u in UNITS}
    importance = ang if metric == "angular" else {u: [1.0 - c for c in cosine[u]] for u in UNITS}
    result = {"n_tokens": n, "metric": metric, "importance": importance, "cosine": cosine, "angular": ang}
    if spans:
        result["span_angular"] = (acc.span / n).tolist()
    return result
