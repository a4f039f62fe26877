"""Integration: calibrate on real C4 text and score the embedded SmolLM2 through the stage CLIs."""
from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def scored(tmp_path_factory, shared_data):
    from stages import calibrate, score

    tmp = tmp_path_factory.mktemp("embedded")
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": {"source": "embedded"},
        "calibration": {"source": str(shared_data / "c4" / "train-sample.jsonl"), "n_samples": 4, "seq_len": 256},
        "score": {"batch_size": 2},
    }))
    assert calibrate.main(["--params", str(params), "--out", str(tmp / "calibration")]) == 0
    assert score.main(["--params", str(params), "--calibration", str(tmp / "calibration" / "tokens.safetensors"),
                       "--out", str(tmp / "scores")]) == 0
    return tmp


def test_calibration_artifacts(scored):
    tokens = load_file(str(scored / "calibration" / "tokens.safetensors"))["input_ids"]
    assert tokens.shape == (4, 256)
    manifest = json.loads((scored / "calibration" / "manifest.json").read_text())
    assert manifest["n_tokens"] == 1024 and manifest["texts_used"] >= 1
    assert manifest["model"]["num_hidden_layers"] == 30


def test_attention_is_more_redundant_than_mlp(scored):
    result = json.loads((scored / "scores" / "scores.json").read_text())
    imp = result["importance"]
    assert result["n_tokens"] == 1024
    assert all(len(imp[u]) == 30 for u in ("attn", "mlp", "block"))
    mean = {u: sum(v) / len(v) for u, v in imp.items()}
    assert mean["attn"] < mean["mlp"], mean
    assert (scored / "scores" / "heatmap.png").stat().st_size > 1000
    assert (scored / "scores" / "importance.csv").read_text().count("\n") == 31


def test_score_refuses_calibration_from_another_model(scored, tmp_path, capsys):
    from stages import score

    manifest = json.loads((scored / "calibration" / "manifest.json").read_text())
    manifest["model"]["fingerprint"] = "0" * 16
    other = tmp_path / "calibration"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps(manifest))
    (other / "tokens.safetensors").write_bytes((scored / "calibration" / "tokens.safetensors").read_bytes())
    rc = score.main(["--calibration", str(other / "tokens.safetensors"), "--out", str(tmp_path / "scores")])
    assert rc == 2 and "re-run calibrate" in capsys.readouterr().err
    assert not (tmp_path / "scores").exists()


def test_bfloat16_scores_agree_with_float32(embedded_model, shared_data):
    """model.dtype: bfloat16 computes in bf16 but accumulates cosines in float32/float64: the 8 most redundant
    attention layers, MLPs and blocks are the float32 path's, every score within 2e-3."""
    import copy

    import torch

    from dropquant.calibration import pack, source_texts
    from dropquant.prune.scoring import score_model

    model, tokenizer = embedded_model
    ids, _ = pack(source_texts(str(shared_data / "c4" / "train-sample.jsonl"), None, "validation", "text", 0),
                  tokenizer, 8, 256)
    f32 = score_model(model, ids, 2, progress=False)
    bf16 = score_model(copy.deepcopy(model).to(torch.bfloat16), ids, 2, progress=False)
    for unit in ("attn", "mlp", "block"):
        a, b = f32["importance"][unit], bf16["importance"][unit]
        assert max(abs(x - y) for x, y in zip(a, b)) <= 2e-3
        lowest = lambda v: set(sorted(range(len(v)), key=v.__getitem__)[:8])  # noqa: E731
        assert lowest(a) == lowest(b)
