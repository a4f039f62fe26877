"""What every API function shares: keyword arguments checked by params.yaml's own schema, and the model to work on
(a model.source spec, or a transformers model already loaded)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from pydantic import ValidationError

from dropquant.errors import DropquantError
from dropquant.params import Params

ModelLike = Union[str, "os.PathLike[str]", torch.nn.Module]
Calibration = Union[str, "os.PathLike[str]", torch.Tensor]


def build_params(func: str, args: dict[str, tuple[str, Any]]) -> Params:
    """A Params from `argument: (params.yaml key, value)`, validated by the same schema as params.yaml; an error
    names the argument (and its params.yaml key) with the schema's own message."""
    data: dict[str, Any] = {}
    for key, value in args.values():
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        by_key = {key: arg for arg, (key, _) in args.items()}
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            # a nested key (drop.layers.attn, heal.steps from heal_options) is named by its closest argument
            parts = key.split(".")
            arg = next((by_key[k] for k in (".".join(parts[:i]) for i in range(len(parts), 0, -1)) if k in by_key),
                       None)
            where = f"{arg} ({key}): " if arg and arg != key else f"{key}: " if key else ""
            if e["type"] == "extra_forbidden":
                lines.append(f"dropquant.{func}: {where}unknown option")
            else:
                got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
                lines.append(f"dropquant.{func}: {where}{e['msg']}{got}")
        raise DropquantError("\n".join(lines)) from None


def options(prefix: str, values: Optional[dict], arg: str) -> dict[str, tuple[str, Any]]:
    """A dict argument (heal_options={"steps": 50}) as more `argument: (key, value)` entries."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise DropquantError(f"{arg}: expected a dict of {prefix}.* options, got {type(values).__name__}")
    return {f"{arg}[{k!r}]": (f"{prefix}.{k}", v) for k, v in values.items()}


@dataclass
class Model:
    """The model an API call works on: where it comes from (`source`, a stand-in for a loaded one), its config,
    what artifacts record about it (`identity`), and the loaded model itself when the caller passed one."""

    source: Any  # dropquant.model.loading.ModelSource
    config: Any
    identity: dict
    loaded: Optional[torch.nn.Module] = None

    @property
    def name(self) -> str:
        return self.source.spec


def open_model(model: ModelLike, revision: Optional[str] = None) -> Model:
    """`model` resolved as model.source is (cheap checks, config only), or a loaded model taken as it is."""
    from dropquant.model.loading import (ModelSource, check_architecture, load_config, model_identity,
                                         resolve_source)

    if isinstance(model, torch.nn.Module):
        config = getattr(model, "config", None)
        if config is None or not hasattr(model, "model"):
            raise DropquantError(f"model: expected a transformers causal LM (…ForCausalLM), got {type(model).__name__}")
        name = str(getattr(model, "name_or_path", "") or "in-memory model")
        check_architecture(config, name)
        source = ModelSource(name, name)
        return Model(source, config, model_identity(config, source), model)
    if not isinstance(model, (str, os.PathLike)):
        raise DropquantError(f"model: expected a model id, a path or a loaded transformers model, "
                             f"got {type(model).__name__}")
    source = resolve_source(os.fspath(model), revision)
    config = load_config(source)
    return Model(source, config, model_identity(config, source))


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def existing_path(value, arg: str) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise DropquantError(f"{arg}: expected a path, got {type(value).__name__}")
    path = Path(value).expanduser()
    if not path.exists():
        raise DropquantError(f"{arg}: {path} not found")
    return path
