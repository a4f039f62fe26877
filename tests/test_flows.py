"""Prefect flows over real DVC, on a tiny random Llama in a temporary git + DVC copy of the project.

Order matters (one repository per module, each test building on the last, as a user would): the variant flow
runs the first stages, the sweep runs two variants (and two impossible ones) as experiments, the same grid queued
(`python -m flows sweep --jobs 2`) in a second copy of the project gives the same metrics, a finished variant is
reproduced bit for bit, and a real Prefect server fires the scheduled sweep.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SHARED_DATA
from flow_helpers import build_tiny_repo, dvc, make_tiny_model

# Before Prefect is imported anywhere in this process: its home (profiles, local storage) in a temporary folder.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="dropquant-test-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"


@pytest.fixture(scope="module")
def prefect_harness(prefect_server):
    """The in-process flows talk to the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server["url"]}):
        yield


_dvc = dvc


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 4-layer random Llama with a real tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("flows-model") / "model")


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory, tiny_model) -> Path:
    """A git + DVC repository with this project's dvc.yaml and code, on the tiny model."""
    return build_tiny_repo(tmp_path_factory.mktemp("flows") / "repo", tiny_model)


def _tmp_leftovers(repo: Path) -> list[Path]:
    return list((repo / "data").rglob(".*.tmp")) if (repo / "data").is_dir() else []


def test_stage_order_follows_dvc_yaml(tiny_repo):
    from flows._dvc import stage_order

    order = stage_order(tiny_repo)
    stages = set(yaml.safe_load((tiny_repo / "dvc.yaml").read_text())["stages"])
    assert set(order) == stages
    for before, after in (("calibrate", "score"), ("score", "drop"), ("drop", "quantize")):
        assert order.index(before) < order.index(after)
    if "evaluate" in stages:
        assert order.index("quantize") < order.index("evaluate")


def test_variant_flow_runs_each_stage_as_a_task(tiny_repo, prefect_harness):
    from flows.variant import variant_flow

    first = variant_flow(repo=str(tiny_repo), stages=["calibrate", "score"])
    assert [s["stage"] for s in first["stages"]] == ["calibrate", "score"]
    assert [s["status"] for s in first["stages"]] == ["ran", "ran"]
    assert all(s["seconds"] > 0 for s in first["stages"])
    again = variant_flow(repo=str(tiny_repo), stages=["score", "calibrate"])
    assert [(s["stage"], s["status"]) for s in again["stages"]] == [("calibrate", "unchanged"), ("score", "unchanged")]


def test_variant_flow_fails_with_the_stage_message(tiny_repo, prefect_harness):
    from flows._dvc import DvcFailed
    from flows.variant import variant_flow

    params = (tiny_repo / "params.yaml").read_text()
    try:
        with pytest.raises(DvcFailed) as err:
            variant_flow(repo=str(tiny_repo), overrides=["drop.n=99"], stages=["drop"])
        assert str(err.value).startswith("dropquant drop: error: drop.n=99 is larger than")
        assert err.value.stage == "drop" and err.value.user_error
        assert not _tmp_leftovers(tiny_repo)
        assert not (tiny_repo / "data" / "pruned").exists()
    finally:
        (tiny_repo / "params.yaml").write_text(params)


