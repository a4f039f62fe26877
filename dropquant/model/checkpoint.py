"""Safetensors checkpoints tensor by tensor: read lazily from (sharded) files, written shard by shard.

A model larger than memory is never loaded whole: `Checkpoint` maps each tensor name to its file and
reads one tensor (or one layer's tensors) at a time from a memory-mapped file that is closed again, and
`write_checkpoint` holds at most one shard. The in-memory path writes through the same writer, so the
two produce byte-identical files for the same tensors.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from dropquant.atomic import umask
from dropquant.errors import DropquantError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = f"{WEIGHTS_NAME}.index.json"
# One shard is the most the writer holds in memory; 2 GB keeps that well under one 70B decoder layer's
# share of a 24 GB machine, and HF's loaders take any shard size.
SHARD_BYTES = 2 * 1024 ** 3
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
TORCH_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
TORCH_NAMES = {**TORCH_DTYPE, "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_header(path: Path) -> dict:
    """A .safetensors file's header (names, dtypes, shapes, offsets); no tensor data is read."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as err:
        raise DropquantError(f"{path}: not a readable safetensors file ({err})") from None
    header.pop("__metadata__", None)
    return header


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: one model.safetensors, or the shards its index names."""
    path = Path(path)
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    if (path / INDEX_NAME).is_file():
        try:
            names = sorted(set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise DropquantError(f"{path / INDEX_NAME}: not a safetensors index ({err})") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise DropquantError(f"{path}: shards named in {INDEX_NAME} are missing: {missing[:3]}")
        return [path / n for n in names]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise DropquantError(f"{path}: no safetensors weights ({WEIGHTS_NAME}, a sharded index, or *.safetensors); "
                         "only safetensors checkpoints are read (never pickle)")


class Checkpoint:
    """The tensors of a safetensors checkpoint directory, by name, read on demand."""

    def __init__(self, path):
        self.path = Path(path)
        self.files = weight_files(self.path)
        self.entries: dict[str, tuple[Path, dict]] = {}
        self._starts: dict[Path, int] = {}
        for f in self.files:
            for name, entry in read_header(f).items():
                if name in self.entries:
                    raise DropquantError(f"{self.path}: tensor {name} is stored in more than one file")
                self.entries[name] = (f, entry)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def nbytes(self, name: str) -> int:
        start, end = self.entries[name][1]["data_offsets"]
        return end - start

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.entries)

    def shape(self, name: str) -> list[int]:
        return list(self.entries[name][1]["shape"])

    def dtype(self, name: str) -> str:
        return self.entries[name][1]["dtype"]

    def floating_dtype(self) -> str:
        """torch name of the dtype most of the checkpoint's floating-point bytes are in."""
        totals: dict[str, int] = {}
        for name, (_, entry) in self.entries.items():
            if entry["dtype"] in TORCH_DTYPE:
                totals[entry["dtype"]] = totals.get(entry["dtype"], 0) + self.nbytes(name)
        if not totals:
            raise DropquantError(f"{self.path}: no floating-point tensors")
        return TORCH_DTYPE[max(totals, key=totals.get)]

    def get(self, name: str):
        return self.get_many([name])[name]

    def get_many(self, names: Iterable[str]) -> dict:
        """These tensors as private (copy-on-write) memory maps of their bytes: no copy is made, a write would
        never reach the file, and the pages stay charged to this process only while a tensor lives."""
        import numpy as np
        import torch

        names = list(names)
        missing = [n for n in names if n not in self.entries]
        if missing:
            raise DropquantError(f"{self.path}: tensors missing from the checkpoint: {missing[:4]}")
        out = {}
        for n in names:
            f, entry = self.entries[n]
            start, end = entry["data_offsets"]
            dtype = getattr(torch, TORCH_NAMES.get(entry["dtype"], ""), None)
            if dtype is None:
                raise DropquantError(f"{f}: tensor {n} has dtype {entry['dtype']}, which is not read here")
            if end == start:
                out[n] = torch.empty(entry["shape"], dtype=dtype)
                continue
            try:
                raw = np.memmap(f, dtype=np.uint8, mode="c", offset=self._data_start(f) + start, shape=(end - start,))
            except ValueError:  # the mapping would run past the end of the file
                raise DropquantError(f"{f}: tensor {n} is cut off (a truncated download or copy?)") from None
            out[n] = torch.from_numpy(raw).view(dtype).reshape(entry["shape"])
        return out

    def _data_start(self, f: Path) -> int:
        if f not in self._starts:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
            self._starts[f] = 8 + n
        return self._starts[f]

    def with_prefix(self, prefix: str) -> list[str]:
        return [n for n in self.entries if n.startswith(prefix)]


def layer_order(name: str) -> tuple:
    """Sort key: embeddings, then layer by layer in numeric order, then the final norm and head."""
    parts = name.split(".")
    if len(parts) > 3 and parts[1] == "layers" and parts[2].isdigit():
        return (1, int(parts[2]), ".".join(parts[3:]))
    return (0 if "embed" in name else 2, 0, name)


def write_checkpoint(out_dir: Path, sizes: Mapping[str, int], load: Callable[[str], "object"],
                     shard_bytes: int = SHARD_BYTES, metadata: Optional[Mapping[str, str]] = None) -> dict:
    """Write the tensors named in `sizes` (name -> bytes as written), each fetched by `load(name)` only when
    its shard is written, into out_dir as model.safetensors, or as HF-style shards with an index when they
    exceed shard_bytes. Returns {"tensor_bytes", "tensors", "shards"}."""
    from safetensors.torch import save_file

    # Shard boundaries come from the sizes alone, so the in-memory and streamed paths cut the same shards.
    plan: list[list[str]] = [[]]
    filled = 0
    for name in sorted(sizes, key=layer_order):
        if plan[-1] and filled + sizes[name] > shard_bytes:
            plan.append([])
            filled = 0
        plan[-1].append(name)
        filled += sizes[name]
    meta = {"format": "pt", **(metadata or {})}
    weight_map = {}
    for k, group in enumerate(plan):
        fname = WEIGHTS_NAME if len(plan) == 1 else f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
        shard = {n: load(n).contiguous() for n in group}
        save_file(shard, str(out_dir / fname), metadata=meta)
        os.chmod(out_dir / fname, 0o666 & ~umask())  # safetensors creates owner-only files
        del shard
        weight_map.update({n: fname for n in group})
    total = sum(sizes.values())
    if len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return {"tensor_bytes": total, "tensors": len(sizes), "shards": len(plan)}


@contextlib.contextmanager
def no_init():
    """Modules built without running their (slow, soon overwritten) random initializers."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        yield
