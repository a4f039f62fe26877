"""`drop`: cut a model by a plan, heal it if asked, and write the checkpoint as the drop and heal stages do."""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from dropquant.api._common import Calibration, ModelLike, build_params, open_model, options
from dropquant.api._plan import Plan
from dropquant.api._scores import _calibration_args, _model_args, _tokenizer_for, tokens_for
from dropquant.errors import DropquantError

PLAN_FILE = "plan.json"  # beside the checkpoint's own files: what `to_gguf` records about it


def drop(model: ModelLike, plan: Plan, *, heal: str = "none", out: Union[str, "os.PathLike[str]", None] = None,
         calibration: Optional[Calibration] = None, n_samples: int = 32, seq_len: int = 512,
         heal_options: Optional[dict] = None, tokenizer: Any = None, dtype: str = "auto", device: str = "auto",
         stream: Union[str, bool] = "auto", revision: Optional[str] = None, progress: bool = True):
    """Drop what `plan` says from `model`, heal it if asked, and return the pruned transformers model.

    The drop stage's cut and the heal stage's healing, in one call. With ``out``, the checkpoint is written as
    the drop stage writes it (``dropquant.load_pruned(out)`` reloads it exactly; a healed one as the heal stage
    writes it), with the stage's plan.json beside it and, when healed, heal.json.

    Args:
        model: the model the plan was made for: ``"embedded"``, a Hugging Face id, a local HF directory or a
            ``.gguf`` file, or a loaded transformers model. A loaded model is pruned in place (as transformers'
            ``prune_heads``); with ``heal``, a copy is, since healing reads the unpruned model.
        plan: from :func:`dropquant.plan`.
        heal: ``none``, ``linear`` (closed-form stand-ins for dropped attention), ``merged`` (maps folded
            into the weights before each cut: no parameter added), ``distill``, ``linear+distill`` or
            ``merged+distill``.
        out: directory for the checkpoint (needed for a model too large to load whole).
        calibration: tokens to heal on: as :func:`dropquant.score` takes them; default: the plan's scores' tokens
            (else ``"generated"``).
        n_samples: calibration sequences, when they are made here.
        seq_len: tokens per sequence, when they are made here.
        heal_options: more ``heal.*`` parameters, e.g. ``{"steps": 60, "train": "norms"}``.
        tokenizer: saved with the checkpoint (a loaded model's; a model id brings its own).
        dtype: ``model.dtype``: the checkpoint keeps the source's precision with ``auto``.
        device: ``model.device`` for healing.
        stream: ``model.stream``: read the source layer by layer (``True``), load whole (``False``) or ``auto``.
        revision: hub revision of a model id.
        progress: show progress bars.

    Returns:
        The pruned (and healed) model, a transformers ``PreTrainedModel`` in eval mode.

    Raises:
        DropquantError: a bad argument (named in the message), a plan made for another model, or a drop the
            model cannot take.
    """
    from dropquant.artifacts import check_model
    from dropquant.atomic import write_json
    from dropquant.prune.cut import cut
    from dropquant.prune.pruned_checkpoint import load_pruned

    if not isinstance(plan, Plan):
        raise DropquantError(f"plan: expected a dropquant.Plan (from dropquant.plan), got {type(plan).__name__}")
    tokens = calibration if calibration is not None else plan.tokens
    cal_args = _calibration_args(tokens if tokens is not None else "generated", n_samples, seq_len, 0, None,
                                 "validation", "text")
    params = build_params("drop", {**cal_args, **_model_args(dtype, device, stream, revision),
                                   "heal": ("heal.method", heal), **options("heal", heal_options, "heal_options")})
    m = open_model(model, params.model.revision)
    check_model(plan.model, m.identity, "plan", "make the plan from this model's scores")
    healing = params.heal.method != "none"
    out = Path(out).expanduser() if out is not None else None
    target, torch_dtype, stream_from = _open_target(m, params, copy_loaded=healing)
    if stream_from is not None and out is None:
        raise DropquantError(f"out: {m.name} is streamed from disk (too large to load whole, or stream=True): "
                             "pass out=<directory> for the pruned checkpoint")
    sizes = cut(target, plan.drop, plan.plan_id, dtype=torch_dtype)
    if out is None and not healing:
        return target
    with tempfile.TemporaryDirectory(prefix="dropquant-drop-", dir=out.parent if out else None) as scratch:
        scratch = Path(scratch)
        pruned_dir = scratch / "pruned" if healing or out is None else out
        record = {**plan.record, **_save(m, target, sizes, pruned_dir, tokenizer, stream_from)}
        if not healing:
            write_json(out / PLAN_FILE, record)
            return target if stream_from is None else load_pruned(out, torch_dtype)
        checkpoint, heal_record = _heal(m, params, record, pruned_dir, scratch, tokens, tokenizer, torch_dtype,
                                        progress)
        healed = load_pruned(checkpoint, torch_dtype)
        if out is not None:
            _place(checkpoint, out, {PLAN_FILE: record, "heal.json": heal_record})
        return healed


