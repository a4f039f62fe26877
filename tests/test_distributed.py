"""Distributed sweeps on loopback: a bare git repository as the shared git remote, a folder as the DVC remote, a
local Prefect server on 127.0.0.1, two `python -m flows worker` processes in two clones, and the coordinator
(`python -m flows sweep --distributed`) in a third; then the same with one worker killed in the middle of a variant.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from flow_helpers import DVC, build_tiny_repo, make_tiny_model
# Two methods: as many variants as workers and (with n=9) more, each a flow run of its own; the methods themselves
# are the pipeline tests' business (every variant costs a flow-run process and DVC's pull/push here).
GRID = ["-m", "attn", "mlp", "-q", "Q8_0"]
NAMES = {"attn-1-Q8_0", "mlp-1-Q8_0"}


def _run(cmd, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed in {cwd}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def _env(home: Path, url: str) -> dict:
    from flows._dvc import _env as dvc_env

    env = {k: v for k, v in dvc_env().items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="2", PYTHONPATH=str(ROOT))
    return env


def _clone(remote: Path, path: Path) -> Path:
    _run(["git", "clone", "-q", str(remote), str(path)], cwd=path.parent)
    for key, value in (("user.email", "test@example.com"), ("user.name", "test")):
        _run(["git", "config", key, value], cwd=path)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory, prefect_server):
    """The shared remotes, a coordinator repository and the session's Prefect server."""
    base = tmp_path_factory.mktemp("distributed")
    git_remote, dvc_remote = base / "remote.git", base / "dvc-remote"
    coord = build_tiny_repo(base / "coordinator", make_tiny_model(base / "model"))
    params = yaml.safe_load((coord / "params.yaml").read_text())
    params["eval"]["chat"]["tasks"] = []
    (coord / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q", "--bare", "-b", "main", str(git_remote)], cwd=base)
    _run([DVC, "remote", "add", "-d", "shared", str(dvc_remote)], cwd=coord)
    _run(["git", "commit", "-qam", "the shared DVC remote; no chat tasks"], cwd=coord)
    _run(["git", "remote", "add", "origin", str(git_remote)], cwd=coord)
    _run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], cwd=coord)

    return {"base": base, "git_remote": git_remote, "dvc_remote": dvc_remote, "coord": coord,
            "url": prefect_server["url"], "home": prefect_server["home"]}


class Worker:
    """`python -m flows worker` in its own clone, in its own process group (killed as a machine would die)."""

    def __init__(self, site, name: str, pool: str):
        self.clone = _clone(site["git_remote"], site["base"] / name)
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-m", "flows", "worker", "--repo", str(self.clone),
                                      "--pool", pool, "--name", name],
                                     cwd=ROOT, env=_env(site["home"], site["url"]), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.output: list[str] = []
        self.killed = False
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()

    def pids(self) -> set[int]:
        """The worker and every process below it (the flow run it started, the DVC stage under that)."""
        found, frontier = {self.proc.pid}, [self.proc.pid]
        while frontier:
            pid = frontier.pop()
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    frontier.append(child)
        return found

    def kill(self) -> None:
        self.killed = True
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


def stop_all(workers: list[Worker]) -> None:
    """Ctrl-C to every live worker at once, then up to 20 s for them together; a worker still up is killed."""
    live = [w for w in workers if w.proc.poll() is None]
    for w in live:
        os.killpg(w.proc.pid, signal.SIGINT)
    deadline = time.monotonic() + 20
    for w in live:
        try:
            w.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.kill()


def _flow_runs(url: str) -> list[dict]:
    import httpx

    r = httpx.post(f"{url}/flow_runs/filter", json={"limit": 200}, timeout=10)
    r.raise_for_status()
    return r.json()


