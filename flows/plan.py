"""The grid of a sweep and its report: shared by the sequential (flows/sweep.py), queued (flows/queue.py) and
distributed (flows/distributed.py) sweeps, so none of them imports another."""
from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dropquant.gguf.mix import axis_label, axis_overrides
from flows._dvc import DvcFailed, dvc_executable

REUSED = {"unchanged": "reused (unchanged)", "run-cache": "reused (DVC run-cache)"}


def variant_name(method: str, n: int, quant_type: str, heal: str = "none") -> str:
    """A git-ref-safe experiment name, e.g. attn-8-Q4_K_M, attn-8-Q8_0-linear-distill."""
    q = axis_label(quant_type)
    name = f"none-{q}" if method == "none" else f"{method}-{n}-{q}"
    return name if heal == "none" else f"{name}-{heal.replace('+', '-')}"


def grid(methods: list[str], ns: list[int], quant_types: list[str], heals: list[str] = ("none",)) -> list[dict]:
    """Variants in run order: quant type outermost, so the baseline GGUF of each type is built once, and heal
    innermost, so the variants of one drop share its calibrate/score/drop outputs back to back."""
    out, seen = [], set()
    for qt in quant_types:
        for method in methods:
            for n in ([0] if method == "none" else ns):
                for heal in (["none"] if method == "none" else heals):  # nothing dropped, nothing to heal
                    name = variant_name(method, n, qt, heal)
                    if name not in seen:
                        seen.add(name)
                        out.append({"name": name, "method": method, "n": n, "quant_type": qt, "heal": heal,
                                    "set": [f"drop.method={method}", f"drop.n={n}", *axis_overrides(qt),
                                            f"heal.method={heal}"]})
    return out


def sweep_defaults(root: Path) -> dict:
    from dropquant.params import load_params

    s = load_params(root / "params.yaml").sweep
    return {"methods": s.methods, "n": s.n, "quant_types": s.quant_types, "heal": s.heal, "set": s.set,
            "cron": s.cron}


def existing_experiments(root: Path) -> set[str]:
    out = subprocess.run([dvc_executable(), "exp", "list", "--name-only"], cwd=root, capture_output=True, text=True)
    return {line.strip() for line in out.stdout.splitlines() if line.strip() and not line.endswith(":")}


def describe_stages(stages) -> str:
    return ", ".join(f"{e.stage} {REUSED.get(e.status, e.status)}" + (f" {e.seconds:.1f} s" if e.status == "ran" else "")
                     for e in stages)


@dataclass
class SweepPlan:
    """The grid of one sweep: its axes, the overrides every variant gets, and the variants in run order."""
    methods: list[str]
    ns: list[int]
    quant_types: list[str]
    heals: list[str]
    common: list[str]
    variants: list[dict]

    def describe(self) -> str:
        return (f"grid methods={self.methods} n={self.ns} quant_types={self.quant_types} heal={self.heals}"
                + (f"; every variant with {' '.join(self.common)}" if self.common else ""))


def plan_sweep(root: Path, methods: Optional[list[str]] = None, n: Optional[list[int]] = None,
               quant_types: Optional[list[str]] = None, heal: Optional[list[str]] = None,
               overrides: Optional[list[str]] = None) -> SweepPlan:
    """The grid from the arguments, params.yaml's `sweep:` section filling in what they leave out."""
    defaults = sweep_defaults(root)
    methods = list(methods or defaults["methods"])
    ns = list(n if n is not None else defaults["n"])
    quant_types = list(quant_types or defaults["quant_types"])
    heals = list(heal or defaults["heal"])
    return SweepPlan(methods, ns, quant_types, heals, [*defaults["set"], *(overrides or [])],
                     grid(methods, ns, quant_types, heals))


def stage_summary(runs: list[dict]) -> str:
    """`calibrate: ran 1×, reused 3×; ...` over the stage events of every run of a sweep."""
    reuse: dict[str, dict[str, int]] = {}
    for d in runs:
        for s in d["stages"]:
            reuse.setdefault(s["stage"], {"ran": 0, "reused": 0})["ran" if s["status"] == "ran" else "reused"] += 1
    return "; ".join(f"{stage}: ran {c['ran']}×, reused {c['reused']}×" for stage, c in reuse.items())


def write_sweep_report(root: Path, plan: SweepPlan, shown, done: list[dict], failures: list[dict],
                       out: Optional[str], title: Optional[str], log, extra_notes: tuple = (),
                       stage_runs: Optional[list[dict]] = None) -> dict:
    """The report of a finished sweep from `dvc exp show --json` (`shown`); raises when no variant finished."""
    from dropquant.report import rows_from_exp_show, write_report

    exp_show = json.loads(shown.output[shown.output.index("["):])
    rows = rows_from_exp_show(exp_show, [d["name"] for d in done])
    summary = stage_summary(done if stage_runs is None else stage_runs)
    log.info("stages over the sweep: %s", summary)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(out) if out else root / "reports" / f"sweep-{stamp}"
    notes = [f"{len(done)} of {len(plan.variants)} variants finished; {plan.describe()}",
             f"Stages over the sweep: {summary}." if summary else "", *extra_notes,
             "Reproduce a variant: `dvc exp apply <experiment>` then `dvc repro` (see docs/flows.md)."]
    paths = write_report(out_dir, rows, failures, title or f"dropquant sweep {stamp}", [n for n in notes if n],
                         extra={"variants": done, "grid": {"methods": plan.methods, "n": plan.ns,
                                                           "quant_types": plan.quant_types, "heal": plan.heals,
                                                           "set": plan.common}})
    log.info("report: %s", out_dir)
    if not done:
        raise DvcFailed(f"all {len(plan.variants)} variants failed; first error: {failures[0]['error']}"
                        if failures else "the grid is empty")
    return {"report": {k: str(p) for k, p in paths.items()}, "experiments": [d["name"] for d in done],
            "failures": failures, "rows": rows}