def _open_target(m, params, copy_loaded: bool):
    """(the model to cut, its dtype, the safetensors to copy from when it is only a skeleton)."""
    from dropquant.model.loading import resolve_dtype
    from dropquant.prune.cut import open_for_cut

    if m.loaded is not None:
        return (copy.deepcopy(m.loaded) if copy_loaded else m.loaded), next(m.loaded.parameters()).dtype, None
    torch_dtype = resolve_dtype(params.model.dtype, m.source)
    target, stream_from = open_for_cut(m.source, m.config, torch_dtype, params.model.stream)
    return target, torch_dtype, stream_from


def _save(m, target, sizes: dict, directory: Path, tokenizer, stream_from) -> dict:
    from dropquant.model.loading import load_tokenizer
    from dropquant.prune.cut import save_cut

    if tokenizer is None and m.loaded is None:
        tokenizer = load_tokenizer(m.source)
    elif tokenizer is None:  # a loaded model's tokenizer when its name_or_path has one; else none is saved
        try:
            tokenizer = _tokenizer_for(m, None)
        except DropquantError:
            tokenizer = None
    return save_cut(target, sizes, directory, tokenizer=tokenizer, stream_from=stream_from)


def _heal(m, params, record: dict, pruned_dir: Path, scratch: Path, tokens, tokenizer, torch_dtype, progress):
    """The heal stage's healing of `pruned_dir` into scratch/heal; returns (checkpoint to use, heal.json)."""
    from dropquant.heal.apply import heal
    from dropquant.model.layerwise import InMemoryStack, source_stack
    from dropquant.model.loading import resolve_device

    ids, manifest = tokens_for(m, params, tokens if tokens is not None else "generated", tokenizer)
    device = resolve_device(params.model.device)
    if m.loaded is not None:
        def open_base():
            return InMemoryStack(m.loaded)
    else:
        def open_base():
            return source_stack(m.source, torch_dtype, device, params.model.stream)
    (scratch / "heal").mkdir()
    heal_record = heal(method=params.heal.method, heal_params=params.heal, plan=record, pruned_dir=pruned_dir,
                       out_dir=scratch / "heal", tokens=ids, calibration_sha256=manifest["sha256"],
                       open_base=open_base, dtype=torch_dtype, device="cuda:0" if device == "auto" else device,
                       batch_size=params.score.batch_size, progress=progress)
    healed = scratch / "heal" / heal_record["checkpoint"] if heal_record["checkpoint"] else pruned_dir
    return healed, heal_record


def _place(checkpoint: Path, out: Path, records: dict) -> None:
    """`checkpoint` moved to `out` (replaced atomically) with its records beside it."""
    from dropquant.atomic import atomic_dir, write_json

    with atomic_dir(out) as tmp:
        for item in checkpoint.iterdir():
            shutil.move(str(item), tmp / item.name)
        for name, record in records.items():
            write_json(tmp / name, record)
