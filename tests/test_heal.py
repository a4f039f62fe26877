"""Healing after the drop: the closed-form linear stand-ins (fit, layout, reload, GGUF parity) and distillation."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dropquant.errors import DropquantError
from dropquant.heal.linear import fit_linear, healed_record, write_healed
from dropquant.model.layerwise import InMemoryStack
from dropquant.prune.pruned_checkpoint import load_pruned, save_pruned
from dropquant.prune.surgery import prune_model
from tests.conftest import make_tiny, make_tiny_llama
from tests.gguf_helpers import check_q8_0_runs, llama_logits, plan, random_ids, tiny_llama, torch_logits

torch.set_num_threads(1)


class LinearAttention(torch.nn.Module):
    """An attention module that is exactly linear in its (normed) input: what a stand-in can reproduce."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, hidden_states, **kwargs):
        return hidden_states @ self.weight.T, None


def _ids(n=6, seq=32, vocab=128, seed=0):
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _healed(base, p, tmp_path, ids, **fit_kw):
    """The pruned checkpoint of `base` under plan `p`, healed with stand-ins fitted on `ids`; (dir, fit)."""
    save_pruned(prune_model(copy.deepcopy(base), p), tmp_path / "pruned")
    fit = fit_linear(InMemoryStack(base), p, ids, progress=False, **{"ridge": 1e-4, **fit_kw})
    write_healed(tmp_path / "pruned", tmp_path / "healed", p, "test", fit)
    return tmp_path / "healed", fit


def _reference_forward(base, p, fit, ids):
    """The healed model by hand from the unpruned model's modules and the fitted weights."""
    from dropquant.model.layerwise import _batch_kwargs

    attn_gone, mlp_gone = set(p.attn) | set(p.blocks), set(p.mlp) | set(p.blocks)
    m = base.model
    with torch.no_grad():
        h = m.embed_tokens(ids)
        kw = _batch_kwargs(InMemoryStack(base), m.rotary_emb, h)
        for i, layer in enumerate(m.layers):
            if i in attn_gone:
                h = h + layer.input_layernorm(h) @ fit.weights[i].T
            else:
                h = h + layer.self_attn(hidden_states=layer.input_layernorm(h), **kw)[0]
            if i not in mlp_gone:
                h = h + layer.mlp(layer.post_attention_layernorm(h))
        return base.lm_head(m.norm(h))


@pytest.mark.parametrize("fit_on", ["healed", "base"])
def test_closed_form_fit_reproduces_a_layer_that_is_linear(fit_on):
    base = make_tiny_llama(layers=4)
    truth = torch.randn(64, 64, generator=torch.Generator().manual_seed(3)) * 0.1
    base.model.layers[2].self_attn = LinearAttention(truth.clone())
    fit = fit_linear(InMemoryStack(base), plan(attn=[2], layers=4), _ids(), ridge=0.0, fit_on=fit_on, progress=False)
    assert torch.allclose(fit.weights[2], truth, atol=1e-4)
    assert fit.explained[2] == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(fit.norms[2], base.model.layers[2].input_layernorm.weight.detach())


def test_healed_layout_keeps_a_dropped_block_as_a_linear_layer():
    p = plan(attn=[0, 2], mlp=[1, 2], blocks=[4], layers=6)
    pruned_record = {"base_num_hidden_layers": 6, "kept_layers": [0, 1, 3, 5], "dropped_attn": [0], "dropped_mlp": [1],
                     "plan_id": "p"}
    rec = healed_record(p, pruned_record, [0, 2, 4])
    assert rec["kept_layers"] == [0, 1, 2, 3, 4, 5]
    assert (rec["dropped_attn"], rec["dropped_mlp"], rec["linear_attn"]) == ([0, 2, 4], [1, 2, 4], [0, 2, 4])
    assert rec["plan_id"] == "p"


