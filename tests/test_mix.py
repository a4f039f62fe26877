"""quantize.type: mix: per-tensor types to a size target, spliced from llama.cpp's own pure quantizations."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dropquant.errors import DropquantError
from dropquant.gguf import mix
from dropquant.gguf.export import export_model
from dropquant.gguf.mix_cost import importance_costs, sensitivity_costs
from dropquant.gguf.quantize import quantize_gguf
from dropquant.model.layerwise import InMemoryStack
from dropquant.params import parse_params
from dropquant.prune.surgery import prune_model
from tests.gguf_helpers import gguf_tensors
from tests.test_quantize import logits, plan, stage, tiny_llama, workspace  # noqa: F401 (workspace: a fixture)

torch.set_num_threads(2)
# Hidden 256: the K-quants apply to every matrix (a width that is not a multiple of 256 falls back to legacy types).
TYPES = ["Q2_K", "Q4_0", "Q4_1", "Q4_K", "Q8_0"]


# Single-tensor streams measured beside the costs (they add streams and leave every cost as it is).
SINGLE = {"a": ("blk.0.ffn_down.weight", "Q2_K"), "b": ("blk.3.attn_v.weight", "Q2_K"),
          "c": ("blk.3.ffn_up.weight", "Q4_0")}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tokenizer_gguf):
    """A tiny pruned model with an untied output (attention of layer 1, MLP of layer 2 dropped): its F32 GGUF,
    the candidates and the sensitivity costs (with the SINGLE streams in the record)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.05)
    model = prune_model(LlamaForCausalLM(config).eval(), plan(attn=[1], mlp=[2]))
    d = tmp_path_factory.mktemp("mix")
    info = export_model(model, d / "model.f32.gguf", tokenizer_gguf=tokenizer_gguf)
    cands = mix.quantize_candidates(d / "model.f32.gguf", TYPES, d / "cands")
    tokens = torch.randint(3, 49152, (2, 32), generator=torch.Generator().manual_seed(1))
    costs, record = sensitivity_costs(InMemoryStack(model), tokens, cands, info.tensor_names, info.permuted,
                                      progress=False, single=SINGLE)
    return model, d, info, cands, costs, record


def test_targets_parse_and_bad_ones_are_named():
    assert mix.parse_target("93.5MB") == mix.Target("bytes", 93.5e6, "93.5MB")
    assert mix.parse_target("1GiB").value == 2 ** 30 and mix.parse_target("4.6bpw").kind == "bpw"
    for bad in ("93.5", "-3MB", "12XB", "bpw"):
        with pytest.raises(DropquantError, match="quantize.target"):
            mix.parse_target(bad)
    with pytest.raises(DropquantError, match="Q9_9"):
        parse_params({"quantize": {"type": "mix", "target": "1MB", "mix_types": ["Q4_0", "Q9_9"]}})
    with pytest.raises(DropquantError, match="IQ2_XS need an importance matrix"):
        parse_params({"quantize": {"type": "mix", "target": "1MB", "mix_types": ["Q4_0", "IQ2_XS"]}})
    with pytest.raises(DropquantError, match="needs quantize.target"):
        parse_params({"quantize": {"type": "mix"}})
    with pytest.raises(DropquantError, match="only with quantize.type=mix"):
        parse_params({"quantize": {"type": "Q8_0", "target": "1MB"}})


def test_options_follow_llama_cpps_fallback(mixed):
    _, _, _, cands, _, _ = mixed
    slots = {s.name: s for s in cands.slots}
    assert set(slots["blk.0.ffn_down.weight"].options) == set(TYPES)
    assert slots["output_norm.weight"].fixed
    # A zero stand-in FFN (the dropped MLP) is 32 wide: no K-quant block fits; llama.cpp falls back to legacy types.
    assert not {"Q2_K", "Q4_K"} & set(slots["blk.2.ffn_down.weight"].options)


