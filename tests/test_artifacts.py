"""Artifacts name what they were made from; consumers refuse a mismatch; a killed stage leaves nothing behind
that a later run keeps or trusts."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dropquant.artifacts import (check_pruned_matches_plan, json_digest, params_digest, plan_id, read_calibration,
                                 read_gguf_manifest, read_plan)
from dropquant.atomic import atomic_dir, remove_leftovers, write_json
from dropquant.errors import DropquantError

ROOT = Path(__file__).resolve().parents[1]


def test_atomic_writes_remove_what_an_interrupted_write_left(tmp_path):
    target = tmp_path / "pruned"
    (tmp_path / ".pruned.abc12_x9.tmp").mkdir()
    (tmp_path / ".pruned.abc12_x9.tmp" / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / ".pruned.old").mkdir()
    (tmp_path / ".pruned.json.zz.tmp").write_text("not ours")  # another artifact's temporary: kept
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pruned.json.zz.tmp", "pruned"]
    (tmp_path / ".metrics.json.q1w2e3r4.tmp").write_text("{")
    write_json(tmp_path / "metrics.json", {"a": 1})
    assert not (tmp_path / ".metrics.json.q1w2e3r4.tmp").exists()
    assert remove_leftovers(tmp_path / "nothing-here") == []


def test_plan_id_covers_the_plan_and_its_inputs(tmp_path):
    plan = {"method": "attn", "n": 2, "attn": [1, 2], "mlp": [], "blocks": [], "model": {"fingerprint": "f"},
            "scores_sha256": "s"}
    plan["plan_id"] = plan_id(plan)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**plan, "kept_layers": [0, 1, 2, 3], "size": {"dropped_bytes": 1}}))
    assert read_plan(path, {"fingerprint": "f", "source": "m"})["attn"] == [1, 2]
    with pytest.raises(DropquantError, match="made for model"):
        read_plan(path, {"fingerprint": "other", "source": "m2"})
    path.write_text(json.dumps({**plan, "attn": [1, 3]}))  # edited by hand
    with pytest.raises(DropquantError, match="plan_id does not match"):
        read_plan(path)
    assert plan_id({**plan, "scores_sha256": "t"}) != plan["plan_id"]
    with pytest.raises(DropquantError, match="interrupted drop stage"):
        check_pruned_matches_plan({"plan_id": "0" * 16}, plan, "data/pruned", "data/drop/plan.json")
    check_pruned_matches_plan({"plan_id": plan["plan_id"]}, plan, "data/pruned", "data/drop/plan.json")
    path.write_text("{not json")
    with pytest.raises(DropquantError, match="not valid JSON"):
        read_plan(path)


def test_calibration_is_refused_for_another_model_or_replaced_tokens(tmp_path):
    import torch
    from safetensors.torch import save_file

    from dropquant.calibration import tokens_digest

    tokens = torch.arange(24).view(3, 8)
    save_file({"input_ids": tokens}, str(tmp_path / "tokens.safetensors"))
    me = {"fingerprint": "me", "source": "m"}
    (tmp_path / "manifest.json").write_text(json.dumps({"model": me, "sha256": tokens_digest(tokens)}))
    got, manifest = read_calibration(tmp_path / "tokens.safetensors", me)
    assert torch.equal(got, tokens) and manifest["sha256"] == tokens_digest(tokens)
    with pytest.raises(DropquantError, match="made for model"):
        read_calibration(tmp_path / "tokens.safetensors", {"fingerprint": "you", "source": "y"})
    save_file({"input_ids": tokens + 1}, str(tmp_path / "tokens.safetensors"))
    with pytest.raises(DropquantError, match="tokens were replaced"):
        read_calibration(tmp_path / "tokens.safetensors", me)
    (tmp_path / "tokens.safetensors").write_bytes(b"\x10\x00\x00\x00")
    with pytest.raises(DropquantError, match="not a readable safetensors"):
        read_calibration(tmp_path / "tokens.safetensors", me)


def test_scores_must_come_from_the_calibration_beside_them(tmp_path):
    from dropquant.artifacts import check_scores_calibration

    scores = {"calibration": {"sha256": "a" * 64}}
    check_scores_calibration(scores, tmp_path / "absent", "scores.json")  # no calibration here: nothing to compare
    (tmp_path / "manifest.json").write_text(json.dumps({"sha256": "a" * 64}))
    check_scores_calibration(scores, tmp_path, "scores.json")
    (tmp_path / "manifest.json").write_text(json.dumps({"sha256": "b" * 64}))
    with pytest.raises(DropquantError, match="other calibration tokens"):
        check_scores_calibration(scores, tmp_path, "scores.json")


def test_gguf_manifest_must_describe_the_file_beside_it(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    (tmp_path / "manifest.json").write_text(json.dumps({"size_bytes": 64, "sha256": "a"}))
    assert read_gguf_manifest(tmp_path, "run quantize")["sha256"] == "a"
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(DropquantError, match="replaced after its manifest"):
        read_gguf_manifest(tmp_path, "run quantize")


def test_params_digest_fills_defaults_and_ignores_the_sweep_section():
    from dropquant.params import Params

    assert params_digest({}) == params_digest(Params())
    assert params_digest({"drop": {"method": "attn"}}) == params_digest({"sweep": {"n": [1]}})
    assert params_digest({"drop": {"n": 4}}) != params_digest({})
    assert json_digest({"b": 1, "a": 2}) == json_digest({"a": 2, "b": 1})


# --- evaluate refuses inputs that do not belong together --------------------------------------------------

def _gguf_dir(path: Path, **manifest) -> Path:
    path.mkdir(parents=True)
    (path / "model.gguf").write_bytes(b"GGUF" + b"\0" * 28)
    (path / "manifest.json").write_text(json.dumps({"size_bytes": 32, **manifest}))
    return path


def test_evaluate_checks_variant_plan_base_and_baseline_evaluation(tmp_path):
    from dropquant.params import Params
    from stages.evaluate import _reuse_key, check_inputs

    params = Params()
    plan = {"method": "attn", "n": 1, "attn": [1], "model": {"fingerprint": "m"}}
    plan["plan_id"] = plan_id(plan)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    model = {"fingerprint": "m"}
    _gguf_dir(tmp_path / "gguf", type="Q8_0", plan_id=plan["plan_id"], model=model, sha256="v" * 64)
    _gguf_dir(tmp_path / "base", type="Q8_0", plan_id=None, model=model, sha256="b" * 64)
    (tmp_path / "base_eval").mkdir()
    base_eval = {"params": _reuse_key(params), "gguf_sha256": "b" * 64}
    (tmp_path / "base_eval" / "manifest.json").write_text(json.dumps(base_eval))
    args = argparse.Namespace(gguf=str(tmp_path / "gguf" / "model.gguf"), base_gguf=str(tmp_path / "base" / "model.gguf"),
                              plan=str(tmp_path / "plan.json"), base_eval=str(tmp_path / "base_eval"))
    assert check_inputs(params, args)["gguf_sha256"] == "v" * 64

    def refused(match, **changes):
        for path, key, value in changes.get("edits", []):
            data = json.loads(path.read_text())
            data[key] = value
            path.write_text(json.dumps(data))
        with pytest.raises(DropquantError, match=match):
            check_inputs(params, args)

    gguf_manifest = tmp_path / "gguf" / "manifest.json"
    refused("plan_id", edits=[(gguf_manifest, "plan_id", "0" * 16)])
    refused("another model", edits=[(gguf_manifest, "plan_id", plan["plan_id"]),
                                    (tmp_path / "base" / "manifest.json", "model", {"fingerprint": "x"})])
    refused("quantize.type is Q8_0", edits=[(tmp_path / "base" / "manifest.json", "model", model),
                                            (gguf_manifest, "type", "Q4_K_M")])
    refused("gguf_sha256", edits=[(gguf_manifest, "type", "Q8_0"),
                                  (tmp_path / "base_eval" / "manifest.json", "gguf_sha256", "c" * 64)])


# --- a stage killed at its worst moment -------------------------------------------------------------------

KILLER = r"""
import os, signal, sys
from pathlib import Path
when = sys.argv[1]
real_replace = os.replace
def replace(src, dst):
    # after-swap: the new checkpoint is in place, plan.json still the previous run's;
    # mid-swap: the previous checkpoint moved aside, the new one not yet in place.
    if when == "mid-swap" and Path(src).name.startswith(".pruned.") and Path(dst).name == "pruned":
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
    if when == "after-swap" and Path(dst).name == "pruned":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from stages.drop import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory, hf_tokenizer):
    from conftest import make_tiny_llama
    from dropquant.prune.pruned_checkpoint import save_pruned

    path = tmp_path_factory.mktemp("source") / "model"
    save_pruned(make_tiny_llama(layers=4), path, tokenizer=hf_tokenizer)
    return path


