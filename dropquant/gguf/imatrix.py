"""The importance matrix that guides llama.cpp's low-bit types, collected in torch.

It follows llama.cpp's `imatrix` tool: for every weight matrix W used as y = W x, the mean over calibration
tokens of x_j^2 for each input column j. The quantizer weighs each column's rounding error by it. We collect it
with the layer-wise runner's observers on the torch model (exactly the activations llama.cpp would see, up to
float rounding), hand the means to the quantizer in memory (`dropquant.gguf.quantize`), and also save them as a
GGUF imatrix file (`<name>.in_sum2` / `<name>.counts`), the format llama.cpp's `llama-quantize --imatrix` reads,
so the same matrix can be reused with the command-line tools.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dropquant.errors import DropquantError
from dropquant.model.layerwise import InMemoryStack, run_layers


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
    """Run `input_ids` [n, seq] through the layers of `stack` (see dropquant.model.layerwise) and accumulate x^2
    per input column of each Linear in `modules` (torch module name -> GGUF tensor name)."""
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