def test_assignment_meets_the_target_and_is_deterministic(mixed):
    _, d, _, cands, costs, _ = mixed
    lo, hi = cands.reachable()
    target = mix.parse_target(f"{(lo + hi) / 2 / 1e6:.3f}MB")
    a = mix.allocate(cands, costs, target)
    assert a == mix.allocate(cands, json.loads(json.dumps(costs)), target)
    assert cands.file_bytes(a) <= target.value and cands.meets(a, target)
    assert len(set(a.values())) > 2  # a real mix, not one type
    bpw = mix.parse_target(f"{cands.bpw(a):.3f}bpw")
    assert cands.bpw(mix.allocate(cands, costs, bpw)) <= bpw.value
    # More room never costs more.
    bigger = mix.allocate(cands, costs, mix.parse_target(f"{(lo + 3 * hi) / 4 / 1e6:.3f}MB"))
    total = lambda x: sum(costs.get(n, {}).get(t, 0.0) for n, t in x.items())  # noqa: E731
    assert total(bigger) <= total(a) + 1e-12
    with pytest.raises(DropquantError, match="reachable range is"):
        mix.allocate(cands, costs, mix.parse_target(f"{lo / 2e6:.3f}MB"))
    with pytest.raises(DropquantError, match="reachable range is"):
        mix.allocate(cands, costs, mix.parse_target("40bpw"))


def test_every_tensor_is_llama_cpps_own_bytes_at_its_type(mixed, tmp_path):
    """Parity: each tensor of the mixed file equals the same tensor in a fresh uniform (pure) quantization at its
    assigned type, and the file's size is the one planned."""
    _, d, _, cands, costs, _ = mixed
    lo, hi = cands.reachable()
    a = mix.allocate(cands, costs, mix.parse_target(f"{(2 * lo + hi) / 3 / 1e6:.3f}MB"))
    out = tmp_path / "mix.gguf"
    mix.write_mix(cands, a, out)
    assert out.stat().st_size == cands.file_bytes(a)
    got = gguf_tensors(out)
    assert set(got) == set(a)
    for requested in sorted({cands.slot(n).options[t].requested[0] for n, t in a.items()}):
        path = tmp_path / f"uniform-{requested}.gguf"
        quantize_gguf(d / "model.f32.gguf", path, mix.PURE_FTYPES[requested], pure=True)
        for name, wtype in a.items():
            if cands.slot(name).options[wtype].requested[0] == requested:
                raw, _ = mix.tensor_data(path, name)
                assert got[name][0] == wtype and got[name][2] == raw.tobytes(), name


def test_the_mixed_file_runs_in_llama_cpp_with_f32_parity_where_lossless(mixed, tmp_path):
    model, d, _, _, _, _ = mixed
    cands = mix.quantize_candidates(d / "model.f32.gguf", ["F16", "Q8_0"], tmp_path / "c")
    ids = list(range(1000, 1032))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    # At the largest size every matrix is F16: the torch logits up to F16 rounding.
    costs = {s.name: {"F16": 0.0, "Q8_0": 1.0} for s in cands.slots}
    top = mix.allocate(cands, costs, mix.parse_target(f"{cands.reachable()[1]}B"))
    assert set(top.values()) <= {"F16", "F32"}
    mix.write_mix(cands, top, tmp_path / "f16.gguf")
    assert np.abs(logits(tmp_path / "f16.gguf", ids) - ref).max() < 2e-2
    half = mix.allocate(cands, costs, mix.parse_target(f"{sum(cands.reachable()) // 2}B"))
    assert {"F16", "Q8_0"} <= set(half.values())
    mix.write_mix(cands, half, tmp_path / "half.gguf")
    assert np.abs(logits(tmp_path / "half.gguf", ids) - ref).max() < 0.2
    mix.close_readers()


def test_sensitivity_costs_cover_every_tensor_and_grow_as_bits_shrink(mixed):
    _, _, info, cands, costs, record = mixed
    quantized = [s for s in cands.slots if not s.fixed]
    assert set(costs) == {s.name for s in quantized}
    assert not record["tied_output"] and set(record["output"]) >= {"Q4_0", "Q8_0"}
    for name in ("blk.0.ffn_down.weight", "blk.3.attn_q.weight", "output.weight", "token_embd.weight"):
        c = costs[name]
        assert c["Q2_K" if "Q2_K" in c else "Q4_0"] > c["Q8_0"] >= 0, (name, c)
    # Zero stand-ins are exact at every type.
    assert all(v == 0.0 for v in costs["blk.2.ffn_down.weight"].values())


