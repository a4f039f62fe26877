"""Optional export of a pruned model in the Nemotron-NAS / DeciLM layout (`drop.export: nemotron-nas`).

NVIDIA's Nemotron-NAS checkpoints (Llama-3_1-Nemotron-51B, Llama-3_3-Nemotron-Super-49B) describe every
layer in `block_configs`: an attention that is a no-op has no weights and no KV cache, an FFN that is a
no-op has no weights. That is exactly an Attention Drop / MLP Drop, so engines that read the layout
(vLLM's DeciLMForCausalLM, llama.cpp's convert_hf_to_gguf.py DeciModel) can run the pruned model natively.
The tensors keep the Llama names; only config.json differs from the `data/pruned` checkpoint.

Per layer (one entry per kept block):
  attention.no_op             true when the layer's attention (and input_layernorm) was dropped
  attention.n_heads_in_group  num_attention_heads / num_key_value_heads, null for a no-op
  attention.replace_with_linear  always false (null n_heads_in_group + false = attention-free in llama.cpp)
  ffn.no_op                   true when the layer's MLP (and post_attention_layernorm) was dropped
  ffn.ffn_mult                intermediate = round_up(int(2 * ffn_mult * hidden / 3), 256); null for a no-op
  ffn.replace_with_linear     always false
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

from dropquant.errors import DropquantError

log = logging.getLogger(__name__)

MODEL_TYPE = "nemotron-nas"
ARCHITECTURE = "DeciLMForCausalLM"
# Global keys copied from the Llama config; per-layer shape lives in block_configs.
GLOBAL_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "rms_norm_eps",
               "max_position_embeddings", "hidden_act", "tie_word_embeddings", "bos_token_id", "eos_token_id",
               "pad_token_id", "attention_bias", "mlp_bias", "initializer_range", "attention_dropout", "head_dim")


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """DeciLM's rule, as vLLM and llama.cpp implement it."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return size if size % 256 == 0 else size + 256 - size % 256


def ffn_mult_for(intermediate_size: int, hidden_size: int) -> float:
    mult = 3 * intermediate_size / (2 * hidden_size)
    if ffn_mult_to_intermediate_size(mult, hidden_size) != intermediate_size:
        raise DropquantError(
            f"drop.export=nemotron-nas: intermediate_size {intermediate_size} cannot be written as a DeciLM ffn_mult "
            f"for hidden_size {hidden_size} (DeciLM rounds the FFN width up to a multiple of 256)")
    return float(mult)


def _rope(config: dict) -> tuple[float, dict | None, dict]:
    params = dict(config.get("rope_parameters") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", "default")
    scaling = None if kind == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
    return theta, scaling, {"rope_type": kind, "rope_theta": theta, **(scaling or {})}


def check_exportable(model_type: str) -> None:
    """DeciLM is a Llama with per-layer shapes: no biases, no q/k norms. Checked before any work."""
    if model_type not in ("llama", "mistral"):
        raise DropquantError(f"drop.export=nemotron-nas writes Llama-family models only (DeciLM has no attention "
                             f"biases or q/k norms); this model is '{model_type}': set drop.export: null")


def nemotron_config(llama_config: dict) -> dict:
    """The DeciLM config.json for a pruned Llama config.json (the dict `pruning.config_dict` writes)."""
    record = llama_config["dropquant"]
    check_exportable(record.get("model_type", "llama"))
    n = llama_config["num_hidden_layers"]
    heads, kv = llama_config["num_attention_heads"], llama_config.get("num_key_value_heads") or llama_config["num_attention_heads"]
    hidden = llama_config["hidden_size"]
    if heads % kv:
        raise DropquantError(f"drop.export=nemotron-nas: {heads} heads are not a multiple of {kv} KV heads")
    if llama_config.get("head_dim") not in (None, hidden // heads):
        raise DropquantError("drop.export=nemotron-nas: DeciLM assumes head_dim = hidden_size / num_attention_heads")
    mult = ffn_mult_for(llama_config["intermediate_size"], hidden)
    blocks = []
    for i in range(n):
        no_attn, no_ffn = i in record["dropped_attn"], i in record["dropped_mlp"]
        blocks.append({
            "attention": {"no_op": no_attn, "replace_with_linear": False, "sparsify": None,
                          "n_heads_in_group": None if no_attn else heads // kv,
                          "window_length": None, "num_sink_tokens": None,
                          "use_prefill_window_in_sink_attention": False, "unshifted_sink": False},
            "ffn": {"no_op": no_ffn, "replace_with_linear": False, "sparsify": None,
                    "ffn_mult": None if no_ffn else mult},
        })
    theta, scaling, rope_parameters = _rope(llama_config)
    out = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}
    out.update({k: llama_config[k] for k in GLOBAL_KEYS if k in llama_config})
    out.update({"rope_theta": theta, "rope_scaling": scaling, "rope_parameters": rope_parameters,
                "block_configs": blocks, "torch_dtype": "float32", "dropquant": copy.deepcopy(record)})
    return out


def llama_config_from_nemotron(data: dict) -> dict:
    """Back to a Llama config.json + dropquant record (what `load_pruned` uses to read an export)."""
    blocks = data["block_configs"]
    heads, hidden = data["num_attention_heads"], data["hidden_size"]
    groups = {b["attention"]["n_heads_in_group"] for b in blocks if not b["attention"]["no_op"]}
    mults = {b["ffn"]["ffn_mult"] for b in blocks if not b["ffn"]["no_op"]}
    if len(groups) > 1 or len(mults) > 1 or any(b["attention"].get("replace_with_linear") or
                                                b["ffn"].get("replace_with_linear") for b in blocks):
        raise DropquantError("this Nemotron-NAS checkpoint has per-layer shapes a Llama model cannot hold")
    group = groups.pop() if groups else 1
    mult = mults.pop() if mults else 4.0
    record = data.get("dropquant") or {"base_num_hidden_layers": len(blocks), "kept_layers": list(range(len(blocks)))}
    out = {k: data[k] for k in GLOBAL_KEYS if k in data}
    out.update({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": len(blocks), "num_key_value_heads": heads // group,
        "intermediate_size": ffn_mult_to_intermediate_size(mult, hidden),
        "rope_parameters": data.get("rope_parameters") or {"rope_type": "default", "rope_theta": data.get("rope_theta", 10000.0)},
        "dropquant": {**record,
                      "dropped_attn": [i for i, b in enumerate(blocks) if b["attention"]["no_op"]],
                      "dropped_mlp": [i for i, b in enumerate(blocks) if b["ffn"]["no_op"]]},
    })
    return out


def export_nemotron(pruned_dir, out_dir) -> Path:
    """Write `out_dir` = `pruned_dir` with a DeciLM config.json; the tensors and tokenizer are the same files."""
    import shutil

    from dropquant.atomic import atomic_dir

    pruned_dir, out_dir = Path(pruned_dir), Path(out_dir)
    llama_config = json.loads((pruned_dir / "config.json").read_text())
    config = nemotron_config(llama_config)
    if any(b["ffn"]["no_op"] and not b["attention"]["no_op"] for b in config["block_configs"]):
        log.warning("nemotron-nas export has layers with a dropped MLP but a kept attention: vLLM runs them "
                    "correctly, but llama.cpp's deci graph skips the attention output of a layer whose FFN "
                    "width is 0, so a GGUF converted from this export is wrong for those layers")
    with atomic_dir(out_dir) as tmp:
        for f in pruned_dir.iterdir():
            if f.is_file() and f.name != "config.json":
                try:  # the tensors are identical: share the file instead of doubling the disk use
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
