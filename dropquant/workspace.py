"""Where relative paths in params.yaml are taken from: $DROPQUANT_WORKSPACE if set, else the current directory.

A stage normally runs in the project folder, so `../shared/data` or `models/my-model` mean what they say there. A
stage run elsewhere on the project's behalf (a copy of its tracked files, say) sets DROPQUANT_WORKSPACE to the
project folder, and the same params then name the same files."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

WORKSPACE_ENV = "DROPQUANT_WORKSPACE"


def workspace_root() -> Path:
    """The folder relative paths are taken from."""
    value = os.environ.get(WORKSPACE_ENV)
    return Path(value).expanduser() if value else Path.cwd()


def workspace_path(value: Union[str, os.PathLike]) -> Path:
    """`value` with `~` expanded; a relative path joined to workspace_root(), an absolute one as it is."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else workspace_root() / path
