"""Sweep: a grid of drop methods x counts x quant types, each variant one DVC experiment, then a comparison report.

Sequential (the default, `--jobs 1`): each variant is `dvc exp run -n <name> -S drop.method=.. -S drop.n=.. -S
quantize.type=..` in the workspace, one after another; DVC's run-cache serves calibrate and score (and the baseline
GGUF per quant type) to every variant after the first, and the log says so stage by stage. The workspace ends up
holding the last finished variant.

Queued (`--jobs N`, N >= 2, flows/queue.py): the shared stages are primed once, then the variants run as DVC
queued experiments, N at once in temporary copies of the repository, the workspace left as it was.

Both end in write_sweep_report: `dvc exp show --json` of the finished variants, the failed ones with their stage's
own message, and what every stage did over the sweep.
"""
from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows._dvc import DvcFailed, check, dvc_executable, find_repo, repo_lock, run_dvc

REUSED = {"unchanged": "reused (unchanged)", "run-cache": "reused (DVC run-cache)"}


def variant_name(method: str, n: int, quant_type: str, heal: str = "none") -> str:
    """A git-ref-safe experiment name, e.g. attn-8-Q4_K_M, attn-8-Q8_0-linear-distill."""
    name = f"none-{quant_type}" if method == "none" else f"{method}-{n}-{quant_type}"
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
                                    "set": [f"drop.method={method}", f"drop.n={n}", f"quantize.type={qt}",
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


@task(name="experiment", task_run_name="{name}", cache_policy=NONE, persist_result=False)
def run_experiment(repo: str, name: str, sets: list[str], replace: bool) -> dict:
    """One variant as a DVC experiment; raises DvcFailed with the failing stage's own message."""
    log = get_run_logger()
    root = Path(repo)
    if replace:
        # Same name = same variant definition: the new run replaces the old record (DVC refuses duplicates).
        run_dvc(["exp", "remove", name], root, log.info)
    started = time.monotonic()
    result = run_dvc(["exp", "run", "-n", name, *[a for s in sets for a in ("-S", s)]], root, log.info)
    seconds = round(time.monotonic() - started, 1)
    log.info("%s: %s", name, describe_stages(result.stages))
    check(result)
    return {"name": name, "params": sets, "seconds": seconds,
            "stages": [{"stage": e.stage, "status": e.status, "seconds": e.seconds} for e in result.stages]}


def leftovers(root: Path) -> list[str]:
    """Temporary files of atomic writes still in data/ (there must be none, even after a failed stage)."""
    data = root / "data"
    return sorted(str(p.relative_to(root)) for p in data.rglob(".*.tmp")) if data.is_dir() else []


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


@flow(name="dropquant-sweep")
def sweep_flow(repo: str = ".", methods: Optional[list[str]] = None, n: Optional[list[int]] = None,
               quant_types: Optional[list[str]] = None, heal: Optional[list[str]] = None,
               overrides: Optional[list[str]] = None,
               out: Optional[str] = None, title: Optional[str] = None, jobs: int = 1) -> dict:
    """Run every variant of the grid (defaults: params.yaml's `sweep:` section) and write the report.

    overrides: `section.key=value` applied to every variant (on top of sweep.set). out: report folder
    (default reports/sweep-<time>/ in the repository). jobs: variants at once; 2 or more runs them as DVC queued
    experiments (flows/queue.py), 1 one after another in the workspace.
    """
    log = get_run_logger()
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    root = find_repo(repo)
    plan = plan_sweep(root, methods, n, quant_types, heal, overrides)
    if jobs > 1:
        from flows.queue import queue_sweep

        return queue_sweep(root, plan, jobs, out, title, log)
    variants = plan.variants
    log.info("sweep of %d variants: %s", len(variants), ", ".join(v["name"] for v in variants))
    done, failures = [], []
    params_file = root / "params.yaml"
    with repo_lock(root, f"sweep of {len(variants)} variants"):
        base_params = params_file.read_text()
        existing = existing_experiments(root)
        for v in variants:
            # Every variant starts from the same params.yaml, whatever the previous one (failed or not) left there.
            params_file.write_text(base_params)
            sets = [*plan.common, *v["set"]]
            state = run_experiment(str(root), v["name"], sets, v["name"] in existing, return_state=True)
            if state.is_completed():
                done.append(state.result())
                continue
            err = state.result(raise_on_failure=False)
            stage = getattr(err, "stage", None)
            failures.append({"name": v["name"], "params": sets, "stage": stage, "error": str(err)})
            log.error("variant %s failed%s: %s", v["name"], f" in stage {stage}" if stage else "", err)
            if getattr(err, "busy", False) or not isinstance(err, DvcFailed):
                break  # another pipeline owns the repository, or something outside DVC broke: stop here
            left = leftovers(root)
            if left:
                log.error("half-written files after %s: %s", v["name"], left)
        if done and failures and failures[-1]["name"] == variants[-1]["name"]:
            # Leave a consistent workspace (params, dvc.lock and data/ of one finished variant), not a failed one.
            check(run_dvc(["exp", "apply", done[-1]["name"]], root, log.info))
            log.info("workspace restored to the last finished variant, %s", done[-1]["name"])
        shown = check(run_dvc(["exp", "show", "--json"], root, lambda line: None))
    return write_sweep_report(root, plan, shown, done, failures, out, title, log)
