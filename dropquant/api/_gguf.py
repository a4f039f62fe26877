"""`to_gguf`: a pruned (or unpruned) model as a GGUF file for llama.cpp, written as the quantize stage writes it.

stages/quantize.py keeps its own body (it is long, and others change it): this calls the same library functions
in the same order (export in the checkpoint's precision, then llama.cpp's quantizer) and writes the same manifest.
What is not here: the importance matrix (quantize.imatrix) and the reference export; use the stage for those.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

from dropquant.api._common import build_params
from dropquant.errors import DropquantError

log = logging.getLogger("dropquant.quantize")


def manifest_path(gguf: Union[str, "os.PathLike[str]"]) -> Path:
    """Where :func:`to_gguf` writes a file's manifest: ``model-Q8_0.gguf`` -> ``model-Q8_0.manifest.json``."""
    gguf = Path(gguf)
    return gguf.with_name(gguf.stem + ".manifest.json")


def read_manifest(gguf: Union[str, "os.PathLike[str]"]) -> Optional[dict]:
    """The manifest of a GGUF file: :func:`to_gguf`'s beside it, or the quantize stage's (its folder's
    manifest.json, for a file named model.gguf); None when there is none."""
    gguf = Path(gguf)
    for path in (manifest_path(gguf), gguf.parent / "manifest.json" if gguf.name == "model.gguf" else None):
        if path is not None and path.is_file():
            return json.loads(path.read_text())
    return None


def _pruned_records(directory: Path) -> tuple[Optional[dict], Optional[dict]]:
    """(plan.json, heal.json) that :func:`dropquant.drop` wrote beside a checkpoint, when present."""
    from dropquant.artifacts import read_json, read_plan
    from dropquant.api._drop import PLAN_FILE

    plan = read_plan(directory / PLAN_FILE) if (directory / PLAN_FILE).is_file() else None
    heal = read_json(directory / "heal.json", "heal record", "") if (directory / "heal.json").is_file() else None
    return plan, heal


def to_gguf(model: Union[str, "os.PathLike[str]"], out: Union[str, "os.PathLike[str]"], quant: str = "Q8_0", *,
            source: Optional[str] = None, dtype: str = "auto") -> Path:
    """Write `model` as a GGUF file of type `quant`, with the quantize stage's manifest beside it.

    Args:
        model: a checkpoint directory written by :func:`dropquant.drop` (or the drop or heal stage), or an
            unpruned model as ``model.source`` takes it (``"embedded"``, a hub id, an HF directory, a ``.gguf``):
            the baseline.
        out: the GGUF file to write; its manifest goes to ``<stem>.manifest.json`` beside it.
        quant: a llama.cpp file type (``quantize.type``): ``Q8_0``, ``Q4_K_M``, ``F16``, ...
        source: the unpruned model a checkpoint was cut from, when its plan.json does not say (its GGUF's
            tokenizer is carried over verbatim when it is a GGUF).
        dtype: ``model.dtype`` for loading a GGUF source (the baseline only).

    Returns:
        The path of the GGUF file.

    Raises:
        DropquantError: a bad argument (named in the message), or a model GGUF cannot express.
    """
    from dropquant.artifacts import file_sha256
    from dropquant.atomic import write_json
    from dropquant.gguf.export import export_checkpoint, export_model
    from dropquant.gguf.quantize import NEEDS_IMATRIX, llama_ftype, quantize_gguf
    from dropquant.model.families import check_gguf_expressible
    from dropquant.model.loading import (checkpoint_dir, load_config, load_model, model_identity, resolve_dtype,
                                         resolve_source)
    from dropquant.prune.pruned_checkpoint import config_from_checkpoint, read_record
    from dropquant.prune.surgery import RECORD_KEY

    params = build_params("to_gguf", {"quant": ("quantize.type", quant), "dtype": ("model.dtype", dtype)})
    qtype = params.quantize.type
    llama_ftype(qtype)
    if qtype in NEEDS_IMATRIX:
        raise DropquantError(f"quant: {qtype} needs an importance matrix, which dropquant.to_gguf does not make: use "
                             "the quantize stage with quantize.imatrix: true, or another type")
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out).endswith(".gguf"):
        raise DropquantError(f"out: expected a path ending in .gguf, got {out!r}")
    out = Path(out).expanduser()

    path = Path(model).expanduser() if isinstance(model, (str, os.PathLike)) else None
    if path is None:
        raise DropquantError(f"model: expected a checkpoint directory or a model id/path, got {type(model).__name__}")
    config_file = path / "config.json"
    pruned = path.is_dir() and config_file.is_file() and RECORD_KEY in json.loads(config_file.read_text())
    if pruned:
        plan, heal_record = _pruned_records(path)
        spec = source or (plan or {}).get("model", {}).get("source")
        src = resolve_source(spec, (plan or {}).get("model", {}).get("revision")) if spec else None
        identity = (plan or {}).get("model")
        if plan is not None:
            check_gguf_expressible(load_config(src) if src else config_from_checkpoint(path), plan["attn"],
                                   plan["mlp"], spec or str(path))
        else:
            record = read_record(config_from_checkpoint(path))
            check_gguf_expressible(config_from_checkpoint(path), record["dropped_attn"], record["dropped_mlp"],
                                   str(path))
        directory, name = path, f"{spec or path.name} dropquant"
    else:
        plan = heal_record = None
        src = resolve_source(os.fspath(model))
        config = load_config(src)
        identity = model_identity(config, src)
        directory = checkpoint_dir(src)  # None: a GGUF source, loaded (dequantized) whole
        check_gguf_expressible(config, [], [], src.spec)
        name = f"{src.spec} baseline"

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".to_gguf-", dir=out.parent) as tmp:
        tok = {"tokenizer_gguf": src.gguf_path} if src is not None and src.gguf_path is not None else {}
        intermediate, final = Path(tmp) / "model.source.gguf", Path(tmp) / "model.gguf"
        if directory is not None:
            log.info("exporting %s to GGUF in its own precision, tensor by tensor", directory)
            info = export_checkpoint(directory, intermediate, name=name, **tok)
        else:
            log.info("exporting the unpruned model to GGUF")
            info = export_model(load_model(src, resolve_dtype(params.model.dtype, src)), intermediate, name=name,
                                **tok)
        if qtype == info.out_type:
            intermediate.rename(final)
        else:
            log.info("quantizing %s to %s with llama.cpp", info.out_type, qtype)
            quantize_gguf(intermediate, final, qtype)
            intermediate.unlink()
        manifest = {
            "type": qtype, "size_bytes": final.stat().st_size, "sha256": file_sha256(final), "arch": info.arch,
            "source_type": info.out_type, "plan": plan, "plan_id": None if plan is None else plan["plan_id"],
            "model": identity, "baseline": not pruned, "reference": False,
            "heal": None if heal_record is None else {k: heal_record.get(k) for k in ("method", "heal_id")},
            "imatrix": None, "layout": info.summary(),
        }
        os.replace(final, out)
    write_json(manifest_path(out), manifest)
    log.info("wrote %s (%s, %s, %.1f MB)", out, qtype, info.arch, manifest["size_bytes"] / 1e6)
    return out
