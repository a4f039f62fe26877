"""What each tensor's quantization costs, in KL divergence from the unquantized model: the figures a mix's
allocation (`dropquant.gguf.mix`) trades against bytes.

`sensitivity_costs` measures them in one layer-wise pass over calibration tokens (the same runner as scoring,
so a model larger than memory is streamed a layer at a time):
- every block's KL is measured end to end: a stream of its own with all of that block's tensors at their
  smallest type, carried through the later layers to the LM head;
- that KL is shared among the block's tensors by the error each one alone causes at the block's output
  (a second forward of the block with only that tensor at its smallest type), and carried to the other types
  by the tensor's activation-weighted weight error (sum_j E[x_j^2] |dW_:j|^2, the imatrix's weighting);
- the token embedding (which is also the LM head when they are tied) and an untied output matrix are measured
  end to end at every type.
The one assumption is additivity: tensors quantized together cost about the sum of what each costs alone.

`importance_costs` is the free alternative: the drop scores' importance of the unit a tensor belongs to,
times the tensor's relative weight error (no calibration pass).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

from dropquant.errors import DropquantError
from dropquant.gguf.export import permute_qk
from dropquant.gguf.imatrix import module_gguf_names
from dropquant.gguf.mix import Candidates, dequantized, tensor_data
from dropquant.model.layerwise import layer_output, walk_layers

log = logging.getLogger(__name__)

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def hf_rows(values: np.ndarray, heads: Optional[int]) -> np.ndarray:
    """A GGUF matrix back in the checkpoint's row order (Q/K rows are interleaved for llama.cpp's rope)."""
    if heads is None:
        return values
    idx = permute_qk(np.arange(values.shape[0]), heads)
    out = np.empty_like(values)
    out[idx] = values
    return out


class _Weights:
    """Dequantized candidates of the tensors in use, in the checkpoint's layout, cached per layer."""

    def __init__(self, cands: Candidates, permuted: Mapping[str, int], dtype: torch.dtype, device):
        self.cands, self.permuted, self.dtype, self.device = cands, permuted, dtype, device
        self.cache: dict[tuple[str, str], torch.Tensor] = {}

    def smallest(self, gname: str) -> str:
        return min(self.cands.slot(gname).options.values(), key=lambda o: (o.nbytes, o.type)).type

    def get(self, gname: str, wtype: str, keep: bool = True) -> torch.Tensor:
        """The tensor at `wtype`; `keep` False: not cached (one type at a time, for a model's largest layers)."""
        key = (gname, wtype)
        if key in self.cache:
            return self.cache[key]
        values = hf_rows(dequantized(self.cands, gname, wtype), self.permuted.get(gname))
        w = torch.from_numpy(np.ascontiguousarray(values)).to(self.device, self.dtype)
        if keep:
            self.cache[key] = w
        return w

    def drop(self, keep=()) -> None:
        self.cache = {k: v for k, v in self.cache.items() if k[0] in keep}