def test_sweep_makes_experiments_and_a_report(tiny_repo, prefect_harness, tmp_path):
    from flows.sweep import sweep_flow

    out = tmp_path / "report"
    # attn-9 and mlp-9 are impossible on 4 layers: reported with their error, the other variants still run.
    result = sweep_flow(repo=str(tiny_repo), n=[9, 1], out=str(out))
    assert result["experiments"] == ["attn-1-Q8_0", "mlp-1-Q8_0"]
    assert [f["name"] for f in result["failures"]] == ["attn-9-Q8_0", "mlp-9-Q8_0"]
    for f in result["failures"]:
        assert "dropquant drop: error: drop.n=9" in f["error"] and f["stage"] == "drop"
    assert not _tmp_leftovers(tiny_repo)

    shown = json.loads(_dvc(tiny_repo, "exp", "show", "--json").stdout)
    exps = {r["name"]: r for b in shown for g in (b.get("experiments") or []) for r in g["revs"]}
    assert {"attn-1-Q8_0", "mlp-1-Q8_0"} <= set(exps)
    assert not {"attn-9-Q8_0", "mlp-9-Q8_0"} & set(exps)
    for name, method in (("attn-1-Q8_0", "attn"), ("mlp-1-Q8_0", "mlp")):
        metrics = exps[name]["data"]["metrics"]["data/eval/metrics.json"]["data"]
        assert metrics["size_mb"] > 0 and metrics["base_size_mb"] >= metrics["size_mb"]
        assert "method" not in metrics  # a parameter, which `dvc exp show` lists already
        params = exps[name]["data"]["params"]["params.yaml"]["data"]
        assert (params["drop"]["method"], params["drop"]["n"]) == (method, 1)

    md = (out / "report.md").read_text()
    assert "| attn-1-Q8_0 | attn | 1 | Q8_0 |" in md and "| mlp-1-Q8_0 | mlp | 1 | Q8_0 |" in md
    assert "| unpruned (base) | none | 0 | Q8_0 |" in md and "not measured (eval.speed: false)" in md
    assert "attn-9-Q8_0" in md and "drop.n=9 is larger than" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "<script" not in page and "http" not in page.split("<body>")[1]
    # calibrate and score ran once (in the variant flow) and every variant reused them.
    for v in json.loads((out / "sweep.json").read_text())["variants"]:
        status = {s["stage"]: s["status"] for s in v["stages"]}
        assert status["calibrate"] in ("unchanged", "run-cache") and status["score"] in ("unchanged", "run-cache")
    mlp = next(v for v in json.loads((out / "sweep.json").read_text())["variants"] if v["name"] == "mlp-1-Q8_0")
    assert {s["stage"]: s["status"] for s in mlp["stages"]}["drop"] == "ran"


# --- the same grid queued (python -m flows sweep --jobs 2), against the sequential sweep above ----------------------

QUEUED = ["-m", "attn", "mlp", "-n", "1", "9", "-q", "Q8_0"]
GOOD = ["attn-1-Q8_0", "mlp-1-Q8_0"]
BAD = ["attn-9-Q8_0", "mlp-9-Q8_0"]  # impossible on 4 layers
COMPARED = ("avg", "ppl", "kld", "top1")


@pytest.fixture(scope="module")
def queued_repo(tmp_path_factory, tiny_model) -> Path:
    """A second copy of the project on the same model, whose model, calibration text and task data are untracked,
    named by paths relative to the project: a queued experiment's temporary copy finds them only through
    DROPQUANT_WORKSPACE. Chat off (the metrics compared do not depend on it)."""
    repo = tmp_path_factory.mktemp("queue") / "queued"
    chat_off = {"tasks": [], "limit": 8, "max_tokens": 192, "parallel": 32, "n_ctx": 1536, "transcripts": 8}
    build_tiny_repo(repo, tiny_model, params_update={"model": {"source": "model"},
                                                     "calibration": {"source": "texts/calib.txt"},
                                                     "eval": {"data_dir": "shared-data", "chat": chat_off}},
                    gitignore="/model/\n/texts/\n/shared-data\n", calib_name="calib-tracked.txt")
    shutil.copytree(tiny_model, repo / "model")
    (repo / "texts").mkdir()
    (repo / "texts" / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)  # as calib.txt
    if SHARED_DATA.is_dir():
        os.symlink(SHARED_DATA, repo / "shared-data")
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout == ""
    return repo


