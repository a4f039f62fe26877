"""Bad input gets one clear error naming the problem, exit code 2, and no output, before any heavy work; and
an edge case that is valid (every attention layer dropped) works all the way to llama.cpp."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dropquant.errors import DropquantError
from dropquant.model.loading import model_identity, resolve_source
from tests.conftest import ROOT, make_tiny_llama

torch.set_num_threads(1)
LAYERS = 4


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory for the stages' default outputs (data/...)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    return tmp_path


@pytest.fixture
def tiny_source(tmp_path):
    """A tiny Llama as a local Hugging Face directory (max_position_embeddings 256)."""
    path = tmp_path / "tiny-model"
    make_tiny_llama(layers=LAYERS).save_pretrained(path)
    return path


def run_stage(name, *argv):
    from stages.__main__ import main

    return main([name, "--params", "params.yaml", *argv])


def refused(capsys, rc, *needles):
    """The stage exited 2 with one error line that contains every needle."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("error:") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def nothing_written(workdir):
    return not (workdir / "data").exists()


# --- 1. every attention layer dropped --------------------------------------------------------------------

def test_every_attention_dropped_runs_through_drop_quantize_and_llama_cpp(workdir, hf_tokenizer):
    """Was: both stages exit 0, then llama.cpp fails with 'failed to allocate buffer for kv cache'."""
    import llama_cpp

    from dropquant.prune.pruned_checkpoint import load_pruned

    source = workdir / "src"
    model = make_tiny_llama(layers=LAYERS, vocab=len(hf_tokenizer), hidden=64)
    model.save_pretrained(source)
    hf_tokenizer.save_pretrained(source)
    overrides = ["-S", f"model.source={source}", "-S", "drop.method=attn", "-S", f"drop.n={LAYERS}",
                 "-S", "drop.selection=reverse", "-S", "quantize.type=F32"]
    assert run_stage("drop", *overrides) == 0
    assert run_stage("heal", *overrides) == 0
    assert run_stage("quantize", *overrides) == 0

    pruned = load_pruned(workdir / "data" / "pruned")
    assert all(layer.self_attn is None for layer in pruned.model.layers)
    ids = list(range(1000, 1032))
    with torch.no_grad():
        ref = pruned(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(str(workdir / "data" / "gguf" / "model.gguf"), logits_all=True, n_ctx=64, n_threads=1,
                          verbose=False, type_k=0, type_v=0, flash_attn=False)  # F32 KV cache: exact comparison
    try:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    assert np.abs(got - ref).max() <= 1e-3


# --- 2. calibration.seq_len beyond the model's context ---------------------------------------------------

@pytest.mark.parametrize("calibration_source", ["generated", "file"])
def test_seq_len_beyond_the_model_context_is_refused(workdir, tiny_source, capsys, calibration_source):
    """Was: 7 hours of sampling (generated source), or blocks longer than the model's context (file source)."""
    texts = workdir / "texts.txt"
    texts.write_text("some text " * 1000)
    source = "generated" if calibration_source == "generated" else str(texts)
    rc = run_stage("calibrate", "-S", f"model.source={tiny_source}", "-S", f"calibration.source={source}",
                   "-S", "calibration.seq_len=100000")
    refused(capsys, rc, "calibration.seq_len=100000", "max_position_embeddings is 256")
    assert nothing_written(workdir)


def test_seq_len_at_the_model_context_is_accepted():
    from transformers import LlamaConfig

    from dropquant.calibration import check_seq_len

    check_seq_len(LlamaConfig(max_position_embeddings=256), 256)
    with pytest.raises(DropquantError, match="calibration.seq_len=257"):
        check_seq_len(LlamaConfig(max_position_embeddings=256), 257)


# --- 3. a truncated .gguf --------------------------------------------------------------------------------

def test_gguf_cut_inside_its_header_is_refused(workdir, tokenizer_gguf, capsys):
    """Was: a struct.error traceback from transformers' GGUF reader, exit 1."""
    cut = workdir / "cut.gguf"
    with open(tokenizer_gguf, "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    rc = run_stage("calibrate", "-S", f"model.source={cut}")
    refused(capsys, rc, f"model.source: {cut} is truncated", "ends inside its header")
    assert nothing_written(workdir)


def test_gguf_cut_inside_its_tensor_data_is_refused(tmp_path, tokenizer_gguf):
    from dropquant.gguf.export import export_model

    whole = tmp_path / "whole.gguf"
    export_model(make_tiny_llama(layers=2, vocab=49152), whole, tokenizer_gguf=tokenizer_gguf)
    resolve_source(str(whole))  # complete files pass
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:-1])
    with pytest.raises(DropquantError, match=f"its tensor data ends at byte {whole.stat().st_size}, "
                                             f"the file has {whole.stat().st_size - 1} bytes"):
        resolve_source(str(cut))
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(DropquantError, match="empty.gguf is truncated"):
        resolve_source(str(tmp_path / "empty.gguf"))
    (tmp_path / "text.gguf").write_text("not a model at all")
    with pytest.raises(DropquantError, match="text.gguf is not a GGUF file"):
        resolve_source(str(tmp_path / "text.gguf"))


