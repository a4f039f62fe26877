"""GGUF export of every family (Qwen2, Qwen3 beside Llama), streamed export, and the intermediate's dtype.

Parity runs use an F32 GGUF and an F32 KV cache without flash attention (see tests/test_gguf_export.py), with the
same tolerance as the Llama tests: max |Δlogit| 1e-2 and identical top-1 at every position.
"""
from __future__ import annotations

import copy
import json
import weakref

import gguf
import numpy as np
import pytest

import torch

from dropquant.model import checkpoint
from dropquant.errors import DropquantError
from dropquant.gguf.export import ARCH_DECI, ARCH_QWEN2, ARCH_QWEN3, export_checkpoint, export_model, permute_qk
from dropquant.prune.surgery import prune_model
from dropquant.prune.pruned_checkpoint import save_pruned
from dropquant.gguf.quantize import quantize_gguf
from tests.gguf_helpers import (L, TINY_MODELS, check_q8_0_runs, gguf_tensors, llama_logits, plan, random_ids,
                                tiny_llama, tiny_qwen2, tiny_qwen3, torch_logits, torch_params)

torch.set_num_threads(2)

QWEN2_PLANS = {
    "none": plan(),
    "attn3_with_layer0": plan(attn=[0, 2, 5]),
    "mlp3": plan(mlp=[0, 3, 5]),
    "block2": plan(blocks=[1, 4]),
    "joint4": plan(attn=[1, 3], mlp=[3, 5]),    # layer 3 loses both halves and is left out
    "attn_all": plan(attn=range(L), mlp=[2]),   # no attention left: one zero attention keeps a KV cache
}


def _parity(model, path, ids, tol=1e-2):
    ref, got = torch_logits(model, ids), llama_logits(path, ids)
    assert ref.std() > 1.0, "logits too flat for the parity check to mean anything"
    assert np.abs(got - ref).max() <= tol
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    return ref


# --- Qwen2: q/k/v biases, NEOX rope in qwen2, permuted in deci ---------------------------------------

@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", list(QWEN2_PLANS))
def test_qwen2_f32_parity(name, tie, tmp_path, tokenizer_gguf):
    p = QWEN2_PLANS[name]
    pruned = prune_model(tiny_qwen2(tie=tie), p)
    path = tmp_path / "model.gguf"
    info = export_model(pruned, path, tokenizer_gguf=tokenizer_gguf)
    assert info.arch == (ARCH_QWEN2 if not (p.attn or p.mlp) else ARCH_DECI)
    assert info.n_params - info.n_standin_params == torch_params(pruned)
    tensors = gguf_tensors(path)
    assert ("output.weight" in tensors) == (not tie)
    # Every kept attention carries its three biases, F32 and 1-D, as llama.cpp's converter writes them.
    kept = [b for b, blk in enumerate(info.blocks) if blk.attn == "keep"]
    for b in kept:
        for proj in ("q", "k", "v"):
            kind, shape, _ = tensors[f"blk.{b}.attn_{proj}.bias"]
            assert kind == "F32" and len(shape) == 1
    assert sum(n.endswith(".bias") for n in tensors) == 3 * len(kept)
    _parity(pruned, path, random_ids())


def test_qwen2_biases_permuted_only_for_deci(tmp_path, tokenizer_gguf):
    """qwen2 rotates halves like HF (biases as they are); deci rotates pairs (biases permuted like their rows)."""
    base = tiny_qwen2()
    src = {k: v.clone() for k, v in base.state_dict().items()}
    plain, cut = tmp_path / "plain.gguf", tmp_path / "cut.gguf"
    export_model(base, plain, tokenizer_gguf=tokenizer_gguf)
    export_model(prune_model(copy.deepcopy(base), plan(mlp=[4])), cut, tokenizer_gguf=tokenizer_gguf)
    t_plain, t_cut = gguf_tensors(plain), gguf_tensors(cut)
    for proj, heads in (("q", 4), ("k", 2), ("v", None)):
        bias = src[f"model.layers.1.self_attn.{proj}_proj.bias"].numpy()
        assert np.abs(bias).mean() > 0.1  # random and large: a lost or misplaced bias would show
        assert t_plain[f"blk.1.attn_{proj}.bias"][2] == bias.tobytes()
        want = bias if heads is None else permute_qk(bias, heads)
        assert t_cut[f"blk.1.attn_{proj}.bias"][2] == np.ascontiguousarray(want).tobytes()


# --- Qwen3: q/k norms, only whole-block drops ------------------------------------------------------