def _cli_sweep(repo: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m flows sweep` as a user runs it: its own temporary Prefect server and home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "DROPQUANT_WORKSPACE"}
    env.update(PREFECT_HOME=str(out.parent / f"prefect-{out.name}"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", PYTHONPATH=str(ROOT),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")  # a first start migrates a fresh database
    return subprocess.run([sys.executable, "-m", "flows", "sweep", "--repo", str(repo), "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _metrics(repo: Path) -> dict[str, dict]:
    shown = json.loads(_dvc(repo, "exp", "show", "--json").stdout)
    names = [r["name"] for b in shown for g in (b.get("experiments") or []) for r in g["revs"]]
    assert len(names) == len(set(names)), names  # every experiment once
    # The drop is a parameter, not a metric (metrics.json holds the headline figures only).
    return {r["name"]: {**r["data"]["metrics"]["data/eval/metrics.json"]["data"],
                        **{k: r["data"]["params"]["params.yaml"]["data"]["drop"][k] for k in ("method", "n")}}
            for b in shown for g in (b.get("experiments") or []) for r in g["revs"]}


# Slow by nature (~200 s): real DVC queue workers, which poll every 5 s, run the grid.
def test_queued_sweep_matches_the_sequential_one(tiny_repo, queued_repo, tmp_path):
    """The sweep above (sequential, in tiny_repo) is the reference: the same grid as DVC queued experiments, 2 jobs,
    in a second copy of the project gives the same metrics and leaves that copy's workspace alone."""
    from flows.queue import threads_per_job

    threads = threads_per_job(2)  # this machine's cores split between the 2 jobs
    reference = _metrics(tiny_repo)
    assert set(GOOD) <= set(reference), sorted(reference)
    queued = queued_repo
    before = {f: (queued / f).read_bytes() for f in ("params.yaml",)}
    run = _cli_sweep(queued, tmp_path / "queue", *QUEUED, "--jobs", "2")
    log = run.stdout + run.stderr
    assert run.returncode == 1, log[-4000:]  # the impossible variants failed, the report was still written
    got = _metrics(queued)
    assert set(got) == set(GOOD), "only the finished variants, no priming experiment: " + ", ".join(got)
    for name in GOOD:
        for key in COMPARED:
            assert got[name].get(key) == pytest.approx(reference[name].get(key), rel=1e-6, abs=1e-9), (name, key)
        assert (got[name]["method"], got[name]["n"]) == (reference[name]["method"], 1)

    # The workspace was left alone: params.yaml as committed, no dvc.lock, no data/.
    assert {f: (queued / f).read_bytes() for f in before} == before
    assert not (queued / "dvc.lock").exists() and not (queued / "data").exists()
    assert "Queued" not in _dvc(queued, "queue", "status").stdout

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
        assert f"eval.threads={threads}" in v["params"]
    md = (tmp_path / "queue" / "report.md").read_text()
    reused = f"ran 1×, reused {len(GOOD)}×"
    assert f"calibrate: {reused}" in md and f"score: {reused}" in md
    assert f"Queued: 2 jobs, {threads} thread(s) each" in md
    assert all(f"| {name} |" in md for name in GOOD) and "drop.n=9 is larger than" in md


def test_search_runs_its_pick_as_an_experiment_and_reports_every_candidate(tiny_repo, prefect_harness, tmp_path):
    """The search over a small space: its pick, measured in-process on the reference scale, runs through the whole
    pipeline as a DVC experiment whose kld_source agrees; the report lists every candidate; a rerun measures
    nothing again."""
    from flows.search import search_flow

    out = tmp_path / "search"
    space = {"methods": ["attn", "mlp"], "n": [0, 1], "quant_types": ["Q8_0"]}
    result = search_flow(repo=str(tiny_repo), max_kld=50.0, out=str(out), **space)
    name = result["experiment"]
    assert name == result["pick"]["name"] and name in ("attn-1-Q8_0", "mlp-1-Q8_0")
    shown = json.loads(_dvc(tiny_repo, "exp", "show", "--json").stdout)
    exps = {r["name"]: r for b in shown for g in (b.get("experiments") or []) for r in g["revs"]}
    metrics = exps[name]["data"]["metrics"]["data/eval/metrics.json"]["data"]
    assert metrics["kld_source"] == pytest.approx(result["measured"]["kld"], rel=1e-3, abs=1e-5)
    assert exps[name]["data"]["params"]["params.yaml"]["data"]["eval"]["source_kld"] is True

    listed = json.loads((out / "candidates.json").read_text())
    assert listed["experiment"] == name and listed["max_kld"] == 50.0
    by_name = {c["name"]: c for c in listed["candidates"]}
    assert set(by_name) == {"none-Q8_0", "attn-1-Q8_0", "mlp-1-Q8_0"}
    assert by_name[name]["status"] == "picked" and by_name[name]["kld_measured"] and by_name[name]["size_measured"]
    assert all(isinstance(c["kld_measured"], bool) for c in listed["candidates"])
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "<script" not in page
    assert name in (out / "report.md").read_text()
    assert not _tmp_leftovers(tiny_repo)

    again = search_flow(repo=str(tiny_repo), max_kld=50.0, out=str(tmp_path / "again"), run_pick=False, **space)
    counts = json.loads((tmp_path / "again" / "candidates.json").read_text())["counts"]
    assert counts["measured"] == 0 and counts["reused"] > 0 and again["pick"]["name"] == name


def test_search_refuses_bad_axes_before_any_work(tiny_repo):
    out = subprocess.run([sys.executable, "-m", "flows", "search", "--repo", str(tiny_repo), "--max-kld", "0.5",
                          "-m", "attn", "heads", "-q", "Q8_0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "unknown drop method(s) ['heads']" in out.stderr
    assert "Beginning flow run" not in out.stdout + out.stderr  # refused before Prefect or DVC did anything


def test_a_finished_variant_reproduces_bit_for_bit(tiny_repo):
    _dvc(tiny_repo, "exp", "apply", "attn-1-Q8_0")
    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text())["stages"]
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    assert (params["drop"]["method"], params["drop"]["n"]) == ("attn", 1)
    # Forced re-runs of the pruning and the quantization write exactly the bytes the experiment recorded.
    for stage in ("drop", "quantize"):
        _dvc(tiny_repo, "repro", "--force", "--single-item", stage)
    after = yaml.safe_load((tiny_repo / "dvc.lock").read_text())["stages"]
    for stage in ("drop", "quantize"):
        assert after[stage]["outs"] == lock[stage]["outs"], stage
    assert "up to date" in _dvc(tiny_repo, "status").stdout


def test_changing_heal_reruns_heal_and_what_follows_never_calibrate_score_or_drop(tiny_repo):
    _dvc(tiny_repo, "exp", "apply", "attn-1-Q8_0")
    out = _dvc(tiny_repo, "exp", "run", "-n", "attn-1-Q8_0-linear", "-S", "heal.method=linear",
               "-S", "heal.holdout=1").stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}
    assert {"heal", "quantize", "evaluate"} <= ran and not ran & {"calibrate", "score", "drop", "baseline"}, out
    details = json.loads((tiny_repo / "data" / "eval" / "details.json").read_text())
    assert details["metrics"]["heal"] == "linear"
    # KL recovered: the unhealed and healed checkpoints on the same held-out tokens, the share in metrics.json.
    heal_kl = details["metrics"]["heal_kl"]
    assert heal_kl["unhealed"] > 0 and heal_kl["tokens"] > 0
    metrics = json.loads((tiny_repo / "data" / "eval" / "metrics.json").read_text())
    assert metrics["kld_recovered"] == pytest.approx(heal_kl["recovered"], abs=1e-3)
    manifest = json.loads((tiny_repo / "data" / "gguf" / "manifest.json").read_text())
    assert manifest["heal"]["method"] == "linear"
    _dvc(tiny_repo, "exp", "apply", "attn-1-Q8_0")


def test_concurrent_runs_get_a_clear_message(tiny_repo, prefect_harness):
    from flows._dvc import RepoBusy, repo_lock
    from flows.variant import variant_flow

    # A second flow on the same repository is refused before it touches anything.
    with repo_lock(tiny_repo, "test holder"):
        with pytest.raises(RepoBusy, match="another dropquant flow is running .*test holder"):
            variant_flow(repo=str(tiny_repo), stages=["calibrate"])
    # A DVC command holding outputs (DVC's own lock file names the process) is refused as well.
    rwlock = tiny_repo / ".dvc" / "tmp" / "rwlock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rwlock.write_text(json.dumps({"write": {str(tiny_repo / "data" / "drop"): {"pid": sleeper.pid,
                                                                                  "cmd": "dvc repro drop"}},
                                      "read": {}}))
        with pytest.raises(RepoBusy, match="a DVC command is running .*dvc repro drop"):
            variant_flow(repo=str(tiny_repo), stages=["calibrate"])
    finally:
        sleeper.kill()
        sleeper.wait()
        rwlock.write_text("{}")


def test_dvc_busy_output_becomes_a_clear_error():
    from flows._dvc import DvcResult, failure_message

    lines = ["Running stage 'drop':", "ERROR: failed to reproduce 'drop': '/r/data/drop' is busy, it is being blocked by:",
             "  (PID 123): dvc exp run -n x", "", "If there are no processes with such PIDs, you can manually remove"]
    err = failure_message(DvcResult(255, lines))
    assert err.busy and "the repository is busy" in str(err) and "PID 123" in str(err)


def _flow_runs(url: str) -> list[dict]:
    import httpx

    r = httpx.post(f"{url}/flow_runs/filter", json={"sort": "EXPECTED_START_TIME_DESC", "limit": 200}, timeout=10)
    r.raise_for_status()
    return r.json()


def test_scheduled_sweep_fires_on_a_real_server(tiny_repo, prefect_server):
    """`flows serve` finds the server already running on its port (it starts one only when none answers; the
    session fixture stops it and checks that it is down) and the scheduler fires the served sweep."""
    url, home = prefect_server["url"], prefect_server["home"]
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_RUNNER_POLL_FREQUENCY="2", PYTHONPATH=str(ROOT))
    serve = subprocess.Popen([sys.executable, "-m", "flows", "serve", "--repo", str(tiny_repo), "--port", str(port),
                              "--interval", "15", "-m", "attn", "-n", "1", "-q", "Q8_0"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(serve.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        finished = []
        while time.monotonic() < deadline and not finished:
            assert serve.poll() is None, "serve exited early:\n" + "".join(output[-40:])
            finished = [r for r in _flow_runs(url) if r["auto_scheduled"]  # not the session's other flows
                        and r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")]
            time.sleep(2)
        assert finished, "no scheduled run finished within 180 s:\n" + "".join(output[-40:])
        run = finished[0]
        assert run["state_type"] == "COMPLETED", f"{run['state_name']}: " + "".join(output[-40:])
        assert run["deployment_id"] and run["auto_scheduled"]
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGINT)
            try:
                serve.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait(5)


def test_a_stage_that_fails_before_it_starts_is_named(tmp_path):
    """DVC can refuse a stage before running it (a parameter missing from params.yaml): blame that stage."""
    from flows._dvc import check, run_dvc

    repo = tmp_path / "r"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")
    (repo / "params.yaml").write_text("a: {x: 1}\n")
    (repo / "dvc.yaml").write_text("stages:\n  one:\n    cmd: echo one > one.txt\n    outs: [one.txt]\n"
                                   "  two:\n    cmd: echo two > two.txt\n    deps: [one.txt]\n    params: [a.missing]\n"
                                   "    outs: [two.txt]\n")
    from flows._dvc import DvcFailed

    with pytest.raises(DvcFailed) as err:
        check(run_dvc(["repro"], repo, lambda line: None))
    assert err.value.stage == "two" and "a.missing" in str(err.value)
    assert [(e.stage, e.status) for e in err.value.stages] == [("one", "ran"), ("two", "failed")]


def test_grid_names_heal_variants_and_never_heals_an_undropped_model():
    from flows.plan import grid

    variants = grid(["none", "attn"], [8], ["Q8_0"], ["none", "linear+distill"])
    assert [v["name"] for v in variants] == ["none-Q8_0", "attn-8-Q8_0", "attn-8-Q8_0-linear-distill"]
    assert variants[2]["set"][-1] == "heal.method=linear+distill"
    assert len({v["name"] for v in grid(["attn"], [4, 8], ["Q8_0", "Q4_K_M"], ["none", "linear"])}) == 8
