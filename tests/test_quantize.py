"""llama.cpp's quantizer through llama-cpp-python, the importance matrix, and the quantize stage end to end."""
from __future__ import annotations

import copy
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from dropquant.errors import DropquantError
from dropquant.gguf.export import ZERO_FFN_WIDTH, export_model
from dropquant.params import QUANT_TYPES
from dropquant.prune.pruned_checkpoint import load_pruned, save_pruned
from dropquant.prune.surgery import prune_model
from dropquant.gguf.quantize import NEEDS_IMATRIX, llama_ftype, quantize_gguf
from dropquant.gguf.imatrix import (collect_imatrix, imatrix_means, module_gguf_names, neutral_stats, read_imatrix,
                                    write_imatrix)
from dropquant.prune.selection import DropPlan

torch.set_num_threads(2)
VOCAB = 49152
L = 4


def tiny_llama(seed=0, layers=L, hidden=256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=512, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, initializer_range=0.05)
    return LlamaForCausalLM(config).eval()


def plan(attn=(), mlp=(), blocks=(), layers=L):
    return DropPlan(method="explicit", n=len(attn) + len(mlp) + len(blocks), selection="explicit",
                    attn=sorted(attn), mlp=sorted(mlp), blocks=sorted(blocks), num_layers=layers)


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory, tokenizer_gguf):
    """A tiny pruned model (attention of layer 1, MLP of layer 2 dropped) as F32 GGUF, with its export info."""
    model = prune_model(tiny_llama(), plan(attn=[1], mlp=[2]))
    path = tmp_path_factory.mktemp("gguf") / "model.f32.gguf"
    info = export_model(model, path, tokenizer_gguf=tokenizer_gguf)
    return model, path, info


def logits(path, ids):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=128, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def test_every_quant_type_has_a_llama_ftype():
    ftypes = [llama_ftype(t) for t in QUANT_TYPES]
    assert len(set(ftypes)) == len(QUANT_TYPES)
    assert llama_ftype("F32") == 0 and llama_ftype("Q8_0") == 7 and llama_ftype("Q4_K_M") == 15
    with pytest.raises(DropquantError, match="unknown type"):
        llama_ftype("Q9_9")


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "IQ4_XS"])
def test_quantize_types(qtype, f32_gguf, tmp_path):
    import gguf

    _, src, _ = f32_gguf
    dst = tmp_path / f"model.{qtype}.gguf"
    quantize_gguf(src, dst, qtype)
    reader = gguf.GGUFReader(str(dst))
    assert reader.fields["general.file_type"].contents() == llama_ftype(qtype)
    assert reader.fields["general.architecture"].contents() == "deci"
    assert dst.stat().st_size < src.stat().st_size
    out = logits(dst, list(range(300, 332)))
    assert np.isfinite(out).all()


def test_sizes_follow_bits(f32_gguf, tmp_path):
    _, src, _ = f32_gguf
    sizes = []
    for qtype in ("F16", "Q8_0", "Q4_0"):
        quantize_gguf(src, tmp_path / f"{qtype}.gguf", qtype)
        sizes.append((tmp_path / f"{qtype}.gguf").stat().st_size)
    assert src.stat().st_size > sizes[0] > sizes[1] > sizes[2]


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q2_K"])
def test_zero_standins_quantize_to_exact_zeros(qtype, f32_gguf, tmp_path):
    """The dropped MLP's stand-in FFN (and the first block's zero attention) stay exactly zero at low bits."""
    import gguf
    from gguf.quants import dequantize

    _, src, info = f32_gguf
    dst = tmp_path / "q.gguf"
    quantize_gguf(src, dst, qtype)
    tensors = {t.name: t for t in gguf.GGUFReader(str(dst)).tensors}
    assert set(info.standin_columns) == {"blk.2.ffn_gate.weight", "blk.2.ffn_up.weight", "blk.2.ffn_down.weight"}
    for name in info.standin_columns:
        t = tensors[name]
        values = dequantize(t.data, t.tensor_type)
        assert values.size == (ZERO_FFN_WIDTH * 256) and not values.any(), name
    real = tensors["blk.1.ffn_down.weight"]
    assert dequantize(real.data, real.tensor_type).any()


