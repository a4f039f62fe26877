"""Quantizing a GGUF with llama.cpp's own quantizer, and the importance matrix that guides low-bit types.

`quantize_gguf` calls `llama_model_quantize` through llama-cpp-python: the same code as llama.cpp's
`llama-quantize` tool, including its per-tensor type mixtures (Q4_K_M keeps some tensors at Q6_K) and its
fallbacks for rows that are not a multiple of a type's block size.

The importance matrix follows llama.cpp's `imatrix` tool: for every weight matrix W used as y = W x, the
mean over calibration tokens of x_j^2 for each input column j. The quantizer weighs each column's rounding
error by it. We collect it with forward hooks on the torch model (exactly the activations llama.cpp would
see, up to float rounding), hand the means to the quantizer in memory (llama.h's llama_model_imatrix_data),
and also save them as a GGUF imatrix file (`<name>.in_sum2` / `<name>.counts`), the format llama.cpp's
`llama-quantize --imatrix` reads, so the same matrix can be reused with the command-line tools.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from .errors import DropquantError
from .params import QUANT_TYPES

log = logging.getLogger(__name__)

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
                  imatrix: Optional[Mapping[str, np.ndarray]] = None, nthread: int = 0) -> None:
    """Quantize the F32/F16 GGUF `src` to `dst` as llama.cpp's llama-quantize would.

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


# --- importance matrix ---------------------------------------------------------------------------

@dataclass
class ImatrixStat:
    """Sum of x^2 per input column over `count` token rows (llama.cpp's in_sum2 / counts)."""

    sums: np.ndarray
    count: int

    @property
    def mean(self) -> np.ndarray:
        return (self.sums / max(self.count, 1)).astype(np.float32)


def module_gguf_names(tensor_names: Mapping[str, str]) -> dict[str, str]:
    """HF parameter -> GGUF name map (from the exporter) turned into Linear module -> GGUF name, matrices only."""
    out = {}
    for param, gname in tensor_names.items():
        if param.endswith(".weight") and re.search(r"\.((self_attn|mlp)\.\w+_proj|linear_attn)\.weight$", param):
            out[param[: -len(".weight")]] = gname
    return out


class ImatrixObserver:
    """x^2 per input column of each named Linear, accumulated as the layer-wise runner pushes tokens through."""

    def __init__(self, modules: Mapping[str, str]):
        self.modules = modules
        self.stats: dict[str, ImatrixStat] = {}
        self._hooks: list = []

    def _hook(self, gname: str):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sq = (x * x).sum(0).cpu().numpy()
            st = self.stats.get(gname)
            if st is None:
                self.stats[gname] = ImatrixStat(sq, x.shape[0])
            else:
                st.sums += sq
                st.count += x.shape[0]
        return hook

    def layer_start(self, i: int, layer) -> None:
        for sub, module in layer.named_modules():
            gname = self.modules.get(f"model.layers.{i}.{sub}")
            if gname is not None:
                self._hooks.append(module.register_forward_hook(self._hook(gname)))

    def batch(self, i, x, y) -> None:
        pass

    def layer_end(self, i: int) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def collect_imatrix_stack(stack, input_ids, modules: Mapping[str, str], batch_size: int = 1,
                          progress: bool = False) -> dict[str, ImatrixStat]:
    """Run `input_ids` [n, seq] through the layers of `stack` (see dropquant.layerwise) and accumulate x^2
    per input column of each Linear in `modules` (torch module name -> GGUF tensor name)."""
    from .layerwise import run_layers

    known = {f"model.layers.{i}.{sub}" for i, layer in enumerate(stack.layers) for sub, _ in layer.named_modules()}
    missing = [m for m in modules if m not in known]
    if missing:
        raise DropquantError(f"importance matrix: the model has no modules {missing[:3]}... (pruned model and GGUF disagree)")
    observer = ImatrixObserver(modules)
    try:
        run_layers(stack, input_ids, [observer], batch_size, progress, desc="imatrix")
    finally:
        observer.layer_end(-1)
    return observer.stats


def collect_imatrix(model, input_ids, modules: Mapping[str, str], batch_size: int = 1,
                    progress: bool = False) -> dict[str, ImatrixStat]:
    """collect_imatrix_stack for a loaded model."""
    from .layerwise import InMemoryStack

    return collect_imatrix_stack(InMemoryStack(model), input_ids, modules, batch_size, progress)


def neutral_stats(names: Sequence[str], columns: Mapping[str, int], count: int) -> dict[str, ImatrixStat]:
    """Uniform importance for tensors torch never runs (the exporter's all-zero stand-ins): weights 0, so any value is exact."""
    return {n: ImatrixStat(np.full(columns[n], float(count)), count) for n in names}


def imatrix_means(stats: Mapping[str, ImatrixStat]) -> dict[str, np.ndarray]:
    return {name: st.mean for name, st in stats.items()}


def write_imatrix(path: str | Path, stats: Mapping[str, ImatrixStat], chunk_size: int, chunk_count: int,
                  datasets: Sequence[str] = ()) -> None:
    """Save as llama.cpp's GGUF imatrix file (what `llama-imatrix` writes and `llama-quantize --imatrix` reads)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(datasets) or ["dropquant calibration"])
    w.add_uint32("imatrix.chunk_count", int(chunk_count))
    w.add_uint32("imatrix.chunk_size", int(chunk_size))
    for name in sorted(stats):
        st = stats[name]
        w.add_tensor(f"{name}.in_sum2", np.asarray(st.sums, dtype=np.float32).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[float(st.count)]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_imatrix(path: str | Path) -> dict[str, ImatrixStat]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = np.array(t.data, dtype=np.float64).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = int(round(float(np.array(t.data).reshape(-1)[0])))
    return {n: ImatrixStat(sums[n], counts.get(n, 0)) for n in sums}


# --- llama.cpp run-time facts --------------------------------------------------------------------

def kv_cache_mib_from_log(text: str) -> Optional[float]:
    """The KV cache size (MiB) in llama.cpp's log of creating a context; None when the line is absent."""
    found = re.findall(r"llama_kv_cache: size = +([0-9.]+) MiB", text)
    return float(found[-1]) if found else None


def kv_cache_mib(model_path: str | Path, n_ctx: int = 4096, flash_attn: bool = True) -> float:
    """KV cache llama.cpp allocates for this GGUF at `n_ctx` (MiB), read from its own allocation log."""
    import llama_cpp

    with llama_log_capture() as lines:
        llm = llama_cpp.Llama(str(model_path), n_ctx=n_ctx, flash_attn=flash_attn, n_threads=1, verbose=False)
        llm.close()
    mib = kv_cache_mib_from_log("".join(lines))
    if mib is None:
        raise DropquantError(f"could not find llama.cpp's KV cache size in its log for {model_path}")
    return mib
