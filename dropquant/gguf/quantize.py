"""Quantizing a GGUF with llama.cpp's own quantizer, and what llama.cpp's log says about a file at run time.

`quantize_gguf` calls `llama_model_quantize` through llama-cpp-python: the same code as llama.cpp's
`llama-quantize` tool, including its per-tensor type mixtures (Q4_K_M keeps some tensors at Q6_K) and its
fallbacks for rows that are not a multiple of a type's block size. An importance matrix
(`dropquant.gguf.imatrix`) is handed over in memory (llama.h's llama_model_imatrix_data).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import re
from pathlib import Path
from typing import Iterator, Mapping, Optional

import numpy as np

from dropquant.errors import DropquantError

log = logging.getLogger(__name__)

# llama.cpp file types quantize.type accepts (llama-quantize's names).
QUANT_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0",
    "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "Q2_K_S",
    "IQ4_NL", "IQ4_XS", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS",
    "IQ2_XXS", "IQ1_M", "IQ1_S", "TQ1_0", "TQ2_0",
)

# Types whose low-bit tensors llama.cpp refuses to quantize without an importance matrix.
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S")
UNQUANTIZED = ("F32", "F16", "BF16")


def llama_ftype(qtype: str) -> int:
    """llama.cpp's file type number for a quantize.type name (F32, Q4_K_M, ...)."""
    import llama_cpp

    attr = "LLAMA_FTYPE_ALL_F32" if qtype == "F32" else f"LLAMA_FTYPE_MOSTLY_{qtype}"
    if qtype not in QUANT_TYPES or not hasattr(llama_cpp, attr):
        raise DropquantError(f"quantize.type: unknown type '{qtype}' (allowed: {', '.join(QUANT_TYPES)})")
    return int(getattr(llama_cpp, attr))


@contextlib.contextmanager
def llama_log_capture() -> Iterator[list[str]]:
    """Route llama.cpp's log lines into a list for the duration of the block (and keep them off stderr)."""
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def quantize_gguf(src: str | Path, dst: str | Path, qtype: str,
                  imatrix: Optional[Mapping[str, np.ndarray]] = None, nthread: int = 0, pure: bool = False) -> None:
    """Quantize the F32/F16 GGUF `src` to `dst` as llama.cpp's llama-quantize would (`pure`: every tensor at
    the type, without the type's per-tensor recipe, as llama-quantize --pure).

    `imatrix` maps GGUF tensor names (blk.N.attn_q.weight, ...) to the mean squared input activation
    per column. nthread 0 = all cores.
    """
    import llama_cpp

    ftype = llama_ftype(qtype)
    if qtype in NEEDS_IMATRIX and not imatrix:
        raise DropquantError(f"quantize.type={qtype} needs an importance matrix: set quantize.imatrix: true")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    params.pure = pure
    keep = []  # the C side only borrows these buffers
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            if not np.all(np.isfinite(arr)):
                raise DropquantError(f"importance matrix for {name} has non-finite values")
            bname = name.encode()
            keep += [arr, bname]
            entries[i].name = bname
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None  # terminator
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    with llama_log_capture() as lines:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    fallbacks = [ln.strip() for ln in lines if "falling back" in ln]
    if fallbacks:
        log.info("llama.cpp: %d tensor(s) fell back to another type (row size not a multiple of the block size)",
                 len(fallbacks))
    if rc != 0:
        tail = "".join(lines[-8:]).strip()
        raise DropquantError(f"llama.cpp could not quantize {src} to {qtype} (return code {rc}): {tail}")


# --- llama.cpp run-time facts --------------------------------------------------------------------

def kv_cache_mib_from_log(text: str) -> Optional[float]:
    """The KV cache size (MiB) in llama.cpp's log of creating a context; None when the line is absent."""
    found = re.findall(r"llama_kv_cache: size = +([0-9.]+) MiB", text)
    return float(found[-1]) if found else None


def kv_cache_mib(model_path: str | Path, n_ctx: int = 4096, flash_attn: bool = True, gpu_layers: int = 0) -> float:
    """KV cache llama.cpp allocates for this GGUF at `n_ctx` (MiB), read from its own allocation log."""
    import llama_cpp

    with llama_log_capture() as lines:
        llm = llama_cpp.Llama(str(model_path), n_ctx=n_ctx, flash_attn=flash_attn, n_threads=1, verbose=False,
                              n_gpu_layers=gpu_layers)
        llm.close()
    mib = kv_cache_mib_from_log("".join(lines))
    if mib is None:
        raise DropquantError(f"could not find llama.cpp's KV cache size in its log for {model_path}")
    return mib
