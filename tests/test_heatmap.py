"""The importance heatmap names the model (not `model.source`'s "embedded") and marks what the plan dropped."""
from __future__ import annotations

import json

import pytest


def test_model_name_is_what_a_person_calls_the_model(tmp_path):
    from dropquant.naming import model_name

    assert model_name("embedded") == "SmolLM2-135M-Instruct"
    assert model_name("Qwen/Qwen2.5-7B") == "Qwen/Qwen2.5-7B"
    assert model_name("models/Llama-3-8B.Q4_K_M.gguf") == "Llama-3-8B"
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Llama-3.2-1B"}))
    assert model_name(str(local)) == "meta-llama/Llama-3.2-1B"
    (local / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path)}))
    assert model_name(str(local)) == "my-model"


def test_heatmap_marks_the_dropped_units(tmp_path, monkeypatch):
    import dropquant.plots as plots
    from dropquant.evaluation.plots import write_heatmap

    drawn = {}
    real = plots.pyplot

    def spy():
        plt = real()
        monkeypatch.setattr(plt, "close", lambda fig: drawn.setdefault("fig", fig))
        return plt

    monkeypatch.setattr(plots, "pyplot", spy)
    imp = {u: [0.1 * (i + 1) for i in range(6)] for u in ("attn", "mlp", "block")}
    plan = {"attn": [2, 4], "mlp": [1], "blocks": [], "model": {"source": "embedded"},
            "scores": {"metric": "cosine", "importance": imp}}
    write_heatmap(tmp_path / "heatmap.png", plan, "attn-2 Q8_0")
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    ax = drawn["fig"].axes[0]
    assert ax.get_title().startswith("SmolLM2-135M-Instruct: importance (cosine)")
    # One red outline and x per dropped unit, in its row (0 attention, 1 MLP) and layer.
    marks = sorted((round(t.get_position()[0]), round(t.get_position()[1])) for t in ax.texts if t.get_text() == "x")
    assert marks == [(1, 1), (2, 0), (4, 0)]
    assert len(ax.patches) == 3 and "dropped" in ax.get_xlabel()


@pytest.mark.parametrize("plan", [{"attn": [1], "model": {"source": "embedded"}}])
def test_a_plan_without_scores_still_writes_the_declared_output(tmp_path, plan):
    from dropquant.evaluation.plots import write_heatmap

    write_heatmap(tmp_path / "h.png", plan, "explicit")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
