"""dropquant: one-shot attention/MLP/block dropping and GGUF quantization for Llama-style LLMs.

The Python API (docs/python.md): score -> plan -> drop -> to_gguf -> evaluate.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dropquant.errors import DropquantError

# Loaded on first use: the API pulls in torch and transformers, and every stage, flow and CLI imports this package.
_LAZY = {"load_pruned": "dropquant.prune.pruned_checkpoint",
         **{name: "dropquant.api" for name in ("Evaluation", "Plan", "Scores", "calibrate", "drop", "evaluate",
                                               "manifest_path", "plan", "read_manifest", "score", "to_gguf")}}

__all__ = ["DropquantError", *sorted(_LAZY)]

if TYPE_CHECKING:
    from dropquant.api import (Evaluation, Plan, Scores, calibrate, drop, evaluate, manifest_path, plan,
                               read_manifest, score, to_gguf)
    from dropquant.prune.pruned_checkpoint import load_pruned


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'dropquant' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
