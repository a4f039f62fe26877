"""Pruned Hugging Face checkpoint -> GGUF file that llama.cpp runs, written with gguf-py.

Nothing dropped, or only whole blocks: the plain `llama` architecture with fewer blocks.
Attention or MLP sublayers dropped: the `deci` architecture (Nemotron-NAS), whose per-layer
`attention.head_count`, `attention.head_count_kv` and `feed_forward_length` arrays let each block
have its own shape. Four facts of llama.cpp's deci graph and KV cache shape the layout (see DESIGN.md):

- head_count 0: the block has no attention tensors and no attn_norm and computes x + FFN(x), an
  exact Attention Drop whose compute and KV cache are really gone.
- feed_forward_length 0 on a block that keeps its attention discards the attention output too
  (the graph `continue`s before the residual add). So a dropped MLP is written as a stand-in FFN of
  ZERO_FFN_WIDTH columns whose weights are all zero: x + down(silu(gate x) * up x) = x + 0 = x,
  exactly, in every quant type (zeros quantize to zeros).
- the first block's head_count sets the head size of the whole model, so the first block cannot
  have head_count 0. Its dropped attention is written as deci's "linear attention" form
  (head_count > 0, head_count_kv 0: x + W_o * norm(x)) with W_o all zero: exact, and no KV cache.
- llama.cpp cannot create a context whose KV cache has no bytes at all ("failed to allocate buffer
  for kv cache"). So when every attention is dropped, the first block carries a real attention with
  one KV head and all-zero weights: uniform scores over zero values, times a zero W_o, adds exactly 0.

A block whose attention and MLP are both dropped is the identity and is left out.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from .errors import DropquantError

log = logging.getLogger(__name__)

ARCH_LLAMA = "llama"
ARCH_DECI = "deci"
# The stand-in FFN of a dropped MLP: 32 columns is the block size of every llama.cpp type that a
# K- or IQ-quant falls back to, so the zero down projection quantizes without an F16 fallback.
ZERO_FFN_WIDTH = 32

# tokenizer.ggml.pre for a byte-level BPE tokenizer, found as llama.cpp's convert_hf_to_gguf.py does:
# sha256 of the token ids of CHKTXT. Entries copied from llama.cpp (conversion/base.py) for the
# model families dropquant supports; anything else should come from a GGUF source or llama.cpp's converter.
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
BPE_PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # abacusai/Smaug-Llama-3-70B-Instruct
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",  # evilfreelancer/ruGPT3XL
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # mistralai/Mistral-Nemo-Base-2407
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",  # mistral-community/pixtral-12b
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-ai/deepseek-llm-7b-base
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # deepseek-ai/deepseek-coder-6.7b-base
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # tiiuae/Falcon3-7B-Base
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",  # LumiOpen/Viking-7B
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",  # sapienzanlp/Minerva-7B-base-v1.0
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
}


@dataclass(frozen=True)
class Block:
    """One GGUF block: which checkpoint layer it comes from and how its two halves are written."""

    layer: int  # index into the checkpoint's layers (0..num_hidden_layers-1)
    attn: str   # "keep" | "drop" (head_count 0) | "zero" (first block: zero linear attention)
                #  | "zero_kv" (first block when no attention is left: zero attention, one KV head)
    mlp: str    # "keep" | "zero" (stand-in FFN with zero weights)


@dataclass
class ExportInfo:
    """What was written: enough for a manifest and for the parity and size tests."""

    arch: str
    blocks: list[Block]
    head_count: list[int]
    head_count_kv: list[int]
    feed_forward_length: list[int]
    n_params: int = 0          # elements of all tensors written
    n_standin_params: int = 0  # elements of the all-zero stand-in tensors among them
    tensor_names: dict[str, str] = field(default_factory=dict)  # HF parameter name -> GGUF tensor name
    standin_columns: dict[str, int] = field(default_factory=dict)  # stand-in matrix GGUF name -> input columns

    def summary(self) -> dict:
        return {"arch": self.arch, "block_count": len(self.blocks),
                "source_layers": [b.layer for b in self.blocks],
                "head_count": self.head_count, "head_count_kv": self.head_count_kv,
                "feed_forward_length": self.feed_forward_length,
                "n_params": self.n_params, "n_standin_params": self.n_standin_params}


def plan_blocks(num_layers: int, dropped_attn, dropped_mlp) -> tuple[str, list[Block]]:
    """The GGUF architecture and block list for a checkpoint with these (checkpoint-numbered) drops."""
    dropped_attn, dropped_mlp = set(dropped_attn), set(dropped_mlp)
    bad = sorted(i for i in dropped_attn | dropped_mlp if not 0 <= i < num_layers)
    if bad:
        raise DropquantError(f"pruned checkpoint: dropped layer indices {bad} out of range 0..{num_layers - 1}")
    blocks = [Block(i, "drop" if i in dropped_attn else "keep", "zero" if i in dropped_mlp else "keep")
              for i in range(num_layers) if not (i in dropped_attn and i in dropped_mlp)]
    if not blocks:
        raise DropquantError("pruned checkpoint: every attention and MLP layer is dropped; nothing left to export")
    if all(b.attn == "drop" for b in blocks):
        blocks[0] = Block(blocks[0].layer, "zero_kv", blocks[0].mlp)
    elif blocks[0].attn == "drop":
        blocks[0] = Block(blocks[0].layer, "zero", blocks[0].mlp)
    plain = all(b.attn == "keep" and b.mlp == "keep" for b in blocks)
    return (ARCH_LLAMA if plain else ARCH_DECI), blocks


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K row order -> llama.cpp's interleaved order (convert_hf_to_gguf.py's LlamaModel.permute)."""
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


