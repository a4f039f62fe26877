"""The pruned model computes exactly what the plan says, its checkpoint is smaller by exactly the dropped
parameters, and it reloads (logits and cached generation) bit for bit."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from dropquant.errors import DropquantError
from dropquant.params import parse_params
from dropquant.prune.pruned_checkpoint import checkpoint_tensor_bytes, load_pruned, save_pruned
from dropquant.prune.surgery import dropped_parameters, prune_model, summary
from dropquant.prune.selection import DropPlan, select
from tests.conftest import FAMILIES, make_tiny

torch.set_num_threads(1)
L = 6


def tiny(seed=0, tie=False, hidden=64, intermediate=128, layers=L, family="llama"):
    return make_tiny(family, seed=seed, layers=layers, vocab=96, hidden=hidden, intermediate=intermediate, tie=tie,
                     noise=0.05, eos_token_id=None, pad_token_id=0)


def ids(seed=1, batch=2, length=10):
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def plan(method="attn", attn=(), mlp=(), blocks=(), layers=L):
    return DropPlan(method=method, n=len(attn) + len(mlp) + len(blocks), selection="explicit",
                    attn=sorted(attn), mlp=sorted(mlp), blocks=sorted(blocks), num_layers=layers)


PLANS = {
    "none": plan("none"),
    "attn": plan("attn", attn=[0, 2, 5]),
    "mlp": plan("mlp", mlp=[1, 4]),
    "block": plan("block", blocks=[0, 3]),
    "joint": plan("joint", attn=[1, 3], mlp=[3, 5]),  # layer 3 loses both halves: the identity
    "attn_all": plan("attn", attn=list(range(L))),     # no attention, no KV cache at all
}


@torch.no_grad()
def reference_logits(base, p: DropPlan, input_ids):
    """The plan computed by hand from the unpruned model's modules."""
    m = base.model
    h = m.embed_tokens(input_ids)
    pe = m.rotary_emb(h, torch.arange(input_ids.shape[1])[None])
    for i, layer in enumerate(m.layers):
        if i in p.blocks:
            continue
        if i not in p.attn:
            h = h + layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=pe, attention_mask=None)[0]
        if i not in p.mlp:
            h = h + layer.mlp(layer.post_attention_layernorm(h))
    return base.lm_head(m.norm(h))


@torch.no_grad()
def logits(model, input_ids):
    return model(input_ids).logits


def greedy(model, input_ids, use_cache=True, n=12):
    return model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=use_cache,
                          pad_token_id=0)


@pytest.fixture(scope="module", params=FAMILIES)
def base(request):
    """Each supported family: Qwen2's q/k/v biases and Qwen3's q/k norms must follow their layer's fate."""
    return tiny(family=request.param)


@pytest.mark.parametrize("method", list(PLANS))
def test_pruned_model_computes_the_plan(base, method):
    p = PLANS[method]
    pruned = prune_model(copy.deepcopy(base), p)
    x = ids()
    got = logits(pruned, x)
    if method == "none":
        assert torch.equal(got, logits(base, x))  # bit for bit
    torch.testing.assert_close(got, reference_logits(base, p, x), rtol=1e-5, atol=1e-5)
    s = summary(pruned)
    gone = set(p.blocks) | (set(p.attn) & set(p.mlp))
    assert s["layers"] == L - len(gone)
    assert s["attention_layers"] == L - len(set(p.attn) | set(p.blocks))
    assert s["mlp_layers"] == L - len(set(p.mlp) | set(p.blocks))


