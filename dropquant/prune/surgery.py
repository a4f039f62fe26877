"""Apply a drop plan (or a pruning record's layout) to a loaded Llama-family model, in memory.

  - a dropped block is deleted from `model.model.layers` (the rest are renumbered);
  - a dropped attention deletes `input_layernorm` + `self_attn` of its layer, a dropped MLP deletes
    `post_attention_layernorm` + `mlp`; the layer's class is swapped for a subclass whose forward skips
    the missing half, so the layer computes X + MLP(LN(X)) or X + Attn(LN(X)) and holds no dropped weight;
  - a layer that loses both halves is the identity and is deleted like a dropped block;
  - the kept attention modules get consecutive `layer_idx` 0..A-1, so the KV cache has entries for those
    A layers only, and `get_seq_length()` (which reads entry 0) always reads a real attention layer.
The layout is kept on the config as a record (RECORD_KEY), which `dropquant.prune.pruned_checkpoint` writes to
and reads from disk:
  {"base_num_hidden_layers": L, "kept_layers": [original index of each kept block],
   "dropped_attn": [kept-layer indices], "dropped_mlp": [kept-layer indices], "model_type": "llama",
   "linear_attn": [kept-layer indices]}
"linear_attn" (written by the heal stage; a subset of dropped_attn) names the layers whose dropped attention
is replaced by a linear stand-in: X + W·LN(X), with the layer's own input_layernorm and a hidden x hidden
`linear_attn` matrix (llama.cpp's deci "linear attention"), which holds no KV cache.
"""
from __future__ import annotations

from typing import Optional

from dropquant.errors import DropquantError
from dropquant.model.loading import decoder_layers
from dropquant.prune.selection import DropPlan

RECORD_KEY = "dropquant"
ATTN_PARTS = ("input_layernorm", "self_attn")
MLP_PARTS = ("post_attention_layernorm", "mlp")


# --- the pruned decoder layer ------------------------------------------------------------------------

def attention_half(layer, hidden_states, **kwargs):
    """X + Attn(LN(X)) of a decoder layer (X + W·LN(X) for a linear stand-in, X when the attention is dropped),
    exactly as the upstream layer computes its first half."""
    if layer.self_attn is not None:
        attn_out, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
        return hidden_states + attn_out
    standin = getattr(layer, "linear_attn", None)
    if standin is not None:
        return hidden_states + standin(layer.input_layernorm(hidden_states))
    return hidden_states


def mlp_half(layer, hidden_states):
    """X + MLP(LN(X)) of a decoder layer (X when the MLP is dropped)."""
    if layer.mlp is None:
        return hidden_states
    return hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))


def _pruned_forward(self, hidden_states, *args, **kwargs):
    """The decoder layer with either half optional; each present half is computed exactly as upstream."""
    if args:
        raise TypeError("pruned decoder layers take keyword arguments only")
    return mlp_half(self, attention_half(self, hidden_states, **kwargs))


_PRUNED_CLASSES: dict[type, type] = {}


def _pruned_class(cls: type) -> type:
    if getattr(cls, "_dropquant_pruned", False):
        return cls
    if cls not in _PRUNED_CLASSES:
        # A subclass, not a wrapper: isinstance checks (output capture, hooks) and state-dict names stay intact.
        _PRUNED_CLASSES[cls] = type(f"Pruned{cls.__name__}", (cls,),
                                    {"forward": _pruned_forward, "_dropquant_pruned": True, "__module__": __name__})
    return _PRUNED_CLASSES[cls]


def _drop_parts(layer, parts: tuple[str, ...]) -> None:
    for name in parts:
        setattr(layer, name, None)  # the module (and its weights) is released; state_dict skips None
    layer.__class__ = _pruned_class(type(layer))


def add_linear_standin(layer, hidden_size: int):
    """Give an attention-dropped layer its linear stand-in (zero: the layer computes what the drop did)."""
    import torch

    if layer_has_attention(layer) or getattr(layer, "input_layernorm", None) is None:
        raise DropquantError("a linear stand-in replaces a dropped attention that kept its input_layernorm")
    ref = layer.input_layernorm.weight
    layer.linear_attn = torch.nn.Linear(hidden_size, hidden_size, bias=False, device=ref.device, dtype=ref.dtype)
    if ref.device.type != "meta":
        torch.nn.init.zeros_(layer.linear_attn.weight)
    return layer.linear_attn


def layer_has_attention(layer) -> bool:
    return getattr(layer, "self_attn", None) is not None


def layer_has_mlp(layer) -> bool:
    return getattr(layer, "mlp", None) is not None


# --- applying a layout ---------------------------------------------------------------------------------

def pruning_record(model) -> Optional[dict]:
    return getattr(model.config, RECORD_KEY, None)


def _set_record(config, record: dict) -> None:
    setattr(config, RECORD_KEY, record)


