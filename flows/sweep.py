"""Sweep: a grid of drop methods x counts x quant types, each variant one DVC experiment, then a comparison report.

Sequential (the default, `--jobs 1`): each variant is `dvc exp run -n <name> -S drop.method=.. -S drop.n=.. -S
quantize.type=..` in the workspace, one after another; DVC's run-cache serves calibrate and score (and the baseline
GGUF per quant type) to every variant after the first, and the log says so stage by stage. The workspace ends up
holding the last finished variant.

Queued (`--jobs N`, N >= 2, flows/queue.py): the shared stages are primed once, then the variants run as DVC
queued experiments, N at once in temporary copies of the repository, the workspace left as it was.

Both end in flows.plan.write_sweep_report: `dvc exp show --json` of the finished variants, the failed ones with their stage's
own message, and what every stage did over the sweep.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows._dvc import DvcFailed, check, find_repo, repo_lock, run_dvc
from flows.plan import describe_stages, existing_experiments, plan_sweep, write_sweep_report
from flows.queue import queue_sweep

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