def test_imatrix_is_mean_squared_input_per_column(f32_gguf):
    model, _, info = f32_gguf
    ids = torch.randint(3, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    modules = module_gguf_names(info.tensor_names)
    assert modules["model.layers.0.self_attn.q_proj"] == "blk.0.attn_q.weight"
    assert "model.layers.1.self_attn.q_proj" not in modules  # dropped
    assert "model.layers.2.mlp.down_proj" not in modules
    stats = collect_imatrix(model, ids, modules, batch_size=2)

    with torch.no_grad():  # by hand: the input of layer 0's q_proj is input_layernorm(embeddings)
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids)).reshape(-1, 256).double()
    st = stats["blk.0.attn_q.weight"]
    assert st.count == 3 * 24
    np.testing.assert_allclose(st.mean, (x * x).mean(0).numpy(), rtol=1e-5)
    # q, k and v read the same input; the MLP of layer 3 reads 512-wide activations into down_proj
    np.testing.assert_allclose(stats["blk.0.attn_v.weight"].sums, st.sums)
    assert stats["blk.3.ffn_down.weight"].sums.shape == (512,)


def test_imatrix_file_roundtrip_covers_every_matrix(f32_gguf, tmp_path):
    import gguf

    model, src, info = f32_gguf
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    stats = collect_imatrix(model, ids, module_gguf_names(info.tensor_names))
    stats.update(neutral_stats(list(info.standin_columns), info.standin_columns, 32))
    path = tmp_path / "imatrix.gguf"
    write_imatrix(path, stats, chunk_size=16, chunk_count=2, datasets=["test"])

    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.chunk_size"].contents() == 16
    assert reader.fields["imatrix.datasets"].contents() == ["test"]
    back = read_imatrix(path)
    assert set(back) == set(stats)
    for name, st in stats.items():
        assert back[name].count == st.count
        np.testing.assert_allclose(back[name].sums, st.sums, rtol=1e-6)
    # one entry per weight matrix in the model file, as long as the matrix's input (its ggml ne[0])
    model_tensors = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    matrices = {n for n, t in model_tensors.items() if n.startswith("blk.") and len(t.shape) == 2}
    assert set(back) == matrices
    for name in matrices:
        assert back[name].sums.size == int(model_tensors[name].shape[0])


def test_low_bit_types_need_an_imatrix(f32_gguf, tmp_path):
    model, src, info = f32_gguf
    assert "IQ2_XXS" in NEEDS_IMATRIX
    with pytest.raises(DropquantError, match="quantize.imatrix"):
        quantize_gguf(src, tmp_path / "q.gguf", "IQ2_XXS")
    assert not (tmp_path / "q.gguf").exists()
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(3))
    stats = collect_imatrix(model, ids, module_gguf_names(info.tensor_names))
    stats.update(neutral_stats(list(info.standin_columns), info.standin_columns, 64))
    quantize_gguf(src, tmp_path / "q.gguf", "IQ2_XXS", imatrix=imatrix_means(stats))
    assert np.isfinite(logits(tmp_path / "q.gguf", list(range(500, 520)))).all()


def test_imatrix_reaches_the_quantizer(f32_gguf, tmp_path):
    """The same type with and without importance weights gives different bytes (the matrix is used)."""
    model, src, info = f32_gguf
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(4))
    stats = collect_imatrix(model, ids, module_gguf_names(info.tensor_names))
    quantize_gguf(src, tmp_path / "plain.gguf", "Q4_K_M")
    quantize_gguf(src, tmp_path / "imat.gguf", "Q4_K_M", imatrix=imatrix_means(stats))
    assert (tmp_path / "plain.gguf").read_bytes() != (tmp_path / "imat.gguf").read_bytes()
    with pytest.raises(DropquantError, match="non-finite"):
        bad = imatrix_means(stats)
        bad["blk.0.attn_q.weight"][0] = np.nan
        quantize_gguf(src, tmp_path / "bad.gguf", "Q4_K_M", imatrix=bad)