@pytest.mark.parametrize("fit_on", ["healed", "base"])
def test_healed_reload_equals_the_healed_model_by_hand(fit_on, tmp_path):
    base = make_tiny_llama(layers=6)
    p = plan(attn=[0, 2], mlp=[1], blocks=[4], layers=6)
    ids = _ids()
    healed_dir, fit = _healed(base, p, tmp_path, ids, fit_on=fit_on)
    assert sorted(fit.weights) == [0, 2, 4]
    healed = load_pruned(healed_dir)
    rec = healed.config.dropquant
    assert rec["kept_layers"] == [0, 1, 2, 3, 4, 5] and rec["linear_attn"] == [0, 2, 4] and rec["heal_id"] == "test"
    assert [layer.self_attn is None for layer in healed.model.layers] == [True, False, True, False, True, False]
    with torch.no_grad():
        got = healed(ids[:2]).logits
    assert torch.allclose(got, _reference_forward(base, p, fit, ids[:2]), atol=1e-5)
    # The stand-ins win back part of what the drop lost (on the tokens they were fitted on).
    with torch.no_grad():
        ref = base(ids).logits.log_softmax(-1)
        kl = {name: (ref.exp() * (ref - m(ids).logits.log_softmax(-1))).sum(-1).mean().item()
              for name, m in (("healed", healed), ("pruned", load_pruned(tmp_path / "pruned")))}
    assert kl["healed"] < kl["pruned"]


def test_a_plan_for_another_model_is_refused_before_any_work():
    base = make_tiny_llama(layers=4)
    with pytest.raises(DropquantError, match="6-layer model"):
        fit_linear(InMemoryStack(base), plan(attn=[1], layers=6), _ids(), ridge=1e-3, progress=False)


# --- GGUF: the stand-ins are deci's linear attention, exactly ---------------------------------------------

@pytest.mark.parametrize("drops", [{"attn": [0, 3]}, {"attn": [2], "blocks": [0, 4]}, {"attn": [1], "mlp": [1, 3]}],
                         ids=["attn-with-layer-0", "blocks-with-layer-0", "attn-and-mlp-same-layer"])
def test_gguf_parity_of_linear_standins(drops, tmp_path, tokenizer_gguf):
    import gguf

    from dropquant.gguf.export import ARCH_DECI, export_checkpoint

    base = tiny_llama()
    p = plan(**drops)
    ids = torch.tensor([random_ids(48, seed=s) for s in range(4)])
    healed_dir, fit = _healed(base, p, tmp_path, ids)
    healed = load_pruned(healed_dir)
    test_ids = random_ids(48, seed=11)
    ref = torch_logits(healed, test_ids)
    info = export_checkpoint(healed_dir, tmp_path / "model.gguf", tokenizer_gguf=tokenizer_gguf)
    assert info.arch == ARCH_DECI
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    hc = list(reader.fields["deci.attention.head_count"].contents())
    kv = list(reader.fields["deci.attention.head_count_kv"].contents())
    linear = [b for b, blk in enumerate(info.blocks) if blk.attn == "linear"]
    assert len(linear) == len(fit.weights)
    assert all(hc[b] == 4 and kv[b] == 0 for b in linear)  # head_count > 0 (block 0 sets the head size), no KV
    got = llama_logits(tmp_path / "model.gguf", test_ids)
    assert np.abs(got - ref).max() <= 1e-2
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    check_q8_0_runs(tmp_path / "model.gguf", tmp_path, ref, test_ids)


def test_linear_standins_with_no_attention_left_are_refused(tmp_path, tokenizer_gguf):
    from dropquant.gguf.export import export_checkpoint

    base = tiny_llama()
    healed_dir, _ = _healed(base, plan(attn=range(6)), tmp_path, torch.tensor([random_ids(32)]))
    with pytest.raises(DropquantError, match="no attention layer left"):
        export_checkpoint(healed_dir, tmp_path / "model.gguf", tokenizer_gguf=tokenizer_gguf)
    assert not (tmp_path / "model.gguf").exists()


# --- distillation ------------------------------------------------------------------------------------------