class _Swap:
    """Module weights replaced for one forward, and restored."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __enter__(self):
        self.saved = [(m, m.weight.data) for m, _ in self.pairs]
        for m, w in self.pairs:
            m.weight.data = w
        return self

    def __exit__(self, *exc):
        for m, w in self.saved:
            m.weight.data = w


@torch.inference_mode()
def sensitivity_costs(stack, chunks: torch.Tensor, cands: Candidates, tensor_names: Mapping[str, str],
                      permuted: Mapping[str, int], batch_size: int = 1, progress: bool = True,
                      single: Optional[Mapping[str, tuple[str, str]]] = None) -> tuple[dict, dict]:
    """Estimated KL cost of every (tensor, type) of the candidates, and the measurements behind it.

    `stack`: the model the GGUF was exported from (layer-wise); `tensor_names`: the exporter's checkpoint name ->
    GGUF name map. `single` (for checking the estimate): extra streams, name -> (GGUF tensor, type), each with only
    that tensor quantized, whose end-to-end KL is returned in the record's "single".
    """
    modules = module_gguf_names(tensor_names)
    slots = {s.name: s for s in cands.slots}
    quantized = {g for g, s in slots.items() if not s.fixed}
    unknown = sorted(quantized - set(modules.values()) - set(tensor_names.values()))
    standins = [g for g in unknown if g.startswith("blk.")]
    if sorted(set(unknown) - set(standins)):
        raise DropquantError(f"mix: no checkpoint tensor for {sorted(set(unknown) - set(standins))[:4]}")
    weights = _Weights(cands, permuted, stack.dtype, "cpu")
    embed_g = tensor_names.get(EMBED)
    out_g = tensor_names.get(LM_HEAD)
    tied = out_g is None
    embed_types = sorted(slots[embed_g].options) if embed_g in quantized else []
    out_types = sorted(slots[out_g].options) if out_g in quantized else []
    by_layer: dict[int, dict[str, str]] = {}
    for path, g in modules.items():
        if g in quantized and path.startswith("model.layers."):
            i = int(path.split(".")[2])
            by_layer.setdefault(i, {})[path[len(f"model.layers.{i}."):]] = g
    single = dict(single or {})
    single_layer = {}
    for name, (g, t) in single.items():
        found = [(i, sub) for i, subs in by_layer.items() for sub, gg in subs.items() if gg == g]
        if not found:
            raise DropquantError(f"mix: {g} is not a quantized block tensor of this model")
        single_layer[name] = found[0]

    streams = ["base", *(f"L{i}" for i in sorted(by_layer)), *(f"E:{t}" for t in embed_types), *single]
    first = {f"L{i}": i for i in by_layer} | {n: single_layer[n][0] for n in single}
    first |= {f"E:{t}": -1 for t in embed_types}
    err_local: dict[str, float] = {}
    err_block: dict[int, float] = {}
    colsq: dict[str, dict[str, np.ndarray]] = {}   # per (tensor, type): sum over rows of dW^2, per input column
    xsq: dict[str, np.ndarray] = {}                 # per tensor: sum over tokens of x^2, per input column
    kl_sum = {n: 0.0 for n in streams if n != "base"} | {f"O:{t}": 0.0 for t in out_types}
    count = 0
    last = len(stack.layers) - 1
    embed_delta = {}

    def visit(i: int, layer, lp) -> None:
        nonlocal count
        subs = by_layer.get(i, {})
        mods = {sub: layer.get_submodule(sub) for sub in subs}
        weights.device = next(layer.parameters()).device
        low = {sub: weights.get(g, weights.smallest(g)) for sub, g in subs.items()}
        for sub, g in subs.items():
            w0 = mods[sub].weight.data.float()
            colsq[g] = {t: ((weights.get(g, t, keep=False).float() - w0) ** 2).sum(0).double().cpu().numpy()
                        for t in slots[g].options}
            xsq.setdefault(g, np.zeros(w0.shape[1]))
        hooks = [_ColumnSquares(mods[sub], xsq, g) for sub, g in subs.items()]
        alive = [n for n in streams if n != "base" and first[n] < i]
        heads = _heads(stack, weights, embed_g if tied else None, embed_types, out_g, out_types) if i == last else None
        for sl, kw in lp.batches():
            x = lp.read("base", sl)
            for h in hooks:
                h.active = True
            y = layer_output(layer, x, kw)
            for h in hooks:
                h.active = False
            outs = {"base": y}
            for sub, g in subs.items():
                with _Swap([(mods[sub], low[sub])]):
                    err_local[g] = err_local.get(g, 0.0) + _sq(layer_output(layer, x, kw) - y)
            if subs:
                with _Swap([(mods[sub], low[sub]) for sub in subs]):
                    outs[f"L{i}"] = layer_output(layer, x, kw)
                err_block[i] = err_block.get(i, 0.0) + _sq(outs[f"L{i}"] - y)
            for name in single:
                if single_layer[name][0] == i:
                    g, t = single[name]
                    sub = single_layer[name][1]
                    with _Swap([(mods[sub], weights.get(g, t))]):
                        outs[name] = layer_output(layer, x, kw)
            for name in alive:
                xs = lp.read(name, sl)
                if i == 0 and name.startswith("E:"):
                    xs = xs + embed_delta[name[2:]][chunks[sl].to(embed_delta[name[2:]].device)].to(xs)
                outs[name] = layer_output(layer, xs, kw)
            for name, out in outs.items():
                lp.write(name, sl, out)
            if i == last:
                count += _head_kl(heads, outs, kl_sum)
        for h in hooks:
            h.remove()
        weights.drop(keep=(embed_g, out_g))

    if embed_types:
        e0 = stack.embed_weight().float()
        weights.device = e0.device
        for t in embed_types:
            embed_delta[t] = (weights.get(embed_g, t, keep=tied).float() - e0).to(stack.dtype)
        del e0
    n_streams = len(streams)
    walk_layers(stack, chunks, visit, tuple(streams), batch_size, progress,
                f"mix sensitivity: {n_streams - 1} streams")
    kl = {n: v / max(count, 1) for n, v in kl_sum.items()}

    costs: dict[str, dict[str, float]] = {g: {t: 0.0 for t in slots[g].options} for g in standins}
    blocks = {}
    for i, subs in by_layer.items():
        gain = kl[f"L{i}"] / err_block[i] if err_block.get(i, 0.0) > 0 else 0.0
        blocks[i] = {"kl": kl[f"L{i}"], "error": err_block.get(i, 0.0), "gain": gain}
        for sub, g in subs.items():
            weighted = {t: float(colsq[g][t] @ xsq[g]) for t in colsq[g]}
            e_low = weighted[weights.smallest(g)]
            costs[g] = {t: (gain * err_local.get(g, 0.0) * w / e_low if e_low > 0 else 0.0)
                        for t, w in weighted.items()}
    if embed_types:
        costs[embed_g] = {t: kl[f"E:{t}"] for t in embed_types}
    if out_types:
        costs[out_g] = {t: kl[f"O:{t}"] for t in out_types}
    missing = sorted(quantized - set(costs))
    if missing:
        raise DropquantError(f"mix: no cost measured for {missing[:4]}")
    record = {"tokens": int(chunks.numel()), "blocks": {str(i): v for i, v in sorted(blocks.items())},
              "embedding": costs.get(embed_g), "output": costs.get(out_g), "tied_output": tied,
              "single": {n: kl[n] for n in single}}
    return costs, record


def _sq(d: torch.Tensor) -> float:
    return float((d.double() ** 2).sum())


class _ColumnSquares:
    """Sum over tokens of x^2 per input column of one Linear, while `active` (the base stream's forward only)."""

    def __init__(self, module, store: dict, g: str):
        self.store, self.g, self.active = store, g, False
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output) -> None:
        if self.active:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            self.store[self.g] += (x * x).sum(0).cpu().numpy()

    def remove(self) -> None:
        self.handle.remove()


