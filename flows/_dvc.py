"""Calling DVC from a flow: stream its output line by line, read what each stage did, turn failures into one message.

Nothing here decides what to run; dvc.yaml does. This only runs `dvc ...` and reads what it prints.
"""
from __future__ import annotations

import contextlib
import fcntl
import graphlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

# What DVC 3 prints per stage (dvc/stage/run.py, dvc/stage/__init__.py).
RUNNING = re.compile(r"^Running stage '([^']+)':")
UNCHANGED = re.compile(r"^Stage '([^']+)' didn't change, skipping")
RUN_CACHE = re.compile(r"^Stage '([^']+)' is cached - skipping run, checking out outputs")
STAGE_ERROR = re.compile(r"^dropquant \S+: error: ")
DVC_ERROR = re.compile(r"^ERROR: ")
FAILED_STAGE = re.compile(r"failed to reproduce '([^']+)'")
BUSY = "is busy, it is being blocked by"
# tqdm redraws with \r, which text mode turns into one line per redraw: keep only the finished bar.
PROGRESS = re.compile(r"\d+%\|")

LOCK_NAME = "dropquant-flow.lock"


class DvcFailed(RuntimeError):
    """A DVC command failed; the message is the failing stage's own error (or DVC's), not a traceback."""

    def __init__(self, message: str, stage: Optional[str] = None, output: str = "", busy: bool = False,
                 user_error: bool = False, stages: Optional[list] = None):
        super().__init__(message)
        self.stage = stage
        self.output = output
        self.busy = busy
        self.user_error = user_error  # the stage refused its input: running it again cannot help
        self.stages = stages or []


class RepoBusy(RuntimeError):
    """Another pipeline is running on this repository."""


@dataclass
class StageEvent:
    stage: str
    status: str                # ran | unchanged | run-cache | failed
    seconds: float = 0.0


