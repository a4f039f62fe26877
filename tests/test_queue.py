"""Queued sweeps (`python -m flows sweep --jobs N`) on the tiny random Llama, and the workspace rule behind them.

The sweeps run as a user runs them, `python -m flows sweep` in a subprocess (its own temporary Prefect server and
home), in two copies of one tiny project: the model, the calibration file and the task data are untracked,
named by paths relative to the project (so a queued experiment's temporary copy finds them only through
DROPQUANT_WORKSPACE). The sequential sweep of the grid in one copy is the reference for the queued one in the other.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SHARED_DATA
from flow_helpers import build_tiny_repo, dvc, make_tiny_model

GRID = ["-m", "attn", "mlp", "block", "-q", "Q8_0"]
GOOD = ["attn-1-Q8_0", "mlp-1-Q8_0", "block-1-Q8_0"]
BAD = ["attn-9-Q8_0", "mlp-9-Q8_0", "block-9-Q8_0"]  # impossible on 4 layers
COMPARED = ("avg", "ppl", "kld", "top1")


# --- the workspace rule ---------------------------------------------------------------------------------------------

def test_workspace_path_takes_relative_paths_from_the_workspace(tmp_path, monkeypatch):
    from dropquant.workspace import WORKSPACE_ENV, workspace_path

    monkeypatch.delenv(WORKSPACE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert workspace_path("../shared/data") == tmp_path / "../shared/data"
    assert workspace_path("/abs/x") == Path("/abs/x")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert workspace_path("~/m") == tmp_path / "home" / "m"
    monkeypatch.setenv(WORKSPACE_ENV, str(tmp_path / "ws"))
    assert workspace_path("data/c4") == tmp_path / "ws" / "data" / "c4"
    assert workspace_path("/abs/x") == Path("/abs/x")  # absolute paths never move
    monkeypatch.setenv(WORKSPACE_ENV, "")
    assert workspace_path("a") == tmp_path / "a"  # empty = unset


def test_stages_resolve_params_paths_from_the_workspace(tmp_path, monkeypatch, tiny_llama):
    from dropquant.calibration import resolve_files
    from dropquant.errors import DropquantError
    from dropquant.evaluation.tasks import resolve_data_dir
    from dropquant.model.loading import resolve_source
    from dropquant.workspace import WORKSPACE_ENV

    ws, elsewhere = tmp_path / "ws", tmp_path / "copy"
    (ws / "texts").mkdir(parents=True)
    elsewhere.mkdir()
    (ws / "texts" / "b.txt").write_text("b")
    (ws / "texts" / "a.jsonl").write_text('{"text": "a"}\n')
    tiny_llama.save_pretrained(ws / "model")
    monkeypatch.chdir(elsewhere)  # a stage running in a copy of the project
    monkeypatch.setenv(WORKSPACE_ENV, str(ws))
    assert resolve_files("texts/*") == [ws / "texts" / "a.jsonl", ws / "texts" / "b.txt"]
    assert resolve_source("model").location == str((ws / "model").resolve())
    assert resolve_data_dir("../data") == (tmp_path / "data").resolve()
    monkeypatch.delenv(WORKSPACE_ENV)
    with pytest.raises(DropquantError, match="no file matches 'texts/\\*'"):
        resolve_files("texts/*")
    with pytest.raises(DropquantError):
        resolve_source("./model")
    assert resolve_data_dir("../data") == (tmp_path / "data").resolve()  # from the copy's parent: tmp_path too
    assert resolve_data_dir(None) is None or os.environ.get("DROPQUANT_EVAL_DATA")


def test_threads_per_job_split_the_cores():
    from flows.queue import thread_overrides, threads_per_job

    assert [threads_per_job(j, cpus=2) for j in (1, 2, 3)] == [2, 1, 1]
    assert threads_per_job(2, cpus=16) == 8 and threads_per_job(3, cpus=16) == 5
    assert thread_overrides(1, []) == ["eval.threads=1", "eval.speed_threads=1"]
    assert thread_overrides(4, ["eval.threads=2", "eval.limit=5"]) == ["eval.speed_threads=4"]  # the user's wins


def test_queue_logs_parse_like_a_streamed_run():
    from flows._dvc import failure_message
    from flows.queue import parse_log

    lines = ["Reproducing experiment 'attn-9-Q8_0'", "Stage 'calibrate' is cached - skipping run, checking out outputs",
             "Stage 'score' didn't change, skipping", "Running stage 'drop':", "> python -m stages.drop",
             "dropquant drop: error: drop.n=9 is larger than method 'attn' can drop",
             "ERROR: failed to reproduce 'drop': failed to run: python -m stages.drop, exited with 2"]
    result = parse_log(lines, 1)
    assert [(e.stage, e.status) for e in result.stages] == [("calibrate", "run-cache"), ("score", "unchanged"),
                                                            ("drop", "failed")]
    err = failure_message(result)
    assert str(err).startswith("dropquant drop: error: drop.n=9") and err.stage == "drop" and err.user_error
    ok = parse_log(["Running stage 'drop':", "12:00:01 dropquant.drop: done in 7 s, peak RSS 0.4 GB"], 0)
    assert [(e.stage, e.status, e.seconds) for e in ok.stages] == [("drop", "ran", 7.0)]


# --- queued against sequential, end to end -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def twin_repos(tmp_path_factory) -> tuple[Path, Path]:
    """Two identical tiny projects; their model, calibration text and task data untracked, named relatively."""
    base = tmp_path_factory.mktemp("queue")
    model = make_tiny_model(base / "model")
    repos = []
    for name in ("sequential", "queued"):
        repo = base / name
        chat_off = {"tasks": [], "limit": 8, "max_tokens": 192, "parallel": 32, "n_ctx": 1536, "transcripts": 8}
        build_tiny_repo(repo, model, params_update={"model": {"source": "model"},
                                                    "calibration": {"source": "texts/calib.txt"},
                                                    "eval": {"data_dir": "shared-data", "chat": chat_off}},
                        gitignore="/model/\n/texts/\n/shared-data\n", calib_name="calib-tracked.txt")
        shutil.copytree(model, repo / "model")
        (repo / "texts").mkdir()
        (repo / "texts" / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
        if SHARED_DATA.is_dir():
            os.symlink(SHARED_DATA, repo / "shared-data")
        assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                              text=True).stdout == ""
        repos.append(repo)
    return repos[0], repos[1]


def _sweep(repo: Path, out: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "DROPQUANT_WORKSPACE"}
    env.update(PREFECT_HOME=str(out.parent / f"prefect-{out.name}"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", PYTHONPATH=str(ROOT),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")  # a first start migrates a fresh database
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flows", "sweep", "--repo", str(repo), "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return done, time.monotonic() - started


def _metrics(repo: Path) -> dict[str, dict]:
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    names = [r["name"] for b in shown for g in (b.get("experiments") or []) for r in g["revs"]]
    assert len(names) == len(set(names)), names  # every experiment once
    # The drop is a parameter, not a metric (metrics.json holds the headline figures only).
    return {r["name"]: {**r["data"]["metrics"]["data/eval/metrics.json"]["data"],
                        **{k: r["data"]["params"]["params.yaml"]["data"]["drop"][k] for k in ("method", "n")}}
            for b in shown for g in (b.get("experiments") or []) for r in g["revs"]}


def test_queued_sweep_matches_the_sequential_one(twin_repos, tmp_path):
    sequential, queued = twin_repos
    ref, seq_s = _sweep(sequential, tmp_path / "seq", *GRID, "-n", "1")
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    expected = _metrics(sequential)
    assert set(expected) == set(GOOD)

    before = {f: (queued / f).read_bytes() for f in ("params.yaml",)}
    run, queue_s = _sweep(queued, tmp_path / "queue", *GRID, "-n", "1", "9", "--jobs", "2")
    log = run.stdout + run.stderr
    print(f"sequential 3 variants {seq_s:.0f} s; queued 6 variants (3 impossible), 2 jobs {queue_s:.0f} s")
    assert run.returncode == 1, log[-4000:]  # the impossible variants failed, the report was still written
    got = _metrics(queued)
    assert set(got) == set(GOOD), "only the finished variants, no priming experiment: " + ", ".join(got)
    for name in GOOD:
        for key in COMPARED:
            assert got[name].get(key) == pytest.approx(expected[name].get(key), rel=1e-6, abs=1e-9), (name, key)
        assert (got[name]["method"], got[name]["n"]) == (expected[name]["method"], 1)

    # The workspace was left alone: params.yaml as committed, no dvc.lock, no data/.
    assert {f: (queued / f).read_bytes() for f in before} == before
    assert not (queued / "dvc.lock").exists() and not (queued / "data").exists()
    assert "Queued" not in dvc(queued, "queue", "status").stdout

    report = json.loads((tmp_path / "queue" / "sweep.json").read_text())
    assert [v["name"] for v in report["variants"]] == GOOD
    assert sorted(f["name"] for f in report["failures"]) == sorted(BAD)
    for f in report["failures"]:
        assert f["stage"] == "drop" and "dropquant drop: error: drop.n=9 is larger than" in f["error"], f
        assert f"failed: {f['name']}: dropquant drop: error:" in run.stderr
    # calibrate and score ran once, in priming; every variant took them (and the baseline) from the run-cache.
    for v in report["variants"]:
        status = {s["stage"]: s["status"] for s in v["stages"]}
        # "Stage 'calibrate' is cached - skipping run" in its queue log: the temporary copies share the run-cache.
        assert all(status[s] == "run-cache" for s in ("calibrate", "score", "baseline", "baseline_eval")), v
        assert status["drop"] == "ran" and status["evaluate"] == "ran", v
        assert "eval.threads=1" in v["params"]
    md = (tmp_path / "queue" / "report.md").read_text()
    assert "calibrate: ran 1×, reused 3×" in md and "score: ran 1×, reused 3×" in md
    assert "Queued: 2 jobs, 1 thread(s) each" in md
    assert all(f"| {name} |" in md for name in GOOD) and "drop.n=9 is larger than" in md
