"""Heal a pruned checkpoint with `heal.method` (none, linear, distill, linear+distill) and write the heal record.

heal.json names what the healed checkpoint was made from (the plan, the calibration tokens, the heal parameters,
digested into `heal_id`, which the checkpoint's pruning record repeats); `read_heal` checks it for a consumer.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

import torch

from dropquant.artifacts import PLAN_ID, check_same, json_digest, read_json
from dropquant.errors import DropquantError
from dropquant.heal.distill import check_precision, deterministic_cublas, distill, teacher_targets
from dropquant.heal.linear import HEAL_ID, fit_linear, standin_layers, standin_parameters, write_healed
from dropquant.prune.pruned_checkpoint import load_pruned, save_pruned, side_files
from dropquant.prune.selection import DropPlan
from dropquant.prune.surgery import RECORD_KEY

log = logging.getLogger(__name__)

HEAL_FILE = "heal.json"


# --- the heal artifact ---------------------------------------------------------------------------------------

def heal_id(heal_params: dict, plan_id: str, calibration_sha256: Optional[str]) -> str:
    """Digest of everything a healed checkpoint follows from."""
    return json_digest({"heal": heal_params, PLAN_ID: plan_id, "calibration_sha256": calibration_sha256})


def read_heal(directory: str | Path, plan: dict, heal_params) -> tuple[dict, Optional[Path]]:
    """(heal.json, the checkpoint to export: the healed one, or None for the pruned one as it is), refused
    when it was made for another plan or with other heal parameters than `heal_params` (the current `heal.*`),
    or its checkpoint is not the one it describes."""
    directory = Path(directory)
    hint = "run the heal stage"
    record = read_json(directory / HEAL_FILE, "heal record", hint)
    check_same(str(directory / HEAL_FILE), PLAN_ID, record.get(PLAN_ID), plan[PLAN_ID],
               f"it heals another drop plan than the current one; {hint}")
    _check_heal_params(directory / HEAL_FILE, record, heal_params, hint)
    if not record.get("checkpoint"):
        return record, None
    checkpoint = directory / record["checkpoint"]
    config = read_json(checkpoint / "config.json", "healed checkpoint", hint)
    check_same(f"{checkpoint}/config.json", HEAL_ID, (config.get(RECORD_KEY) or {}).get(HEAL_ID), record.get(HEAL_ID),
               f"the checkpoint is not the one {directory / HEAL_FILE} describes (an interrupted heal stage?); {hint}")
    return record, checkpoint


def _check_heal_params(path: Path, record: dict, heal_params, hint: str) -> None:
    """A heal.json left by an earlier run with other heal.* (a heal stage killed before replacing it, and the
    next stage run by hand) would otherwise have its checkpoint, or the unhealed one, exported as this run's."""
    current = heal_params if isinstance(heal_params, dict) else heal_params.model_dump(mode="json")
    recorded = record.get("params") or {}
    if recorded == current:
        return
    differ = [f"heal.{k}: {recorded.get(k)!r} there, {current.get(k)!r} now"
              for k in sorted(set(recorded) | set(current)) if k != "method" and recorded.get(k) != current.get(k)]
    made, now = record.get("method"), current.get("method")
    what = (f"heal.method={made}, and the current parameters ask for heal.method={now}" if made != now
            else f"heal.method={made} with other heal parameters than the current ones")
    raise DropquantError(f"{path} was made by {what}{': ' if differ else ''}{', '.join(differ)} (an interrupted or "
                         f"older heal stage?); {hint} with the current parameters")


def nothing_to_heal(plan: dict) -> bool:
    """A plan that drops nothing (drop.method none, or n = 0): the pruned checkpoint is the unpruned model."""
    return DropPlan.from_json(plan).is_empty


def _merge(dplan, hp, open_base, train, pruned_dir: Path, out: Path, hid: str, batch_size: int, progress: bool) -> dict:
    """The merged maps (and any fallback stand-ins) fitted and written to `out`; their heal.json record."""
    from dropquant.heal.merged import fit_merged, merged_parameters_changed, plan_cuts, sublayer_name

    log.info("fitting the merged heal of %d cut(s) on %d tokens (%s form, %s inputs, %s objective, ridge %g)",
             len(plan_cuts(dplan)), train.numel(), hp.form, hp.fit_on, hp.objective, hp.merged_ridge)
    fit = fit_merged(open_base(), dplan, train, ridge=hp.merged_ridge, fit_on=hp.fit_on, form=hp.form,
                     weigh=hp.weigh, objective=hp.objective, fallback=hp.fallback, standin_ridge=hp.ridge,
                     cosine_steps=hp.cosine_steps, cosine_lr=hp.cosine_lr, seed=hp.seed, batch_size=batch_size,
                     progress=progress)
    write_healed(pruned_dir, out, dplan, hid, fit.standins, fit.folded())
    return {"cuts": [{"cut": c.describe(), "host": None if c.host is None else sublayer_name(c.host),
                      "explained": fit.explained.get(c.host), "explained_plain": fit.plain.get(c.host)}
                     for c in fit.cuts],
            "params_changed": merged_parameters_changed(fit), "params_added": standin_parameters(fit.standins),
            "fallback_layers": sorted(fit.standins.weights), "seconds": round(fit.seconds, 2)}


