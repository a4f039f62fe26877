"""A fresh clone's `dvc status` finds the committed dvc.lock in step with the code and parameters, and the same
inputs give byte-identical outputs (so DVC never sees a change that is not one)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))


def _tracked(path: str) -> bool:
    out = subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=ROOT, capture_output=True)
    return out.returncode == 0


def stale_lock_entries(status: dict) -> list[str]:
    """`dvc status` entries that say dvc.lock was recorded from other code or parameters than git holds.

    Outputs that are absent (a fresh clone holds no data/) and data dependencies are not staleness."""
    stale = []
    for stage, changes in status.items():
        for change in changes if isinstance(changes, list) else []:
            if not isinstance(change, dict):
                continue
            for path, state in (change.get("changed deps") or {}).items():
                if isinstance(state, dict) or path.endswith(".yaml") or _tracked(path):
                    stale.append(f"{stage}: {path} {state}")
    return stale


def test_stale_lock_entries_ignores_missing_data_but_not_code():
    status = {"score": [{"changed deps": {"stages/score.py": "modified", "data/calibration": "deleted"}},
                        {"changed outs": {"data/scores/scores.json": "not in cache"}}],
              "drop": [{"changed deps": {"params.yaml": {"drop.n": "modified"}}}],
              "calibrate": [{"changed outs": {"data/calibration": "deleted"}}]}
    assert stale_lock_entries(status) == ["score: stages/score.py modified", "drop: params.yaml {'drop.n': 'modified'}"]


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_committed_dvc_lock_matches_the_code_and_params():
    out = subprocess.run([DVC, "status", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout[out.stdout.index("{"):]) if "{" in out.stdout else {}
    stale = stale_lock_entries(status)
    assert not stale, ("dvc.lock is out of step with the code or params.yaml (run `make run` and commit dvc.lock): "
                       + "; ".join(stale))


HEATMAP = """
import sys
from dropquant.plots import importance_heatmap
imp = {u: [((i * 7919 + k) % 97 + 1) / 1000 for i in range(30)] for k, u in enumerate(("attn", "mlp", "block"))}
importance_heatmap(imp, sys.argv[1], "same scores")
"""


def test_heatmap_bytes_do_not_depend_on_the_process(tmp_path):
    digests = []
    for i in range(2):
        path = tmp_path / f"h{i}.png"
        # A fresh matplotlib config dir on the first run: its font cache is built during that run.
        env = {"MPLCONFIGDIR": str(tmp_path / f"mpl{i}"), "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
        subprocess.run([sys.executable, "-c", HEATMAP, str(path)], check=True, env=env, cwd=tmp_path, timeout=120)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert b"Matplotlib" not in (tmp_path / "h0.png").read_bytes()  # no version stamp in the file


def test_calibrate_and_score_twice_give_identical_bytes(tmp_path, hf_tokenizer):
    """What `dvc repro calibrate score` twice does, on a tiny model: every output byte-identical."""
    from conftest import make_tiny_llama
    from dropquant.prune.pruned_checkpoint import save_pruned

    save_pruned(make_tiny_llama(layers=3, vocab=49152), tmp_path / "model", tokenizer=hf_tokenizer)
    (tmp_path / "params.yaml").write_text(f"model: {{source: {tmp_path / 'model'}}}\n"
                                          "calibration: {n_samples: 2, seq_len: 16}\nscore: {batch_size: 1}\n")
    digests = []
    for run in range(2):
        cal, scores = tmp_path / f"cal{run}", tmp_path / f"scores{run}"
        for argv in (["stages.calibrate", "--out", str(cal)],
                     ["stages.score", "--calibration", str(cal / "tokens.safetensors"), "--out", str(scores)]):
            subprocess.run([sys.executable, "-m", *argv, "--params", str(tmp_path / "params.yaml")], cwd=ROOT,
                           check=True, capture_output=True, timeout=300)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for d in (cal, scores) for p in d.iterdir()})
    assert digests[0] == digests[1] and len(digests[0]) == 5
