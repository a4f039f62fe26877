"""Distributed sweeps: Prefect workers on any number of machines run the variants, one shared DVC remote holds the data.

The coordinator (`python -m flows sweep --distributed`) pushes the sweep's commit to the shared git remote,
registers the deployment `dropquant-remote-variant/distributed` on a process work pool, and submits one flow run
per variant. Each worker (`python -m flows worker`, in its own clone) checks that commit out, runs the variant as
a DVC experiment with `--pull` (inputs and run-cache from the DVC remote, so a stage computed anywhere is never
computed again), pushes its outputs and run-cache (`dvc push --run-cache`) and only then the experiment's git ref
(`dvc exp push --no-cache`): an experiment on the git remote always has all its data on the DVC remote. The
coordinator then pulls every experiment (`dvc exp pull --no-cache`) and writes the usual report.

Faults: flow runs send heartbeats; an automation on the server marks a run Crashed when they stop (a killed worker,
a lost machine), and the coordinator submits that variant again for any worker to take. A variant that fails on its
own input (`dropquant <stage>: error: ...`) is reported, never resubmitted.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.states import Failed

from dropquant.gguf.mix import axis_label, axis_overrides
from flows._dvc import DvcFailed, check, find_repo, repo_lock, run_dvc, stage_order
from flows.plan import plan_sweep, write_sweep_report
from flows.variant import _transient, apply_overrides

FLOW = "dropquant-remote-variant"
DEPLOYMENT_NAME = "distributed"
POOL = "dropquant"
AUTOMATION = "dropquant: crash flow runs whose heartbeats stopped"
REPO_ENV = "DROPQUANT_REPO"  # the worker's clone; the process worker starts each flow run in a temporary folder
USER_ERROR = "user error: "  # prefix of a remote run's Failed message when the variant's input was refused
SWEEP_REFS = "refs/dropquant/sweeps"
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if out.returncode != 0:
        raise DvcFailed(f"git {' '.join(args)} failed in {repo}: {(out.stderr or out.stdout).strip()}")
    return out.stdout.strip()


def _stage_events(result) -> list[dict]:
    return [{"stage": e.stage, "status": e.status, "seconds": e.seconds} for e in result.stages]


# ---- the worker side -------------------------------------------------------------------------------------------

def worker_repo() -> Path:
    return find_repo(os.environ.get(REPO_ENV) or ".")


def checkout_sweep(root: Path, git_remote: str, ref: str, commit: str) -> None:
    """The coordinator's commit, exactly: code, dvc.yaml and params.yaml as the sweep was started with."""
    _git(root, "fetch", "--quiet", git_remote, f"{ref}:{ref}")
    got = _git(root, "rev-parse", ref)
    if got != commit:
        raise DvcFailed(f"{git_remote} {ref} is {got[:10]}, not the sweep's commit {commit[:10]}")
    # Tracked files only: data/ is DVC's (git-ignored) and is checked out by hash at each stage.
    _git(root, "checkout", "--quiet", "--force", "--detach", commit)


@task(name="variant", task_run_name="{name}", cache_policy=NONE, persist_result=False, retry_condition_fn=_transient)
def run_remote_variant(repo: str, name: str, sets: list[str], git_remote: str, dvc_remote: Optional[str],
                       targets: Optional[list[str]]) -> dict:
    log = get_run_logger()
    root = Path(repo)
    remote = ["-r", dvc_remote] if dvc_remote else []
    if targets:
        # Priming: the stages every variant shares, computed once and published through the run-cache.
        apply_overrides(root / "params.yaml", sets)
        result = check(run_dvc(["repro", "--pull", *targets], root, log.info))
        check(run_dvc(["push", "--run-cache", "--with-deps", *remote, *targets], root, log.info))
    else:
        run_dvc(["exp", "remove", name], root, lambda line: None)  # an earlier attempt on this clone
        result = check(run_dvc(["exp", "run", "--pull", "-n", name, *[a for s in sets for a in ("-S", s)]],
                               root, log.info))
        # Data first, then the git ref: an experiment on the git remote always has its outputs on the DVC remote.
        check(run_dvc(["push", "--run-cache", *remote], root, log.info))
        check(run_dvc(["exp", "push", "--no-cache", "--force", git_remote, name], root, log.info))
    return {"name": name, "stages": _stage_events(result)}


