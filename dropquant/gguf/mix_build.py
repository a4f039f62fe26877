"""quantize.type: mix from start to end: the candidates, their costs, the allocation, the file and its record."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from dropquant.gguf import mix
from dropquant.gguf.mix_cost import importance_costs, sensitivity_costs

log = logging.getLogger("dropquant.quantize")


def build_mix(source_gguf: Path, out: Path, *, target: str, types: Sequence[str], by: str, info,
              open_stack: Optional[Callable] = None, tokens=None, mix_tokens: int = 1024,
              importance: Optional[Mapping] = None,
              layer_map: Optional[Sequence[int]] = None, imatrix: Optional[Mapping[str, np.ndarray]] = None,
              work: Path) -> dict:
    """Write the mixed GGUF `out` from the exported `source_gguf` and return its summary (for the manifest).

    by="sensitivity": `open_stack()` gives the layer-wise model the GGUF was exported from, measured on the last
    samples of the calibration `tokens` [n, seq] that hold `mix_tokens`; by="importance": `importance` is the drop scores' importance
    ({"attn": [...], "mlp": [...]}, original layer numbering) and `layer_map` the original index of each
    checkpoint layer. `work`: a scratch folder for the candidates, removed afterwards."""
    t = mix.parse_target(target)
    started = time.perf_counter()
    try:
        cands = mix.quantize_candidates(source_gguf, types, work, imatrix=imatrix)
        cands.check_target(t)  # before the costly part
        if by == "sensitivity":
            tokens = tokens[-max(1, min(len(tokens), -(-mix_tokens // tokens.shape[1]))):]
            stack = open_stack()
            log.info("mix: measuring what each tensor's types cost on %d calibration tokens", int(tokens.numel()))
            costs, record = sensitivity_costs(stack, tokens, cands, info.tensor_names, info.permuted, progress=True)
            del stack
        else:
            names = _original_numbering(info.tensor_names, layer_map)
            costs, record = importance_costs(cands, names, importance, source_gguf), {}
        assignment = mix.allocate(cands, costs, t)
        mix.write_mix(cands, assignment, out)
        summary = mix.summarize(cands, assignment, costs, t, by)
    finally:
        mix.close_readers()
        shutil.rmtree(work, ignore_errors=True)
    summary["measurement"] = record
    summary["seconds"] = round(time.perf_counter() - started, 1)
    log.info("mix: %.2f MB, %.3f bpw, estimated KL %.4f; %s", summary["file_bytes"] / 1e6, summary["bpw"],
             summary["estimated_kl"], ", ".join(f"{k} x{v}" for k, v in summary["tensor_counts"].items()))
    return summary


def _original_numbering(tensor_names: Mapping[str, str], layer_map: Optional[Sequence[int]]) -> dict[str, str]:
    """The exporter's name map with checkpoint layer indices turned into the original model's (block drops
    renumber the layers a checkpoint keeps)."""
    if layer_map is None:
        return dict(tensor_names)
    out = {}
    for key, g in tensor_names.items():
        parts = key.split(".")
        if parts[:2] == ["model", "layers"]:
            parts[2] = str(layer_map[int(parts[2])])
        out[".".join(parts)] = g
    return out