def test_sensitivity_estimate_matches_single_tensor_streams(mixed):
    """The per-tensor estimate (block KL shared by local error) against that tensor alone, measured end to end."""
    _, _, _, _, costs, record = mixed
    assert set(record["single"]) == set(SINGLE)
    for name, (g, t) in SINGLE.items():
        measured, estimated = record["single"][name], costs[g][t]
        assert measured > 0 and 0.3 < estimated / measured < 3, (g, t, measured, estimated)


def test_importance_gives_the_important_layers_more_bits(mixed):
    _, d, info, cands, _, _ = mixed
    importance = {"attn": [1.0, 0.01, 0.01, 0.01], "mlp": [1.0, 0.01, 0.01, 0.01]}
    costs = importance_costs(cands, info.tensor_names, importance, d / "model.f32.gguf")
    lo, hi = cands.reachable()
    # Room for a few upgrades beyond the smallest file: they go to layer 0 (layer 3 has the same tensors).
    a = mix.allocate(cands, costs, mix.parse_target(f"{lo + 300_000}B"))
    size = lambda layer: sum(s.options[a[s.name]].nbytes for s in cands.slots  # noqa: E731
                             if s.name.startswith(f"blk.{layer}.") and not s.fixed)
    assert size(0) > size(3)
    for group in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down"):
        n0, n3 = f"blk.0.{group}.weight", f"blk.3.{group}.weight"
        assert cands.slot(n0).options[a[n0]].nbytes >= cands.slot(n3).options[a[n3]].nbytes, group


def test_stage_writes_a_mix_with_its_record_and_heatmap(workspace):  # noqa: F811
    out = workspace / "gguf"
    assert stage(workspace, "--out", str(out), "-S", "quantize.type=Q4_0") == 0
    q4_0 = json.loads((out / "manifest.json").read_text())["size_bytes"]
    target = f"{q4_0 / 1e6:.3f}MB"
    assert stage(workspace, "--out", str(out), "-S", "quantize.type=mix", "-S", f"quantize.target={target}",
                 "-S", "quantize.mix_types=[Q2_K,Q4_0,Q4_1,Q8_0]", "-S", "quantize.mix_tokens=32") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    m = manifest["mix"]
    assert manifest["type"] == "mix" and manifest["size_bytes"] <= q4_0 and m["file_bytes"] == manifest["size_bytes"]
    assert m["by"] == "sensitivity" and m["measurement"]["tokens"] == 32 and m["bpw"] > 0
    assert all("cost" in v and v["type"] in v["costs"] for v in m["tensors"].values())
    assert (out / "mix.png").stat().st_size > 1000
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "mix.png", "model.gguf"]
    ids = list(range(1000, 1020))
    assert np.isfinite(logits(out / "model.gguf", ids)).all()


def test_stage_refuses_an_unreachable_target_and_leaves_nothing(workspace, capsys):  # noqa: F811
    out = workspace / "gguf"
    assert stage(workspace, "--out", str(out), "-S", "quantize.type=mix", "-S", "quantize.target=0.001MB",
                 "-S", "quantize.mix_types=[Q4_0,Q8_0]") == 2
    err = capsys.readouterr().err
    assert "reachable range is" in err and "MB" in err
    assert not out.exists()


def test_streamed_sensitivity_equals_in_memory(mixed, tmp_path, hf_tokenizer):
    """A model larger than memory is read a layer at a time: the same costs as the model in memory."""
    from dropquant.model.layerwise import checkpoint_stack
    from dropquant.prune.pruned_checkpoint import save_pruned

    model, _, info, cands, costs, _ = mixed
    save_pruned(model, tmp_path / "ckpt", tokenizer=hf_tokenizer)
    tokens = torch.randint(3, 49152, (2, 32), generator=torch.Generator().manual_seed(1))
    streamed, _ = sensitivity_costs(checkpoint_stack(tmp_path / "ckpt", torch.float32, "cpu", True), tokens, cands,
                                    info.tensor_names, info.permuted, progress=False)
    assert set(streamed) == set(costs)
    for g, c in costs.items():
        for t, v in c.items():
            assert streamed[g][t] == pytest.approx(v, rel=1e-4, abs=1e-9), (g, t)