@flow(name=FLOW, flow_run_name="{name}")
def remote_variant(name: str, sets: list[str], commit: str, ref: str, git_remote: str = "origin",
                   dvc_remote: Optional[str] = None, targets: Optional[list[str]] = None, retries: int = 1):
    """One variant of a distributed sweep, in the worker's clone ($DROPQUANT_REPO): run, push data, push the ref."""
    from prefect.artifacts import create_table_artifact

    log = get_run_logger()
    root = worker_repo()
    log.info("%s in %s (commit %s)", name, root, commit[:10])
    with repo_lock(root, f"distributed variant {name}"):
        checkout_sweep(root, git_remote, ref, commit)
        try:
            done = run_remote_variant.with_options(retries=retries, retry_delay_seconds=5)(
                str(root), name, sets, git_remote, dvc_remote, targets)
        except DvcFailed as err:
            if err.user_error:
                return Failed(message=f"{USER_ERROR}{err}")
            raise
        finally:
            # The next variant starts from the commit again, whatever this one wrote into params.yaml/dvc.lock.
            _git(root, "checkout", "--quiet", "--force", "--detach", commit)
    # What each stage did, readable by the coordinator (and in the UI) without shared result storage.
    create_table_artifact(key=artifact_key(name), table=done["stages"], description=f"stages of {name}")
    return done


def artifact_key(name: str) -> str:
    return "dropquant-" + re.sub(r"[^a-z0-9-]", "-", name.lower())


# ---- the coordinator side --------------------------------------------------------------------------------------

def ensure_pool_and_deployment(client, pool: str) -> str:
    """The process work pool and the remote-variant deployment on it; returns the deployment's id."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import EntrypointType
    from prefect.exceptions import ObjectNotFound

    try:
        client.read_work_pool(pool)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    deployment = remote_variant.to_deployment(
        name=DEPLOYMENT_NAME, entrypoint_type=EntrypointType.MODULE_PATH,
        description="one variant of a distributed dropquant sweep (python -m flows sweep --distributed)")
    return str(deployment.apply(work_pool_name=pool))


def ensure_zombie_automation(within_s: int) -> None:
    """Mark a flow run Crashed when its heartbeats stop (Prefect's documented zombie detection)."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    name = f"{AUTOMATION} for {within_s} s"
    try:
        Automation.read(name=name)
        return
    except ValueError:
        pass
    Automation(
        name=name,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=within_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message="no heartbeat: the worker running this flow run stopped")],
    ).create()


def publish_commit(root: Path, git_remote: str) -> tuple[str, str]:
    """Push HEAD to a sweep ref of its own on the shared git remote; workers check exactly that out."""
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    if dirty:
        raise DvcFailed("a distributed sweep runs the committed pipeline on every worker: commit or stash these "
                        f"changes first:\n{dirty}", user_error=True)
    commit = _git(root, "rev-parse", "HEAD")
    ref = f"{SWEEP_REFS}/{commit}"
    _git(root, "push", "--quiet", git_remote, f"{commit}:{ref}")
    return commit, ref


def _stages_from_artifact(client, flow_run_id) -> list[dict]:
    import json

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    for art in arts:
        if art.type == "table":
            data = json.loads(art.data) if isinstance(art.data, str) else art.data
            return list(data)
    return []


class Scheduler:
    """Submits flow runs of the deployment and follows them to a final state, resubmitting crashed ones."""

    def __init__(self, client, deployment_id: str, common: dict, attempts: int, log, poll: float = 3.0,
                 pool: str = POOL):
        self.client, self.deployment_id, self.common = client, deployment_id, common
        self.attempts, self.log, self.poll, self.pool = attempts, log, poll, pool

    def submit(self, name: str, parameters: dict, attempt: int):
        run = self.client.create_flow_run_from_deployment(
            self.deployment_id, parameters={**self.common, "name": name, **parameters},
            name=name if attempt == 1 else f"{name}-attempt-{attempt}", tags=["dropquant-sweep"])
        self.log.info("submitted %s (attempt %d): flow run %s", name, attempt, run.id)
        return run.id

    def run_all(self, jobs: list[tuple[str, dict]]) -> tuple[list[dict], list[dict]]:
        """Run every job to the end; returns (finished, failed), each job exactly once."""
        pending = {name: {"params": params, "attempt": 1, "id": self.submit(name, params, 1)} for name, params in jobs}
        done, failed = [], []
        last_warning = time.monotonic()
        while pending:
            time.sleep(self.poll)
            for name in list(pending):
                job = pending[name]
                run = self.client.read_flow_run(job["id"])
                state = run.state.type.value if run.state else "PENDING"
                if state not in FINAL:
                    continue
                message = (run.state.message or "") if run.state else ""
                if state == "COMPLETED":
                    done.append({"name": name, "attempts": job["attempt"], "flow_run": str(job["id"]),
                                 "stages": _stages_from_artifact(self.client, job["id"])})
                    self.log.info("%s: completed (attempt %d)", name, job["attempt"])
                elif message.startswith(USER_ERROR) or job["attempt"] >= self.attempts or state == "CANCELLED":
                    error = message[len(USER_ERROR):] if message.startswith(USER_ERROR) else f"{state}: {message}"
                    failed.append({"name": name, "params": job["params"].get("sets"), "stage": None, "error": error,
                                   "attempts": job["attempt"]})
                    self.log.error("%s failed (attempt %d): %s", name, job["attempt"], error)
                else:
                    self.log.warning("%s: %s (%s); submitting it again", name, state, message)
                    job["attempt"] += 1
                    job["id"] = self.submit(name, job["params"], job["attempt"])
                    continue
                del pending[name]
            if pending and time.monotonic() - last_warning > 60:
                last_warning = time.monotonic()
                self._warn_if_no_worker()
        return done, failed

    def _warn_if_no_worker(self) -> None:
        workers = self.client.read_workers_for_work_pool(self.pool)
        if not any(str(getattr(w.status, "value", w.status)).upper() == "ONLINE" for w in workers):
            self.log.warning("no worker is online in work pool '%s': start one with `python -m flows worker "
                             "--pool %s` in a clone of this repository", self.pool, self.pool)


