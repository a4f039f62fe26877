"""Building blocks of the flow tests: a git + DVC copy of this project on a tiny random Llama, and `dvc` with the
venv on PATH (as the flows run it). Shared by tests/test_flows.py, test_distributed.py and test_search.py."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from conftest import ROOT, SHARED_DATA, make_tiny_llama

DVC = str(Path(sys.executable).with_name("dvc"))
COPY = ("dvc.yaml", "params.yaml", ".dvcignore", "dropquant", "stages")
GIT_ID = ["-c", "user.email=test@example.com", "-c", "user.name=test"]


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    from flows._dvc import _env

    # The stages' `python` must be this venv's, as for the flows.
    out = subprocess.run([DVC, *args], cwd=repo, capture_output=True, text=True, env=_env())
    if check and out.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out


def make_tiny_model(path: Path) -> Path:
    """A 4-layer random Llama with the embedded model's tokenizer (vocabulary 49152: GGUF export and llama.cpp work)."""
    from dropquant.model.loading import load_tokenizer, resolve_source

    make_tiny_llama(seed=0, layers=4, vocab=49152, hidden=64).save_pretrained(path)
    load_tokenizer(resolve_source("embedded")).save_pretrained(path)
    return path


def build_tiny_repo(repo: Path, model: Path, params_update: Optional[dict] = None, gitignore: str = "",
                    calib_name: str = "calib.txt") -> Path:
    """A git + DVC repository with this project's dvc.yaml and code on `model`, everything committed.

    params_update: {section: {key: value}} on top of the tiny settings (a relative model.source, say).
    gitignore: extra .gitignore lines (files the repository holds but git does not track)."""
    repo.mkdir(parents=True)
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            shutil.copy2(src, repo / name)
    (repo / calib_name).write_text("The quick brown fox jumps over the lazy dog. " * 200)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"]["source"] = str(model)
    params["calibration"].update(source=calib_name, n_samples=2, seq_len=32)
    params["drop"].update(method="attn", n=1)
    tasks = ["arc_easy"] if (SHARED_DATA / "arc_easy").is_dir() else []
    params["eval"].update(tasks=tasks, limit=2, speed=False, fidelity_tokens=512, n_ctx=256, threads=1,
                          data_dir=str(SHARED_DATA))
    # Chat on, as a user runs it, but small: 2 prompts of 24 tokens per task (a random model never stops early).
    params["eval"]["chat"].update(limit=2, max_tokens=24, parallel=4, transcripts=2)
    params["sweep"] = {"methods": ["attn", "mlp"], "n": [1], "quant_types": ["Q8_0"], "cron": "0 3 * * *"}
    for section, values in (params_update or {}).items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("reports/\n__pycache__/\n.dropquant/\n" + gitignore)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    subprocess.run(["git", *GIT_ID, "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", *GIT_ID, "commit", "-qm", "tiny pipeline"], cwd=repo, check=True)
    # Experiments are commits: give them an identity in this repository only.
    subprocess.run(["git", "config", "user.email", "test@example.com"], cwd=repo, check=True)
    subprocess.run(["git", "config", "user.name", "test"], cwd=repo, check=True)
    return repo