def _distill(what, steps=12, seed=0, hidden_weight=0.0, lr=5e-3, precision="float32"):
    from dropquant.heal.distill import distill, teacher_targets

    base = make_tiny("llama", layers=4, noise=0.1)  # large weights: the drop costs the tiny model a real KL
    student = prune_model(copy.deepcopy(base), plan(attn=[1, 2], layers=4))
    ids = _ids(n=8, seq=32)
    targets = teacher_targets(InMemoryStack(base), ids, topk=16, hidden=hidden_weight > 0, progress=False)
    return distill(student, targets.select(slice(0, 6)), targets.select(slice(6, None)), what=what, lora_rank=4,
                   steps=steps, lr=lr, batch_size=2, hidden_weight=hidden_weight, eval_every=4, patience=3,
                   seed=seed, precision=precision, progress=False)


@pytest.mark.parametrize("what", ["norms", "lora", "all"])
def test_a_few_distillation_steps_lower_the_heldout_kl(what):
    model, result = _distill(what, lr=3e-4 if what == "all" else 5e-3)
    assert result.heldout_kl_best < result.heldout_kl_start
    assert result.trainable_params > 0
    assert not any("lora" in n for n, _ in model.named_parameters())  # LoRA merged back: a plain model


def test_hidden_state_matching_trains_too():
    _, result = _distill("norms", hidden_weight=1.0)
    assert result.heldout_kl_best < result.heldout_kl_start


def test_distillation_is_deterministic_for_a_seed():
    a, ra = _distill("lora", steps=6, seed=1)
    b, rb = _distill("lora", steps=6, seed=1)
    assert ra.heldout == rb.heldout
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_distillation_log_quotes_the_best_including_the_current_evaluation(caplog):
    # It quoted the best before the current evaluation: "step 20: KL 0.1418 (best 0.1684 at step 0)".
    import re

    with caplog.at_level("INFO", logger="dropquant.heal.distill"):
        _, result = _distill("norms")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == len(result.heldout) - 1 and any("new best" in line for line in lines)
    best, best_step = result.heldout[0][1], 0
    for (step, kl), line in zip(result.heldout[1:], lines):
        if kl < best:
            best, best_step = kl, step
            assert line == f"step {step}: held-out KL {kl:.4f} (new best)"
        else:
            assert line == f"step {step}: held-out KL {kl:.4f} (best {best:.4f} at step {best_step})"
            assert float(re.search(r"best ([0-9.]+)", line).group(1)) <= round(kl, 4)


def _needs_bf16():
    from dropquant.heal.distill import bf16_supported

    if not bf16_supported("cpu"):
        pytest.skip("this CPU has no bfloat16 arithmetic (AVX512-BF16 or AMX)")


def test_bfloat16_distillation_trains_deterministically_and_exports_float32():
    _needs_bf16()
    a, ra = _distill("lora", seed=1, precision="bfloat16")
    b, rb = _distill("lora", seed=1, precision="bfloat16")
    assert ra.precision == "bfloat16"
    assert ra.heldout_kl_best < ra.heldout_kl_start
    assert ra.heldout == rb.heldout
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert pa.dtype == torch.float32 and torch.equal(pa, pb), name
    _, r32 = _distill("lora", seed=1)
    assert ra.heldout != r32.heldout  # the training forward really ran in bfloat16


def test_bfloat16_without_hardware_support_is_refused_before_any_work(monkeypatch, tmp_path):
    import dropquant.heal.distill
    from dropquant.heal.apply import heal
    from dropquant.params import HealParams

    monkeypatch.setattr(dropquant.heal.distill, "bf16_supported", lambda device: False)
    p = plan(attn=[1], layers=4)
    with pytest.raises(DropquantError, match="heal.precision=bfloat16"):
        heal(method="linear+distill", heal_params=HealParams(method="linear+distill", precision="bfloat16"),
             plan={**p.to_json(), "plan_id": "x"}, pruned_dir=tmp_path, out_dir=tmp_path / "out", tokens=_ids(),
             calibration_sha256="x", open_base=lambda: pytest.fail("work started"), dtype=torch.float32,
             device="cpu", progress=False)


