"""Module importance (He et al. 2024): 1 - cos(X, Y) per token, averaged over all calibration tokens.

X and Y are the residual stream around each unit, observed while the layer-wise runner pushes the
calibration tokens through the unpruned model:
  attention: X = decoder-layer input,          Y = input of post_attention_layernorm (= X + attn(LN(X)))
  MLP:       X = input of post_attention_layernorm, Y = decoder-layer output
  block:     X = decoder-layer input,          Y = decoder-layer output
Cosines are computed in float32 and summed in float64, whatever the model's compute dtype. For
contiguous spans, the unit-normalized residual stream at every block boundary is kept in float16
(~1e-4 in angular distance) in a scratch file, not in memory, so memory does not grow with depth.
"""
from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dropquant.model.layerwise import InMemoryStack, StreamedStack, run_layers

log = logging.getLogger(__name__)
UNITS = ("attn", "mlp", "block")


def angular(cos: torch.Tensor) -> torch.Tensor:
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def _norm(h: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(h.float(), dim=-1)


def _cosine(x, nx, y, ny) -> torch.Tensor:
    return torch.linalg.vecdot(x.float(), y.float(), dim=-1) / (nx * ny).clamp_min(1e-12)


class UnitScores:
    """Running sums of per-token cosine and angular distance of each layer's attention, MLP and block."""

    def __init__(self, n_layers: int):
        self.cos = {u: torch.zeros(n_layers, dtype=torch.float64) for u in UNITS}
        self.ang = {u: torch.zeros(n_layers, dtype=torch.float64) for u in UNITS}
        self._mid: Optional[torch.Tensor] = None
        self._hook = None

    def layer_start(self, i: int, layer) -> None:
        def capture(module, args):
            self._mid = args[0]
        self._hook = layer.post_attention_layernorm.register_forward_pre_hook(capture)

    def batch(self, i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        mid, self._mid = self._mid, None
        nx, nmid, ny = _norm(x), _norm(mid), _norm(y)
        for unit, c in (("attn", _cosine(x, nx, mid, nmid)), ("mlp", _cosine(mid, nmid, y, ny)),
                        ("block", _cosine(x, nx, y, ny))):
            self.cos[unit][i] += c.sum(dtype=torch.float64).cpu()
            self.ang[unit][i] += angular(c).sum(dtype=torch.float64).cpu()

    def layer_end(self, i: int) -> None:
        self._hook.remove()
        self._hook = None


class SpanScores:
    """Mean angular distance between the residual streams at every pair of block boundaries (Gromov et al.)."""

    def __init__(self, n_layers: int, n_tokens: int, hidden: int, scratch: Optional[Path] = None, chunk: int = 256):
        self.n_layers, self.n_tokens, self.hidden, self.chunk = n_layers, n_tokens, hidden, chunk
        self.span = torch.zeros(n_layers + 1, n_layers + 1, dtype=torch.float64)
        self._file = tempfile.TemporaryFile(prefix="dropquant-boundaries-", dir=scratch)
        self._seen = 0  # tokens of the current layer observed so far

    def layer_start(self, i: int, layer) -> None:
        self._seen = 0

    def _offset(self, boundary: int, token: int) -> int:
        return ((boundary * self.n_tokens) + token) * self.hidden * 2

    def _read(self, boundary: int, token: int, count: int) -> np.ndarray:
        self._file.seek(self._offset(boundary, token))
        return np.fromfile(self._file, dtype=np.float16, count=count * self.hidden).reshape(count, self.hidden)

    def _add_boundary(self, k: int, h: torch.Tensor, token: int) -> None:
        """Store boundary k of these tokens and add its distances to boundaries 0..k (symmetric)."""
        unit = (h.float() / _norm(h).clamp_min(1e-12).unsqueeze(-1)).reshape(-1, self.hidden).half().cpu()
        self._file.seek(self._offset(k, token))
        self._file.write(unit.numpy().tobytes())
        # One earlier boundary at a time: memory stays one chunk, however deep the model.
        for c in range(0, unit.shape[0], self.chunk):
            mine = unit[c:c + self.chunk].float()
            for j in range(k + 1):
                other = torch.from_numpy(self._read(j, token + c, mine.shape[0])).float()
                d = angular(torch.linalg.vecdot(mine, other)).sum(dtype=torch.float64)
                self.span[k, j] += d
                if j < k:
                    self.span[j, k] += d

    def batch(self, i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        n = x.shape[0] * x.shape[1]
        self._add_boundary(i, x, self._seen)
        if i == self.n_layers - 1:
            self._add_boundary(i + 1, y, self._seen)
        self._seen += n

    def layer_end(self, i: int) -> None:
        pass

    def close(self) -> None:
        self._file.close()


def score_stack(stack, input_ids: torch.Tensor, batch_size: int = 4, metric: str = "cosine",
                spans: bool = True, progress: bool = True, scratch: Optional[Path] = None) -> dict:
    """Importance of every attention layer, MLP layer and block of the model behind `stack`."""
    n_layers = len(stack.layers)
    units = UnitScores(n_layers)
    observers = [units]
    span = SpanScores(n_layers, int(input_ids.numel()), int(stack.config.hidden_size), scratch) if spans else None
    if span is not None:
        observers.append(span)
    try:
        n = run_layers(stack, input_ids, observers, batch_size, progress, desc="scoring", scratch=scratch)
    finally:
        if span is not None:
            span.close()
    cosine = {u: (units.cos[u] / n).tolist() for u in UNITS}
    ang = {u: (units.ang[u] / n).tolist() for u in UNITS}
    importance = ang if metric == "angular" else {u: [1.0 - c for c in cosine[u]] for u in UNITS}
    result = {"n_tokens": n, "metric": metric, "importance": importance, "cosine": cosine, "angular": ang}
    if span is not None:
        result["span_angular"] = (span.span / n).tolist()
    return result


def score_model(model, input_ids: torch.Tensor, batch_size: int = 4, metric: str = "cosine",
                spans: bool = True, progress: bool = True) -> dict:
    """Importance of every unit of a loaded Llama-style model."""
    return score_stack(InMemoryStack(model), input_ids, batch_size, metric, spans, progress)


# --- the score stage's artifact, shared with dropquant.score ------------------------------------------------

def scores_file(stack, input_ids: torch.Tensor, *, identity: dict, calibration_sha256: Optional[str], dtype,
                batch_size: int, metric: str, name: str, progress: bool = True) -> dict:
    """What the score stage writes as scores.json: the model and tokens it came from, and every unit's scores."""
    stage_log = logging.getLogger("dropquant.score")  # the stage's log lines, wherever they are made
    stage_log.info("scoring %s on %d tokens in %s", name, input_ids.numel(), str(dtype).removeprefix("torch."))
    scores = score_stack(stack, input_ids, batch_size, metric, progress=progress)
    result = {"model": identity, "calibration": {"sha256": calibration_sha256},
              "dtype": str(dtype).removeprefix("torch."), "streamed": isinstance(stack, StreamedStack), **scores}
    imp = scores["importance"]
    for unit in UNITS:
        stage_log.info("mean %s importance %.4f", unit, sum(imp[unit]) / len(imp[unit]))
    return result


def importance_title(source: str, metric: str, n_tokens: int) -> str:
    """The heatmap's title, naming the model as a person would (not "embedded")."""
    from dropquant.naming import model_name

    return f"{model_name(str(source))}: importance ({metric}), {n_tokens} tokens"


def importance_csv(importance: dict) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", "attn", "mlp", "block"])
    for i, row in enumerate(zip(importance["attn"], importance["mlp"], importance["block"])):
        w.writerow([i, *(f"{v:.6f}" for v in row)])
    return buf.getvalue()


def write_scores(out: Path, result: dict, title: str) -> None:
    """The score stage's folder: heatmap.png, importance.csv, and scores.json last (its presence means done)."""
    from dropquant.atomic import write_json, write_text
    from dropquant.plots import importance_heatmap

    out = Path(out)
    imp = result["importance"]
    importance_heatmap(imp, out / "heatmap.png", title)
    write_text(out / "importance.csv", importance_csv(imp))
    write_json(out / "scores.json", result)
