"""One variant: the pipeline of dvc.yaml, each stage a Prefect task (`dvc repro --single-item <stage>`) in DAG order.

DVC decides whether a stage runs, is unchanged or comes from its run-cache; the task shows which, how long it
took, and the stage's log. A failing stage fails its task and the flow with the stage's own error message.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows._dvc import DvcFailed, check, find_repo, repo_lock, run_dvc, stage_order


def _transient(task, task_run, state) -> bool:
    """Retry crashes and a busy repository, never a stage's own `dropquant <stage>: error:` (it would fail again)."""
    try:
        state.result()
    except DvcFailed as err:
        return not err.user_error
    except Exception:  # noqa: BLE001 - anything else is worth another try
        return True
    return False


@task(name="stage", task_run_name="{stage}", cache_policy=NONE, persist_result=False, retry_condition_fn=_transient)
def run_stage(repo: str, stage: str) -> dict:
    log = get_run_logger()
    result = check(run_dvc(["repro", "--single-item", stage], Path(repo), log.info))
    event = next((e for e in result.stages if e.stage == stage), None)
    status = event.status if event else "unchanged"
    seconds = event.seconds if event else 0.0
    log.info("stage %s: %s%s", stage, status, f" in {seconds:.1f} s" if status == "ran" else "")
    return {"stage": stage, "status": status, "seconds": seconds}


def apply_overrides(params_file: Path, overrides: list[str]) -> None:
    """Write `section.key=value` overrides into params.yaml with the grammar and comment-keeping of `dvc exp run -S`."""
    from dvc.utils.hydra import apply_overrides as dvc_apply

    try:
        dvc_apply(str(params_file), list(overrides))
    except Exception as err:  # hydra raises several types, all meaning "bad override"
        raise DvcFailed(f"cannot apply overrides {overrides} to {params_file}: {err}", user_error=True) from None


@flow(name="dropquant-variant")
def variant_flow(repo: str = ".", overrides: Optional[list[str]] = None, stages: Optional[list[str]] = None,
                 experiment: Optional[str] = None, retries: int = 0) -> dict:
    """Run the pipeline for params.yaml (+ `overrides`, written into params.yaml as `dvc exp run -S` does).

    stages: run only these (still in DAG order); experiment: save the result as a DVC experiment of that name.
    """
    log = get_run_logger()
    root = find_repo(repo)
    with repo_lock(root, f"variant flow{' ' + experiment if experiment else ''}"):
        if overrides:
            apply_overrides(root / "params.yaml", overrides)
            log.info("params.yaml: %s", " ".join(overrides))
        order = stage_order(root)
        unknown = sorted(set(stages or []) - set(order))
        if unknown:
            raise DvcFailed(f"unknown stage(s) {unknown}; dvc.yaml has {order}", user_error=True)
        selected = [s for s in order if not stages or s in stages]
        log.info("stages in order: %s", " -> ".join(selected))
        stage_task = run_stage.with_options(retries=retries, retry_delay_seconds=10)
        done = [stage_task(str(root), s) for s in selected]
        if experiment:
            check(run_dvc(["exp", "save", "--force", "-n", experiment], root, log.info))
            log.info("saved as DVC experiment '%s' (see `dvc exp show`)", experiment)
    ran = [d["stage"] for d in done if d["status"] == "ran"]
    reused = [d["stage"] for d in done if d["status"] != "ran"]
    log.info("ran: %s; reused: %s", ", ".join(ran) or "none", ", ".join(reused) or "none")
    return {"repo": str(root), "stages": done, "experiment": experiment}