def test_bucket_kl_is_the_full_kl_when_k_is_the_vocabulary():
    from dropquant.heal.distill import bucket_kl

    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(3, 5, 20, generator=g), torch.randn(3, 5, 20, generator=g)
    tl = t.log_softmax(-1)
    full = (tl.exp() * (tl - s.log_softmax(-1))).sum(-1).mean()
    values, ids = tl.topk(20, dim=-1)
    assert bucket_kl(s, ids, values).item() == pytest.approx(full.item(), rel=1e-4)
    values, ids = tl.topk(5, dim=-1)
    assert bucket_kl(s, ids, values).item() <= full.item() + 1e-6  # fewer buckets: a lower bound


# --- nothing dropped, nothing to heal ----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["linear", "distill", "linear+distill"])
def test_a_plan_that_drops_nothing_is_not_healed(method, tmp_path, caplog):
    """Was: heal.method=distill on drop.method=none trained the unpruned model towards itself (held-out KL 0)."""
    from dropquant.heal.apply import heal
    from dropquant.params import HealParams

    p = plan(layers=4)
    with caplog.at_level("INFO", logger="dropquant.heal.apply"):
        record = heal(method=method, heal_params=HealParams(method=method), plan={**p.to_json(), "plan_id": "x"},
                      pruned_dir=tmp_path, out_dir=tmp_path / "out", tokens=None, calibration_sha256=None,
                      open_base=lambda: pytest.fail("work started"), dtype=torch.float32, device="cpu",
                      progress=False)
    assert record["checkpoint"] is None and record["method"] == method and record["skipped"]
    assert [r.getMessage() for r in caplog.records] == [
        f"heal.method={method}: the drop plan removes nothing, so there is nothing to heal; the pruned checkpoint "
        "is used as it is"]


def test_heal_stage_skips_an_empty_plan_and_quantize_exports_it(tmp_path, monkeypatch, hf_tokenizer):
    """No calibration tokens are needed, and the downstream stages take the skipped heal as the pruned model."""
    import json

    from stages.__main__ import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    source = tmp_path / "src"
    make_tiny("llama", layers=4, vocab=len(hf_tokenizer)).save_pretrained(source)
    hf_tokenizer.save_pretrained(source)
    overrides = ["-S", f"model.source={source}", "-S", "drop.method=none", "-S", "heal.method=distill",
                 "-S", "quantize.type=F32"]
    for stage in ("drop", "heal", "quantize"):
        assert main([stage, "--params", "params.yaml", *overrides]) == 0, stage
    record = json.loads((tmp_path / "data" / "healed" / "heal.json").read_text())
    assert record["method"] == "distill" and record["checkpoint"] is None and record["skipped"]
    manifest = json.loads((tmp_path / "data" / "gguf" / "manifest.json").read_text())
    assert manifest["heal"]["method"] == "distill" and manifest["arch"] == "llama"
    assert not (tmp_path / "data" / "calibration").exists()


def test_kl_recovered_is_measured_on_the_same_heldout_tokens(tmp_path):
    """The heal record's held-out KL of the unhealed and the healed checkpoint, from which evaluate reports the
    share recovered (README's heal table headline)."""
    from dropquant.heal.recovered import heldout_recovery, recovered_share

    base = make_tiny_llama(layers=6)
    p = plan(attn=[0, 2], mlp=[1], blocks=[4], layers=6)
    ids = _ids(n=8)
    healed_dir, _ = _healed(base, p, tmp_path, ids[:6])
    got = heldout_recovery(lambda: InMemoryStack(base), tmp_path / "pruned", healed_dir, ids[6:], topk=16)
    assert got["tokens"] == 2 * 32 and got["samples"] == 2
    # (A random model fitted on 6 samples need not generalise: only the bookkeeping is checked here.)
    assert got["healed"] > 0 and got["unhealed"] > 0 and got["healed"] != got["unhealed"]
    assert got["recovered"] == pytest.approx(recovered_share(got["unhealed"], got["healed"]), rel=1e-3)
    same = heldout_recovery(lambda: InMemoryStack(base), tmp_path / "pruned", tmp_path / "pruned", ids[6:], topk=16)
    assert same["recovered"] == pytest.approx(0.0, abs=1e-9)
    assert recovered_share(0.0, 0.0) is None and recovered_share(0.4, 0.5) == pytest.approx(-0.25)
