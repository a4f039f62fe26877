"""Random-weight checkpoints (dropquant.model.random_model): transformers loads them whole, sharded or not, and the
values are a function of the seed alone."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dropquant.errors import DropquantError
from dropquant.model.checkpoint import INDEX_NAME as INDEX_FILE, WEIGHTS_NAME as SINGLE_FILE, Checkpoint
from dropquant.model.random_model import main, write_random_checkpoint

TINY = dict(layers=3, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256, tokenizer_source=None,
            progress=False)
SMALL_SHARDS = 60_000  # bytes: a tiny bf16 model then spans several shards


def load(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, output_loading_info=True)
    return model.eval(), info


def all_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def assert_loads_whole(path):
    model, info = load(path)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 5, 9, 200, 3]])).logits
    assert torch.isfinite(logits).all()
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_sharded_checkpoint_loads_with_no_missing_or_unexpected_keys(tmp_path, family):
    path = write_random_checkpoint(tmp_path / "m", family=family, shard_bytes=SMALL_SHARDS, **TINY)
    model = assert_loads_whole(path)
    assert model.config.model_type == family and model.dtype == torch.bfloat16
    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["num_hidden_layers"] == 3
    if family == "qwen2":  # its q/k/v biases are drawn, not left out
        assert model.model.layers[0].self_attn.q_proj.bias.abs().max() > 0


def test_index_names_every_tensor_in_the_file_that_holds_it(tmp_path):
    path = write_random_checkpoint(tmp_path / "m", shard_bytes=SMALL_SHARDS, **TINY)
    index = json.loads((path / INDEX_FILE).read_text())
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(files) > 2 and not (path / SINGLE_FILE).exists()
    assert files == sorted(set(index["weight_map"].values()))
    assert all(name.endswith(f"-of-{len(files):05d}.safetensors") for name in files)
    # ordinary files, as config.json is (safetensors alone creates them owner-only)
    assert {(path / name).stat().st_mode for name in files} == {(path / "config.json").stat().st_mode}
    found = {}
    for name in files:
        for key, tensor in load_file(path / name).items():
            assert index["weight_map"][key] == name
            found[key] = tensor
    assert set(found) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in found.values())
    assert Checkpoint(path).total_bytes() == index["metadata"]["total_size"]


def test_same_seed_same_tensors_whatever_the_shard_size(tmp_path):
    one = write_random_checkpoint(tmp_path / "one", shard_bytes=1e9, **TINY)
    many = write_random_checkpoint(tmp_path / "many", shard_bytes=SMALL_SHARDS, **TINY)
    other = write_random_checkpoint(tmp_path / "other", seed=1, shard_bytes=1e9, **TINY)
    assert (one / SINGLE_FILE).is_file() and not (one / INDEX_FILE).exists()
    a, b, c = all_tensors(one), all_tensors(many), all_tensors(other)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert Checkpoint(one).total_bytes() == Checkpoint(many).total_bytes()


def test_values_are_drawn_as_documented(tmp_path):
    path = write_random_checkpoint(tmp_path / "m", family="qwen2", hidden=256, intermediate=512, heads=4, kv_heads=2,
                                   layers=1, vocab=512, tokenizer_source=None, dtype="float32", progress=False)
    t = all_tensors(path)
    assert t["model.layers.0.mlp.up_proj.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert t["model.embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    norm = t["model.layers.0.input_layernorm.weight"]
    assert norm.mean().item() == pytest.approx(1.0, abs=0.01) and 0 < norm.std().item() < 0.05
    bias = t["model.layers.0.self_attn.q_proj.bias"]
    assert abs(bias.mean().item()) < 0.01 and 0 < bias.std().item() < 0.05
    assert len({k: v for k, v in t.items() if v.ndim == 2}) == 1 + 7 + 1  # embedding, 7 projections, lm_head


def test_tied_checkpoint_has_no_lm_head(tmp_path):
    path = write_random_checkpoint(tmp_path / "m", tie=True, **TINY)
    assert "lm_head.weight" not in all_tensors(path)
    model = assert_loads_whole(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_is_saved_and_sets_vocab_and_special_ids(tmp_path, hf_tokenizer):
    from transformers import AutoTokenizer

    tiny = {k: v for k, v in TINY.items() if k not in ("vocab", "tokenizer_source")}
    path = write_random_checkpoint(tmp_path / "m", tokenizer_source=hf_tokenizer, **{**tiny, "layers": 1})
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == len(hf_tokenizer) == 49152
    assert (config["bos_token_id"], config["eos_token_id"]) == (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.encode("Hello world") == hf_tokenizer.encode("Hello world")
    with pytest.raises(DropquantError, match="smaller than the tokenizer"):
        write_random_checkpoint(tmp_path / "small", tokenizer_source=hf_tokenizer, vocab=100, **tiny)


def test_bad_shapes_and_targets_are_refused(tmp_path):
    with pytest.raises(DropquantError, match="not a multiple of heads"):
        write_random_checkpoint(tmp_path / "m", **{**TINY, "heads": 5})
    with pytest.raises(DropquantError, match="family 'gpt2'"):
        write_random_checkpoint(tmp_path / "m", family="gpt2", **TINY)
    with pytest.raises(DropquantError, match="vocab must be given"):
        write_random_checkpoint(tmp_path / "m", **{**TINY, "vocab": None})
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(DropquantError, match="refusing to replace"):
        write_random_checkpoint(tmp_path / "precious", **TINY)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_cli_writes_a_checkpoint_that_loads(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main([str(out), "--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4",
                 "--kv-heads", "2", "--vocab", "256", "--tokenizer", "none", "--family", "qwen3",
                 "--shard-gb", "0.00005"]) == 0
    assert "wrote" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 500000.0  # the llama3-8b preset's, kept under overrides
    assert config["max_position_embeddings"] == 8192 and config["rms_norm_eps"] == 1e-5
    assert (out / INDEX_FILE).is_file()
    assert_loads_whole(out)