def _drop_argv(ws: Path, source: Path, method: str) -> list[str]:
    (ws / "params.yaml").write_text(yaml.safe_dump({"model": {"source": str(source)},
                                                    "drop": {"method": method, "n": 1, "selection": "reverse"}}))
    return ["--params", str(ws / "params.yaml"), "--scores", str(ws / "no-scores.json"),
            "--calibration", str(ws / "calibration"), "--plan", str(ws / "drop"),
            "--pruned", str(ws / "pruned"), "--export", str(ws / "export")]


@pytest.mark.parametrize("when", ["after-swap", "mid-swap"])
def test_killed_drop_stage_is_refused_downstream_and_cleaned_up_by_the_next_run(tmp_path, tiny_source, when, capsys):
    from stages.drop import main as drop
    from stages.quantize import main as quantize

    assert drop(_drop_argv(tmp_path, tiny_source, "attn")) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KILLER, when, *_drop_argv(tmp_path, tiny_source, "mlp")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".pruned."))
    if when == "after-swap":
        assert leftovers == [".pruned.old"]
    else:  # the previous checkpoint moved aside, the new one still in its temporary directory
        # (the temporary name is random: it may sort before or after ".pruned.old")
        assert len(leftovers) == 2 and ".pruned.old" in leftovers
        assert [p for p in leftovers if p != ".pruned.old"][0].endswith(".tmp")
        assert not (tmp_path / "pruned").exists()

    # The previous run's plan next to the new (or no) checkpoint: quantize refuses before any work.
    out = tmp_path / "gguf"
    rc = quantize(["--params", str(tmp_path / "params.yaml"), "--pruned", str(tmp_path / "pruned"),
                   "--plan", str(tmp_path / "drop" / "plan.json"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert ("interrupted drop stage" in err) if when == "after-swap" else ("run the drop stage" in err)

    # The next drop run leaves one consistent pair and no leftovers.
    assert drop(_drop_argv(tmp_path, tiny_source, "mlp")) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned.")]
    plan = read_plan(tmp_path / "drop" / "plan.json")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    check_pruned_matches_plan(config["dropquant"], plan, "pruned", "plan.json")
    assert plan["mlp"] == [3]


def test_quantize_refuses_another_model_source_than_the_plans(tmp_path, tiny_source, hf_tokenizer, capsys):
    from conftest import make_tiny_llama
    from dropquant.prune.pruned_checkpoint import save_pruned
    from stages.drop import main as drop
    from stages.quantize import main as quantize

    assert drop(_drop_argv(tmp_path, tiny_source, "attn")) == 0
    other = tmp_path / "other"
    save_pruned(make_tiny_llama(seed=1, layers=4), other, tokenizer=hf_tokenizer)
    out = tmp_path / "gguf"
    rc = quantize(["--params", str(tmp_path / "params.yaml"), "-S", f"model.source={other}", "--pruned",
                   str(tmp_path / "pruned"), "--plan", str(tmp_path / "drop" / "plan.json"), "--out", str(out)])
    assert rc == 2 and not out.exists()
    assert "made for model" in capsys.readouterr().err