@dataclass
class DvcResult:
    returncode: int
    lines: list[str] = field(default_factory=list)
    stages: list[StageEvent] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def dvc_executable() -> str:
    """The dvc next to this Python (the project's venv) first, so a flow works without an activated venv."""
    here = Path(sys.executable).with_name("dvc")
    return str(here) if here.is_file() else "dvc"


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env["PYTHONUNBUFFERED"] = "1"  # stage logs arrive as they are written, not at exit
    # The stages run `python -m stages.<verb>`: make that the venv's python even when the venv is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_dvc(args: list[str], repo: Path, log: Callable[[str], None] = print) -> DvcResult:
    """Run `dvc <args>` in `repo`, passing each output line to `log`; record what happened to each stage."""
    result = DvcResult(returncode=-1)
    current: Optional[tuple[str, float]] = None

    def close(now: float) -> None:
        nonlocal current
        if current:
            result.stages.append(StageEvent(current[0], "ran", round(now - current[1], 2)))
            current = None

    proc = subprocess.Popen([dvc_executable(), *args], cwd=repo, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip()
        if not line:
            continue
        result.lines.append(line)
        if PROGRESS.search(line) and "100%" not in line:
            continue
        now = time.monotonic()
        if m := RUNNING.match(line):
            close(now)
            current = (m.group(1), now)
        elif m := UNCHANGED.match(line):
            close(now)
            result.stages.append(StageEvent(m.group(1), "unchanged"))
        elif m := RUN_CACHE.match(line):
            close(now)
            result.stages.append(StageEvent(m.group(1), "run-cache"))
        log(line)
    result.returncode = proc.wait()
    now = time.monotonic()
    if result.returncode != 0:
        # DVC names the stage that failed; it may never have started (e.g. a missing parameter).
        named = next((m.group(1) for line in reversed(result.lines) if (m := FAILED_STAGE.search(line))), None)
        if current and named in (None, current[0]):
            result.stages.append(StageEvent(current[0], "failed", round(now - current[1], 2)))
            current = None
        elif named:
            close(now)
            result.stages.append(StageEvent(named, "failed"))
    close(now)
    return result


def failure_message(result: DvcResult) -> DvcFailed:
    """The stage's own `dropquant <stage>: error:` lines if it printed any, else DVC's ERROR line, else the tail."""
    failed = next((e.stage for e in reversed(result.stages) if e.status == "failed"), None)
    lines = result.lines
    own = [i for i, line in enumerate(lines) if STAGE_ERROR.match(line)]
    if own:
        # An error message may span lines (the params checker lists one problem per line): keep them until DVC's ERROR.
        start = own[0]
        end = next((i for i in range(start, len(lines)) if DVC_ERROR.match(lines[i])), len(lines))
        message = "\n".join(lines[start:end])
    else:
        dvc_lines = [line for line in lines if DVC_ERROR.match(line)]
        message = dvc_lines[-1][len("ERROR: "):] if dvc_lines else "\n".join(lines[-15:]) or "dvc failed"
    busy = any(BUSY in line for line in lines)
    if busy:
        holder = "\n".join(line.strip() for line in lines if "(PID" in line)
        message = f"the repository is busy: another DVC command holds its outputs ({holder or 'see the log'})"
    return DvcFailed(message, stage=failed, output=result.output, busy=busy, user_error=bool(own),
                     stages=result.stages)


def check(result: DvcResult) -> DvcResult:
    if result.returncode != 0:
        raise failure_message(result)
    return result


def stage_order(repo: Path) -> list[str]:
    """The pipeline's stages in dependency order, as `dvc dag` sees dvc.yaml."""
    out = subprocess.run([dvc_executable(), "dag", "--dot"], cwd=repo, env=_env(), capture_output=True, text=True)
    if out.returncode != 0:
        raise DvcFailed(f"dvc dag failed: {(out.stderr or out.stdout).strip()}")
    graph: dict[str, set[str]] = {}
    for line in out.stdout.splitlines():
        names = re.findall(r'"([^"]+)"', line)
        if "->" in line and len(names) == 2:
            graph.setdefault(names[1], set()).add(names[0])
            graph.setdefault(names[0], set())
        elif len(names) == 1:
            graph.setdefault(names[0], set())
    # Same dvc.yaml, same order: static_order is deterministic for the same input.
    return list(graphlib.TopologicalSorter(graph).static_order())


def dvc_writers(repo: Path) -> list[str]:
    """Live DVC processes holding output locks on this repository (DVC's own rwlock file)."""
    path = repo / ".dvc" / "tmp" / "rwlock"
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return []
    holders = set()
    for kind in ("write", "read"):
        for info in (data.get(kind) or {}).values():
            for entry in info if isinstance(info, list) else [info]:
                pid = entry.get("pid")
                if pid and _alive(pid):
                    holders.add(f"PID {pid}: {entry.get('cmd', '?')}")
    return sorted(holders)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def repo_lock(repo: Path, what: str) -> Iterator[None]:
    """One flow at a time per repository.

    DVC locks outputs while a stage runs, but two concurrent `dvc exp run` in one workspace overwrite each
    other's params.yaml and experiment refs before that lock is reached (verified with dvc 3.67.1: the first
    experiment fails with "'NoneType' object is not subscriptable"). So a flow takes this lock first and
    refuses to start while DVC reports a live writer.
    """
    path = repo / ".dvc" / "tmp" / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(path).read_text().strip() or "unknown"
            raise RepoBusy(f"another dropquant flow is running on {repo} ({holder}); wait for it to finish") from None
        writers = dvc_writers(repo)
        if writers:
            raise RepoBusy(f"a DVC command is running on {repo} ({'; '.join(writers)}); wait for it to finish")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {what}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing releases the flock


def find_repo(path: str | os.PathLike) -> Path:
    """The DVC repository root at or above `path` (a flow may be started from a subfolder)."""
    start = Path(path).resolve()
    for candidate in (start, *start.parents):
        if (candidate / "dvc.yaml").is_file() and (candidate / ".dvc").is_dir():
            return candidate
    raise FileNotFoundError(f"no DVC pipeline (dvc.yaml and .dvc/) at or above {start}")
