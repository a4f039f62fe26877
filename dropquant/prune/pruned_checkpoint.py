"""The pruned checkpoint's format: a smaller Hugging Face directory that `load_pruned` reloads exactly.

`save_pruned` writes model.safetensors with exactly the kept tensors (tied lm_head omitted) and config.json:
the model's config with num_hidden_layers = kept blocks plus the pruning record (`dropquant.prune.surgery`).
With sublayers dropped, config.json's model_type is PRUNED_MODEL_TYPE, so that a plain transformers load
fails instead of filling the dropped modules with random weights; the record keeps the real model type.
`load_pruned` rebuilds the standard architecture from that config, applies the record, and loads the
safetensors with strict key checking. No pickle, no remote code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from dropquant.atomic import atomic_dir
from dropquant.errors import DropquantError
from dropquant.model.checkpoint import Checkpoint, no_init, write_checkpoint
from dropquant.model.loading import check_architecture, decoder_layers
from dropquant.prune.surgery import RECORD_KEY, apply_layout, pruning_record

# transformers loads a Llama config whose layers lack weights with those weights randomly initialized and only a
# warning. A model type it does not know makes it fail instead, and its error ("...has model type `X` but
# Transformers does not recognize this architecture") quotes the type: so the type says what to do.
PRUNED_MODEL_TYPE = ("dropquant-pruned (sublayers dropped: load it with dropquant.load_pruned(path); "
                     "for vLLM or llama.cpp's converter, use drop.export: nemotron-nas)")


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


# Files of a checkpoint directory that are not its weights or config: carried into a rewritten one as they are.
_WEIGHTS_AND_CONFIG = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def side_files(checkpoint_dir: Path) -> dict[str, bytes]:
    """A checkpoint's tokenizer and other side files (everything but weights and config), by name."""
    return {p.name: p.read_bytes() for p in sorted(Path(checkpoint_dir).iterdir())
            if p.is_file() and p.name not in _WEIGHTS_AND_CONFIG and not p.name.endswith(".safetensors")}



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
        from dropquant.prune.nemotron import llama_config_from_nemotron

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


def load_checkpoint_tokenizer(path):
    """A checkpoint directory's tokenizer, chosen for its real model type.

    Without a config, AutoTokenizer reads config.json through AutoConfig; a sublayer-dropped checkpoint's
    PRUNED_MODEL_TYPE makes that fail, and transformers falls back to the bare PretrainedConfig with a warning that
    the checkpoint is of the wrong type. Given the config, a pruned checkpoint's tokenizer loads as its base's.
    A directory with a tokenizer and no config.json is loaded as transformers would."""
    from transformers import AutoTokenizer

    kw = {"config": config_from_checkpoint(path)} if (Path(path) / "config.json").is_file() else {}
    return AutoTokenizer.from_pretrained(str(path), **kw)


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


