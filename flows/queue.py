"""Queued sweeps: the variants of a sweep as DVC's queued experiments, N at once on this machine.

`python -m flows sweep --jobs N` (N >= 2). Three steps, under the repository lock of the sequential sweep:

1. Prime: the stages every variant shares (calibrate, score; baseline and baseline_eval per quant type) run once,
   in the foreground, as `dvc exp run --temp -n dropquant-prime-<type> ... score baseline_eval`. Their outputs
   go to DVC's cache and run-cache, which queued experiments share with the workspace (DVC points each
   temporary copy's cache at the repository's), so every variant later finds them there ("Stage 'calibrate' is
   cached - skipping run") instead of N jobs computing them at once. The priming experiments are removed again.
2. Queue and run: `dvc exp run --queue -n <name> -S ...` per variant (an experiment of the same name is replaced,
   as in the sequential sweep), then `dvc queue start --jobs N`, and `dvc queue status` every few seconds until
   every variant is done, then until the workers have exited (a worker idles 10 s before it exits, and one still
   up after 20 s gets `dvc queue stop`: an idle worker would keep its environment for the next sweep's jobs).
3. Collect: `dvc queue logs <task>` of every variant gives what each stage did and, for a failed one, the stage's
   own `dropquant <stage>: error:` message; the queue entries are then removed (a failed experiment would
   otherwise stay listed in `dvc exp show`), and the report is the sequential sweep's.

Queued experiments run in .dvc/tmp/exps/<tmp>/, a copy of the git-tracked files (with the workspace's uncommitted
changes to them, not untracked files). What they need from elsewhere: the venv (its bin/ leads PATH, inherited by
the workers `dvc queue start` spawns, and by their stages), and relative paths in params.yaml (model.source,
calibration.source, eval.data_dir), which DROPQUANT_WORKSPACE=<repository> makes the stages take from the
repository (dropquant/workspace.py). The workspace's params.yaml, dvc.lock and data/ are left as they were.

Threads: with N jobs on C cores each job gets T = max(1, C // N): OMP_NUM_THREADS/MKL_NUM_THREADS=T in the
workers' environment (torch: drop, heal, quantize), and `-S eval.threads=T -S eval.speed_threads=T` (llama.cpp:
evaluate) unless the sweep's own overrides set them. As overrides they are in each experiment's params, so
`dvc exp apply` + `dvc repro` repeats the run as it was measured; neither is a parameter of the shared stages
(baseline_eval does not depend on eval.threads), so priming runs with every core.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from dropquant.gguf.mix import axis_label, axis_overrides
from dropquant.workspace import WORKSPACE_ENV  # where the stages take relative paths from
from flows._dvc import (FAILED_STAGE, RUN_CACHE, RUNNING, UNCHANGED, DvcFailed, DvcResult, RepoBusy,
                        StageEvent, _env, check, dvc_executable, failure_message, repo_lock, run_dvc)
from flows.plan import describe_stages, existing_experiments, write_sweep_report

PRIME_PREFIX = "dropquant-prime-"
PRIME_TARGETS = ("score", "baseline_eval")  # with what they depend on: calibrate, baseline
POLL_S = 5.0  # one `dvc queue status` costs about 1 s of CPU (dvc 3.67.1)
TASK_ROW = re.compile(r"^([0-9a-f]{7})\s+(\S+)\s+.*\s(\S+)\s*$")
WORKERS = re.compile(r"Worker status: (\d+) active, (\d+) idle")
DONE_IN = re.compile(r"dropquant\.\S+: done in (\d+(?:\.\d+)?) s")
FINAL = ("Success", "Failed")


def threads_per_job(jobs: int, cpus: Optional[int] = None) -> int:
    """Threads for each of `jobs` concurrent experiments on this machine's CPUs (at least 1)."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // jobs)


def thread_overrides(threads: int, common: list[str]) -> list[str]:
    """llama.cpp's thread params for a job, unless the sweep's overrides already set them."""
    given = {s.split("=", 1)[0].strip() for s in common}
    return [f"{key}={threads}" for key in ("eval.threads", "eval.speed_threads") if key not in given]