def _renumber_attention(model) -> int:
    """Consecutive cache slots for the attention layers that remain; returns how many there are."""
    a = 0
    for layer in decoder_layers(model):
        if layer_has_attention(layer):
            layer.self_attn.layer_idx = a
            a += 1
    return a


def _check_layer_types(config, n_layers: int) -> None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return
    if len(set(layer_types)) > 1:
        raise DropquantError(f"models with mixed layer_types {sorted(set(layer_types))} are not supported by drop")
    config.layer_types = [layer_types[0]] * n_layers  # one type: a healed layout may have more layers than before


def apply_layout(model, record: dict) -> None:
    """Shape `model` (with `len(kept_layers)` layers already, or `base_num_hidden_layers` to be cut) to the
    layout a pruning record describes (the record is kept on its config, extra keys such as plan_id included)."""
    kept_layers, base_num_layers = record["kept_layers"], record["base_num_hidden_layers"]
    dropped_attn, dropped_mlp = record["dropped_attn"], record["dropped_mlp"]
    linear_attn = record.get("linear_attn") or []
    layers = decoder_layers(model)
    if len(layers) == base_num_layers and len(kept_layers) != base_num_layers:
        keep = [layers[i] for i in kept_layers]
        model.model.layers = type(layers)(keep)
        layers = decoder_layers(model)
    if len(layers) != len(kept_layers):
        raise DropquantError(f"model has {len(layers)} layers but the layout keeps {len(kept_layers)}")
    _check_layer_types(model.config, len(kept_layers))
    model.config.num_hidden_layers = len(kept_layers)
    for i in dropped_attn:
        _drop_parts(layers[i], ("self_attn",) if i in linear_attn else ATTN_PARTS)
        if i in linear_attn:
            add_linear_standin(layers[i], int(model.config.hidden_size))
    for i in dropped_mlp:
        _drop_parts(layers[i], MLP_PARTS)
    _renumber_attention(model)
    _set_record(model.config, {
        **record,
        "kept_layers": list(kept_layers),
        "dropped_attn": sorted(dropped_attn),
        "dropped_mlp": sorted(dropped_mlp),
        **({"linear_attn": sorted(linear_attn)} if linear_attn else {}),
    })


def layout_for_plan(plan: DropPlan) -> tuple[list[int], list[int], list[int]]:
    """kept_layers (original numbering) and the sublayer drops in kept-layer numbering."""
    both = set(plan.attn) & set(plan.mlp)  # a layer with neither half is the identity: remove it whole
    gone = set(plan.blocks) | both
    kept = [i for i in range(plan.num_layers) if i not in gone]
    pos = {orig: k for k, orig in enumerate(kept)}
    return kept, sorted(pos[i] for i in plan.attn if i in pos), sorted(pos[i] for i in plan.mlp if i in pos)


def dropped_parameters(model, plan: DropPlan) -> dict:
    """Parameters and bytes of every module the plan removes (counted on the unpruned model)."""
    layers = decoder_layers(model)
    both = set(plan.attn) & set(plan.mlp)
    modules = []
    for i in sorted(set(plan.blocks) | both):
        modules.append(layers[i])
    for i in plan.attn:
        if i not in both:
            modules += [getattr(layers[i], p) for p in ATTN_PARTS]
    for i in plan.mlp:
        if i not in both:
            modules += [getattr(layers[i], p) for p in MLP_PARTS]
    params = [p for m in modules for p in m.parameters()]
    return {"params": sum(p.numel() for p in params), "bytes": sum(p.numel() * p.element_size() for p in params)}


def prune_model(model, plan: DropPlan):
    """Apply `plan` to `model` in place (and return it). The model must be unpruned."""
    record = pruning_record(model)
    if record and (record["dropped_attn"] or record["dropped_mlp"] or
                   len(record["kept_layers"]) != record["base_num_hidden_layers"]):
        raise DropquantError("this model is already pruned; prune the original model instead")
    n_layers = len(decoder_layers(model))
    if plan.num_layers != n_layers:
        raise DropquantError(f"the drop plan is for a {plan.num_layers}-layer model, this one has {n_layers} layers")
    for name, ids in (("attn", plan.attn), ("mlp", plan.mlp), ("blocks", plan.blocks)):
        bad = [i for i in ids if not 0 <= i < n_layers]
        if bad or len(set(ids)) != len(ids):
            raise DropquantError(f"drop plan {name}: invalid or repeated layer indices {ids} for {n_layers} layers")
    kept, attn, mlp = layout_for_plan(plan)
    if not kept:
        raise DropquantError("the drop plan removes every layer")
    apply_layout(model, {"base_num_hidden_layers": n_layers, "kept_layers": kept, "dropped_attn": attn,
                         "dropped_mlp": mlp})
    return model


def summary(model) -> dict:
    layers = decoder_layers(model)
    return {
        "layers": len(layers),
        "attention_layers": sum(layer_has_attention(l) for l in layers),
        "mlp_layers": sum(layer_has_mlp(l) for l in layers),
        "params": sum(p.numel() for p in model.parameters()),
    }
