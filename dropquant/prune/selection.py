"""From importance scores (or an explicit list) to a drop plan: which attention layers, MLPs and blocks go.

Every check that can fail runs here, before any weight is loaded, so a bad request costs nothing and
leaves no half-written output. Indices in a plan are always in the original layer numbering.

Methods (the paper's one-shot drops, He et al. 2024):
  none   drop nothing (the baseline through the same pipeline)
  attn   the n attention layers of lowest importance
  mlp    the n MLP layers of lowest importance
  block  the n whole blocks of lowest importance
  joint  attention and MLP ranked together in one list of 2L modules; the n lowest go
Selections (the paper's Table 7 ablations, plus Gromov et al. 2024):
  importance  lowest importance first (ties: lower layer first, attention before MLP)
  random      n modules drawn uniformly with `seed` (reproducible)
  reverse     the last n modules in execution order (attn0, mlp0, attn1, mlp1, ... for joint)
  contiguous  block only: the n adjacent blocks l..l+n-1 minimizing span_angular[l][l+n]
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Optional

from dropquant.errors import DropquantError
from dropquant.params import Params, check_against_model, normalize_protect

SCORE_UNITS = ("attn", "mlp", "block")


@dataclass
class DropPlan:
    method: str
    n: int
    selection: str
    attn: list[int] = field(default_factory=list)
    mlp: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    scores: dict = field(default_factory=dict)
    num_layers: int = 0
    protect: list[int] = field(default_factory=list)
    seed: Optional[int] = None

    def to_json(self, model: Optional[dict] = None) -> dict:
        data = {k: v for k, v in asdict(self).items()}
        data["model"] = model
        return data

    @classmethod
    def from_json(cls, data: dict) -> "DropPlan":
        keys = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in keys})

    @property
    def is_empty(self) -> bool:
        return not (self.attn or self.mlp or self.blocks)


# --- scores ------------------------------------------------------------------------------------------

def check_scores(scores: dict, num_layers: int, fingerprint: Optional[str] = None, origin: str = "scores") -> None:
    """A scores file must come from this model: same fingerprint and one finite number per layer."""
    if not isinstance(scores, dict) or not isinstance(scores.get("importance"), dict):
        raise DropquantError(f"{origin}: not a scores file (no 'importance' key); run the score stage")
    recorded = (scores.get("model") or {}).get("fingerprint")
    if fingerprint is not None and recorded != fingerprint:
        src = (scores.get("model") or {}).get("source")
        raise DropquantError(
            f"{origin} was computed for another model (source {src!r}, fingerprint {recorded}); "
            f"the current model.source has fingerprint {fingerprint}: re-run the score stage")
    for unit in SCORE_UNITS:
        values = scores["importance"].get(unit)
        if not isinstance(values, (list, tuple)) or len(values) != num_layers:
            got = len(values) if isinstance(values, (list, tuple)) else None
            raise DropquantError(
                f"{origin}: importance.{unit} has {got} values but the model has {num_layers} layers: "
                "the scores come from another model; re-run the score stage")
        bad = _first_non_number(values)
        if bad is not None:
            raise DropquantError(f"{origin}: importance.{unit}[{bad}] (layer {bad}) is {json.dumps(values[bad])}, "
                                 "not a number: re-run the score stage")
    for start, row in enumerate(scores.get("span_angular") or []):
        bad = _first_non_number(row) if isinstance(row, (list, tuple)) else 0
        if bad is not None:
            raise DropquantError(f"{origin}: span_angular[{start}][{bad}] is not a number: re-run the score stage")


def _first_non_number(values: list) -> Optional[int]:
    """Index of the first value that is not a finite number: a null is a TypeError when ranking, a NaN a wrong plan."""
    return next((i for i, v in enumerate(values)
                 if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)), None)


# --- validation --------------------------------------------------------------------------------------

def _explicit_parts(method: str) -> tuple[str, ...]:
    return {"none": (), "attn": ("attn",), "mlp": ("mlp",), "block": ("blocks",), "joint": ("attn", "mlp")}[method]


def validate(params: Params, num_layers: int, scores: Optional[dict] = None) -> None:
    """Everything that can be wrong with the drop request for a model of `num_layers` layers."""
    d = params.drop
    check_against_model(params, num_layers)
    protect = set(normalize_protect(d.protect, num_layers))

    if d.layers is not None:
        allowed = _explicit_parts(d.method)
        for part in ("attn", "mlp", "blocks"):
            ids = getattr(d.layers, part)
            if ids and part not in allowed:
                raise DropquantError(
                    f"drop.layers.{part} is not allowed with drop.method={d.method} "
                    f"(method {d.method} takes drop.layers.{' and drop.layers.'.join(allowed) if allowed else '<nothing>'})")
            hit = sorted(protect.intersection(ids))
            if hit:
                raise DropquantError(f"drop.layers.{part} names protected layers {hit} (drop.protect={d.protect})")
        if d.method != "none" and not (d.layers.attn or d.layers.mlp or d.layers.blocks):
            raise DropquantError("drop.layers is empty: name the layers to drop, or use drop.method=none")
        gone = set(d.layers.blocks) | (set(d.layers.attn) & set(d.layers.mlp))
        if len(gone) == num_layers:
            raise DropquantError(f"drop.layers would drop every one of the {num_layers} layers")
        return

    if d.method == "none":
        return
    if d.selection == "contiguous" and d.method != "block":
        raise DropquantError(
            f"drop.selection=contiguous works with drop.method=block only (got method {d.method})")
    units = 2 if d.method == "joint" else 1
    free = num_layers - len(protect)
    available = units * free
    if d.method in ("block", "joint") and not protect:
        available -= 1  # at least one module of the model must survive
    if d.selection == "contiguous":
        available = _longest_free_run(num_layers, protect)
        if not protect:
            available -= 1
    if d.n > available:
        what = {"attn": "attention layers", "mlp": "MLP layers", "block": "blocks", "joint": "modules"}[d.method]
        extra = f" with drop.protect={d.protect}" if protect else ""
        if d.selection == "contiguous":
            what = "adjacent blocks"
        raise DropquantError(
            f"drop.n={d.n} is larger than method '{d.method}' can drop: at most {available} {what} "
            f"of a {num_layers}-layer model{extra}")
    if d.selection in ("importance", "contiguous") and d.n > 0:
        if scores is None:
            raise DropquantError(f"drop.selection={d.selection} needs a scores file: run the score stage first")
        if d.selection == "contiguous" and "span_angular" not in scores:
            raise DropquantError("drop.selection=contiguous needs 'span_angular' in the scores file: re-run the score stage")


def _longest_free_run(num_layers: int, protect: set[int]) -> int:
    best = run = 0
    for i in range(num_layers):
        run = 0 if i in protect else run + 1
        best = max(best, run)
    return best


# --- selection ---------------------------------------------------------------------------------------

def select(params: Params, num_layers: int, scores: Optional[dict] = None) -> DropPlan:
    """The drop plan for `params.drop`; validates first, so every error is raised before any work."""
    validate(params, num_layers, scores)
    d = params.drop
    protect = normalize_protect(d.protect, num_layers)
    plan = DropPlan(method=d.method, n=d.n, selection=d.selection, num_layers=num_layers, protect=protect,
                    seed=d.seed if d.selection == "random" else None)
    importance = (scores or {}).get("importance")
    if importance is not None:
        plan.scores = {"metric": scores.get("metric"),
                       "importance": {u: list(importance[u]) for u in SCORE_UNITS}}

    if d.layers is not None:
        plan.selection = "explicit"
        plan.attn, plan.mlp, plan.blocks = sorted(d.layers.attn), sorted(d.layers.mlp), sorted(d.layers.blocks)
        plan.n = len(plan.attn) + len(plan.mlp) + len(plan.blocks)
        return plan
    if d.method == "none" or d.n == 0:
        return plan

    if d.selection == "contiguous":
        start, spans = contiguous_span(scores["span_angular"], num_layers, d.n, set(protect))
        plan.blocks = list(range(start, start + d.n))
        plan.scores["span_angular"] = {"n": d.n, "start": start, "by_start": spans}
        return plan

    candidates = _candidates(d.method, num_layers, set(protect))
    if d.selection == "importance":
        chosen = lowest(candidates, importance, d.n)
    elif d.selection == "random":
        chosen = random.Random(d.seed).sample(candidates, d.n)
    else:  # reverse: the last n in execution order
        chosen = candidates[len(candidates) - d.n:]
    for unit, layer in chosen:
        {"attn": plan.attn, "mlp": plan.mlp, "block": plan.blocks}[unit].append(layer)
    plan.attn.sort(), plan.mlp.sort(), plan.blocks.sort()
    return plan


def _candidates(method: str, num_layers: int, protect: set[int]) -> list[tuple[str, int]]:
    """Droppable modules in execution order: (unit, layer) with unit attn/mlp/block."""
    units = {"attn": ("attn",), "mlp": ("mlp",), "block": ("block",), "joint": ("attn", "mlp")}[method]
    return [(u, i) for i in range(num_layers) if i not in protect for u in units]


def lowest(candidates: list[tuple[str, int]], importance: dict, n: int) -> list[tuple[str, int]]:
    """The n candidates of lowest importance; ties go to the lower layer, then attention before MLP."""
    order = {"attn": 0, "mlp": 1, "block": 0}
    ranked = sorted(candidates, key=lambda c: (importance[c[0]][c[1]], c[1], order[c[0]]))
    return ranked[:n]


def contiguous_span(span_angular: list[list[float]], num_layers: int, n: int, protect: set[int]) -> tuple[int, list]:
    """Gromov et al.: the start l minimizing the angular distance between boundary l and boundary l+n."""
    if len(span_angular) != num_layers + 1:
        raise DropquantError(
            f"scores: span_angular is {len(span_angular)}x.. but a {num_layers}-layer model needs "
            f"{num_layers + 1}x{num_layers + 1}: re-run the score stage")
    by_start = []
    for start in range(num_layers - n + 1):
        ok = not any(i in protect for i in range(start, start + n))
        by_start.append(span_angular[start][start + n] if ok else None)
    valid = [(v, s) for s, v in enumerate(by_start) if v is not None]
    if not valid:
        raise DropquantError(f"drop.n={n}: no run of {n} adjacent unprotected blocks")
    return min(valid)[1], by_start


def describe(plan: DropPlan) -> str:
    parts = [f"{name} {ids}" for name, ids in (("attention", plan.attn), ("MLP", plan.mlp), ("blocks", plan.blocks)) if ids]
    return f"{plan.method} ({plan.selection}): drop " + ("; ".join(parts) if parts else "nothing")