def _load_checkpoint(path: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file  # torch, not numpy: numpy has no bfloat16

    from .pruning import read_config_json

    if not (path / "config.json").is_file():
        raise DropquantError(f"{path}: no config.json; expected a (pruned) Hugging Face checkpoint directory")
    cfg = read_config_json(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise DropquantError(f"{path}: no *.safetensors weights")
    state: dict = {}
    for f in files:
        state.update(load_file(str(f)))
    return cfg, state


def _np(t) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t.astype(np.float32, copy=False)
    return t.detach().to("cpu").float().numpy()


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, tokenizer_gguf: Optional[str | Path] = None,
                      out_type: str = "F32", name: Optional[str] = None) -> ExportInfo:
    """A pruned (or plain) HF checkpoint directory -> GGUF. Tokenizer from `tokenizer_gguf` if given, else the directory."""
    checkpoint = Path(checkpoint)
    cfg, state = _load_checkpoint(checkpoint)
    drop = cfg.get("dropquant") or {}
    return write_gguf(out, state, cfg, drop.get("dropped_attn", []), drop.get("dropped_mlp", []),
                      tokenizer_gguf=tokenizer_gguf, tokenizer_dir=None if tokenizer_gguf else checkpoint,
                      out_type=out_type, name=name or cfg.get("_name_or_path") or checkpoint.name)


def export_model(model, out: str | Path, *, tokenizer_gguf: Optional[str | Path] = None,
                 tokenizer_dir: Optional[str | Path] = None, out_type: str = "F32", name: str = "model") -> ExportInfo:
    """A loaded (pruned or plain) torch Llama -> GGUF; the drops come from its config's "dropquant" record."""
    record = getattr(model.config, "dropquant", None) or {}
    return write_gguf(out, model.state_dict(), model.config, record.get("dropped_attn", []),
                      record.get("dropped_mlp", []), tokenizer_gguf=tokenizer_gguf, tokenizer_dir=tokenizer_dir,
                      out_type=out_type, name=name)


def write_gguf(out: str | Path, state: Mapping[str, Any], config: Any, dropped_attn=(), dropped_mlp=(), *,
               tokenizer_gguf: Optional[str | Path] = None, tokenizer_dir: Optional[str | Path] = None,
               out_type: str = "F32", name: str = "model") -> ExportInfo:
    """Write `state` (HF parameter names; dropped modules absent) as a GGUF llama.cpp computes exactly.

    `dropped_attn` / `dropped_mlp` index the checkpoint's layers. `out_type` is F32 or F16 (2-D weights;
    norms stay F32, as llama.cpp's converter does). Exactly one tokenizer source must be given.
    """
    import gguf

    cfg = _cfg(config)
    if cfg.get("model_type") not in ("llama", "mistral"):
        raise DropquantError(f"GGUF export supports llama/mistral checkpoints, not '{cfg.get('model_type')}'")
    if out_type not in ("F32", "F16"):
        raise DropquantError(f"GGUF export writes F32 or F16 (got {out_type}); other types come from the quantizer")
    if (tokenizer_gguf is None) == (tokenizer_dir is None):
        raise DropquantError("GGUF export needs exactly one tokenizer source: a GGUF file or a Hugging Face directory")
    rs = _rope_scaling(cfg)
    rope_kind = None if rs is None else rs.get("rope_type", rs.get("type"))
    if rope_kind not in (None, "linear", "llama3"):
        raise DropquantError(f"GGUF export: rope scaling '{rope_kind}' is not supported yet (supported: none, linear, llama3)")

    n_layers = int(cfg["num_hidden_layers"])
    n_embd = int(cfg["hidden_size"])
    n_head = int(cfg["num_attention_heads"])
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = int(cfg.get("head_dim") or n_embd // n_head)
    n_ff = int(cfg["intermediate_size"])
    tied = bool(cfg.get("tie_word_embeddings", False)) or "lm_head.weight" not in state

    arch, blocks = plan_blocks(n_layers, dropped_attn, dropped_mlp)
    info = ExportInfo(arch, blocks,
                      head_count=[0 if b.attn == "drop" else n_head for b in blocks],
                      head_count_kv=[{"keep": n_head_kv, "zero_kv": 1}.get(b.attn, 0) for b in blocks],
                      feed_forward_length=[n_ff if b.mlp == "keep" else ZERO_FFN_WIDTH for b in blocks])
    log.info("GGUF layout: %s, %d blocks from %d layers (%d attention-free, %d zero-FFN)", arch, len(blocks), n_layers,
             sum(b.attn != "keep" for b in blocks), sum(b.mlp == "zero" for b in blocks))

    model_arch = gguf.MODEL_ARCH.LLAMA if arch == ARCH_LLAMA else gguf.MODEL_ARCH.DECI
    tmap = gguf.get_tensor_name_map(model_arch, len(blocks))
    w = gguf.GGUFWriter(str(out), arch)

    w.add_name(name)
    w.add_vocab_size(int(cfg["vocab_size"]))
    w.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
    w.add_embedding_length(n_embd)
    w.add_block_count(len(blocks))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_rope_dimension_count(head_dim)
    if head_dim != n_embd // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if rope_kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
    if arch == ARCH_LLAMA:
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        w.add_feed_forward_length(n_ff)
    else:
        w.add_head_count(info.head_count)
        w.add_head_count_kv(info.head_count_kv)
        w.add_feed_forward_length(info.feed_forward_length)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if out_type == "F32" else gguf.LlamaFileType.MOSTLY_F16)

    if tokenizer_gguf is not None:
        copy_tokenizer(w, tokenizer_gguf)
    else:
        add_hf_tokenizer(w, Path(tokenizer_dir), int(cfg["vocab_size"]))

    def put(hf_name: str, block: Optional[int], array: np.ndarray, source: Optional[str] = None) -> None:
        """Add one tensor under its GGUF name; `source` is the checkpoint tensor it came from (None: a stand-in)."""
        lookup = hf_name if block is None else f"model.layers.{block}.{hf_name}"
        gname = tmap.get_name(lookup, try_suffixes=(".weight",))
        if gname is None:
            raise DropquantError(f"GGUF export: no GGUF name for tensor {lookup}")
        array = np.ascontiguousarray(array, dtype=np.float32)
        if out_type == "F16" and array.ndim == 2:
            array = array.astype(np.float16)
        w.add_tensor(gname, array)
        info.n_params += array.size
        if source is None:
            info.n_standin_params += array.size
            if array.ndim == 2:
                info.standin_columns[gname] = array.shape[1]
        else:
            info.tensor_names[source] = gname

    def take(key: str, transform=None) -> tuple[np.ndarray, str]:
        if key not in state:
            raise DropquantError(f"pruned checkpoint: tensor {key} is missing (does config 'dropquant' match the weights?)")
        array = _np(state[key])
        return (transform(array) if transform else array), key

    put("model.embed_tokens.weight", None, *take("model.embed_tokens.weight"))
    for b, blk in enumerate(blocks):
        src = f"model.layers.{blk.layer}."
        if blk.attn == "keep":
            put("input_layernorm.weight", b, *take(src + "input_layernorm.weight"))
            put("self_attn.q_proj.weight", b, *take(src + "self_attn.q_proj.weight", lambda a: permute_qk(a, n_head)))
            put("self_attn.k_proj.weight", b, *take(src + "self_attn.k_proj.weight", lambda a: permute_qk(a, n_head_kv)))
            for proj in ("v_proj", "o_proj"):
                put(f"self_attn.{proj}.weight", b, *take(src + f"self_attn.{proj}.weight"))
        elif blk.attn == "zero":
            put("input_layernorm.weight", b, np.ones(n_embd, np.float32))
            put("self_attn.o_proj.weight", b, np.zeros((n_embd, n_embd), np.float32))
        elif blk.attn == "zero_kv":
            put("input_layernorm.weight", b, np.ones(n_embd, np.float32))
            put("self_attn.q_proj.weight", b, np.zeros((n_head * head_dim, n_embd), np.float32))
            put("self_attn.k_proj.weight", b, np.zeros((head_dim, n_embd), np.float32))
            put("self_attn.v_proj.weight", b, np.zeros((head_dim, n_embd), np.float32))
            put("self_attn.o_proj.weight", b, np.zeros((n_embd, n_head * head_dim), np.float32))
        if blk.mlp == "keep":
            put("post_attention_layernorm.weight", b, *take(src + "post_attention_layernorm.weight"))
            for proj in ("gate_proj", "up_proj", "down_proj"):
                put(f"mlp.{proj}.weight", b, *take(src + f"mlp.{proj}.weight"))
        else:
            put("post_attention_layernorm.weight", b, np.ones(n_embd, np.float32))
            put("mlp.gate_proj.weight", b, np.zeros((ZERO_FFN_WIDTH, n_embd), np.float32))
            put("mlp.up_proj.weight", b, np.zeros((ZERO_FFN_WIDTH, n_embd), np.float32))
            put("mlp.down_proj.weight", b, np.zeros((n_embd, ZERO_FFN_WIDTH), np.float32))
    put("model.norm.weight", None, *take("model.norm.weight"))
    if not tied:
        put("lm_head.weight", None, *take("lm_head.weight"))
    if rope_kind == "llama3":
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                     llama3_rope_factors(rs, _rope_theta(cfg), head_dim))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return info


