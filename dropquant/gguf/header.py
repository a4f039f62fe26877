"""A GGUF file's header read directly (struct over a memory map), without gguf-py's GGUFReader, which parses every
tensor and every array element into numpy objects (~5 s for the embedded model's 94 MB file, most of a tiny
model's export): how many bytes the file needs, and its metadata key-values."""
from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

# GGUF metadata value types of fixed width (gguf-py's GGUFValueType), as struct formats; 8 = string, 9 = array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


def _string(buf, pos: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8:pos + 8 + n], pos + 8 + n


def _value(buf, pos: int, vtype: int, decode: bool):
    """(value, position after it); with decode False arrays are skipped (value None)."""
    if vtype in _GGUF_SCALARS:
        fmt = "<" + _GGUF_SCALARS[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if vtype == STRING:
        raw, pos = _string(buf, pos)
        return (raw.decode("utf-8") if decode else raw), pos
    if vtype != ARRAY:
        raise ValueError(f"unknown metadata value type {vtype} at offset {pos}")
    etype, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if etype in _GGUF_SCALARS:
        fmt = "<" + _GGUF_SCALARS[etype]
        end = pos + count * struct.calcsize(fmt)
        values = np.frombuffer(buf[pos:end], dtype=np.dtype(fmt)).tolist() if decode else None
        return values, end
    values = []
    for _ in range(count):
        item, pos = _value(buf, pos, etype, decode)
        values.append(item)
    return (values if decode else None), pos


def _walk_kv(buf, decode: bool):
    """(key, value, type, element type of an array or None) of every key-value, then the offset after them."""
    if buf[:4] != b"GGUF":
        raise ValueError("no GGUF magic bytes")
    n_kv = struct.unpack_from("<Q", buf, 16)[0]
    pos = 24
    for _ in range(n_kv):
        key, pos = _string(buf, pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        subtype = struct.unpack_from("<I", buf, pos + 4)[0] if vtype == ARRAY else None
        value, pos = _value(buf, pos + 4, vtype, decode)
        yield key.decode("utf-8"), value, vtype, subtype, pos


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a GGUF's table: GGUF dims (ne0 first), GGML type number, data offset and bytes."""

    name: str
    dims: tuple[int, ...]
    type: int
    offset: int
    n_bytes: int


def tensor_index(path: str | Path) -> tuple[list[TensorEntry], int, int]:
    """Every tensor's entry, where the data section starts, and the alignment (no tensor data is read)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        n_tensors = struct.unpack_from("<Q", buf, 8)[0]
        pos, alignment = 24, 32
        for key, value, _, _, pos in _walk_kv(buf, decode=False):
            if key == "general.alignment":
                alignment = value
        table = []
        for _ in range(n_tensors):
            name, pos = _string(buf, pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            table.append(TensorEntry(name.decode("utf-8"), tuple(dims), ttype, offset,
                                     prod(dims) // block * block_bytes))
    return table, -(-pos // alignment) * alignment, alignment


def _tensor_table(path: Path) -> tuple[list[tuple[str, int, int]], int]:
    """(name, data offset, bytes) of every tensor, and where the data section starts."""
    table, data_start, _ = tensor_index(path)
    return [(t.name, t.offset, t.n_bytes) for t in table], data_start


def file_extent(path: Path) -> int:
    """Bytes a GGUF file needs, from its header and tensor table only (no tensor data is read)."""
    table, data_start = _tensor_table(Path(path))
    return data_start + max((offset + n for _, offset, n in table), default=0)


def tensor_bytes(path: str | Path) -> dict[str, int]:
    """Tensor name -> bytes of its data, from the tensor table (no tensor data is read)."""
    return {name: n for name, _, n in _tensor_table(Path(path))[0]}


def read_metadata(path: str | Path, prefix: str = "") -> dict[str, tuple]:
    """Key -> (value, GGUF value type, array element type or None) of every key starting with `prefix`; strings
    decoded, arrays as lists (what GGUFReader's `contents()` gives)."""
    path = Path(path)
    stat = path.stat()
    return dict(_read_metadata(str(path), stat.st_size, stat.st_mtime_ns, prefix))


@functools.lru_cache(maxsize=8)  # keyed by size and mtime too: a file replaced in place is read again
def _read_metadata(path: str, size: int, mtime_ns: int, prefix: str) -> tuple:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return tuple((key, (value, vtype, subtype)) for key, value, vtype, subtype, _ in _walk_kv(buf, decode=True)
                     if key.startswith(prefix))