@pytest.mark.parametrize("name", ["none", "block2"])
def test_qwen3_f32_parity(name, tmp_path, tokenizer_gguf):
    pruned = prune_model(tiny_qwen3(), QWEN2_PLANS[name])
    path = tmp_path / "model.gguf"
    info = export_model(pruned, path, tokenizer_gguf=tokenizer_gguf)
    assert info.arch == ARCH_QWEN3
    assert info.n_params == torch_params(pruned) and info.n_standin_params == 0
    tensors = gguf_tensors(path)
    for b in range(len(info.blocks)):
        for norm in ("q", "k"):
            kind, shape, _ = tensors[f"blk.{b}.attn_{norm}_norm.weight"]
            assert (kind, shape) == ("F32", (32,))
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["qwen3.attention.key_length"].contents() == 32   # head_dim != hidden / heads
    _parity(pruned, path, random_ids())


@pytest.mark.parametrize("drops", [{"attn": [2]}, {"mlp": [1, 3]}], ids=["attn", "mlp"])
def test_qwen3_sublayer_drop_refused_before_any_file(drops, tmp_path, tokenizer_gguf, monkeypatch):
    pruned = prune_model(tiny_qwen3(layers=4), plan(layers=4, **drops))
    save_pruned(pruned, tmp_path / "ckpt")

    def no_open(*a, **k):
        raise AssertionError("a safetensors file was opened before the refusal")
    monkeypatch.setattr(checkpoint, "read_header", no_open)
    out = tmp_path / "model.gguf"
    for export in (lambda: export_model(pruned, out, tokenizer_gguf=tokenizer_gguf),
                   lambda: export_checkpoint(tmp_path / "ckpt", out, tokenizer_gguf=tokenizer_gguf)):
        with pytest.raises(DropquantError, match="qwen3 model with attention or MLP layers dropped cannot be "
                                                 "written as GGUF.*q_norm/k_norm"):
            export()
        assert not any(tmp_path.glob("*model.gguf*"))


# --- one writer for memory and disk -----------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_in_memory_and_checkpoint_exports_are_byte_identical(family, tmp_path, tokenizer_gguf):
    pruned = prune_model(TINY_MODELS[family](tie=True), plan(attn=[0, 2], mlp=[2, 4], blocks=[5]))
    save_pruned(pruned, tmp_path / "ckpt")
    info_mem = export_model(pruned, tmp_path / "mem.gguf", tokenizer_gguf=tokenizer_gguf, name="tiny")
    info_disk = export_checkpoint(tmp_path / "ckpt", tmp_path / "disk.gguf", tokenizer_gguf=tokenizer_gguf, name="tiny")
    assert info_mem.arch == info_disk.arch == ARCH_DECI
    assert info_mem.summary() == info_disk.summary()
    assert (tmp_path / "mem.gguf").read_bytes() == (tmp_path / "disk.gguf").read_bytes()