def parse_log(lines: list[str], returncode: int) -> DvcResult:
    """What each stage did, from the output of one experiment (a queue log or a streamed run), as run_dvc records it.

    A stage that ran gets the duration its own `dropquant.<stage>: done in N s` line reports."""
    result = DvcResult(returncode=returncode, lines=[line.rstrip() for line in lines if line.strip()])
    current: Optional[StageEvent] = None
    for line in result.lines:
        if m := RUNNING.match(line):
            current = StageEvent(m.group(1), "ran")
            result.stages.append(current)
        elif m := UNCHANGED.match(line):
            current = None
            result.stages.append(StageEvent(m.group(1), "unchanged"))
        elif m := RUN_CACHE.match(line):
            current = None
            result.stages.append(StageEvent(m.group(1), "run-cache"))
        elif current and (m := DONE_IN.search(line)):
            current.seconds = float(m.group(1))
    if returncode != 0:
        named = next((m.group(1) for line in reversed(result.lines) if (m := FAILED_STAGE.search(line))), None)
        ran = result.stages[-1] if result.stages and result.stages[-1].status == "ran" else None
        if ran and named in (None, ran.stage):
            ran.status = "failed"
        elif named:
            result.stages.append(StageEvent(named, "failed"))
    return result


def _run(args: list[str], root: Path, env: dict, log: Callable[[str], None]) -> DvcResult:
    """`dvc <args>` with `env`, its output streamed to `log` and parsed as parse_log does."""
    proc = subprocess.Popen([dvc_executable(), *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    lines = []
    for raw in proc.stdout:
        line = raw.rstrip()
        if line and not (re.search(r"\d+%\|", line) and "100%" not in line):
            lines.append(line)
            log(line)
    return parse_log(lines, proc.wait())


def queue_status(root: Path, attempts: int = 3) -> tuple[list[tuple[str, str, str]], int]:
    """`dvc queue status`: its tasks as (task id, name, status) and the number of live workers.

    A failed call is tried again (up to `attempts` calls, 1 s apart): dvc 3.67.1 reads the queue's broker files while
    the workers write them, and under load it can meet a half-written one ("unexpected error - Expecting value")."""
    for attempt in range(attempts):
        out = subprocess.run([dvc_executable(), "queue", "status"], cwd=root, env=_env(), capture_output=True,
                             text=True)
        if out.returncode == 0:
            break
        if attempt + 1 < attempts:
            time.sleep(1)
    else:
        raise DvcFailed(f"dvc queue status failed: {(out.stderr or out.stdout).strip()}")
    tasks, workers = [], 0
    for line in out.stdout.splitlines():
        if m := WORKERS.search(line):
            workers = int(m.group(1)) + int(m.group(2))
        elif (m := TASK_ROW.match(line)) and m.group(1) != "Task":
            tasks.append((m.group(1), m.group(2), m.group(3)))
    return tasks, workers


def _wait_for_workers_to_exit(root: Path, log, grace_s: float = 20, limit_s: float = 60) -> None:
    """Until no DVC queue worker is left, asking the idle ones to stop after `grace_s`.

    An idle worker exits by itself after 10 s, unless its idle monitor died: with dvc 3.67.1 / dvc-task the monitor
    thread can crash on a half-written broker file (JSONDecodeError in the worker's log, seen here under load) and
    the worker then idles forever. `dvc queue stop` ends it (no task of this sweep is left to wait for)."""
    started = time.monotonic()
    asked = False
    while True:
        _, workers = queue_status(root)
        if not workers:
            return
        waited = time.monotonic() - started
        if waited > limit_s:
            raise RepoBusy(f"{workers} DVC queue worker(s) still running on {root} after `dvc queue stop` "
                           "(dvc queue status); stop them or wait for them to exit")
        if waited > grace_s and not asked:
            log.info("%d idle DVC queue worker(s) still up after %.0f s: dvc queue stop", workers, waited)
            run_dvc(["queue", "stop"], root, log.info)
            asked = True
        time.sleep(POLL_S)


def queue_sweep(root: Path, plan, jobs: int, out: Optional[str], title: Optional[str], log) -> dict:
    """Run the sweep `plan` as DVC queued experiments, `jobs` at once; the report of the sequential sweep."""
    variants = plan.variants
    threads = threads_per_job(jobs)
    env = {**_env(), WORKSPACE_ENV: str(root)}
    worker_env = {**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    per_job = thread_overrides(threads, plan.common)
    log.info("queued sweep of %d variants, %d jobs, %d thread(s) each: %s", len(variants), jobs, threads,
             ", ".join(v["name"] for v in variants))
    with repo_lock(root, f"queued sweep of {len(variants)} variants, {jobs} jobs"):
        tasks, _ = queue_status(root)
        pending = sorted(name for _, name, status in tasks if status not in FINAL)
        before = {rev for rev, _, _ in tasks}  # entries of earlier queues, not this sweep's
        if pending:
            raise RepoBusy(f"the DVC experiment queue of {root} is not empty ({', '.join(pending)}); "
                           "run or remove those first (dvc queue status, dvc queue remove)")
        _wait_for_workers_to_exit(root, log)
        existing = existing_experiments(root)

        # 1. The shared stages once per quant type, so that the queued jobs find them in the run-cache.
        primes = []
        for qt in dict.fromkeys(v["quant_type"] for v in variants):
            name = f"{PRIME_PREFIX}{axis_label(qt)}"
            sets = [*plan.common, *axis_overrides(qt)]
            if name in existing:
                run_dvc(["exp", "remove", name], root, log.info)
            result = _run(["exp", "run", "--temp", "-n", name, *[a for s in sets for a in ("-S", s)], *PRIME_TARGETS],
                          root, env, log.info)
            if name in existing_experiments(root):
                run_dvc(["exp", "remove", name], root, log.info)
            log.info("%s: %s", name, describe_stages(result.stages))
            if result.returncode != 0:
                err = failure_message(result)
                raise DvcFailed(f"the stages every variant shares failed ({name}): {err}", stage=err.stage,
                                output=err.output, user_error=err.user_error, stages=err.stages)
            primes.append({"name": name, "params": sets,
                           "stages": [{"stage": e.stage, "status": e.status, "seconds": e.seconds}
                                      for e in result.stages]})

        # 2. Every variant into the queue, then N workers.
        queued = {}
        for v in variants:
            sets = [*per_job, *plan.common, *v["set"]]
            if v["name"] in existing:
                run_dvc(["exp", "remove", v["name"]], root, log.info)
            check(run_dvc(["exp", "run", "--queue", "-n", v["name"], *[a for s in sets for a in ("-S", s)]],
                          root, log.info))
            queued[v["name"]] = sets
        started = time.monotonic()
        # The workers it spawns inherit its stdout: a pipe would stay open until they exit, a file does not.
        with tempfile.TemporaryFile("w+") as start_log:
            code = subprocess.run([dvc_executable(), "queue", "start", "--jobs", str(jobs)], cwd=root, env=worker_env,
                                  stdout=start_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
            start_log.seek(0)
            said = start_log.read().strip()
        log.info("%s", said)
        if code != 0:
            raise DvcFailed(f"dvc queue start failed: {said}")
        last, stalled = None, 0
        while True:
            time.sleep(POLL_S)
            rows, workers = queue_status(root)
            tasks = {name: (rev, status) for rev, name, status in rows if rev not in before and name in queued}
            states = {name: tasks.get(name, ("", "?"))[1] for name in queued}
            summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(
                {s: sum(1 for x in states.values() if x == s) for s in states.values()}.items()))
            if summary != last:
                log.info("queue after %.0f s: %s", time.monotonic() - started, summary)
                last = summary
            if all(s in FINAL for s in states.values()):
                break  # the workers are not waited on here: one may never exit by itself (below)
            if not workers:
                stalled += 1  # no worker left but tasks not done: give a starting worker one more look
                if stalled >= 3:
                    break
            else:
                stalled = 0
        wall = round(time.monotonic() - started, 1)
        # No worker may outlive the sweep: it would keep this sweep's environment (threads) for the next one's jobs.
        _wait_for_workers_to_exit(root, log)

        # 3. What every variant did, from its queue log; then the queue entries go.
        done, failures = [], []
        for v in variants:
            name = v["name"]
            rev, status = tasks.get(name, ("", "?"))
            lines = []
            if rev:
                logs = subprocess.run([dvc_executable(), "queue", "logs", rev], cwd=root, env=_env(),
                                      capture_output=True, text=True)
                lines = logs.stdout.splitlines() + logs.stderr.splitlines()
            result = parse_log(lines, 0 if status == "Success" else 1)
            log.info("%s: %s", name, describe_stages(result.stages))
            stages = [{"stage": e.stage, "status": e.status, "seconds": e.seconds} for e in result.stages]
            if status == "Success":
                done.append({"name": name, "params": queued[name], "seconds": round(sum(s["seconds"] for s in stages), 1),
                             "stages": stages})
                continue
            if status in FINAL:
                err = failure_message(result)
            else:
                err = DvcFailed(f"the queue worker exited before the experiment finished (status {status}); "
                                f"see `dvc queue logs {rev or name}`")
            failures.append({"name": name, "params": queued[name], "stage": err.stage, "error": str(err)})
            log.error("variant %s failed%s: %s", name, f" in stage {err.stage}" if err.stage else "", err)
        revs = [tasks[n][0] for n in queued if n in tasks and tasks[n][1] in FINAL]
        if revs:
            run_dvc(["queue", "remove", *revs], root, log.info)
        shown = check(run_dvc(["exp", "show", "--json"], root, lambda line: None))
    notes = (f"Queued: {jobs} jobs, {threads} thread(s) each; the variants took {wall:.0f} s wall-clock after priming "
             f"the shared stages ({', '.join(p['name'] for p in primes)}).",)
    return write_sweep_report(root, plan, shown, done, failures, out, title, log, extra_notes=notes,
                              stage_runs=[*primes, *done])
