"""Pruned Hugging Face checkpoint -> GGUF file that llama.cpp runs, written with gguf-py one tensor at a time.

Which llama.cpp architecture (dropquant.model.families holds one spec per model family):

- Nothing dropped, or only whole blocks: the family's own architecture with fewer blocks (`llama` for Llama
  and Mistral, `qwen2`, `qwen3`), laid out as llama.cpp's convert_hf_to_gguf.py lays it out.
- Attention or MLP sublayers dropped (Llama, Mistral, Qwen2): the `deci` architecture (Nemotron-NAS), whose
  per-layer `attention.head_count`, `attention.head_count_kv` and `feed_forward_length` arrays let each block
  have its own shape. Qwen3's per-head q/k norms exist in no per-layer architecture, so
  families.check_gguf_expressible refuses that case before any work.

RoPE: `llama` and `deci` rotate pairs of consecutive values, so HF's rotate-half Q/K rows (and Qwen2's q/k
biases, which are added before the rotation) are permuted; `qwen2` and `qwen3` rotate halves as HF does and
take the rows as they are.

Four facts of llama.cpp's deci graph and KV cache shape the deci layout (see DESIGN.md):

- head_count 0: the block has no attention tensors and no attn_norm and computes x + FFN(x), an
  exact Attention Drop whose compute and KV cache are really gone.
- feed_forward_length 0 on a block that keeps its attention discards the attention output too
  (the graph `continue`s before the residual add). So a dropped MLP is written as a stand-in FFN of
  ZERO_FFN_WIDTH columns whose weights are all zero: x + down(silu(gate x) * up x) = x + 0 = x,
  exactly, in every quant type (zeros quantize to zeros).
- head_count > 0 with head_count_kv 0 is "linear attention", x + W_o * norm(x) with W_o hidden x hidden:
  exactly a healed layer's linear stand-in (dropquant.heal.linear), with no KV cache.
- the first block's head_count sets the head size of the whole model, so the first block cannot
  have head_count 0. Its dropped attention is written as deci's "linear attention" form
  (head_count > 0, head_count_kv 0: x + W_o * norm(x)) with W_o all zero: exact, and no KV cache.
- llama.cpp cannot create a context whose KV cache has no bytes at all ("failed to allocate buffer
  for kv cache"). So when every attention is dropped, the first block carries a real attention with
  one KV head and all-zero weights: uniform scores over zero values, times a zero W_o, adds exactly 0.

A block whose attention and MLP are both dropped is the identity and is left out.

Streaming: every tensor of the file is first described (GGUF name, shape, type) from the checkpoint's
metadata alone, the header, key-values and tensor index are written, and then each tensor is loaded,
converted, written and released in turn. Peak memory is about one tensor and its converted copy, so a
checkpoint larger than RAM exports. An in-memory model goes through the same writer, byte for byte.

Types: 2-D weights are written in `out_type`; "auto" keeps the checkpoint's own dtype (a bfloat16 checkpoint
gives a BF16 file holding exactly its bits). Norms and biases stay F32, as convert_hf_to_gguf.py writes them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from dropquant.atomic import atomic_path
from dropquant.errors import DropquantError
from dropquant.gguf.tokenizer import add_hf_tokenizer, copy_tokenizer
from dropquant.model.families import Family, biased_projections, check_gguf_expressible, family_of

log = logging.getLogger(__name__)

ARCH_LLAMA = "llama"
ARCH_DECI = "deci"
ARCH_QWEN2 = "qwen2"
ARCH_QWEN3 = "qwen3"
# llama.cpp's llama_model_rope_type (src/llama-model.cpp): these rotate pairs of consecutive values
# (LLAMA_ROPE_TYPE_NORM); qwen2/qwen3 are NEOX, the rotate-half order HF checkpoints already have.
NORM_ROPE_ARCHS = (ARCH_LLAMA, ARCH_DECI)
# The stand-in FFN of a dropped MLP: 32 columns is the block size of every llama.cpp type that a
# K- or IQ-quant falls back to, so the zero down projection quantizes without an F16 fallback.
ZERO_FFN_WIDTH = 32
OUT_TYPES = ("auto", "F32", "F16", "BF16")
# "auto": the GGUF type that holds a checkpoint dtype exactly (float64 has none; F32 is the closest).
AUTO_TYPE_BY_DTYPE = {"float32": "F32", "float64": "F32", "float16": "F16", "bfloat16": "BF16"}
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_BYTES_PER_VALUE = {"F32": 4, "F16": 2, "BF16": 2}

@dataclass(frozen=True)
class Block:
    """One GGUF block: which checkpoint layer it comes from and how its two halves are written."""

    layer: int  # index into the checkpoint's layers (0..num_hidden_layers-1)
    attn: str   # "keep" | "drop" (head_count 0) | "zero" (first block: zero linear attention)
                #  | "zero_kv" (first block when no attention is left: zero attention, one KV head)
                #  | "linear" (a linear stand-in: linear attention with the fitted W)
    mlp: str    # "keep" | "zero" (stand-in FFN with zero weights)


@dataclass
class ExportInfo:
    """What was written: enough for a manifest and for the parity and size tests."""

    arch: str
    blocks: list[Block]
    head_count: list[int]
    head_count_kv: list[int]
    feed_forward_length: list[int]
    out_type: str = "F32"      # GGUF type of the 2-D weights (norms and biases are F32)
    n_params: int = 0          # elements of all tensors written
    n_standin_params: int = 0  # elements of the all-zero stand-in tensors among them
    tensor_names: dict[str, str] = field(default_factory=dict)  # HF parameter name -> GGUF tensor name
    standin_columns: dict[str, int] = field(default_factory=dict)  # stand-in matrix GGUF name -> input columns
    permuted: dict[str, int] = field(default_factory=dict)  # GGUF name -> heads, rows in llama.cpp's Q/K order

    def summary(self) -> dict:
        return {"arch": self.arch, "block_count": len(self.blocks),
                "source_layers": [b.layer for b in self.blocks],
                "head_count": self.head_count, "head_count_kv": self.head_count_kv,
                "feed_forward_length": self.feed_forward_length, "out_type": self.out_type,
                "n_params": self.n_params, "n_standin_params": self.n_standin_params}


def plan_blocks(num_layers: int, dropped_attn, dropped_mlp, plain_arch: str = ARCH_LLAMA,
                linear_attn=()) -> tuple[str, list[Block]]:
    """The GGUF architecture and block list for a checkpoint with these (checkpoint-numbered) drops and
    linear stand-ins (a subset of dropped_attn).

    `plain_arch` is the family's own architecture, used when every kept block is whole.
    """
    dropped_attn, dropped_mlp, linear_attn = set(dropped_attn), set(dropped_mlp), set(linear_attn)
    bad = sorted(i for i in dropped_attn | dropped_mlp | linear_attn if not 0 <= i < num_layers)
    if bad:
        raise DropquantError(f"pruned checkpoint: dropped layer indices {bad} out of range 0..{num_layers - 1}")
    if linear_attn - dropped_attn:
        raise DropquantError(f"pruned checkpoint: linear stand-ins {sorted(linear_attn - dropped_attn)} replace no "
                             "dropped attention")

    def attn(i: int) -> str:
        return "keep" if i not in dropped_attn else "linear" if i in linear_attn else "drop"

    blocks = [Block(i, attn(i), "zero" if i in dropped_mlp else "keep")
              for i in range(num_layers) if not (attn(i) == "drop" and i in dropped_mlp)]
    if not blocks:
        raise DropquantError("pruned checkpoint: every attention and MLP layer is dropped; nothing left to export")
    if linear_attn and not any(b.attn == "keep" for b in blocks):
        raise DropquantError("pruned checkpoint: linear stand-ins with no attention layer left have no GGUF form "
                             "(llama.cpp needs a KV cache, and the first block would have to be both)")
    if all(b.attn == "drop" for b in blocks):
        blocks[0] = Block(blocks[0].layer, "zero_kv", blocks[0].mlp)
    elif blocks[0].attn == "drop":
        blocks[0] = Block(blocks[0].layer, "zero", blocks[0].mlp)
    plain = all(b.attn == "keep" and b.mlp == "keep" for b in blocks)
    return (plain_arch if plain else ARCH_DECI), blocks


def permute_qk(w, n_head: int):
    """HF's rotate-half Q/K row order -> llama.cpp's interleaved order (convert_hf_to_gguf.py's LlamaModel.permute).

    Works on numpy arrays and torch tensors, on weights (rows) and on bias vectors alike.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _cfg(config: Any) -> dict:
    return dict(config) if isinstance(config, Mapping) else config.to_dict()


def _rope_theta(cfg: dict) -> float:
    if cfg.get("rope_theta") is not None:
        return float(cfg["rope_theta"])
    rp = cfg.get("rope_parameters") or {}
    return float(rp.get("rope_theta", 10000.0))


def _rope_scaling(cfg: dict) -> Optional[dict]:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or None
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type", "default"))
    return None if kind in (None, "default") else rs


def _rope_kind(cfg: dict) -> Optional[str]:
    rs = _rope_scaling(cfg)
    return None if rs is None else rs.get("rope_type", rs.get("type"))


def llama3_rope_factors(rs: dict, theta: float, head_dim: int) -> np.ndarray:
    """Llama 3.x frequency scaling as llama.cpp's rope_freqs tensor (convert_hf_to_gguf.py's formula)."""
    import math

    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor = rs.get("factor", 8.0)
    low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_ctx = rs.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@dataclass(frozen=True)
class _Dims:
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int

    @classmethod
    def of(cls, cfg: dict) -> "_Dims":
        n_embd, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return cls(n_layers=int(cfg["num_hidden_layers"]), n_embd=n_embd, n_head=n_head,
                   n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
                   head_dim=int(cfg.get("head_dim") or n_embd // n_head),
                   n_ff=int(cfg["intermediate_size"]), n_vocab=int(cfg["vocab_size"]))


# --- tensor sources: shapes and dtypes without loading; one tensor loaded at a time ------------------

def _dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


class StateDictTensors:
    """An in-memory state dict (torch tensors or numpy arrays) seen through the exporter's source interface."""

    def __init__(self, state: Mapping[str, Any]):
        self._state = state

    def __contains__(self, key: str) -> bool:
        return key in self._state

    def meta(self, key: str) -> tuple[tuple[int, ...], str]:
        t = self._state[key]
        return tuple(t.shape), _dtype_name(t)

    def load(self, key: str):
        import torch

        t = self._state[key]
        return torch.from_numpy(np.asarray(t)) if isinstance(t, np.ndarray) else t.detach()

    def close(self) -> None:
        pass


class SafetensorsTensors:
    """A checkpoint directory's tensors (dropquant.model.checkpoint: headers up front, one tensor per read)."""

    def __init__(self, directory: str | Path):
        from dropquant.model.checkpoint import Checkpoint

        self._checkpoint = Checkpoint(directory)

    def __contains__(self, key: str) -> bool:
        return key in self._checkpoint

    def meta(self, key: str) -> tuple[tuple[int, ...], str]:
        raw = self._checkpoint.dtype(key)
        return tuple(self._checkpoint.shape(key)), _SAFETENSORS_DTYPES.get(raw, raw)

    def load(self, key: str):
        return self._checkpoint.get(key)

    def close(self) -> None:
        pass

    def __enter__(self) -> "SafetensorsTensors":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the file plan: every tensor described before any is loaded ------------------------------------

@dataclass
class _Tensor:
    name: str                   # GGUF name
    shape: tuple[int, ...]      # row-major (torch) order
    load: Callable[[], Any]     # -> torch tensor of `shape`, any float dtype, already in llama.cpp's row order
    source: Optional[str]       # checkpoint tensor it comes from; None for a stand-in or a derived tensor
    standin: bool = False       # an all-zero/all-one stand-in (counted apart from the model's own weights)
    heads: Optional[int] = None  # rows permuted by permute_qk with this many heads

    @property
    def matrix(self) -> bool:
        return len(self.shape) == 2


def _from_source(src, key: str, transform: Optional[Callable]) -> Callable[[], Any]:
    if transform is None:
        return lambda: src.load(key)
    return lambda: transform(src.load(key))


def _filled(shape: tuple[int, ...], value: float) -> Callable[[], Any]:
    def make():
        import torch

        return torch.full(shape, value, dtype=torch.float32)
    return make


class _FilePlan:
    """The file's tensors in write order, checked against the config's shapes from metadata alone."""

    def __init__(self, arch: str, n_blocks: int, src):
        import gguf

        self.tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_blocks)
        self.src = src
        self.tensors: list[_Tensor] = []

    def _gguf_name(self, hf_name: str, block: Optional[int]) -> str:
        lookup = hf_name if block is None else f"model.layers.{block}.{hf_name}"
        gname = self.tmap.get_name(lookup, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise DropquantError(f"GGUF export: no GGUF name for tensor {lookup}")
        return gname

    def take(self, hf_name: str, block: Optional[int], key: str, shape: tuple[int, ...],
             heads: Optional[int] = None) -> None:
        """A checkpoint tensor (`key`), written as `hf_name` of GGUF block `block`."""
        if key not in self.src:
            raise DropquantError(f"pruned checkpoint: tensor {key} is missing (does config 'dropquant' match the weights?)")
        got = self.src.meta(key)[0]
        if got != shape:
            raise DropquantError(f"pruned checkpoint: tensor {key} has shape {list(got)}, but the config implies "
                                 f"{list(shape)}")
        transform = None if heads is None else (lambda t: permute_qk(t, heads))
        self.tensors.append(_Tensor(self._gguf_name(hf_name, block), shape, _from_source(self.src, key, transform), key,
                                    heads=heads))

    def standin(self, hf_name: str, block: int, shape: tuple[int, ...], value: float) -> None:
        self.tensors.append(_Tensor(self._gguf_name(hf_name, block), shape, _filled(shape, value), None, standin=True))

    def derived(self, gguf_name: str, make: Callable[[], Any], shape: tuple[int, ...]) -> None:
        self.tensors.append(_Tensor(gguf_name, shape, make, None))


@dataclass(frozen=True)
class _Layout:
    """What the per-block tensor planning needs to know about the model and the target architecture."""

    arch: str
    family: Family
    dims: _Dims
    biased: tuple[str, ...]   # projections with a bias tensor (Qwen2: q, k, v)

    @property
    def permute(self) -> bool:
        return self.arch in NORM_ROPE_ARCHS


def _plan_attention(plan: _FilePlan, lay: _Layout, b: int, blk: Block) -> None:
    d, src = lay.dims, f"model.layers.{blk.layer}."
    q_rows, kv_rows = d.n_head * d.head_dim, d.n_head_kv * d.head_dim
    if blk.attn == "keep":
        plan.take("input_layernorm.weight", b, src + "input_layernorm.weight", (d.n_embd,))
        rows = {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows}
        heads = {"q_proj": d.n_head, "k_proj": d.n_head_kv}
        for proj in ("q_proj", "k_proj", "v_proj"):
            # The rotation acts on q + bias, so a bias is permuted exactly as its rows are.
            permuted = heads[proj] if lay.permute and proj in heads else None
            plan.take(f"self_attn.{proj}.weight", b, src + f"self_attn.{proj}.weight", (rows[proj], d.n_embd), permuted)
            if proj in lay.biased:
                plan.take(f"self_attn.{proj}.bias", b, src + f"self_attn.{proj}.bias", (rows[proj],), permuted)
        if lay.family.qk_norm:
            if lay.permute:  # would need the norm weights permuted too; check_gguf_expressible rules this out
                raise DropquantError(f"GGUF export: q/k norms cannot be written for the {lay.arch} architecture")
            for norm in ("q_norm", "k_norm"):
                plan.take(f"self_attn.{norm}.weight", b, src + f"self_attn.{norm}.weight", (d.head_dim,))
        plan.take("self_attn.o_proj.weight", b, src + "self_attn.o_proj.weight", (d.n_embd, q_rows))
        if "o_proj" in lay.biased:
            plan.take("self_attn.o_proj.bias", b, src + "self_attn.o_proj.bias", (d.n_embd,))
    elif blk.attn == "linear":
        plan.take("input_layernorm.weight", b, src + "input_layernorm.weight", (d.n_embd,))
        plan.take("self_attn.o_proj.weight", b, src + "linear_attn.weight", (d.n_embd, d.n_embd))
    elif blk.attn == "zero":
        plan.standin("input_layernorm.weight", b, (d.n_embd,), 1.0)
        plan.standin("self_attn.o_proj.weight", b, (d.n_embd, d.n_embd), 0.0)
    elif blk.attn == "zero_kv":
        plan.standin("input_layernorm.weight", b, (d.n_embd,), 1.0)
        plan.standin("self_attn.q_proj.weight", b, (q_rows, d.n_embd), 0.0)
        plan.standin("self_attn.k_proj.weight", b, (d.head_dim, d.n_embd), 0.0)
        plan.standin("self_attn.v_proj.weight", b, (d.head_dim, d.n_embd), 0.0)
        plan.standin("self_attn.o_proj.weight", b, (d.n_embd, q_rows), 0.0)


def _plan_mlp(plan: _FilePlan, lay: _Layout, b: int, blk: Block) -> None:
    d, src = lay.dims, f"model.layers.{blk.layer}."
    if blk.mlp == "keep":
        plan.take("post_attention_layernorm.weight", b, src + "post_attention_layernorm.weight", (d.n_embd,))
        plan.take("mlp.gate_proj.weight", b, src + "mlp.gate_proj.weight", (d.n_ff, d.n_embd))
        plan.take("mlp.up_proj.weight", b, src + "mlp.up_proj.weight", (d.n_ff, d.n_embd))
        plan.take("mlp.down_proj.weight", b, src + "mlp.down_proj.weight", (d.n_embd, d.n_ff))
    else:
        plan.standin("post_attention_layernorm.weight", b, (d.n_embd,), 1.0)
        plan.standin("mlp.gate_proj.weight", b, (ZERO_FFN_WIDTH, d.n_embd), 0.0)
        plan.standin("mlp.up_proj.weight", b, (ZERO_FFN_WIDTH, d.n_embd), 0.0)
        plan.standin("mlp.down_proj.weight", b, (d.n_embd, ZERO_FFN_WIDTH), 0.0)


def _plan_file(src, lay: _Layout, blocks: list[Block], cfg: dict) -> _FilePlan:
    import gguf

    d = lay.dims
    plan = _FilePlan(lay.arch, len(blocks), src)
    plan.take("model.embed_tokens.weight", None, "model.embed_tokens.weight", (d.n_vocab, d.n_embd))
    for b, blk in enumerate(blocks):
        _plan_attention(plan, lay, b, blk)
        _plan_mlp(plan, lay, b, blk)
    plan.take("model.norm.weight", None, "model.norm.weight", (d.n_embd,))
    # A tied head is llama.cpp's default: without output.weight every architecture here reuses token_embd.
    tied = bool(cfg.get("tie_word_embeddings", False)) or "lm_head.weight" not in src
    if not tied:
        plan.take("lm_head.weight", None, "lm_head.weight", (d.n_vocab, d.n_embd))
    if _rope_kind(cfg) == "llama3":
        def factors():
            import torch

            return torch.from_numpy(llama3_rope_factors(_rope_scaling(cfg), _rope_theta(cfg), d.head_dim))
        plan.derived(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors, (d.head_dim // 2,))
    return plan


# --- types and encoding -----------------------------------------------------------------------------

def _weight_type(out_type: str, plan: _FilePlan) -> str:
    """The GGUF type of the 2-D weights: `out_type`, or for "auto" the one that holds the checkpoint's dtype."""
    if out_type != "auto":
        return out_type
    dtypes = sorted({plan.src.meta(t.source)[1] for t in plan.tensors if t.source is not None and t.matrix})
    if len(dtypes) > 1:
        log.info("2-D weights in several dtypes %s: writing F32, which holds each of them exactly", dtypes)
        return "F32"
    dtype = dtypes[0] if dtypes else "float32"
    if dtype not in AUTO_TYPE_BY_DTYPE:
        raise DropquantError(f"GGUF export: the checkpoint's 2-D weights are {dtype}; out_type 'auto' handles "
                             f"{', '.join(AUTO_TYPE_BY_DTYPE)}. Convert the checkpoint to one of those first")
    return AUTO_TYPE_BY_DTYPE[dtype]


def _encode(t, qtype: str) -> np.ndarray:
    """A float tensor as the bytes of GGUF type `qtype` (F32, F16 or BF16), without an f32 round trip where none is needed."""
    import gguf
    import torch

    t = t.detach().cpu()
    if qtype == "BF16" and t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy()  # the source's bits, exactly
    if qtype == "F16" and t.dtype == torch.float16:
        return t.contiguous().numpy()
    a = t.to(torch.float32).contiguous().numpy()  # exact from float16 and bfloat16
    if qtype == "F32":
        return a
    # F16: numpy's round-to-nearest-even; BF16: ggml's own rounding (ggml_compute_fp32_to_bf16), as the converter does.
    return gguf.quants.quantize(a, gguf.GGMLQuantizationType[qtype])


def _write_tensor(w, t: _Tensor, qtype: str) -> None:
    """Load, convert and write one tensor; everything it held is released on return."""
    value = t.load()
    if tuple(value.shape) != t.shape:
        raise DropquantError(f"GGUF export: tensor {t.name} loaded with shape {list(value.shape)}, "
                             f"expected {list(t.shape)}")
    w.write_tensor_data(_encode(value, qtype))


# --- writing ----------------------------------------------------------------------------------------

def _check_request(cfg: dict, dropped_attn, dropped_mlp, out_type: str, tokenizer_gguf, tokenizer_dir,
                   name: str) -> Family:
    """Everything that can be refused from the config and arguments alone, before any tensor is opened."""
    family = family_of(cfg, name)
    check_gguf_expressible(cfg, dropped_attn, dropped_mlp, name)
    if out_type not in OUT_TYPES:
        raise DropquantError(f"GGUF export writes F32, F16, BF16 or auto (the checkpoint's dtype); got {out_type!r}. "
                             "Other types come from the quantizer")
    if (tokenizer_gguf is None) == (tokenizer_dir is None):
        raise DropquantError("GGUF export needs exactly one tokenizer source: a GGUF file or a Hugging Face directory")
    kind = _rope_kind(cfg)
    if kind not in (None, "linear", "llama3"):
        raise DropquantError(f"GGUF export: rope scaling '{kind}' is not supported yet (supported: none, linear, llama3)")
    if kind == "llama3" and family.gguf_arch != ARCH_LLAMA:
        raise DropquantError(f"GGUF export: llama3 rope scaling on a {family.model_type} model has no form in "
                             f"llama.cpp's {family.gguf_arch} architecture")
    if cfg.get("use_sliding_window"):
        raise DropquantError(f"{name}: sliding-window attention (use_sliding_window) is not computed by llama.cpp's "
                             f"{family.gguf_arch} architecture; the GGUF would differ from the model")
    d = _Dims.of(cfg)
    if family.gguf_arch == ARCH_QWEN2 and d.n_head * d.head_dim != d.n_embd:
        # llama.cpp's qwen2 loads attn_q and attn_output as n_embd x n_embd (src/models/qwen2.cpp).
        raise DropquantError(f"{name}: head_dim {d.head_dim} x {d.n_head} heads != hidden_size {d.n_embd}, which "
                             "llama.cpp's qwen2 architecture requires")
    return family


def _add_hparams(w, info: ExportInfo, cfg: dict, d: _Dims, weight_type: str, name: str) -> None:
    import gguf

    w.add_name(name)
    w.add_vocab_size(d.n_vocab)
    w.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
    w.add_embedding_length(d.n_embd)
    w.add_block_count(len(info.blocks))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_rope_dimension_count(d.head_dim)
    if d.head_dim != d.n_embd // d.n_head:
        w.add_key_length(d.head_dim)
        w.add_value_length(d.head_dim)
    if _rope_kind(cfg) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(_rope_scaling(cfg)["factor"]))
    if info.arch == ARCH_DECI:
        w.add_head_count(info.head_count)
        w.add_head_count_kv(info.head_count_kv)
        w.add_feed_forward_length(info.feed_forward_length)
    else:
        w.add_head_count(d.n_head)
        w.add_head_count_kv(d.n_head_kv)
        w.add_feed_forward_length(d.n_ff)
    w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                     "BF16": gguf.LlamaFileType.MOSTLY_BF16}[weight_type])


def _account(info: ExportInfo, plan: _FilePlan) -> None:
    for t in plan.tensors:
        if t.source is not None:
            info.tensor_names[t.source] = t.name
            if t.heads is not None:
                info.permuted[t.name] = t.heads
        elif not t.standin:
            continue  # derived (rope_freqs): not a parameter of the model
        n = int(np.prod(t.shape))
        info.n_params += n
        if t.standin:
            info.n_standin_params += n
            if t.matrix:
                info.standin_columns[t.name] = t.shape[1]


def _write(out: str | Path, src, cfg: dict, family: Family, dropped_attn, dropped_mlp, *, tokenizer_gguf,
           tokenizer_dir, out_type: str, name: str) -> ExportInfo:
    import gguf

    d = _Dims.of(cfg)
    linear = (cfg.get("dropquant") or {}).get("linear_attn", [])
    arch, blocks = plan_blocks(d.n_layers, dropped_attn, dropped_mlp, plain_arch=family.gguf_arch, linear_attn=linear)
    plan = _plan_file(src, _Layout(arch, family, d, biased_projections(cfg)), blocks, cfg)
    weight_type = _weight_type(out_type, plan)
    info = ExportInfo(arch, blocks,
                      head_count=[0 if b.attn == "drop" else d.n_head for b in blocks],  # linear: n_head sets head size
                      head_count_kv=[{"keep": d.n_head_kv, "zero_kv": 1}.get(b.attn, 0) for b in blocks],
                      feed_forward_length=[d.n_ff if b.mlp == "keep" else ZERO_FFN_WIDTH for b in blocks],
                      out_type=weight_type)
    _account(info, plan)
    log.info("GGUF layout: %s (%s weights), %d blocks from %d layers (%d attention-free, %d zero-FFN)", arch,
             weight_type, len(blocks), d.n_layers, sum(b.attn != "keep" for b in blocks),
             sum(b.mlp == "zero" for b in blocks))

    qtypes = [weight_type if t.matrix else "F32" for t in plan.tensors]
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        try:
            _add_hparams(w, info, cfg, d, weight_type, name)
            if tokenizer_gguf is not None:
                copy_tokenizer(w, tokenizer_gguf)
            else:
                add_hf_tokenizer(w, Path(tokenizer_dir), d.n_vocab)
            for t, q in zip(plan.tensors, qtypes):
                # Described only: the data follows tensor by tensor once the index is written.
                w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), int(np.prod(t.shape)) * _BYTES_PER_VALUE[q],
                                  raw_dtype=gguf.GGMLQuantizationType[q])
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for t, q in zip(plan.tensors, qtypes):
                _write_tensor(w, t, q)
        finally:
            w.close()
    return info


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, tokenizer_gguf: Optional[str | Path] = None,
                      out_type: str = "auto", name: Optional[str] = None) -> ExportInfo:
    """A pruned (or plain) HF checkpoint directory -> GGUF, streamed: one tensor in memory at a time.

    Tokenizer from `tokenizer_gguf` if given, else the directory. `out_type` "auto" keeps the weights' dtype.
    """
    from dropquant.prune.pruned_checkpoint import read_config_json

    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise DropquantError(f"{checkpoint}: no config.json; expected a (pruned) Hugging Face checkpoint directory")
    cfg = read_config_json(checkpoint)
    drop = cfg.get("dropquant") or {}
    attn, mlp = drop.get("dropped_attn", []), drop.get("dropped_mlp", [])
    tokenizer_dir = None if tokenizer_gguf else checkpoint
    family = _check_request(cfg, attn, mlp, out_type, tokenizer_gguf, tokenizer_dir, str(checkpoint))
    with SafetensorsTensors(checkpoint) as src:
        return _write(out, src, cfg, family, attn, mlp, tokenizer_gguf=tokenizer_gguf, tokenizer_dir=tokenizer_dir,
                      out_type=out_type, name=name or cfg.get("_name_or_path") or checkpoint.name)


