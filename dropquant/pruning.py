"""Apply a drop plan to a loaded Llama/Mistral model, save it as a smaller HF checkpoint, and reload it exactly.

In memory:
  - a dropped block is deleted from `model.model.layers` (the rest are renumbered);
  - a dropped attention deletes `input_layernorm` + `self_attn` of its layer, a dropped MLP deletes
    `post_attention_layernorm` + `mlp`; the layer's class is swapped for a subclass whose forward skips
    the missing half, so the layer computes X + MLP(LN(X)) or X + Attn(LN(X)) and holds no dropped weight;
  - a layer that loses both halves is the identity and is deleted like a dropped block;
  - the kept attention modules get consecutive `layer_idx` 0..A-1, so the KV cache has entries for those
    A layers only, and `get_seq_length()` (which reads entry 0) always reads a real attention layer.
On disk (`save_pruned`): model.safetensors holds exactly the kept tensors (tied lm_head omitted), and
config.json is the model's config with num_hidden_layers = kept blocks plus a "dropquant" record:
  {"base_num_hidden_layers": L, "kept_layers": [original index of each kept block],
   "dropped_attn": [kept-layer indices], "dropped_mlp": [kept-layer indices], "model_type": "llama",
   "linear_attn": [kept-layer indices]}
"linear_attn" (written by the heal stage; a subset of dropped_attn) names the layers whose dropped attention
is replaced by a linear stand-in: X + W·LN(X), with the layer's own input_layernorm and a hidden x hidden
`linear_attn` matrix (llama.cpp's deci "linear attention"), which holds no KV cache.
With sublayers dropped, config.json's model_type is PRUNED_MODEL_TYPE, so that a plain transformers load
fails instead of filling the dropped modules with random weights; the record keeps the real model type.
`load_pruned` rebuilds the standard architecture from that config, applies the record, and loads the
safetensors with strict key checking. No pickle, no remote code.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from .atomic import atomic_dir
from .checkpoint import Checkpoint, no_init, write_checkpoint
from .errors import DropquantError
from .models import check_architecture, decoder_layers
from .selection import DropPlan

log = logging.getLogger(__name__)

RECORD_KEY = "dropquant"
# transformers loads a Llama config whose layers lack weights with those weights randomly initialized and only a
# warning. A model type it does not know makes it fail instead, and its error ("...has model type `X` but
# Transformers does not recognize this architecture") quotes the type: so the type says what to do.
PRUNED_MODEL_TYPE = ("dropquant-pruned (sublayers dropped: load it with dropquant.load_pruned(path); "
                     "for vLLM or llama.cpp's converter, use drop.export: nemotron-nas)")
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


# --- saving --------------------------------------------------------------------------------------------

def _tied_keys(model) -> set[str]:
    """State-dict keys that alias another tensor (the tied LM head): saved once, re-tied on load."""
    return {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()


def config_dict(model) -> dict:
    data = model.config.to_dict()
    data["num_hidden_layers"] = len(decoder_layers(model))
    record = dict(pruning_record(model) or {
        "base_num_hidden_layers": data["num_hidden_layers"], "kept_layers": list(range(data["num_hidden_layers"])),
        "dropped_attn": [], "dropped_mlp": []})
    record["model_type"] = data["model_type"]
    if record["dropped_attn"] or record["dropped_mlp"]:
        data["model_type"] = PRUNED_MODEL_TYPE
    data[RECORD_KEY] = record
    data["architectures"] = [type(model).__name__]
    # The weights are written dequantized: a GGUF source's quantization record no longer applies.
    for key in ("_name_or_path", "gguf_file", "quantization_config"):
        data.pop(key, None)
    data["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return data


def _write_pruned(model, path, load, generation_config, tokenizer, extra_files) -> dict:
    """The directory both paths write: `model` gives names, shapes and config (it may live on the meta
    device), `load(name)` each tensor as written."""
    path = Path(path)
    tied = _tied_keys(model)
    dtype_size = {k: v.element_size() for k, v in model.state_dict().items()}
    sizes = {k: v.numel() * dtype_size[k] for k, v in model.state_dict().items() if k not in tied}
    with atomic_dir(path) as tmp:
        written = write_checkpoint(tmp, sizes, load)
        (tmp / "config.json").write_text(json.dumps(config_dict(model), indent=2, sort_keys=True) + "\n")
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return written


def save_pruned(model, path, tokenizer=None, extra_files: Optional[dict[str, str]] = None) -> dict:
    """Write a loaded model as a Hugging Face directory atomically; returns the tensor bytes written."""
    state = model.state_dict()
    return _write_pruned(model, path, lambda name: state[name].detach(), getattr(model, "generation_config", None),
                         tokenizer, extra_files)


def save_pruned_from(model, source_dir, path, tokenizer=None, progress: bool = True) -> dict:
    """Write the directory `save_pruned` would, for a pruned `model` on the meta device, copying each kept
    tensor (in the model's dtype) from the safetensors checkpoint it was built from: one tensor in memory
    at a time, one shard at most."""
    from tqdm import tqdm
    from transformers import GenerationConfig

    source = Checkpoint(source_dir)
    kept = model.config.dropquant["kept_layers"]

    def source_name(name: str) -> str:
        parts = name.split(".")
        if name.startswith("model.layers."):
            parts[2] = str(kept[int(parts[2])])
        return ".".join(parts)

    state = model.state_dict()
    bar = tqdm(total=len(state) - len(_tied_keys(model)), desc="writing pruned checkpoint", unit="tensor",
               disable=not progress)

    def load(name: str):
        bar.update(1)
        t = source.get(source_name(name))
        return t.to(state[name].dtype) if t.is_floating_point() else t

    try:
        generation = GenerationConfig.from_pretrained(str(source_dir))
    except OSError:
        generation = GenerationConfig.from_model_config(model.config)
    try:
        return _write_pruned(model, path, load, generation, tokenizer, None)
    finally:
        bar.close()


def checkpoint_tensor_bytes(path) -> int:
    return Checkpoint(path).total_bytes()


# --- loading -------------------------------------------------------------------------------------------

def read_config_json(path) -> dict:
    """A checkpoint's config.json as a dict, a sublayer-dropped checkpoint's real model type put back."""
    raw = json.loads((Path(path) / "config.json").read_text())
    if raw.get("model_type") == PRUNED_MODEL_TYPE:
        raw["model_type"] = (raw.get(RECORD_KEY) or {}).get("model_type")
    return raw


def _config_from_dict(raw: dict, path: Path):
    from transformers import CONFIG_MAPPING

    if raw.get("model_type") == "nemotron-nas":
        from .nemotron import llama_config_from_nemotron

        raw = llama_config_from_nemotron(raw)
    if raw.get("model_type") not in CONFIG_MAPPING:
        raise DropquantError(f"{path}/config.json: model_type {raw.get('model_type')!r} is not one transformers knows")
    return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)


def config_from_checkpoint(path):
    """A checkpoint directory's transformers config (a pruned one's record included), its family checked."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise DropquantError(f"{path}: no config.json (not a Hugging Face model directory)")
    config = _config_from_dict(read_config_json(path), path)
    check_architecture(config, str(path))
    return config


