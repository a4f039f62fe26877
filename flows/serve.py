"""Scheduled sweeps: a local Prefect server on 127.0.0.1 (started if none answers) and the sweep served on a cron.

Prefect's ephemeral API has no scheduler, so schedules need a real `prefect server start`. It is bound to the
loopback interface only; the UI is at http://127.0.0.1:<port>. Prefect is imported only after PREFECT_API_URL
points at that server, because Prefect reads its settings when it is first imported.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

log = logging.getLogger("dropquant.serve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEPLOYMENT = "scheduled-sweep"


def api_url(host: str, port: int) -> str:
    return f"http://{'[::1]' if host == '::1' else host}:{port}/api"


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def prefect_executable() -> str:
    here = Path(sys.executable).with_name("prefect")
    return str(here) if here.is_file() else "prefect"


def start_server(host: str = "127.0.0.1", port: int = 4200, log_file: Optional[Path] = None,
                 timeout: float = 120.0) -> tuple[str, Optional[subprocess.Popen]]:
    """The API URL of a healthy server on host:port; starts `prefect server start` there if none answers.

    Returns the process when this call started it (the caller stops it), else None.
    """
    if host not in LOOPBACK:
        raise ValueError(f"refusing to bind the Prefect server to {host}: only loopback ({', '.join(LOOPBACK)})")
    url = api_url(host, port)
    if healthy(url):
        log.info("using the Prefect server already running at %s", url)
        return url, None
    env = dict(os.environ, PREFECT_SERVER_API_HOST=host, PREFECT_SERVER_API_PORT=str(port),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_API_URL=url)
    env.pop("PREFECT_API_URL", None)  # the server itself must not try to talk to another API
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    log.info("starting `prefect server start --host %s --port %d`%s", host, port,
             f" (log: {log_file})" if log_file else "")
    proc = subprocess.Popen([prefect_executable(), "server", "start", "--host", host, "--port", str(port)],
                            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    if log_file:
        # So a server that outlives its starter (a killed `make serve`) can still be found and stopped.
        Path(log_file).with_name("server.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(log_file).read_text()[-2000:] if log_file else ""
            raise RuntimeError(f"prefect server exited with {proc.returncode} before answering at {url}\n{tail}")
        if healthy(url):
            log.info("Prefect server up at %s (UI: %s)", url, url[: -len("/api")])
            return url, proc
        time.sleep(1)
    stop(proc)
    raise RuntimeError(f"prefect server did not answer at {url} within {timeout:.0f} s")


def stop(proc: Optional[subprocess.Popen], timeout: float = 20.0) -> None:
    """Stop a process this module started, with its children (it leads its own process group)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


def serve_sweep(repo: str = ".", cron: Optional[str] = None, interval: Optional[float] = None,
                host: str = "127.0.0.1", port: int = 4200, parameters: Optional[dict] = None,
                name: Optional[str] = None, search: bool = False) -> None:
    """Serve the sweep flow (or, with `search`, the search flow) on a schedule until interrupted (Ctrl-C); stops
    the server if it started it."""
    from flows._dvc import find_repo

    root = find_repo(repo)
    prefect_home = Path(os.environ.get("PREFECT_HOME", root / ".prefect"))
    os.environ.setdefault("PREFECT_HOME", str(prefect_home))
    url, proc = start_server(host, port, log_file=prefect_home / "server.log")
    os.environ["PREFECT_API_URL"] = url
    try:
        from prefect import serve
        from prefect.deployments.runner import EntrypointType

        from flows.plan import sweep_defaults
        from flows.search import search_flow
        from flows.sweep import sweep_flow

        served = search_flow if search else sweep_flow
        name = name or ("scheduled-search" if search else DEPLOYMENT)

        if interval is None and cron is None:
            cron = sweep_defaults(root)["cron"]
        schedule = {"interval": interval} if interval is not None else {"cron": cron}
        deployment = served.to_deployment(
            name=name, **schedule, parameters={"repo": str(root), **(parameters or {})},
            # One sweep at a time: a run that outlasts the period makes the next one wait, not collide.
            concurrency_limit=1,
            # Importable from anywhere: the package is installed, the flow file's path need not be under cwd.
            entrypoint_type=EntrypointType.MODULE_PATH,
            description=f"dropquant {'search' if search else 'sweep'} of {root}")
        log.info("serving deployment '%s/%s' (%s) for %s; runs in the UI at %s/deployments", served.name, name, f"every {interval} s" if interval is not None else f"cron '{cron}'", root, url[: -len("/api")])
        serve(deployment, limit=1)
    finally:
        stop(proc)
