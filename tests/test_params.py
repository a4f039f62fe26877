"""Every parameter error path gives one clear message naming the key, and the stages exit non-zero writing nothing."""
from __future__ import annotations

import pytest
import yaml

from dropquant.errors import DropquantError
from dropquant.params import QUANT_TYPES, Params, check_against_model, load_params, load_params_with_overrides, parse_params
from tests.conftest import ROOT


def test_repo_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.drop.method in ("none", "attn", "mlp", "block", "joint")
    assert params.quantize.type in QUANT_TYPES


def test_defaults_fill_missing_sections():
    assert parse_params({}) == Params()


@pytest.mark.parametrize("data, expected", [
    ({"drop": {"methd": "attn"}}, "unknown key 'drop.methd'"),
    ({"dorp": {}}, "unknown key 'dorp'"),
    ({"drop": {"method": "heads"}}, "drop.method"),
    ({"drop": {"n": -1}}, "drop.n"),
    ({"drop": {"n": "eight"}}, "drop.n"),
    ({"quantize": {"type": "Q9_K"}}, "quantize.type"),
    ({"calibration": {"n_samples": 0}}, "calibration.n_samples"),
    ({"eval": {"tasks": ["squad"]}}, "eval.tasks.0"),
    ({"eval": {"fewshot": -2}}, "eval.fewshot"),
    ({"score": {"metric": "l2"}}, "score.metric"),
])
def test_bad_values_name_the_key(data, expected):
    with pytest.raises(DropquantError, match=expected.replace(".", r"\.")):
        parse_params(data)


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(DropquantError) as err:
        parse_params({"drop": {"methd": "attn"}})
    assert "allowed: method, n" in str(err.value)


def test_bad_quant_type_lists_allowed_values():
    with pytest.raises(DropquantError) as err:
        parse_params({"quantize": {"type": "Q9_K"}})
    assert "Q4_K_M" in str(err.value)


@pytest.mark.parametrize("drop, expected", [
    ({"method": "attn", "n": 5}, "drop.n=5 is larger"),
    ({"method": "block", "n": 4}, "drop.n=4 is larger"),
    ({"method": "joint", "n": 8}, "drop.n=8 is larger"),
    ({"method": "attn", "n": 1, "protect": [4]}, "drop.protect: layer indices \\[4\\] out of range"),
    ({"method": "attn", "n": 1, "layers": {"attn": [1, 1]}}, "named more than once"),
])
def test_model_dependent_checks(drop, expected):
    with pytest.raises(DropquantError, match=expected):
        check_against_model(parse_params({"drop": drop}), num_layers=4)


def test_joint_limit_allows_all_but_one_module():
    check_against_model(parse_params({"drop": {"method": "joint", "n": 7}}), num_layers=4)


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"drop": {"method": "attn", "n": 8}}))
    params = load_params_with_overrides(path, ["drop.method=joint", "drop.n=4", "drop.protect=[0, 29]"])
    assert (params.drop.method, params.drop.n, params.drop.protect) == ("joint", 4, [0, 29])
    with pytest.raises(DropquantError, match="drop.n"):
        load_params_with_overrides(path, ["drop.n=many"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(DropquantError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("drop: [unclosed")
    with pytest.raises(DropquantError, match="not valid YAML"):
        load_params(bad)


def test_stage_cli_reports_bad_params_and_writes_nothing(tmp_path, capsys):
    from stages import calibrate

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"calibration": {"n_samples": 0}}))
    out = tmp_path / "calibration"
    rc = calibrate.main(["--params", str(path), "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "calibration.n_samples" in err and err.count("error:") == 1
    assert not out.exists()


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config

    from dropquant.model.loading import load_config, resolve_source

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(DropquantError, match="architecture 'gpt2'; supported: llama, mistral, qwen2, qwen3"):
        load_config(resolve_source(str(tmp_path)))


def test_missing_model_paths_are_refused(tmp_path):
    from dropquant.model.loading import resolve_source

    with pytest.raises(DropquantError, match="GGUF file not found"):
        resolve_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(DropquantError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_fidelity_tokens_below_one_chunk_refused_before_any_work():
    from dropquant.evaluation.fidelity import FIDELITY_CTX
    from dropquant.params import FIDELITY_CHUNK

    assert FIDELITY_CHUNK == FIDELITY_CTX
    with pytest.raises(DropquantError, match="eval.fidelity_tokens: Value error, must be 0 \\(off\\) or at least 512"):
        parse_params({"eval": {"fidelity_tokens": 256}})
    assert parse_params({"eval": {"fidelity_tokens": 0}}).eval.fidelity_tokens == 0


def test_chat_params(tmp_path):
    p = load_params_with_overrides(ROOT / "params.yaml", ["eval.chat.limit=4", "eval.chat.tasks=[mt_bench]"])
    assert p.eval.chat.limit == 4 and p.eval.chat.tasks == ["mt_bench"]
    assert parse_params({"eval": {"chat": {"tasks": []}}}).eval.chat.tasks == []
    with pytest.raises(DropquantError, match="eval.chat.tasks"):
        parse_params({"eval": {"chat": {"tasks": ["alpaca_eval"]}}})
    with pytest.raises(DropquantError, match="max_tokens \\(2048\\) must be below n_ctx \\(1536\\)"):
        parse_params({"eval": {"chat": {"max_tokens": 2048}}})


def test_float16_on_a_cpu_is_refused(monkeypatch, tmp_path, capsys):
    """Was accepted silently: torch's CPU float16 matmuls made data-free calibration run for over 10 minutes."""
    import torch

    from stages import calibrate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cpu", "auto"):
        with pytest.raises(DropquantError, match=f"model.dtype=float16 on a CPU \\(model.device={device}.*bfloat16 "
                                                 "or float32"):
            parse_params({"model": {"dtype": "float16", "device": device}})
    for dtype in ("auto", "bfloat16", "float32"):  # auto keeps a float16 checkpoint's precision: the F16 GGUF path
        assert parse_params({"model": {"dtype": dtype, "device": "cpu"}}).model.dtype == dtype
    assert parse_params({"model": {"dtype": "float16", "device": "cuda"}}).model.device == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse_params({"model": {"dtype": "float16"}}).model.dtype == "float16"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "calibration"
    rc = calibrate.main(["--params", str(ROOT / "params.yaml"), "-S", "model.dtype=float16", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "model.dtype=float16 on a CPU" in err
    assert not out.exists()