# --- the stage ------------------------------------------------------------------------------------------

@pytest.fixture
def workspace(tmp_path, hf_tokenizer):
    """A source HF directory (tiny model + the embedded tokenizer), its pruned checkpoint, plan and calibration,
    each recording what it was made from as the stages write them."""
    from safetensors.torch import save_file

    from dropquant.artifacts import plan_id
    from dropquant.calibration import tokens_digest
    from dropquant.model.loading import load_config, model_identity, resolve_source

    base = tiny_llama(layers=4)
    source = tmp_path / "source"
    save_pruned(base, source, tokenizer=hf_tokenizer)
    src = resolve_source(str(source))
    identity = model_identity(load_config(src), src)
    p = plan(attn=[0, 3], mlp=[1])
    record = p.to_json(identity)
    record["plan_id"] = plan_id(record)
    pruned = prune_model(copy.deepcopy(base), p)
    pruned.config.dropquant["plan_id"] = record["plan_id"]
    save_pruned(pruned, tmp_path / "pruned", tokenizer=hf_tokenizer)
    (tmp_path / "plan.json").write_text(json.dumps({**record, "kept_layers": [0, 1, 2, 3]}))
    tokens = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(5))
    save_file({"input_ids": tokens}, str(tmp_path / "tokens.safetensors"))
    (tmp_path / "manifest.json").write_text(json.dumps({"model": identity, "sha256": tokens_digest(tokens)}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": {"source": str(source)}, "heal": {"holdout": 1}}))
    assert heal_stage(tmp_path) == 0
    return tmp_path


def heal_stage(ws, *extra):
    from stages.heal import main

    return main(["--params", str(ws / "params.yaml"), "--pruned", str(ws / "pruned"), "--plan", str(ws / "plan.json"),
                 "--calibration", str(ws / "tokens.safetensors"), "--out", str(ws / "healed"), *extra])


def stage(ws, *extra):
    from stages.quantize import main

    return main(["--params", str(ws / "params.yaml"), "--pruned", str(ws / "pruned"), "--plan", str(ws / "plan.json"),
                 "--healed", str(ws / "healed"), "--calibration", str(ws / "tokens.safetensors"), *extra])


def test_stage_variant_f32_is_the_pruned_model(workspace):
    out = workspace / "gguf"
    assert stage(workspace, "--out", str(out), "-S", "quantize.type=F32") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.gguf"]
    assert manifest["type"] == "F32" and manifest["arch"] == "deci" and manifest["baseline"] is False
    assert manifest["plan"]["attn"] == [0, 3] and manifest["model"]["source"] == str(workspace / "source")
    assert manifest["plan_id"] == json.loads((workspace / "plan.json").read_text())["plan_id"]
    assert manifest["size_bytes"] == (out / "model.gguf").stat().st_size
    assert manifest["sha256"] == hashlib.sha256((out / "model.gguf").read_bytes()).hexdigest()
    assert manifest["heal"]["method"] == "none"

    ids = list(range(1000, 1040))
    with torch.no_grad():
        ref = load_pruned(workspace / "pruned")(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(logits(out / "model.gguf", ids) - ref).max() < 1e-2

    # heal.method none: the GGUF is byte for byte the pruned checkpoint's own export.
    from dropquant.gguf.export import export_checkpoint

    direct = workspace / "direct.gguf"
    export_checkpoint(workspace / "pruned", direct, name=f"{workspace / 'source'} dropquant")
    assert hashlib.sha256(direct.read_bytes()).hexdigest() == manifest["sha256"]


def test_stage_exports_the_healed_checkpoint_with_its_imatrix(workspace):
    linear = ("-S", "heal.method=linear")
    assert heal_stage(workspace, *linear) == 0
    healed = workspace / "healed" / "model"
    out = workspace / "gguf"
    assert stage(workspace, "--out", str(out), "-S", "quantize.type=F32", *linear) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    heal_record = json.loads((workspace / "healed" / "heal.json").read_text())
    assert manifest["heal"] == {"method": "linear", "heal_id": heal_record["heal_id"]}
    ids = list(range(1000, 1040))
    with torch.no_grad():
        ref = load_pruned(healed)(torch.tensor([ids])).logits[0].numpy()
        plain = load_pruned(workspace / "pruned")(torch.tensor([ids])).logits[0].numpy()
    got = logits(out / "model.gguf", ids)
    assert np.abs(got - ref).max() < 1e-2 < np.abs(got - plain).max()

    # The importance matrix covers the stand-ins (collected on the healed model, not the pruned one).
    assert stage(workspace, "--out", str(out), "-S", "quantize.type=Q4_K_M", "-S", "quantize.imatrix=true", *linear) == 0
    from dropquant.gguf.imatrix import read_imatrix

    stats = read_imatrix(out / "imatrix.gguf")
    standin = stats["blk.0.attn_output.weight"].sums
    assert standin.std() > 0, "the stand-in's statistics are neutral, not measured"

    # A heal record for another plan is refused before any work.
    record = {**heal_record, "plan_id": "0" * 16}
    (workspace / "healed" / "heal.json").write_text(json.dumps(record))
    assert stage(workspace, "--out", str(workspace / "other"), *linear) == 2
    assert not (workspace / "other").exists()


def test_stage_refuses_a_heal_record_made_with_other_heal_params(workspace, capsys):
    """Was: after a complete heal.method=none run and an interrupted linear+distill one, quantize by hand with
    heal.method=linear+distill exported the unhealed checkpoint without a word."""
    out = workspace / "gguf"
    assert stage(workspace, "--out", str(out), "-S", "heal.method=linear+distill") == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "heal.json was made by heal.method=none" in err, err
    assert "the current parameters ask for heal.method=linear+distill" in err and "run the heal stage" in err, err
    assert stage(workspace, "--out", str(out), "-S", "heal.steps=7") == 2
    err = capsys.readouterr().err
    assert "heal.method=none with other heal parameters" in err and "heal.steps: 120 there, 7 now" in err, err
    assert not out.exists()


def test_stage_imatrix_and_baseline(workspace):
    out = workspace / "gguf"
    assert stage(workspace, "--out", str(out), "-S", "quantize.type=Q4_K_M", "-S", "quantize.imatrix=true") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["imatrix"]["tokens"] == 4 * 32 and (out / "imatrix.gguf").is_file()
    assert not list(out.glob("*.f32.gguf"))

    base_out = workspace / "baseline"
    assert stage(workspace, "--baseline", "--out", str(base_out), "-S", "quantize.type=Q8_0") == 0
    base = json.loads((base_out / "manifest.json").read_text())
    assert base["arch"] == "llama" and base["plan"] is None and base["baseline"] is True
    assert base["model"]["num_hidden_layers"] == 4
    assert base["size_bytes"] > manifest["size_bytes"]


def test_stage_errors_leave_nothing(workspace, capsys):
    out = workspace / "gguf"
    assert stage(workspace, "--out", str(out), "-S", "quantize.type=IQ2_XXS") == 2
    assert "quantize.imatrix" in capsys.readouterr().err
    assert stage(workspace, "--out", str(out), "-S", "quantize.type=Q5_9") == 2
    (workspace / "plan.json").unlink()
    assert stage(workspace, "--out", str(out)) == 2
    assert "run the drop stage" in capsys.readouterr().err
    assert not out.exists()


def test_heal_stage_refuses_before_any_work(workspace, hf_tokenizer, capsys):
    other = workspace / "other-model"
    save_pruned(tiny_llama(seed=1, layers=4), other, tokenizer=hf_tokenizer)
    out = workspace / "healed"
    shutil.rmtree(out)
    assert heal_stage(workspace, "-S", "heal.method=linear", "-S", f"model.source={other}") == 2
    assert "made for model" in capsys.readouterr().err and not out.exists()
    # Four calibration samples, all of them held out: nothing would be left to fit on.
    assert heal_stage(workspace, "-S", "heal.method=linear", "-S", "heal.holdout=4") == 2
    assert "leaves no calibration sample" in capsys.readouterr().err and not out.exists()
    assert not list(workspace.glob(".healed*"))