# --- the whole heal: linear, merged, distill ------------------------------------------------------------------

def heal(*, method: str, heal_params, plan: dict, pruned_dir: Path, out_dir: Path, tokens: torch.Tensor,
         calibration_sha256: str, open_base, dtype: torch.dtype, device: str, batch_size: int = 2,
         progress: bool = True) -> dict:
    """Heal the pruned checkpoint `pruned_dir` cut by `plan` into `out_dir` (a fresh directory); returns the
    record written as heal.json. `open_base()` gives the unpruned model's layer stack (in memory or streamed)."""
    hp = heal_params
    record = {"method": method, PLAN_ID: plan[PLAN_ID], "params": hp.model_dump(mode="json"),
              "calibration_sha256": calibration_sha256, "checkpoint": None}
    record[HEAL_ID] = heal_id(record["params"], plan[PLAN_ID], calibration_sha256)
    if method == "none":
        return record
    if nothing_to_heal(plan):
        # Distilling the unpruned model towards itself would train for nothing (held-out KL 0 from step 0).
        log.info("heal.method=%s: the drop plan removes nothing, so there is nothing to heal; the pruned "
                 "checkpoint is used as it is", method)
        record["skipped"] = "the drop plan removes nothing"
        return record
    if "distill" in method:
        check_precision(hp.precision, device)  # before the fit and the teacher pass, not after them
        deterministic_cublas(device)
    if tokens.shape[0] <= hp.holdout:
        raise DropquantError(f"heal.holdout={hp.holdout} leaves no calibration sample to fit on: the calibration "
                             f"tokens have {tokens.shape[0]} samples")
    dplan = DropPlan.from_json(plan)
    train, holdout = tokens[:-hp.holdout], tokens[-hp.holdout:]
    record["tokens"] = {"train_samples": int(train.shape[0]), "heldout_samples": int(holdout.shape[0]),
                        "seq_len": int(tokens.shape[1])}
    checkpoint = out_dir / "model"
    student_dir = pruned_dir
    if "linear" in method:
        layers = standin_layers(dplan)
        if not layers:
            log.warning("heal.method=%s: the plan drops no attention, so there is no linear stand-in to fit", method)
        else:
            log.info("fitting %d linear stand-ins (layers %s) on %d tokens (%s inputs, ridge %g)", len(layers),
                     layers, train.numel(), hp.fit_on, hp.ridge)
            fit = fit_linear(open_base(), dplan, train, ridge=hp.ridge, fit_on=hp.fit_on, batch_size=batch_size,
                             progress=progress)
            student_dir = out_dir / "linear" if "distill" in method else checkpoint
            write_healed(pruned_dir, student_dir, dplan, record[HEAL_ID], fit)
            record["linear"] = {"layers": sorted(fit.weights), "explained": {str(k): v for k, v in fit.explained.items()},
                                "params_added": standin_parameters(fit), "seconds": round(fit.seconds, 2)}
    if "merged" in method:
        student_dir = out_dir / "merged" if "distill" in method else checkpoint
        record["merged"] = _merge(dplan, hp, open_base, train, pruned_dir, student_dir, record[HEAL_ID], batch_size,
                                  progress)
    if "distill" in method:
        targets = teacher_targets(open_base(), tokens, hp.topk, hidden=hp.hidden_weight > 0, batch_size=batch_size,
                                  progress=progress)
        n_train = train.shape[0]
        student = load_pruned(student_dir, torch.float32, device)
        student, result = distill(student, targets.select(slice(0, n_train)), targets.select(slice(n_train, None)),
                                  what=hp.train, lora_rank=hp.lora_rank, steps=hp.steps, lr=hp.lr,
                                  batch_size=hp.batch_size, hidden_weight=hp.hidden_weight, eval_every=hp.eval_every,
                                  patience=hp.patience, seed=hp.seed, device=device, precision=hp.precision,
                                  progress=progress)
        student.config.dropquant[HEAL_ID] = record[HEAL_ID]
        save_pruned(student.to(dtype), checkpoint, extra_files=side_files(student_dir))
        record["distill"] = result.to_json()
        if student_dir != pruned_dir:
            shutil.rmtree(student_dir)
    if checkpoint.is_dir():
        record["checkpoint"] = checkpoint.name
        from dropquant.heal.recovered import heldout_recovery

        # The healed checkpoint's KL beside the plain drop's, on the same held-out tokens: the share recovered.
        record["heldout_kl"] = heldout_recovery(open_base, pruned_dir, checkpoint, holdout, hp.topk, device,
                                                batch_size)
        log.info("held-out KL from the base: %.4f unhealed, %.4f healed (%.0f%% recovered)",
                 record["heldout_kl"]["unhealed"], record["heldout_kl"]["healed"],
                 100 * (record["heldout_kl"]["recovered"] or 0))
    return record