def test_the_embedded_gguf_is_complete(tokenizer_gguf):
    from dropquant.gguf.header import file_extent

    assert file_extent(tokenizer_gguf) == tokenizer_gguf.stat().st_size


# --- 4. a mistyped local directory -----------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["models/TinyLlama-1.1B", "./TinyLlama-1.1B", "~/no-such-model-dir",
                                  "data/models/TinyLlama-1.1B"])
def test_missing_local_directory_is_named_at_once(workdir, spec):
    """Was: taken for a hub id, 25 s of retries, then a network error."""
    (workdir / "models").mkdir()
    start = time.monotonic()
    with pytest.raises(DropquantError, match=f"model.source: no such directory: {spec}"):
        resolve_source(spec)
    assert time.monotonic() - start < 1


def test_uncached_hub_id_offline_is_refused_quickly(workdir, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    rc = run_stage("calibrate", "-S", "model.source=no-such-org/no-such-model")
    refused(capsys, rc, "'no-such-org/no-such-model' is not a local directory", "not in the local cache",
            "HF_HUB_OFFLINE")
    assert time.monotonic() - start < 5
    assert nothing_written(workdir)


def test_unreachable_hub_is_refused_quickly(workdir, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(DropquantError, match="'no-such-org/no-such-model' is not a local directory.* unreachable"):
        resolve_source("no-such-org/no-such-model")
    assert time.monotonic() - start < 5


def test_invalid_hub_id_is_refused():
    with pytest.raises(DropquantError, match="nor a valid Hugging Face id"):
        resolve_source("org--x/na..me")


# --- 5. a null or NaN in scores.json ---------------------------------------------------------------------

@pytest.mark.parametrize("value, shown", [(None, "null"), (float("nan"), "NaN"), ("0.1", '"0.1"')])
def test_non_numeric_importance_is_refused(workdir, tiny_source, capsys, value, shown):
    """Was: a TypeError traceback while ranking (null), or a silently wrong plan (NaN)."""
    from dropquant.model.loading import load_config

    src = resolve_source(str(tiny_source))
    importance = {u: [0.1, 0.2, 0.3, 0.4] for u in ("attn", "mlp", "block")}
    importance["attn"][3] = value
    scores = workdir / "scores.json"
    scores.write_text(json.dumps({"model": model_identity(load_config(src), src), "importance": importance}))
    rc = run_stage("drop", f"--scores={scores}", "-S", f"model.source={tiny_source}", "-S", "drop.n=2")
    refused(capsys, rc, f"{scores}: importance.attn[3] (layer 3) is {shown}, not a number")
    assert nothing_written(workdir)


def test_non_numeric_span_angular_is_refused():
    from dropquant.prune.selection import check_scores

    span = [[0.0] * 3 for _ in range(3)]
    span[1][2] = None
    scores = {"importance": {u: [0.1, 0.2] for u in ("attn", "mlp", "block")}, "span_angular": span}
    with pytest.raises(DropquantError, match=r"scores.json: span_angular\[1\]\[2\] is not a number"):
        check_scores(scores, 2, origin="scores.json")


# --- 6. a plain transformers load of a sublayer-dropped checkpoint ---------------------------------------

SUBLAYER_PLANS = {"attn": {"attn": [1]}, "mlp": {"mlp": [2]}, "joint": {"attn": [0], "mlp": [3]}}
WHOLE_PLANS = {"none": {}, "block": {"blocks": [1]}}


def _saved(tmp_path, drops):
    from dropquant.prune.surgery import prune_model
    from dropquant.prune.pruned_checkpoint import save_pruned
    from dropquant.prune.selection import DropPlan

    model = make_tiny_llama(layers=LAYERS)
    plan = DropPlan(method="explicit", n=sum(map(len, drops.values())), selection="explicit", num_layers=LAYERS,
                    **drops)
    pruned = prune_model(model, plan)
    save_pruned(pruned, tmp_path / "pruned")
    return pruned, tmp_path / "pruned"


def _logits(model):
    with torch.no_grad():
        return model(torch.arange(3, 20)[None]).logits


@pytest.mark.parametrize("name", list(SUBLAYER_PLANS))
def test_transformers_refuses_a_sublayer_dropped_checkpoint(tmp_path, name):
    """Was: loaded with the dropped modules 'newly initialized' at random: silently the wrong model."""
    from transformers import AutoModelForCausalLM

    from dropquant.prune.pruned_checkpoint import load_pruned

    pruned, path = _saved(tmp_path, SUBLAYER_PLANS[name])
    with pytest.raises(ValueError) as err:
        AutoModelForCausalLM.from_pretrained(path)
    assert "load it with dropquant.load_pruned(path)" in str(err.value)
    assert "drop.export: nemotron-nas" in str(err.value)
    config = json.loads((path / "config.json").read_text())
    assert config["dropquant"]["model_type"] == "llama"
    again = load_pruned(path)
    assert again.config.model_type == "llama"
    assert torch.equal(_logits(again), _logits(pruned))


@pytest.mark.parametrize("name", list(WHOLE_PLANS))
def test_block_drops_stay_plain_llama_checkpoints(tmp_path, name):
    from transformers import AutoModelForCausalLM

    pruned, path = _saved(tmp_path, WHOLE_PLANS[name])
    assert json.loads((path / "config.json").read_text())["model_type"] == "llama"
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(path)), _logits(pruned))