def attempts_note(done: list[dict]) -> str:
    return ", ".join(f"{d['name']} {d['attempts']}" for d in done)


def _failed_stage(error: str) -> Optional[str]:
    m = re.match(r"dropquant (\S+): error:", error)
    return m.group(1) if m else None


@flow(name="dropquant-distributed-sweep")
def distributed_sweep_flow(repo: str = ".", methods: Optional[list[str]] = None, n: Optional[list[int]] = None,
                           quant_types: Optional[list[str]] = None, heal: Optional[list[str]] = None,
                           overrides: Optional[list[str]] = None, out: Optional[str] = None,
                           title: Optional[str] = None, pool: str = POOL, git_remote: str = "origin",
                           dvc_remote: Optional[str] = None, attempts: int = 3, zombie_after_s: int = 90) -> dict:
    """The grid of `sweep_flow`, each variant a flow run on the work pool `pool`; then every experiment pulled
    from `git_remote` and the report written here."""
    from prefect.client.orchestration import get_client

    log = get_run_logger()
    root = find_repo(repo)
    plan = plan_sweep(root, methods, n, quant_types, heal, overrides)
    if attempts < 1:
        raise DvcFailed(f"attempts must be at least 1 (got {attempts})", user_error=True)
    order = stage_order(root)
    shared = [s for s in ("score", "baseline_eval") if s in order]
    with repo_lock(root, f"distributed sweep of {len(plan.variants)} variants"):
        commit, ref = publish_commit(root, git_remote)
        log.info("sweep commit %s pushed to %s as %s", commit[:10], git_remote, ref)
        with get_client(sync_client=True) as client:
            deployment_id = ensure_pool_and_deployment(client, pool)
            ensure_zombie_automation(zombie_after_s)
            scheduler = Scheduler(client, deployment_id, {"commit": commit, "ref": ref, "git_remote": git_remote,
                                                          "dvc_remote": dvc_remote}, attempts, log, pool=pool)
            # Calibrate and score (and each quant type's baseline) once, before the variants race for them.
            primes = [(f"prime-{axis_label(qt)}", {"sets": [*plan.common, *axis_overrides(qt)], "targets": shared})
                      for qt in plan.quant_types]
            primed, prime_failed = [], []
            for job in primes:
                d, f = scheduler.run_all([job])
                primed += d
                prime_failed += f
            if prime_failed:
                raise DvcFailed(f"priming the shared stages failed: {prime_failed[0]['error']}",
                                stage=_failed_stage(prime_failed[0]["error"]))
            done, failures = scheduler.run_all([(v["name"], {"sets": [*plan.common, *v["set"]]})
                                                for v in plan.variants])
        for f in failures:
            f["stage"] = _failed_stage(f["error"])
        names = [d["name"] for d in done]
        if names:
            check(run_dvc(["exp", "pull", "--no-cache", "--force", git_remote, *names], root, log.info))
        shown = check(run_dvc(["exp", "show", "--json"], root, lambda line: None))
    for d in done:
        d["params"] = [*plan.common, *next(v["set"] for v in plan.variants if v["name"] == d["name"])]
    return write_sweep_report(root, plan, shown, done, failures, out, title, log,
                              extra_notes=[f"Distributed over work pool '{pool}': shared stages primed by "
                                           f"{', '.join(p['name'] for p in primed)}; attempts per variant "
                                           f"{attempts_note(done)}."],
                              stage_runs=[*primed, *done])
