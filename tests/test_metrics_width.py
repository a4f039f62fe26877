"""metrics.json stays small enough to read: `dvc exp show --only-changed` of a 4-variant sweep (real DVC, the
evaluate stage's own metric code, speed and chat measured) fits a 160-column terminal once DVC's dependency hash
columns are dropped (`--drop data/`, as docs/evaluate.md says)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

DVC = str(Path(sys.executable).with_name("dvc"))
GIT_ID = ["-c", "user.email=test@example.com", "-c", "user.name=test"]

# Figures of the README's sweep (-m attn mlp block joint -n 8 -q Q8_0), one set per method.
STAGE = """
import json, sys, yaml
from pathlib import Path
from dropquant.evaluation.metrics import build_metrics, headline

method = yaml.safe_load(open("params.yaml"))["drop"]["method"]
i = ["attn", "mlp", "block", "joint"].index(method)
acc = lambda ps: {"tasks": {t: {"acc": p + 0.05, "acc_norm": p, "n": 100} for t, p in zip(["arc_easy", "hellaswag", "piqa"], ps)}}
full = build_metrics(method=method, n=8, quant_type="Q8_0", tasks=["arc_easy", "hellaswag", "piqa"],
                     accuracy=acc([0.40 + 0.013 * i, 0.39 - 0.021 * i, 0.62 - 0.017 * i]),
                     base_accuracy=acc([0.45, 0.34, 0.71]),
                     fidelity={"ppl": 41.7991 + 57.123 * i, "base_ppl": 24.4758, "kld": 0.545512 + 0.51234 * i,
                               "top1_agree": 0.58479 - 0.0813 * i},
                     speed=None, variant_bytes=int(137.27e6 - 7.3e6 * i), base_bytes=int(144.8e6))
full.update(speedup_pp=1.3217 + 0.07 * i, speedup_tg=1.1913 + 0.061 * i, speed_noisy=False,
            kv_cache_mib=66.0 if i != 1 else 90.0, base_kv_cache_mib=90.0)
full["chat"]["ifeval"].update(prompt_strict=0.125 * (i % 3), prompt_strict_base=0.125)
full["chat"]["gsm8k"].update(strict=0.125 * (i % 2), strict_base=0.0)
full["chat"]["mt_bench"].update(loop_rate=0.53125 + 0.0625 * i, base_loop_rate=0.125)
Path("data/eval").mkdir(parents=True, exist_ok=True)
json.dump(headline(full), open("data/eval/metrics.json", "w"))
"""

DVC_YAML = f"""stages:
  quantize:
    cmd: {sys.executable} -c "import yaml, pathlib; pathlib.Path('data/gguf').mkdir(parents=True, exist_ok=True); pathlib.Path('data/gguf/model.gguf').write_text(str(yaml.safe_load(open('params.yaml'))['drop']))"
    params: [drop]
    outs: [data/gguf]
  evaluate:
    cmd: {sys.executable} evaluate.py
    deps: [evaluate.py, data/gguf]
    params: [drop, quantize]
    metrics:
      - data/eval/metrics.json:
          cache: false
"""


def _run(repo: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "1000"}
    out = subprocess.run(args, cwd=repo, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_exp_show_of_a_four_variant_sweep_fits_160_columns(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text("drop:\n  method: attn\n  n: 8\nquantize:\n  type: Q8_0\n")
    (repo / "evaluate.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    _run(repo, "git", "init", "-q")
    _run(repo, DVC, "init", "-q")
    _run(repo, DVC, "repro", "-q")  # the baseline commit holds a finished run, as after `make run`
    _run(repo, "git", *GIT_ID, "add", "-A")
    _run(repo, "git", *GIT_ID, "commit", "-qm", "pipeline")
    for method in ("attn", "mlp", "block", "joint"):
        _run(repo, DVC, "exp", "run", "-q", "-n", f"{method}-8-Q8_0", "-S", f"drop.method={method}")
    table = _run(repo, DVC, "exp", "show", "--only-changed", "--drop", "data/", "--no-pager")
    lines = [line.rstrip() for line in table.splitlines() if line.strip()]
    header = next(line for line in lines if "Experiment" in line)
    for column in ("avg", "avg_delta", "ppl", "kld", "top1", "size_mb", "pp_x", "tg_x", "kv_mib", "ifeval", "gsm8k",
                   "loops", "drop.method"):
        assert f" {column} " in f" {header} ", (column, header)
    width = max(len(line) for line in lines)
    # The "Created" column reads "Dec 07, 2026" (4 more) for an older sweep: room is left for it. (A speed_noisy
    # column joins only when some variant's speed rounds disagreed.)
    assert width <= 156, "\n" + table
    # Without --drop, the only other columns are DVC's hashes of the stage inputs under data/.
    full = _run(repo, DVC, "exp", "show", "--only-changed", "--no-pager")
    extra = set(next(line for line in full.splitlines() if "Experiment" in line).split()) - set(header.split())
    assert extra and all(c.startswith("data/") for c in extra), extra