def test_tokenizer_of_a_sublayer_dropped_checkpoint_still_loads(tmp_path, hf_tokenizer):
    """Plain AutoTokenizer still loads it; the GGUF export and evaluation use load_checkpoint_tokenizer."""
    from transformers import AutoTokenizer

    from dropquant.prune.surgery import prune_model
    from dropquant.prune.pruned_checkpoint import load_checkpoint_tokenizer, save_pruned
    from dropquant.prune.selection import DropPlan

    plan = DropPlan(method="attn", n=1, selection="explicit", attn=[1], num_layers=LAYERS)
    save_pruned(prune_model(make_tiny_llama(layers=LAYERS), plan), tmp_path / "p", tokenizer=hf_tokenizer)
    for tok in (AutoTokenizer.from_pretrained(tmp_path / "p"), load_checkpoint_tokenizer(tmp_path / "p")):
        assert tok.encode("Hello world") == hf_tokenizer.encode("Hello world")


# --- 7. the dropquant command --------------------------------------------------------------------------

def test_unknown_stage_is_named(capsys):
    from stages.__main__ import main

    assert main(["bogus"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == ("dropquant: unknown stage 'bogus' "
                                    "(stages: calibrate, score, drop, heal, quantize, evaluate, report)")
    assert captured.out == ""


def test_report_is_a_stage(workdir, capsys):
    rc = run_stage("report", "--metrics", str(workdir / "missing.json"))
    refused(capsys, rc, "dropquant report: error: no metrics at")


def test_the_console_command_exits_2_on_an_unknown_stage():
    out = subprocess.run([sys.executable, "-m", "stages", "bogus"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert "unknown stage 'bogus'" in out.stderr


def test_usage_lists_every_stage(capsys):
    from stages.__main__ import main

    assert main(["--help"]) == 0
    assert "report" in capsys.readouterr().out
    assert main([]) == 2
    assert "stages: calibrate" in capsys.readouterr().err



# --- 8. issue #28: refused before any work ---------------------------------------------------------------

def _no_weights_loaded(monkeypatch):
    import dropquant.model.loading as loading

    def fail(*a, **k):
        raise AssertionError("weights were loaded before the refusal")
    for name in ("load_model", "build_skeleton"):
        monkeypatch.setattr(loading, name, fail)


@pytest.fixture
def tiny_qwen3_source(workdir, hf_tokenizer):
    """A tiny random Qwen3 checkpoint as `python -m dropquant.model.random_model --family qwen3` writes it."""
    from dropquant.model.random_model import write_random_checkpoint

    return write_random_checkpoint(workdir / "qwen3", family="qwen3", layers=LAYERS, hidden=64, intermediate=128,
                                   heads=4, kv_heads=2, dtype="float32", tokenizer_source=hf_tokenizer, progress=False)


@pytest.mark.parametrize("method", ["attn", "mlp", "joint"])
def test_qwen3_sublayer_drop_is_refused_by_the_drop_stage(workdir, tiny_qwen3_source, monkeypatch, capsys, method):
    """Was: drop and heal ran and wrote a checkpoint; only quantize refused ('cannot be written as GGUF')."""
    _no_weights_loaded(monkeypatch)
    rc = run_stage("drop", "-S", f"model.source={tiny_qwen3_source}", "-S", f"drop.method={method}",
                   "-S", "drop.n=1", "-S", "drop.selection=reverse")
    refused(capsys, rc, "qwen3", f"drop.method={method}", "cannot be written as GGUF", "drop.method none or block",
            "dropquant.load_pruned", "prune_model", "save_pruned")
    assert nothing_written(workdir)


def test_qwen3_whole_layer_drops_still_run(workdir, tiny_qwen3_source):
    """Block drops, and a joint drop that takes both halves of a layer (the layer goes whole), have a GGUF form."""
    for method, layers in (("block", "{blocks: [1]}"), ("joint", "{attn: [2], mlp: [2]}")):
        assert run_stage("drop", "-S", f"model.source={tiny_qwen3_source}", "-S", f"drop.method={method}",
                         "-S", f"drop.layers={layers}") == 0
        plan = json.loads((workdir / "data" / "drop" / "plan.json").read_text())
        assert plan["kept_layers"] == ([0, 2, 3] if method == "block" else [0, 1, 3])
    overrides = ["-S", f"model.source={tiny_qwen3_source}", "-S", "drop.method=joint", "-S", "quantize.type=F32"]
    assert run_stage("heal", *overrides) == 0
    assert run_stage("quantize", *overrides) == 0
    assert json.loads((workdir / "data" / "gguf" / "manifest.json").read_text())["arch"] == "qwen3"


@pytest.mark.parametrize("content", ["", "\n  \n", '{"text": ""}\n'], ids=["empty", "blank", "blank-field"])
def test_calibration_file_without_text_is_refused_before_the_model_loads(workdir, monkeypatch, capsys, content):
    """Was refused only after the model and its tokenizer had loaded (44 s), by the packer finding 0 tokens."""
    import dropquant.model.loading as loading

    def fail(*a, **k):
        raise AssertionError("the model was touched before the refusal")
    for name in ("resolve_source", "load_config", "load_tokenizer", "load_model"):
        monkeypatch.setattr(loading, name, fail)
    path = workdir / ("texts.jsonl" if content.startswith("{") else "texts.txt")
    path.write_text(content)
    rc = run_stage("calibrate", "-S", f"calibration.source={path}")
    refused(capsys, rc, f"calibration.source: '{path}' holds no text")
    assert nothing_written(workdir)