def _layer_io(model, k, x):
    seen = {}
    layer = model.model.layers[k]
    def before(mod, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    def after(mod, args, out):
        seen["y"] = out

    h1 = layer.register_forward_pre_hook(before, with_kwargs=True)
    h2 = layer.register_forward_hook(after)
    try:
        logits(model, x)
    finally:
        h1.remove(), h2.remove()
    return seen["x"], seen["y"]


@torch.no_grad()
def test_dropped_attention_layer_is_residual_plus_mlp(base):
    pruned = prune_model(copy.deepcopy(base), plan("attn", attn=[2]))
    layer = pruned.model.layers[2]
    assert layer.self_attn is None and layer.input_layernorm is None
    x, y = _layer_io(pruned, 2, ids())
    orig = base.model.layers[2]
    assert torch.equal(y, x + orig.mlp(orig.post_attention_layernorm(x)))


@torch.no_grad()
def test_dropped_mlp_layer_is_residual_plus_attention(base):
    pruned = prune_model(copy.deepcopy(base), plan("mlp", mlp=[4]))
    layer = pruned.model.layers[4]
    assert layer.mlp is None and layer.post_attention_layernorm is None
    x, y = _layer_io(pruned, 4, ids())
    orig = base.model.layers[4]
    pe = base.model.rotary_emb(x, torch.arange(x.shape[1])[None])
    attn = orig.self_attn(hidden_states=orig.input_layernorm(x), position_embeddings=pe, attention_mask=None)[0]
    torch.testing.assert_close(y, x + attn, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_dropped_block_is_the_identity(base):
    pruned = prune_model(copy.deepcopy(base), plan("block", blocks=[3]))
    # Kept layer 3 is original layer 4; its input is original layer 2's output: nothing happened in between.
    x_after, _ = _layer_io(pruned, 3, ids())
    _, y_before = _layer_io(pruned, 2, ids())
    assert torch.equal(x_after, y_before)
    assert pruned.config.dropquant["kept_layers"] == [0, 1, 2, 4, 5]
    assert pruned.config.num_hidden_layers == 5


@pytest.mark.parametrize("method", list(PLANS))
def test_reload_equals_the_in_memory_model(base, method, tmp_path):
    pruned = prune_model(copy.deepcopy(base), PLANS[method])
    save_pruned(pruned, tmp_path / "pruned")
    again = load_pruned(tmp_path / "pruned")
    x = ids()
    assert torch.equal(logits(again, x), logits(pruned, x))
    prompt = ids(seed=7, batch=1, length=6)
    g = greedy(pruned, prompt)
    assert torch.equal(greedy(again, prompt), g)
    assert torch.equal(greedy(pruned, prompt, use_cache=False), g)


@torch.no_grad()
def test_dropped_attention_has_no_cache_entry_even_at_layer_0(base):
    pruned = prune_model(copy.deepcopy(base), plan("attn", attn=[0, 1, 4]))
    out = pruned(ids(), use_cache=True)
    filled = [layer for layer in out.cache.layers if getattr(layer, "is_initialized", False)]
    assert len(filled) == 3  # one per kept attention layer
    assert sorted(l.self_attn.layer_idx for l in pruned.model.layers if l.self_attn is not None) == [0, 1, 2]
    prompt = ids(seed=3, batch=1, length=5)
    assert torch.equal(greedy(pruned, prompt, n=16), greedy(pruned, prompt, use_cache=False, n=16))
    # A batch with left padding: the cache must track positions through attention-free layer 0.
    batch = torch.cat([prompt, ids(seed=4, batch=1, length=5)])
    assert torch.equal(greedy(pruned, batch, n=8), greedy(pruned, batch, use_cache=False, n=8))


def _module_bytes(state: dict, prefixes) -> int:
    return sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith(tuple(prefixes)))


@pytest.mark.parametrize("method", [m for m in PLANS if m != "none"])
def test_checkpoint_shrinks_by_exactly_the_dropped_parameters(base, method, tmp_path):
    p = PLANS[method]
    save_pruned(prune_model(copy.deepcopy(base), PLANS["none"]), tmp_path / "full")
    save_pruned(prune_model(copy.deepcopy(base), p), tmp_path / "pruned")
    state = base.state_dict()
    prefixes = [f"model.layers.{i}." for i in p.blocks]
    prefixes += [f"model.layers.{i}.{part}." for i in p.attn for part in ("self_attn", "input_layernorm")]
    prefixes += [f"model.layers.{i}.{part}." for i in p.mlp for part in ("mlp", "post_attention_layernorm")]
    expected = _module_bytes(state, prefixes)
    assert expected > 0
    assert checkpoint_tensor_bytes(tmp_path / "full") - checkpoint_tensor_bytes(tmp_path / "pruned") == expected
    assert dropped_parameters(base, p)["bytes"] == expected
    assert checkpoint_tensor_bytes(tmp_path / "full") == _module_bytes(state, [""])
    with open(tmp_path / "pruned" / "model.safetensors", "rb") as f:
        names = set(json.loads(f.read(int.from_bytes(f.read(8), "little"))))
    record = json.loads((tmp_path / "pruned" / "config.json").read_text())["dropquant"]
    assert not any(n.startswith(f"model.layers.{len(record['kept_layers'])}.") for n in names)
    for k in record["dropped_attn"]:  # no tensor of a dropped module is written (kept layers renumbered)
        assert not any(n.startswith((f"model.layers.{k}.self_attn.", f"model.layers.{k}.input_layernorm.")) for n in names)
    for k in record["dropped_mlp"]:
        assert not any(n.startswith((f"model.layers.{k}.mlp.", f"model.layers.{k}.post_attention_layernorm.")) for n in names)


def test_tied_embeddings_stay_tied_and_are_saved_once(tmp_path):
    model = tiny(tie=True)
    pruned = prune_model(model, plan("attn", attn=[1]))
    save_pruned(pruned, tmp_path / "p")
    again = load_pruned(tmp_path / "p")
    assert again.lm_head.weight is again.model.embed_tokens.weight
    from safetensors import safe_open
    with safe_open(str(tmp_path / "p" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    assert torch.equal(logits(again, ids()), logits(pruned, ids()))


def test_loader_reads_an_unpruned_hf_directory(base, tmp_path):
    base.save_pretrained(tmp_path / "hf")
    again = load_pruned(tmp_path / "hf")
    assert torch.equal(logits(again, ids()), logits(base, ids()))


def test_loader_refuses_weights_that_do_not_match_the_config(base, tmp_path):
    from safetensors.torch import load_file, save_file

    pruned = prune_model(copy.deepcopy(base), plan("attn", attn=[2]))
    save_pruned(pruned, tmp_path / "p")
    f = tmp_path / "p" / "model.safetensors"
    state = load_file(str(f))
    extra = dict(state, **{"model.layers.2.self_attn.q_proj.weight": torch.zeros(64, 64)})
    save_file(extra, str(f))
    with pytest.raises(DropquantError, match="unexpected .*layers.2.self_attn.q_proj"):
        load_pruned(tmp_path / "p")
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, str(f))
    with pytest.raises(DropquantError, match="missing .*layers.0.mlp.up_proj"):
        load_pruned(tmp_path / "p")


def test_selection_protect_and_explicit_layers_reach_the_model(base, tmp_path):
    scores = {"importance": {"attn": [0.01, 0.5, 0.5, 0.5, 0.5, 0.02], "mlp": [0.5] * L,
                             "block": [0.01, 0.5, 0.3, 0.5, 0.2, 0.02]}}
    p = select(parse_params({"drop": {"method": "block", "n": 2, "protect": [0, -1]}}), L, scores)
    assert p.blocks == [2, 4]
    pruned = prune_model(copy.deepcopy(base), p)
    assert pruned.config.dropquant["kept_layers"] == [0, 1, 3, 5]
    p = select(parse_params({"drop": {"method": "joint", "layers": {"attn": [5], "mlp": [0]}}}), L, scores)
    pruned = prune_model(copy.deepcopy(base), p)
    rec = pruned.config.dropquant
    assert (rec["dropped_attn"], rec["dropped_mlp"]) == ([5], [0])
    torch.testing.assert_close(logits(pruned, ids()), reference_logits(base, p, ids()), rtol=1e-5, atol=1e-5)


def test_prune_refuses_a_plan_for_another_model(base):
    with pytest.raises(DropquantError, match="8-layer model"):
        prune_model(copy.deepcopy(base), plan("attn", attn=[1], layers=8))
    with pytest.raises(DropquantError, match="already pruned"):
        prune_model(prune_model(copy.deepcopy(base), plan("attn", attn=[1])), plan("attn", attn=[2]))


def test_nemotron_nas_export_round_trips(tmp_path):
    from dropquant.prune.nemotron import export_nemotron, ffn_mult_to_intermediate_size

    model = tiny(hidden=64, intermediate=256)  # DeciLM widths are multiples of 256
    p = plan("joint", attn=[0, 2], mlp=[2, 4], blocks=[])
    pruned = prune_model(model, p)
    save_pruned(pruned, tmp_path / "p")
    export_nemotron(tmp_path / "p", tmp_path / "n")
    config = json.loads((tmp_path / "n" / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    blocks = config["block_configs"]
    assert len(blocks) == config["num_hidden_layers"] == 5  # layer 2 lost both halves: removed
    assert [b["attention"]["no_op"] for b in blocks] == [True, False, False, False, False]
    assert [b["ffn"]["no_op"] for b in blocks] == [False, False, False, True, False]
    assert blocks[0]["attention"]["n_heads_in_group"] is None and blocks[1]["attention"]["n_heads_in_group"] == 2
    assert blocks[3]["ffn"]["ffn_mult"] is None
    assert ffn_mult_to_intermediate_size(blocks[0]["ffn"]["ffn_mult"], 64) == 256
    again = load_pruned(tmp_path / "n")
    assert torch.equal(logits(again, ids()), logits(pruned, ids()))


def test_nemotron_export_refuses_a_width_it_cannot_write(base, tmp_path):
    from dropquant.prune.nemotron import export_nemotron

    save_pruned(prune_model(copy.deepcopy(base), plan("attn", attn=[1])), tmp_path / "p")
    # DeciLM is a Llama: a Qwen model is refused for its family before its FFN width is looked at.
    why = "multiple of 256" if base.config.model_type == "llama" else "writes Llama-family models only"
    with pytest.raises(DropquantError, match=why):
        export_nemotron(tmp_path / "p", tmp_path / "n")
    assert not (tmp_path / "n").exists()


def test_stage_refuses_scores_from_another_model_before_writing(tmp_path, monkeypatch):
    from stages.drop import main

    src = tmp_path / "model"
    tiny().save_pretrained(src)
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"model": {"fingerprint": "0000", "source": "other"},
                                  "importance": {u: [0.1] * L for u in ("attn", "mlp", "block")}}))
    out = dict(plan=tmp_path / "drop", pruned=tmp_path / "pruned", export=tmp_path / "export")
    argv = [f"--{k}={v}" for k, v in out.items()] + [f"--scores={scores}", "--params", str(tmp_path / "none.yaml"),
                                                     "-S", f"model.source={src}"]
    (tmp_path / "none.yaml").write_text("drop: {method: attn, n: 2}\n")
    assert main(argv) == 2
    assert main(argv[:-4] + [f"--scores={tmp_path / 'missing.json'}", "--params", str(tmp_path / "none.yaml"),
                             "-S", f"model.source={src}", "-S", "drop.n=9"]) == 2
    assert not any(p.exists() for p in out.values())


def test_embedded_model_attention_drop_reloads_exactly(embedded_model, tmp_path):
    """Integration: the drop stage on SmolLM2-135M, 8 attention layers, against the same plan applied in memory."""
    from dropquant.model.loading import load_config, model_identity, resolve_source
    from stages.drop import main

    model, tokenizer = embedded_model
    source = resolve_source("embedded")
    n = model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    imp = {u: torch.rand(n, generator=gen).tolist() for u in ("attn", "mlp", "block")}
    imp["attn"][0] = 0.0  # make sure layer 0's attention goes: the cache must still track positions
    scores = {"model": model_identity(load_config(source), source), "metric": "cosine", "importance": imp}
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    (tmp_path / "params.yaml").write_text("model: {source: embedded}\ndrop: {method: attn, n: 8}\n")
    rc = main(["--params", str(tmp_path / "params.yaml"), f"--scores={tmp_path / 'scores.json'}",
               f"--calibration={tmp_path / 'calibration'}",
               f"--plan={tmp_path / 'drop'}", f"--pruned={tmp_path / 'pruned'}", f"--export={tmp_path / 'export'}"])
    assert rc == 0
    plan_json = json.loads((tmp_path / "drop" / "plan.json").read_text())
    want = sorted(sorted(range(n), key=lambda i: (imp["attn"][i], i))[:8])
    assert plan_json["attn"] == want and 0 in want
    assert plan_json["size"]["pruned_tensor_bytes"] == checkpoint_tensor_bytes(tmp_path / "pruned")
    assert plan_json["size"]["base_tensor_bytes"] - plan_json["size"]["pruned_tensor_bytes"] == plan_json["size"]["dropped_bytes"]

    reloaded = load_pruned(tmp_path / "pruned")
    in_memory = prune_model(copy.deepcopy(model), DropPlan.from_json(plan_json))
    x = tokenizer(["The capital of France is", "Water boils at a temperature of"], return_tensors="pt",
                  padding=True).input_ids
    assert torch.equal(logits(reloaded, x), logits(in_memory, x))
    prompt = tokenizer("Once upon a time", return_tensors="pt").input_ids
    out_mem = in_memory.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(reloaded.generate(prompt, max_new_tokens=12, do_sample=False), out_mem)
    assert torch.equal(in_memory.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False), out_mem)
    assert summary(model)["attention_layers"] == n  # the session fixture was not modified