def _coordinator(site, pool: str, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows", "sweep", "--distributed", "--repo", str(site["coord"]),
                             "--pool", pool, "--out", str(out), *GRID, *extra],
                            cwd=ROOT, env=_env(site["home"], site["url"]), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float, workers, returncode: int = 0) -> str:
    """The coordinator's output once it exits; fails early if a worker that should be serving has died."""
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    tails = lambda: "\n".join(f"--- {w.name}:\n" + "".join(w.output[-30:]) for w in workers)  # noqa: E731
    while proc.poll() is None:
        dead = [w.name for w in workers if not w.killed and w.proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            reader.join(5)
            why = f"worker(s) {dead} exited" if dead else f"the coordinator did not finish in {timeout:.0f} s"
            raise AssertionError(f"{why}:\n{''.join(output)[-4000:]}\n{tails()}")
        time.sleep(1)
    reader.join(10)
    out = "".join(output)
    assert proc.returncode == returncode, out[-6000:] + tails()
    return out


def _exp_metrics(repo: Path) -> dict[str, dict]:
    shown = json.loads(_run([DVC, "exp", "show", "--json"], cwd=repo).stdout)
    out = {}
    for entry in shown:
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                metrics = ((rev.get("data") or {}).get("metrics") or {}).get("data/eval/metrics.json", {})
                out[rev.get("name") or exp.get("name")] = metrics.get("data", {})
    return out


def _remote_objects_intact(dvc_remote: Path) -> int:
    """Every object in the DVC remote holds the bytes its name promises (md5 of the content)."""
    count = 0
    for path in (dvc_remote / "files" / "md5").rglob("*"):
        if path.is_file() and not path.name.endswith(".tmp") and "runs" not in path.parts:
            digest = path.parent.name + path.name.removesuffix(".dir")
            assert hashlib.md5(path.read_bytes()).hexdigest() == digest, f"corrupt object in the remote: {path}"
            count += 1
    return count


def test_a_worker_refuses_to_start_without_what_a_variant_needs(tmp_path, site):
    lone = tmp_path / "lone"
    shutil.copytree(site["coord"], lone, ignore=shutil.ignore_patterns(".dvc", ".git"))
    _run(["git", "init", "-q"], cwd=lone)
    _run([DVC, "init", "-q"], cwd=lone)
    env = _env(site["home"], site["url"])

    def worker(repo: Path, env: dict) -> str:
        out = subprocess.run([sys.executable, "-m", "flows", "worker", "--repo", str(repo)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stdout + out.stderr
        return out.stderr

    assert "has no git remote 'origin'" in worker(lone, env)
    _run(["git", "remote", "add", "origin", str(site["git_remote"])], cwd=lone)
    assert "has no DVC remote" in worker(lone, env)
    assert "PREFECT_API_URL is not set" in worker(site["coord"], {k: v for k, v in env.items() if k != "PREFECT_API_URL"})


def test_the_coordinator_refuses_uncommitted_changes_workers_would_not_see(site, tmp_path):
    params = site["coord"] / "params.yaml"
    committed = params.read_text()
    params.write_text(committed.replace("limit: 2", "limit: 5"))
    try:
        proc = _coordinator(site, "test-dirty", tmp_path / "report", "-n", "1")
        out, _ = proc.communicate(timeout=300)
    finally:
        params.write_text(committed)
    assert proc.returncode == 2, out[-3000:]
    assert "commit or stash these changes first" in out and "params.yaml" in out
    assert not (tmp_path / "report").exists()


def _runs_by_variant(url: str, pool: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in _flow_runs(url):
        if r["work_pool_name"] == pool:
            out.setdefault(re.sub(r"-attempt-\d+$", "", r["name"]), []).append(r["state_type"])
    return out


def _sweep(report: Path) -> dict:
    return json.loads((report / "sweep.json").read_text())


def test_two_workers_share_a_sweep_and_compute_each_stage_once(site, tmp_path):
    pool = "test-two-workers"
    workers = [Worker(site, f"w{i}", pool) for i in (1, 2)]
    try:
        # n=9 is impossible for a 4-layer model: those variants fail on their input, are reported, never retried.
        out = _finish(_coordinator(site, pool, tmp_path / "report", "-n", "1", "9"), 900, workers, returncode=1)
    finally:
        stop_all(workers)
    metrics = _exp_metrics(site["coord"])
    assert NAMES <= set(metrics), out[-3000:]
    assert all(metrics[n].get("ppl") for n in NAMES), metrics
    runs = _runs_by_variant(site["url"], pool)
    impossible = {n.replace("-1-", "-9-") for n in NAMES}
    assert {n: runs.get(n) for n in NAMES} == {n: ["COMPLETED"] for n in NAMES}, runs
    assert {n: runs.get(n) for n in impossible} == {n: ["FAILED"] for n in impossible}, runs
    sweep = _sweep(tmp_path / "report")
    assert sorted(r["name"] for r in sweep["rows"]) == sorted(NAMES)
    assert sorted(f["name"] for f in sweep["failures"]) == sorted(impossible)
    assert all(f["stage"] == "drop" and "drop.n=9" in f["error"] for f in sweep["failures"]), sweep["failures"]
    # Across the priming run and every variant, on either worker, calibrate and score ran once.
    report = (tmp_path / "report" / "report.md").read_text()
    assert "calibrate: ran 1×" in report and "score: ran 1×" in report, report
    assert all(d["attempts"] == 1 for d in sweep["variants"])
    assert _remote_objects_intact(site["dvc_remote"]) > 0


# Slow by nature (~60 s of waiting): a killed worker is detected from missed 30 s heartbeats.
def test_a_worker_killed_mid_variant_is_replaced_and_every_variant_reported_once(site, tmp_path):
    pool = "test-killed-worker"
    workers = [Worker(site, f"k{i}", pool) for i in (1, 2)]
    # New eval settings: the variants' evaluate stages must run again, so there is a variant to kill mid-way.
    coord = _coordinator(site, pool, tmp_path / "report", "-n", "1", "-S", "eval.limit=3", "--crash-after", "60")
    killed = None
    try:
        deadline = time.monotonic() + 600
        while killed is None and time.monotonic() < deadline and coord.poll() is None:
            running = [r for r in _flow_runs(site["url"]) if r["work_pool_name"] == pool and
                       r["state_type"] == "RUNNING" and not r["name"].startswith("prime") and r["infrastructure_pid"]]
            for r in running:
                pid = int(r["infrastructure_pid"].split(":")[-1])
                owner = next((w for w in workers if pid in w.pids()), None)
                if owner:
                    time.sleep(2)  # well inside the variant: its DVC stages are running
                    owner.kill()
                    killed = (r["name"], owner.name)
                    break
            time.sleep(1)
        assert killed, "no variant was seen running on a worker"
        _finish(coord, 900, workers)
    finally:
        if coord.poll() is None:
            os.killpg(coord.pid, signal.SIGKILL)
        stop_all(workers)
    runs = _runs_by_variant(site["url"], pool)
    assert sorted(runs[killed[0]]) == ["COMPLETED", "CRASHED"], (killed, runs)
    assert all(runs[n].count("COMPLETED") == 1 for n in NAMES), runs
    sweep = _sweep(tmp_path / "report")
    assert sorted(r["name"] for r in sweep["rows"]) == sorted(NAMES) and not sweep["failures"], sweep
    assert next(d["attempts"] for d in sweep["variants"] if d["name"] == killed[0]) == 2
    assert _remote_objects_intact(site["dvc_remote"]) > 0
    # Every experiment on the git remote has all its data on the DVC remote: a fresh clone pulls them whole.
    fresh = _clone(site["git_remote"], tmp_path / "fresh")
    _run([DVC, "exp", "pull", "origin", *sorted(NAMES)], cwd=fresh)
