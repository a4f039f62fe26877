"""A model's name for titles and reports: what a person calls it, not the `model.source` setting ("embedded")."""
from __future__ import annotations

import json
import re
from pathlib import Path

# A GGUF file is usually named <model>.<quant type>.gguf or <model>-<quant type>.gguf.
_QUANT_SUFFIX = re.compile(r"[.-](F32|F16|BF16|Q\d\w*|IQ\d\w*|TQ\d\w*)$", re.IGNORECASE)


def _from_gguf(path: Path) -> str:
    return _QUANT_SUFFIX.sub("", path.stem) or path.stem


def model_name(spec: str) -> str:
    """The embedded model's and a .gguf file's name from the file, a local HF directory's from its config (the
    hub id it was saved from) or its folder, a hub id as it is."""
    from dropquant.model.loading import EMBEDDED, embedded_gguf_path

    if spec == EMBEDDED:
        return _from_gguf(embedded_gguf_path())
    path = Path(spec)
    if spec.endswith(".gguf"):
        return _from_gguf(path)
    config = path / "config.json"
    if config.is_file():
        try:
            origin = json.loads(config.read_text()).get("_name_or_path") or ""
        except (OSError, ValueError):
            origin = ""
        # A hub id names the model; a local path (where it was saved from) says nothing more than the folder.
        if re.fullmatch(r"[\w.-]+/[\w.-]+", origin) and not Path(origin).exists():
            return origin
        return path.resolve().name
    return spec