def _heads(stack, weights: _Weights, tied_embed: Optional[str], embed_types: list[str], out_g: Optional[str],
           out_types: list[str]) -> dict:
    """The LM head each stream ends with: the model's, or a quantized embedding (tied) or output matrix."""
    heads = {"base": stack.head()}
    if tied_embed is not None:
        heads |= {f"E:{t}": stack.head(weight=weights.get(tied_embed, t)) for t in embed_types}
    heads |= {f"O:{t}": stack.head(weight=weights.get(out_g, t)) for t in out_types}
    return heads


def _head_kl(heads: dict, outs: dict, kl_sum: dict) -> int:
    """Accumulate every stream's KL from the base at the LM head; returns the positions counted."""
    base_lp = torch.log_softmax(heads["base"](outs["base"]).float(), dim=-1)
    p = base_lp.exp()
    for name in kl_sum:
        y = outs["base"] if name.startswith("O:") else outs[name]
        lq = torch.log_softmax(heads.get(name, heads["base"])(y).float(), dim=-1)
        kl_sum[name] += float((p * (base_lp - lq)).sum(-1).double().sum())
    return int(base_lp.shape[0] * base_lp.shape[1])


def importance_costs(cands: Candidates, tensor_names: Mapping[str, str], importance: Mapping[str, list],
                     source_gguf) -> dict[str, dict[str, float]]:
    """Cost = importance of the tensor's unit (attention or MLP of its layer, from the drop scores; the embedding
    and output count as the most important) x its relative weight error ||Q(W) - W||^2 / ||W||^2."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    top = max(max(importance.get("attn", [0.0]) or [0.0]), max(importance.get("mlp", [0.0]) or [0.0]))
    unit: dict[str, float] = {}
    for key, g in tensor_names.items():
        parts = key.split(".")
        if key in (EMBED, LM_HEAD):
            unit[g] = top
        elif parts[:2] == ["model", "layers"]:
            i = int(parts[2])
            kind = "mlp" if parts[3] == "mlp" else "attn"
            values = importance.get(kind) or []
            if i >= len(values):
                raise DropquantError(f"mix_by importance: the scores have no {kind} importance for layer {i}")
            unit[g] = float(values[i])
    costs = {}
    for s in cands.slots:
        if s.fixed:
            continue
        if s.name not in unit:  # a zero stand-in: exact at every type
            costs[s.name] = {t: 0.0 for t in s.options}
            continue
        raw, ttype = tensor_data(Path(source_gguf), s.name)
        w = np.asarray(dequantize(raw, GGMLQuantizationType(ttype)), dtype=np.float64).reshape(-1)
        norm = float(w @ w) or 1.0
        costs[s.name] = {}
        for t in s.options:
            q = dequantized(cands, s.name, t).astype(np.float64).reshape(-1)
            costs[s.name][t] = unit[s.name] * float(((q - w) ** 2).sum()) / norm
    return costs