def read_record(config) -> dict:
    n = config.num_hidden_layers
    record = getattr(config, RECORD_KEY, None) or {
        "base_num_hidden_layers": n, "kept_layers": list(range(n)), "dropped_attn": [], "dropped_mlp": []}
    if len(record["kept_layers"]) != n:
        raise DropquantError(f"config.json: dropquant.kept_layers lists {len(record['kept_layers'])} layers "
                             f"but num_hidden_layers is {n}")
    for key in ("dropped_attn", "dropped_mlp", "linear_attn"):
        bad = [i for i in record.get(key, []) if not 0 <= i < n]
        if bad:
            raise DropquantError(f"config.json: dropquant.{key} has indices {bad} outside the {n} kept layers")
    stray = sorted(set(record.get("linear_attn", [])) - set(record["dropped_attn"]))
    if stray:
        raise DropquantError(f"config.json: dropquant.linear_attn lists layers {stray} whose attention is not dropped")
    return record


def load_pruned(path, dtype=None, device: str = "cpu"):
    """A pruned (or plain) HF directory as a torch model in eval mode, weights checked key by key."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    config = config_from_checkpoint(path)
    checkpoint = Checkpoint(path)
    record = read_record(config)
    dtype = dtype or torch.float32
    with no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply_layout(model, record)

    expected = set(model.state_dict().keys())
    tied = _tied_keys(model)
    stored = set(checkpoint.keys())
    missing = sorted(expected - stored - tied)
    unexpected = sorted(stored - expected)
    if missing or unexpected:
        raise DropquantError(f"{path}: weights do not match config.json: missing {missing[:8]}"
                             f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                             f"{'...' if len(unexpected) > 8 else ''}")
    state = checkpoint.get_many(sorted(stored))
    for k, v in state.items():
        if v.is_floating_point():
            state[k] = v.to(dtype)
    model.load_state_dict(state, strict=False)
    del state
    # Tied keys point at the same storage as their source; re-tie in case load_state_dict broke the alias.
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    if device != "cpu":
        from accelerate import dispatch_model, infer_auto_device_map

        model = (dispatch_model(model, infer_auto_device_map(model)) if device == "auto" else model.to(device))
    return model.eval()


def summary(model) -> dict:
    layers = decoder_layers(model)
    return {
        "layers": len(layers),
        "attention_layers": sum(layer_has_attention(l) for l in layers),
        "mlp_layers": sum(layer_has_mlp(l) for l in layers),
        "params": sum(p.numel() for p in model.parameters()),
    }
