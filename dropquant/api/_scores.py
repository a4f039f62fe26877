"""`calibrate` and `score`: calibration tokens and per-unit importance, as the calibrate and score stages make them."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from dropquant.api._common import Calibration, Model, ModelLike, build_params, open_model
from dropquant.errors import DropquantError

UNITS = ("attn", "mlp", "block")


def _calibration_args(calibration, n_samples, seq_len, seed, hf_config, split, text_field) -> dict:
    if isinstance(calibration, torch.Tensor):  # its shape is n_samples (heal's holdout is checked against it)
        source, n_samples = "tensor", calibration.shape[0] if calibration.ndim == 2 else n_samples
    else:
        source = os.fspath(calibration) if isinstance(calibration, os.PathLike) else calibration
    return {"calibration": ("calibration.source", source), "n_samples": ("calibration.n_samples", n_samples),
            "seq_len": ("calibration.seq_len", seq_len), "seed": ("calibration.seed", seed),
            "hf_config": ("calibration.hf_config", hf_config), "split": ("calibration.split", split),
            "text_field": ("calibration.text_field", text_field)}


def _model_args(dtype, device, stream, revision) -> dict:
    return {"dtype": ("model.dtype", dtype), "device": ("model.device", device), "stream": ("model.stream", stream),
            "revision": ("model.revision", revision)}


def _tokenizer_for(m: Model, tokenizer):
    """The tokenizer to pack text with: the caller's, or the source's (a loaded model's: from its name_or_path)."""
    from dropquant.model.loading import load_tokenizer, resolve_source

    if tokenizer is not None:
        return tokenizer
    if m.loaded is None:
        return load_tokenizer(m.source)
    try:
        return load_tokenizer(resolve_source(m.name))
    except DropquantError:
        raise DropquantError(f"tokenizer: a loaded model ({m.name}) needs its tokenizer passed as tokenizer=..., "
                             "or calibration given as a tensor of token ids") from None


def tokens_for(m: Model, params, calibration: Calibration, tokenizer=None) -> tuple[torch.Tensor, dict]:
    """(input_ids, manifest) for `calibration`: token ids as they are, the calibrate stage's tokens.safetensors
    (checked against the model), or a calibration.source made into tokens as the calibrate stage does."""
    from dropquant.artifacts import read_calibration
    from dropquant.calibration import make_calibration, tokens_digest

    if isinstance(calibration, torch.Tensor):
        if calibration.ndim != 2 or calibration.is_floating_point() or calibration.numel() == 0:
            raise DropquantError(f"calibration: a tensor must hold token ids of shape [n_samples, seq_len], got "
                                 f"{calibration.dtype} {list(calibration.shape)}")
        ids = calibration.long()
        return ids, {"source": "tensor", "n_samples": ids.shape[0], "seq_len": ids.shape[1], "n_tokens": ids.numel(),
                     "sha256": tokens_digest(ids), "model": m.identity}
    if str(calibration).endswith(".safetensors"):
        return read_calibration(Path(calibration).expanduser(), m.identity)
    if m.loaded is not None:
        return make_calibration(params, m.source, m.config, tokenizer=_tokenizer_for(m, tokenizer), model=m.loaded)
    return make_calibration(params, m.source, m.config, tokenizer=tokenizer)


def calibrate(model: ModelLike, calibration: Calibration = "generated", *, n_samples: int = 32, seq_len: int = 512,
              seed: int = 0, hf_config: Optional[str] = None, split: str = "validation", text_field: str = "text",
              tokenizer: Any = None, dtype: str = "auto", device: str = "auto", revision: Optional[str] = None
              ) -> torch.Tensor:
    """Calibration tokens, as the calibrate stage makes them.

    Args:
        model: ``"embedded"``, a Hugging Face id, a local HF directory or a ``.gguf`` file (what ``model.source``
            takes), or a loaded transformers model.
        calibration: ``"generated"`` (text sampled from the model), a ``.txt``/``.jsonl`` path or glob,
            ``"hf:<dataset>"``, or the calibrate stage's ``tokens.safetensors``.
        n_samples: sequences of ``seq_len`` tokens.
        seq_len: tokens per sequence.
        seed: sampling and shuffling seed.
        hf_config: dataset config of an ``hf:`` source.
        split: dataset split of an ``hf:`` source.
        text_field: the JSON field holding the text.
        tokenizer: the tokenizer of a loaded ``model`` (a model id brings its own).
        dtype: ``model.dtype`` for sampling from the model.
        device: ``model.device`` for sampling from the model.
        revision: hub revision of a model id.

    Returns:
        Token ids of shape ``[n_samples, seq_len]``.

    Raises:
        DropquantError: a bad argument (named in the message) or an unusable model or source.
    """
    params = build_params("calibrate", {**_calibration_args(calibration, n_samples, seq_len, seed, hf_config, split,
                                                            text_field), **_model_args(dtype, device, "auto", revision)})
    m = open_model(model, params.model.revision)
    return tokens_for(m, params, calibration, tokenizer)[0]


@dataclass
class Scores:
    """Importance of every attention layer, MLP and block of one model, and the calibration tokens behind them.

    Attributes:
        data: what the score stage writes as ``scores.json`` (``importance``, ``cosine``, ``angular``,
            ``span_angular``, the model's identity, the calibration tokens' digest).
        tokens: the calibration tokens, reused by :func:`dropquant.drop` to heal.
        calibration: their manifest, as the calibrate stage writes it.
    """

    data: dict
    tokens: Optional[torch.Tensor] = field(default=None, repr=False)
    calibration: dict = field(default_factory=dict, repr=False)

    @property
    def importance(self) -> dict[str, list[float]]:
        """``{"attn": [...], "mlp": [...], "block": [...]}``, one value per layer; lower = more redundant."""
        return self.data["importance"]

    @property
    def model(self) -> dict:
        """The model's identity (source, shape, fingerprint), as every artifact records it."""
        return self.data["model"]

    @property
    def num_layers(self) -> int:
        return len(self.importance["attn"])

    @property
    def sha256(self) -> str:
        """Digest of scores.json as :meth:`save` writes it (what a drop plan records)."""
        return hashlib.sha256((json.dumps(self.data, indent=2) + "\n").encode()).hexdigest()

    def lowest(self, unit: str, n: int) -> list[int]:
        """The `n` layers whose `unit` (attn, mlp or block) is most redundant, most redundant first."""
        if unit not in UNITS:
            raise DropquantError(f"unit: expected one of {', '.join(UNITS)}, got {unit!r}")
        values = self.importance[unit]
        return sorted(range(len(values)), key=lambda i: (values[i], i))[:n]

    def table(self) -> str:
        """A plain-text table: one row per layer, the importance of its attention, MLP and block."""
        rows = [f"layer  {'attn':>8}  {'mlp':>8}  {'block':>8}"]
        for i, row in enumerate(zip(*(self.importance[u] for u in UNITS))):
            rows.append(f"{i:>5}  " + "  ".join(f"{v:8.4f}" for v in row))
        return "\n".join(rows)

    def __str__(self) -> str:
        return f"importance ({self.data.get('metric')}) of {self.model.get('source')}, " \
               f"{self.data.get('n_tokens')} tokens\n{self.table()}"

    def plot(self, path: Union[str, os.PathLike], title: Optional[str] = None) -> Path:
        """The score stage's heatmap (one row per unit, one column per layer) as a PNG at `path`."""
        from dropquant.plots import importance_heatmap
        from dropquant.prune.scoring import importance_title

        importance_heatmap(self.importance, path, title or importance_title(
            self.model.get("source"), self.data.get("metric"), self.data.get("n_tokens")))
        return Path(path)

    def save(self, folder: Union[str, os.PathLike]) -> Path:
        """Write the score stage's folder (scores.json, importance.csv, heatmap.png); returns scores.json."""
        from dropquant.prune.scoring import importance_title, write_scores

        folder = Path(folder)
        write_scores(folder, self.data, importance_title(self.model.get("source"), self.data.get("metric"),
                                                         self.data.get("n_tokens")))
        return folder / "scores.json"

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Scores":
        """Scores from a scores.json (the score stage's, or :meth:`save`'s)."""
        from dropquant.artifacts import read_json
        from dropquant.prune.selection import check_scores

        data = read_json(path, "scores", "run the score stage or dropquant.score")
        check_scores(data, len((data.get("importance") or {}).get("attn") or []), origin=str(path))
        return cls(data)


def score(model: ModelLike, calibration: Calibration = "generated", *, n_samples: int = 32, seq_len: int = 512,
          seed: int = 0, metric: str = "cosine", batch_size: int = 2, hf_config: Optional[str] = None,
          split: str = "validation", text_field: str = "text", tokenizer: Any = None, dtype: str = "auto",
          device: str = "auto", stream: Union[str, bool] = "auto", revision: Optional[str] = None,
          progress: bool = True) -> Scores:
    """Importance (1 − cos between input and output) of every attention layer, MLP and block.

    The calibrate and score stages' work in one call: the same tokens, the same scores.

    Args:
        model: ``"embedded"``, a Hugging Face id, a local HF directory or a ``.gguf`` file, or a loaded
            transformers model (scored as it is, in its own dtype and device).
        calibration: ``"generated"``, a ``.txt``/``.jsonl`` path or glob, ``"hf:<dataset>"``, the calibrate
            stage's ``tokens.safetensors``, or a tensor of token ids ``[n_samples, seq_len]``.
        n_samples: calibration sequences (``calibration.n_samples``).
        seq_len: tokens per sequence (``calibration.seq_len``).
        seed: calibration seed.
        metric: ``"cosine"`` (1 − cos) or ``"angular"`` (arccos / π).
        batch_size: sequences per forward pass.
        hf_config: dataset config of an ``hf:`` source.
        split: dataset split of an ``hf:`` source.
        text_field: the JSON field holding the text.
        tokenizer: the tokenizer of a loaded ``model`` (for text calibration).
        dtype: ``model.dtype``: ``auto`` (the checkpoint's), ``bfloat16``, ``float16`` or ``float32``.
        device: ``model.device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        stream: ``model.stream``: read layer by layer (``True``), load whole (``False``), or ``auto``.
        revision: hub revision of a model id.
        progress: show progress bars.

    Returns:
        The :class:`Scores`; ``print(scores)`` shows them per layer, ``scores.plot(path)`` draws the heatmap.

    Raises:
        DropquantError: a bad argument (named in the message) or an unusable model or calibration source.
    """
    from dropquant.model.layerwise import InMemoryStack, source_stack
    from dropquant.model.loading import resolve_device, resolve_dtype
    from dropquant.prune.scoring import scores_file

    params = build_params("score", {
        **_calibration_args(calibration, n_samples, seq_len, seed, hf_config, split, text_field),
        **_model_args(dtype, device, stream, revision),
        "metric": ("score.metric", metric), "batch_size": ("score.batch_size", batch_size)})
    m = open_model(model, params.model.revision)
    tokens, manifest = tokens_for(m, params, calibration, tokenizer)
    if m.loaded is not None:
        stack, torch_dtype = InMemoryStack(m.loaded), next(m.loaded.parameters()).dtype
    else:
        torch_dtype = resolve_dtype(params.model.dtype, m.source)
        stack = source_stack(m.source, torch_dtype, resolve_device(params.model.device), params.model.stream)
    data = scores_file(stack, tokens, identity=m.identity, calibration_sha256=manifest["sha256"], dtype=torch_dtype,
                       batch_size=params.score.batch_size, metric=params.score.metric, name=m.name, progress=progress)
    return Scores(data, tokens, manifest)