def test_sharded_checkpoint_exports_the_same_file(tmp_path, tokenizer_gguf):
    """model.safetensors.index.json with two shards gives the file the single-file checkpoint gives."""
    from safetensors.torch import load_file, save_file

    pruned = prune_model(tiny_qwen2(), plan(attn=[1], mlp=[3]))
    save_pruned(pruned, tmp_path / "single")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    state = load_file(str(tmp_path / "single" / "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for fname, names in shards.items():
        save_file({k: state[k] for k in names}, str(sharded / fname))
    weight_map = {k: f for f, names in shards.items() for k in names}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    export_checkpoint(tmp_path / "single", tmp_path / "a.gguf", tokenizer_gguf=tokenizer_gguf, name="x")
    export_checkpoint(sharded, tmp_path / "b.gguf", tokenizer_gguf=tokenizer_gguf, name="x")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_checkpoint_export_streams_one_tensor_at_a_time(tmp_path, tokenizer_gguf, monkeypatch):
    """Every tensor read from the checkpoint is released before the next one is read."""
    pruned = prune_model(tiny_llama(), plan(attn=[1], mlp=[3]))  # untied: two 12.6 MB matrices
    save_pruned(pruned, tmp_path / "ckpt")
    live, at_load, loaded = [0], [], []
    real_get_many = checkpoint.Checkpoint.get_many

    def release():
        live[0] -= 1

    def counting_get_many(self, names):
        out = {}
        for key in names:
            at_load.append(live[0])
            tensor = real_get_many(self, [key])[key]
            live[0] += 1
            loaded.append(key)
            weakref.finalize(tensor, release)
            out[key] = tensor
        return out

    monkeypatch.setattr(checkpoint.Checkpoint, "get_many", counting_get_many)
    info = export_checkpoint(tmp_path / "ckpt", tmp_path / "model.gguf", tokenizer_gguf=tokenizer_gguf)
    assert sorted(loaded) == sorted(info.tensor_names)      # each tensor read once, through the lazy reader
    assert max(at_load) == 0, f"tensors alive when the next was read: {at_load}"
    assert live[0] == 0
    _parity(pruned, tmp_path / "model.gguf", random_ids(32))


# --- the intermediate's dtype ----------------------------------------------------------------------

def _weights_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rounded_through(model, dtype):
    """A float32 copy whose weights are rounded to `dtype`; buffers (rotary inv_freq) keep float32, as
    llama.cpp computes its rope frequencies in float32 whatever the weights' type."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.to(dtype).float())
    return out


def test_bf16_checkpoint_written_bit_exactly(tmp_path, tokenizer_gguf):
    """auto on a bfloat16 checkpoint writes BF16 2-D weights with the source's bits; norms and biases F32."""
    pruned = prune_model(tiny_qwen2().to(torch.bfloat16), plan(attn=[2], mlp=[4]))
    save_pruned(pruned, tmp_path / "ckpt")
    info = export_checkpoint(tmp_path / "ckpt", tmp_path / "model.gguf", tokenizer_gguf=tokenizer_gguf)
    assert info.out_type == info.summary()["out_type"] == "BF16"
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16
    tensors = gguf_tensors(tmp_path / "model.gguf")
    state = _weights_of(pruned)
    heads = {"q_proj": 4, "k_proj": 2}
    for hf, gname in info.tensor_names.items():
        kind, shape, data = tensors[gname]
        src = state[hf]
        proj = hf.split(".")[-2]
        if proj in heads:  # deci: Q/K rows (and biases) in llama.cpp's pair order
            src = permute_qk(src, heads[proj])
        if src.dim() == 2:
            assert kind == "BF16"
            assert data == src.contiguous().view(torch.int16).numpy().tobytes(), gname
        else:
            assert kind == "F32"
            assert data == src.float().numpy().tobytes(), gname
    # The same bits through the in-memory path, and through an explicit F32 -> BF16 rounding (exact here).
    export_model(pruned, tmp_path / "mem.gguf", tokenizer_gguf=tokenizer_gguf, name="ckpt")
    assert (tmp_path / "mem.gguf").read_bytes() == (tmp_path / "model.gguf").read_bytes()
    f32 = copy.deepcopy(pruned).float()
    export_model(f32, tmp_path / "rounded.gguf", tokenizer_gguf=tokenizer_gguf, out_type="BF16", name="ckpt")
    assert (tmp_path / "rounded.gguf").read_bytes() == (tmp_path / "model.gguf").read_bytes()


def test_bf16_and_f16_intermediates_quantize_to_q8_0_and_run(tmp_path, tokenizer_gguf):
    """llama.cpp quantizes BF16 and F16 files; Q8_0 from BF16 equals Q8_0 from the F32 file of the same weights."""
    model = prune_model(tiny_llama(), plan(attn=[0, 3], mlp=[4]))
    ids = random_ids(32)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    export_model(bf16, tmp_path / "bf16.gguf", tokenizer_gguf=tokenizer_gguf)
    export_model(bf16, tmp_path / "f32.gguf", tokenizer_gguf=tokenizer_gguf, out_type="F32")
    ref = torch_logits(_rounded_through(model, torch.bfloat16), ids)
    assert np.abs(llama_logits(tmp_path / "f32.gguf", ids) - ref).max() <= 1e-2
    q_bf16 = check_q8_0_runs(tmp_path / "bf16.gguf", tmp_path, ref, ids, name="from_bf16.Q8_0.gguf")
    quantize_gguf(tmp_path / "f32.gguf", tmp_path / "from_f32.Q8_0.gguf", "Q8_0")
    a, b = gguf_tensors(q_bf16), gguf_tensors(tmp_path / "from_f32.Q8_0.gguf")
    assert a.keys() == b.keys()
    assert {t[0] for t in a.values()} == {"Q8_0", "F32"}
    assert all(a[n] == b[n] for n in a)   # bf16 -> f32 is exact, so llama.cpp quantizes the same numbers

    f16 = copy.deepcopy(model).to(torch.float16)
    info = export_model(f16, tmp_path / "f16.gguf", tokenizer_gguf=tokenizer_gguf)
    assert info.out_type == "F16"
    assert {t[0] for t in gguf_tensors(tmp_path / "f16.gguf").values()} == {"F16", "F32"}
    check_q8_0_runs(tmp_path / "f16.gguf", tmp_path, torch_logits(_rounded_through(model, torch.float16), ids), ids,
                    name="from_f16.Q8_0.gguf")


def test_auto_type_of_mixed_dtypes_is_f32_and_bad_types_refused(tmp_path, tokenizer_gguf):
    model = tiny_llama(layers=2)
    model.model.layers[0].mlp.up_proj.to(torch.bfloat16)
    assert export_model(model, tmp_path / "m.gguf", tokenizer_gguf=tokenizer_gguf).out_type == "F32"
    with pytest.raises(DropquantError, match="F32, F16, BF16 or auto"):
        export_model(model, tmp_path / "x.gguf", tokenizer_gguf=tokenizer_gguf, out_type="f16")
    assert not (tmp_path / "x.gguf").exists()