# --- tokenizer -----------------------------------------------------------------------------------

def copy_tokenizer(w, source_gguf: str | Path) -> None:
    """Carry every tokenizer.* key (vocabulary, merges, special ids, chat template) over from a GGUF."""
    import gguf

    reader = gguf.GGUFReader(str(source_gguf))
    n = 0
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, f.contents(), vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(key, f.contents(), vtype)
        n += 1
    if n == 0:
        raise DropquantError(f"{source_gguf}: no tokenizer.* keys to carry over")


def bpe_pre(tokenizer) -> str:
    chkhsh = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if chkhsh not in BPE_PRE_BY_HASH:
        raise DropquantError(
            f"GGUF export: the tokenizer's BPE pre-tokenizer is not recognized (chkhsh {chkhsh}); use a GGUF model.source "
            "(its tokenizer is carried over) or convert with llama.cpp's convert_hf_to_gguf.py")
    return BPE_PRE_BY_HASH[chkhsh]


def add_hf_tokenizer(w, directory: Path, vocab_size: int) -> None:
    """Write a Hugging Face tokenizer as llama.cpp expects it (convert_hf_to_gguf.py's gpt2 / llama-hf paths)."""
    import gguf
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as err:
        raise DropquantError(f"{directory}: cannot load its tokenizer: {err}") from None
    backend = getattr(tok, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    bpe = spec.get("model") or {}
    byte_level = (bpe.get("type") == "BPE" and not bpe.get("byte_fallback")
                  and "ByteLevel" in json.dumps(spec.get("pre_tokenizer")))
    if byte_level:
        tokens, toktypes = _bpe_tokens(tok, vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(bpe_pre(tok))
        w.add_token_list(tokens)
        w.add_token_types(toktypes)
        special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    else:
        try:
            vocab = gguf.LlamaHfVocab(directory)
        except Exception as err:  # gguf-py raises several kinds for tokenizers it cannot read
            raise DropquantError(f"{directory}: tokenizer is neither byte-level BPE nor a Llama HF tokenizer ({err})") from None
        tokens, scores, toktypes = [], [], []
        for text, score, toktype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            toktypes.append(toktype)
        tokens += [f"[PAD{i}]".encode() for i in range(len(tokens), vocab_size)]
        scores += [-1000.0] * (vocab_size - len(scores))
        toktypes += [gguf.TokenType.UNUSED] * (vocab_size - len(toktypes))
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(toktypes)
        special = gguf.SpecialVocab(directory, n_vocab=len(tokens))
    special.add_to_gguf(w, quiet=True)


def _bpe_tokens(tok, vocab_size: int) -> tuple[list[str], list[int]]:
    import gguf

    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, toktypes = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
            continue
        text = reverse[i]
        if text in added:
            if i in decoder and not decoder[i].normalized:
                text = tok.decode(tok.encode(text, add_special_tokens=False))
            special = i in decoder and decoder[i].special
            toktypes.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            toktypes.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    return tokens, toktypes
