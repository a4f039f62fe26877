"""What each pipeline artifact was made from, and the checks a consumer runs before it trusts one.

DVC keeps artifacts consistent inside `dvc repro`; these records make that hold for stages run by hand
and after a kill too. Each artifact names its inputs by digest:

  calibration/manifest.json  model fingerprint, tokens sha256
  scores/scores.json         model fingerprint, calibration tokens sha256 (drop checks it when they are present)
  drop/plan.json             model fingerprint, scores file sha256, plan_id (digest of the whole plan)
  pruned/config.json         dropquant.plan_id: the plan the checkpoint was cut by
  gguf/manifest.json         model fingerprint, plan_id, the GGUF's own sha256
  baseline/eval/manifest.json  the base GGUF's sha256
  eval/metrics.json          variant: plan_id, GGUF sha256s, params digest (so a report can refuse stale metrics)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from .errors import DropquantError

PLAN_ID = "plan_id"
# Written into plan.json after the checkpoint is cut; they follow from the plan, so they are not part of its id.
PLAN_DERIVED = (PLAN_ID, "kept_layers", "size")


def json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str | Path, what: str, hint: str) -> dict:
    """A JSON artifact, or one error naming the file, what it should be and how to make it."""
    path = Path(path)
    if not path.is_file():
        raise DropquantError(f"{what} not found: {path} ({hint})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DropquantError(f"{path}: not valid JSON ({err}); {hint}") from None
    if not isinstance(data, dict):
        raise DropquantError(f"{path}: expected a JSON object; {hint}")
    return data


def check_model(recorded: Optional[dict], identity: dict, origin: str, hint: str) -> None:
    """`origin` must have been made from the model `identity` describes (same source and shape)."""
    fingerprint = (recorded or {}).get("fingerprint")
    if fingerprint != identity["fingerprint"]:
        raise DropquantError(f"{origin} was made for model '{(recorded or {}).get('source')}' (fingerprint "
                             f"{fingerprint}), not the current model.source '{identity['source']}' "
                             f"(fingerprint {identity['fingerprint']}): {hint}")


def check_same(origin: str, key: str, recorded: Any, expected: Any, hint: str) -> None:
    if recorded != expected:
        raise DropquantError(f"{origin} records {key} {recorded!r}, but its input has {expected!r}: {hint}")


# --- calibration tokens ---------------------------------------------------------------------------------

def read_calibration(path: str | Path, identity: dict):
    """(input_ids, manifest) of the calibration tokens, refused if made for another model or damaged."""
    from safetensors import SafetensorError, safe_open

    from .calibration import tokens_digest

    path = Path(path)
    hint = "run the calibrate stage"
    manifest = read_json(path.parent / "manifest.json", "calibration manifest", hint)
    check_model(manifest.get("model"), identity, str(path), "re-run calibrate")
    if not path.is_file():
        raise DropquantError(f"calibration tokens not found: {path} ({hint})")
    try:
        with safe_open(str(path), framework="pt") as f:
            if "input_ids" not in f.keys():
                raise DropquantError(f"{path} has no tensor 'input_ids'; re-run calibrate")
            tokens = f.get_tensor("input_ids")
    except SafetensorError as err:
        raise DropquantError(f"{path}: not a readable safetensors file ({err}); re-run calibrate") from None
    if tokens.ndim != 2:
        raise DropquantError(f"{path}: expected input_ids of shape [n_samples, seq_len], got {list(tokens.shape)}")
    check_same(str(path.parent / "manifest.json"), "tokens sha256", manifest.get("sha256"), tokens_digest(tokens),
               "the tokens were replaced after the manifest was written; re-run calibrate")
    return tokens, manifest


def check_scores_calibration(scores: dict, calibration_dir: str | Path, origin: str) -> None:
    """Scores must come from the calibration tokens beside them, when those are present (a calibrate run by hand
    after score leaves them apart)."""
    manifest = Path(calibration_dir) / "manifest.json"
    if manifest.is_file():
        recorded = (scores.get("calibration") or {}).get("sha256")
        check_same(origin, "calibration sha256", recorded, read_json(manifest, "calibration manifest", "").get("sha256"),
                   f"the scores were computed on other calibration tokens than {calibration_dir}; re-run the score stage")


# --- drop plan and pruned checkpoint ----------------------------------------------------------------------

def plan_id(plan: dict) -> str:
    """The plan's digest: any change to what it drops, or to what it was made from, changes it."""
    return json_digest({k: v for k, v in plan.items() if k not in PLAN_DERIVED})


def read_plan(path: str | Path, identity: Optional[dict] = None) -> dict:
    hint = "run the drop stage"
    plan = read_json(path, "drop plan", hint)
    if plan.get(PLAN_ID) != plan_id(plan):
        raise DropquantError(f"{path}: its plan_id does not match its contents (edited or damaged); re-run the drop stage")
    if identity is not None:
        check_model(plan.get("model"), identity, str(path), "re-run the drop stage for this model")
    return plan


def check_pruned_matches_plan(pruned_record: Optional[dict], plan: dict, pruned: str | Path, plan_path: str | Path) -> None:
    """The pruned checkpoint must be the one cut by this plan (a killed drop stage can leave them apart)."""
    check_same(f"{pruned}/config.json", "dropquant.plan_id", (pruned_record or {}).get(PLAN_ID), plan[PLAN_ID],
               f"the checkpoint was not cut by {plan_path} (an interrupted drop stage?); re-run the drop stage")


# --- GGUF files ---------------------------------------------------------------------------------------------

def read_gguf_manifest(directory: str | Path, hint: str) -> dict:
    """A GGUF folder's manifest, checked against the file beside it (cheaply: its size)."""
    directory = Path(directory)
    manifest = read_json(directory / "manifest.json", "GGUF manifest", hint)
    gguf = directory / "model.gguf"
    if not gguf.is_file():
        raise DropquantError(f"{gguf} not found ({hint})")
    check_same(str(directory / "manifest.json"), "size_bytes", manifest.get("size_bytes"), gguf.stat().st_size,
               f"{gguf} was replaced after its manifest was written; {hint}")
    return manifest


# --- metrics ------------------------------------------------------------------------------------------------

def params_digest(params: Any) -> str:
    """Digest of every parameter that shapes a variant's numbers (all sections but `sweep`), defaults filled in,
    from a Params object or a raw params.yaml mapping (what `dvc exp show` reports)."""
    from .params import Params, parse_params

    if not isinstance(params, Params):
        params = parse_params(params)
    return json_digest(params.model_dump(mode="json", exclude={"sweep"}))
