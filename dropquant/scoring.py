"""Module importance (He et al. 2024): 1 - cos(X, Y) per token, averaged over all calibration tokens.

X and Y are the residual stream around each unit, read with hooks in one pass over the unpruned model:
  attention: X = decoder-layer input,          Y = input of post_attention_layernorm (= X + attn(LN(X)))
  MLP:       X = input of post_attention_layernorm, Y = decoder-layer output
  block:     X = decoder-layer input,          Y = decoder-layer output
Only one layer's tensors are held at a time, plus the unit-normalized residual stream at every block
boundary in float16 (for contiguous spans: ~1e-4 in angular distance, ~1e-3 for near-identical states;
half the memory of
float32), so peak memory is the model plus one batch's activations."""
from __future__ import annotations

import logging
import math
import torch

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

    def add(self, unit: str, layer: int, x, nx, y, ny) -> None:
        """x, y: residual streams [..., d]; nx, ny: their norms (computed once per tensor and shared)."""
        cos = torch.linalg.vecdot(x.float(), y.float(), dim=-1) / (nx * ny).clamp_min(1e-12)
        self.cos[unit][layer] += cos.sum(dtype=torch.float64)
        self.ang[unit][layer] += angular(cos).sum(dtype=torch.float64)

    def add_spans(self, boundaries: torch.Tensor, chunk: int = 256) -> None:
        """boundaries[i] holds the unit-normalized residual stream at boundary i for every token ([L+1, N, d]).

        The per-token Gram matrix of all boundaries is one batched matmul; chunking over tokens keeps
        its float32 copy small."""
        for start in range(0, boundaries.shape[1], chunk):
            s = boundaries[:, start:start + chunk].float().transpose(0, 1)  # [c, L+1, d]
            self.span += angular(torch.bmm(s, s.transpose(1, 2))).sum(0, dtype=torch.float64)


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

    def norm(h: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(h.float(), dim=-1)

    def keep_boundary(i: int, h: torch.Tensor, nh: torch.Tensor) -> None:
        if spans:
            state["boundaries"][i] = (h.float() / nh.clamp_min(1e-12).unsqueeze(-1)).reshape(-1, h.shape[-1])

    def on_layer_input(i):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            # A layer's input is the previous layer's output: reuse its norm.
            nx = state.pop("ny") if state.pop("y", None) is x else norm(x)
            state["x"], state["nx"] = x, nx
            keep_boundary(i, x, nx)
        return hook

    def on_mlp_input(module, args):
        state["mid"] = args[0]
        state["nmid"] = norm(args[0])

    def on_layer_output(i):
        def hook(module, args, output):
            y = _hidden(output)
            ny = norm(y)
            x, nx, mid, nmid = state.pop("x"), state.pop("nx"), state.pop("mid"), state.pop("nmid")
            acc.add("attn", i, x, nx, mid, nmid)
            acc.add("mlp", i, mid, nmid, y, ny)
            acc.add("block", i, x, nx, y, ny)
            state["y"], state["ny"] = y, ny
            if i == n_layers - 1:
                keep_boundary(n_layers, y, ny)
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(on_layer_input(i), with_kwargs=True))
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(on_mlp_input))
        handles.append(layer.register_forward_hook(on_layer_output(i)))
    try:
        batches = input_ids.split(batch_size)
        hidden = model.config.hidden_size
        for batch in tqdm(batches, desc="scoring", unit="batch", disable=not progress):
            if spans:
                state["boundaries"] = torch.empty(n_layers + 1, batch.numel(), hidden, dtype=torch.float16)
            # The base model only: the LM head's logits are not needed and would dominate memory.
            model.model(input_ids=batch, use_cache=False)
            state.pop("y", None), state.pop("ny", None)
            if spans:
                acc.add_spans(state.pop("boundaries"))
            acc.tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
        state.clear()

    n = acc.tokens
    cosine = {u: (acc.cos[u] / n).tolist() for u in UNITS}
    ang = {u: (acc.ang[u] / n).tolist() for u in UNITS}
    importance = ang if metric == "angular" else {u: [1.0 - c for c in cosine[u]] for u in UNITS}
    result = {"n_tokens": n, "metric": metric, "importance": importance, "cosine": cosine, "angular": ang}
    if spans:
        result["span_angular"] = (acc.span / n).tolist()
    return result
