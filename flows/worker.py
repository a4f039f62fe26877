"""`python -m flows worker`: a Prefect process worker that runs distributed-sweep variants in this clone.

It is `prefect worker start --type process` with what the variant flow needs from its surroundings: the clone
to work in ($DROPQUANT_REPO; a process worker starts each run in a temporary folder), this venv first on PATH
(the stages run `python -m stages.<verb>`), and flow-run heartbeats often enough for the server to notice a
worker that died mid-variant. Before it starts it checks what a variant will need: a Prefect API to talk to,
the git remote the sweep commits come from, and a DVC remote.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

from flows._dvc import DvcFailed, _env, dvc_executable, find_repo
from flows.distributed import POOL, REPO_ENV

HEARTBEAT_S = 30  # Prefect's minimum; the server marks a run crashed after zombie_after_s without one


def prefect_executable() -> str:
    here = Path(sys.executable).with_name("prefect")
    return str(here) if here.is_file() else "prefect"


def check_clone(root: Path, git_remote: str, dvc_remote: Optional[str]) -> None:
    """Refuse to start a worker that could not run a variant: say which piece is missing."""
    if not os.environ.get("PREFECT_API_URL"):
        raise DvcFailed("PREFECT_API_URL is not set: point it at the coordinator's Prefect server, e.g. "
                        "PREFECT_API_URL=http://127.0.0.1:4200/api (through `ssh -L 4200:127.0.0.1:4200 host`)")
    remotes = subprocess.run(["git", "remote"], cwd=root, capture_output=True, text=True).stdout.split()
    if git_remote not in remotes:
        raise DvcFailed(f"this clone ({root}) has no git remote '{git_remote}' (it has: {remotes or 'none'}); "
                        f"the sweep's commits and experiments travel through it")
    out = subprocess.run([dvc_executable(), "remote", "list"], cwd=root, capture_output=True, text=True, env=_env())
    names = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    if dvc_remote and dvc_remote not in names or not names:
        raise DvcFailed(f"this clone ({root}) has no DVC remote{f' {dvc_remote!r}' if dvc_remote else ''} "
                        f"(it has: {names or 'none'}); add the shared one with `dvc remote add -d <name> <url>`")


def worker_command(root: Path, pool: str, name: Optional[str], limit: int) -> tuple[list[str], dict]:
    env = _env()
    env[REPO_ENV] = str(root)
    env.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))
    name = name or f"{socket.gethostname()}-{root.name}"
    cmd = [prefect_executable(), "worker", "start", "--pool", pool, "--type", "process", "--limit", str(limit),
           "--name", name]
    return cmd, env


def start_worker(repo: str = ".", pool: str = POOL, name: Optional[str] = None, limit: int = 1,
                 git_remote: str = "origin", dvc_remote: Optional[str] = None) -> None:
    """Replace this process by the Prefect worker (signals such as Ctrl-C then reach it directly)."""
    if limit < 1:
        raise DvcFailed(f"--limit must be at least 1 (got {limit})")
    root = find_repo(repo)
    check_clone(root, git_remote, dvc_remote)
    cmd, env = worker_command(root, pool, name, limit)
    print(f"dropquant worker: {' '.join(cmd)} (clone {root})", flush=True)
    os.execve(cmd[0] if os.path.isabs(cmd[0]) else _which(cmd[0]), cmd, env)


def _which(program: str) -> str:
    import shutil

    found = shutil.which(program)
    if not found:
        raise DvcFailed(f"cannot find `{program}` on PATH")
    return found
