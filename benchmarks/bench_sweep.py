"""Sweep wall-clock: the same 4-variant sweep of the embedded model, sequential (`--jobs 1`) against 2 queued jobs
(`--jobs 2`, cores split between them), each in its own fresh copy of the project (git init + commit of the
pipeline's files, an empty DVC cache), both in this one run.

Small evaluation settings (eval.limit, fidelity_tokens, no speed, no chat) keep it to a few minutes. What bounds the
ratio: the shared stages (calibrate, score, baseline, baseline_eval) run once, serially, in both modes; only the
per-variant stages (drop, heal, quantize, evaluate) overlap, and with 2 cores 2 jobs at 1 thread each can at best
halve their time (Amdahl: serial + parallel / 2). One pair is one measurement, not a spread: run it again (with
`--queued-first` to alternate the order) to see how much the machine's other load moves it."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COPY = ("dvc.yaml", "params.yaml", ".dvcignore", "dropquant", "stages")
GRID = ["-m", "attn", "mlp", "block", "joint", "-n", "4", "-q", "Q8_0"]
SHARED = ("calibrate", "score", "baseline", "baseline_eval")
GIT_ID = ["-c", "user.email=bench@example.com", "-c", "user.name=bench"]


def _project(path: Path, limit: int, fidelity_tokens: int) -> Path:
    path.mkdir(parents=True)
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, path / name)
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["model"]["source"] = "embedded"
    params["calibration"].update(source="generated", n_samples=8, seq_len=128)
    data = Path(os.environ.get("DROPQUANT_SHARED_DATA", ROOT.parent / "shared" / "data")).resolve()
    params["eval"].update(tasks=["arc_easy", "hellaswag", "piqa"], limit=limit, fidelity_tokens=fidelity_tokens,
                          speed=False, data_dir=str(data))
    params["eval"]["chat"]["tasks"] = []
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (path / ".gitignore").write_text("reports/\n__pycache__/\n")
    env = _env(path.parent)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "-q"], cwd=path, check=True, env=env)
    subprocess.run(["git", *GIT_ID, "add", "-A"], cwd=path, check=True)
    subprocess.run(["git", *GIT_ID, "commit", "-qm", "bench pipeline"], cwd=path, check=True)
    for key, value in (("user.email", "bench@example.com"), ("user.name", "bench")):
        subprocess.run(["git", "config", key, value], cwd=path, check=True)
    return path


def _env(base: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "DROPQUANT_WORKSPACE"}
    env.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
               PREFECT_HOME=str(base / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               DVC_NO_ANALYTICS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")  # a first start migrates a fresh database
    return env


def _sweep(repo: Path, jobs: int) -> dict:
    out = repo.parent / f"report-{jobs}"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows", "sweep", "--repo", str(repo), "--out", str(out), *GRID,
                           "--jobs", str(jobs)], cwd=ROOT, env=_env(repo.parent), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"sweep --jobs {jobs} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    report = json.loads((out / "sweep.json").read_text())
    shared = 0.0
    for v in report["variants"]:
        shared += sum(s["seconds"] for s in v["stages"] if s["stage"] in SHARED and s["status"] == "ran")
    for m in re.finditer(r"dropquant-prime-\S+: (.*)", done.stdout + done.stderr):  # queued: the priming run
        shared += sum(float(x) for x in re.findall(r"ran (\d+(?:\.\d+)?) s", m.group(1)))
    metrics = {r["name"]: {k: r.get(k) for k in ("avg", "ppl", "kld", "top1_agree")} for r in report["rows"]}
    return {"wall": wall, "shared": shared, "metrics": metrics}


def main(limit: int = 10, fidelity_tokens: int = 512) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks sweep")
    p.add_argument("--queued-first", action="store_true", help="run the queued sweep first")
    args = p.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="dropquant-bench-sweep-") as tmp:
        repos = {jobs: _project(Path(tmp) / f"jobs{jobs}" / "repo", limit, fidelity_tokens) for jobs in (1, 2)}
        order = (2, 1) if args.queued_first else (1, 2)
        runs = {jobs: _sweep(repos[jobs], jobs) for jobs in order}
    seq, que = runs[1], runs[2]
    ratio = seq["wall"] / que["wall"]
    # Amdahl with what the sequential run measured: its shared stages stay serial, the rest at best halves.
    rest = max(seq["wall"] - seq["shared"], 0.0)
    bound = seq["wall"] / (seq["shared"] + rest / 2) if rest else 1.0
    same = all(seq["metrics"][n] == que["metrics"].get(n) for n in seq["metrics"])
    print(f"sweep bench: {len(seq['metrics'])} variants of the embedded model ({' '.join(GRID)}), eval.limit={limit}, "
          f"fidelity_tokens={fidelity_tokens}, speed and chat off; {cpus} CPUs; order: "
          f"{'queued, sequential' if args.queued_first else 'sequential, queued'}")
    print(f"  sequential (--jobs 1)         {seq['wall']:7.1f} s   shared stages {seq['shared']:.0f} s of it")
    print(f"  queued (--jobs 2, 1 thread)   {que['wall']:7.1f} s   shared stages (primed) {que['shared']:.0f} s of it")
    print(f"  wall-clock ratio sequential / queued: ×{ratio:.2f} (Amdahl bound on {cpus} cores with the measured "
          f"serial part: ×{bound:.2f}); one pair, not a spread: run again with --queued-first to alternate")
    print(f"  metrics (avg, ppl, KLD, top-1) identical in both modes: {same}")
    if not same:
        for name in seq["metrics"]:
            print(f"    {name}: sequential {seq['metrics'][name]} queued {que['metrics'].get(name)}")
    return {"sequential_s": seq["wall"], "queued_s": que["wall"], "ratio": ratio, "bound": bound, "same": same}


if __name__ == "__main__":
    main()