def export_model(model, out: str | Path, *, tokenizer_gguf: Optional[str | Path] = None,
                 tokenizer_dir: Optional[str | Path] = None, out_type: str = "auto", name: str = "model") -> ExportInfo:
    """A loaded (pruned or plain) torch model -> GGUF; the drops come from its config's "dropquant" record.

    The same writer as export_checkpoint: the file is byte-identical to exporting the model saved by save_pruned.
    """
    record = getattr(model.config, "dropquant", None) or {}
    return write_gguf(out, model.state_dict(), model.config, record.get("dropped_attn", []),
                      record.get("dropped_mlp", []), tokenizer_gguf=tokenizer_gguf, tokenizer_dir=tokenizer_dir,
                      out_type=out_type, name=name)


def write_gguf(out: str | Path, state: Mapping[str, Any] | StateDictTensors | SafetensorsTensors, config: Any,
               dropped_attn=(), dropped_mlp=(), *, tokenizer_gguf: Optional[str | Path] = None,
               tokenizer_dir: Optional[str | Path] = None, out_type: str = "auto", name: str = "model") -> ExportInfo:
    """Write `state` (HF parameter names; dropped modules absent) as a GGUF llama.cpp computes exactly.

    `state` is a state dict or a tensor source (SafetensorsTensors streams a checkpoint). `dropped_attn` /
    `dropped_mlp` index the checkpoint's layers. `out_type` is F32, F16, BF16 (2-D weights; norms and biases
    stay F32, as llama.cpp's converter does) or auto (the weights' own dtype). Exactly one tokenizer source
    must be given.
    """
    cfg = _cfg(config)
    family = _check_request(cfg, dropped_attn, dropped_mlp, out_type, tokenizer_gguf, tokenizer_dir, name)
    src = state if isinstance(state, (StateDictTensors, SafetensorsTensors)) else StateDictTensors(state)
    return _write(out, src, cfg, family, dropped_attn, dropped_mlp, tokenizer_gguf=tokenizer_gguf,
                  tokenizer_dir=tokenizer_dir, out_type=out_type, name=name)
