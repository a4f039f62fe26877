"""Model families dropquant supports, one small spec each: what the torch side and the GGUF writer must know.

Every supported family has the decoder layer input_layernorm -> self_attn -> post_attention_layernorm -> mlp
with a residual add around each half, so hooks, drops and the layer-wise runner are shared; what differs
(biases, per-head q/k norms, which llama.cpp architecture can express which drop) is data here.
A new family is one entry in FAMILIES, proven by the tiny-model tests of tests/test_families.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from dropquant.errors import DropquantError


@dataclass(frozen=True)
class Family:
    model_type: str
    # llama.cpp architecture of the unpruned model and of block drops (the same graph with fewer blocks).
    gguf_arch: str
    # llama.cpp's rope for gguf_arch: "norm" (interleaved pairs: HF's rotate-half Q/K rows are permuted on
    # export, as convert_hf_to_gguf.py does for llama) or "neox" (rotate-half, written as is).
    rope: str
    # Projections that always carry a bias whatever the config says (Qwen2's q/k/v).
    fixed_bias: tuple[str, ...] = ()
    # Per-head RMSNorm on queries and keys (Qwen3's q_norm / k_norm).
    qk_norm: bool = False
    # Why attention/MLP drops have no exact GGUF form (None: llama.cpp's `deci` architecture expresses them).
    no_sublayer_gguf: Optional[str] = None


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "llama", "norm"),
    Family("mistral", "llama", "norm"),
    Family("qwen2", "qwen2", "neox", fixed_bias=("q_proj", "k_proj", "v_proj")),
    Family("qwen3", "qwen3", "neox", qk_norm=True, no_sublayer_gguf=(
        "Qwen3's per-head q_norm/k_norm exist only in llama.cpp's qwen3 architecture, whose layers all share one "
        "shape, and the per-layer architecture (deci) that expresses attention/MLP drops has no q/k norms")),
)}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def _get(config: Any, key: str, default=None):
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def family_of(config: Any, name: str = "model") -> Family:
    """The family of a transformers config (or config.json dict); anything else is refused by name."""
    model_type = _get(config, "model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        raise DropquantError(f"{name} has architecture '{model_type}'; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if _get(config, "mlp_bias", False):
        raise DropquantError(f"{name}: MLP biases are not supported")
    if family.model_type in ("llama", "mistral") and _get(config, "attention_bias", False):
        raise DropquantError(f"{name}: attention biases on a {model_type} model are not supported")
    layer_types = _get(config, "layer_types")
    if layer_types and len(set(layer_types)) > 1:
        raise DropquantError(f"{name}: mixed layer_types {sorted(set(layer_types))} (sliding-window layers "
                             "between full-attention ones) are not supported")
    return family


def biased_projections(config: Any) -> tuple[str, ...]:
    """Attention projections that have a bias tensor in this model's checkpoint."""
    family = family_of(config)
    if family.fixed_bias:
        return family.fixed_bias
    return ("q_proj", "k_proj", "v_proj", "o_proj") if _get(config, "attention_bias", False) else ()


# Where a drop the pipeline refuses (it always exports a GGUF) is still made: the torch checkpoint alone, from Python.
TORCH_ONLY_HINT = ("for the pruned model in torch alone, prune it from Python with dropquant.prune.surgery.prune_model "
                   "and save_pruned, and reload it with dropquant.load_pruned (docs/drop.md, \"Only the torch "
                   "checkpoint\")")


def check_gguf_expressible(config: Any, dropped_attn, dropped_mlp, name: str = "model",
                           method: Optional[str] = None) -> None:
    """Refuse, before any work, a drop pattern that no GGUF stock llama.cpp runs can express exactly.
    `dropped_attn`/`dropped_mlp` are sublayer drops of kept layers (a layer losing both halves is a block)."""
    family = family_of(config, name)
    if family.no_sublayer_gguf and (list(dropped_attn) or list(dropped_mlp)):
        what = f" (drop.method={method})" if method else ""
        raise DropquantError(
            f"{name}: a {family.model_type} model with attention or MLP layers dropped{what} cannot be written as "
            f"GGUF, which the pipeline always makes: {family.no_sublayer_gguf}. What works: drop.method none or block "
            f"(the {family.gguf_arch} architecture with fewer blocks); {TORCH_ONLY_HINT}")
