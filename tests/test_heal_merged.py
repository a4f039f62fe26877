"""The merged heal: a linear map per cut folded into the kept projection before it (no parameter added)."""
from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch

from dropquant.heal.linear import write_healed
from dropquant.heal.merged import Cut, fallback_layers, fit_merged, plan_cuts
from dropquant.model.layerwise import InMemoryStack
from dropquant.prune.pruned_checkpoint import load_pruned, save_pruned
from dropquant.prune.surgery import prune_model
from tests.conftest import make_tiny_llama
from tests.gguf_helpers import check_q8_0_runs, llama_logits, plan, random_ids, tiny_llama, torch_logits

torch.set_num_threads(1)


def _ids(n=8, seq=32, vocab=128, seed=0):
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


class _ReadsTail(torch.nn.Module):
    """An attention that adds (the last `k` residual dimensions)·A."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = a

    def forward(self, hidden_states=None, **kwargs):
        return hidden_states[..., -self.a.shape[0]:] @ self.a, None


def _linear_in_host(drops: dict, layer: int = 2, k: int = 16):
    """A tiny Llama in which only MLP(layer-1) writes the last k residual dimensions, and layer `layer`'s
    attention (no norm) adds those dimensions times A (its MLP adds nothing when the block is dropped): the
    dropped part is exactly the host's output times a matrix, so the merged heal can reproduce the model."""
    base = make_tiny_llama(layers=4)
    m = base.model
    with torch.no_grad():
        m.embed_tokens.weight[:, -k:] = 0
        for i, blk in enumerate(m.layers):
            blk.self_attn.o_proj.weight[-k:] = 0
            down = blk.mlp.down_proj.weight
            down[:-k] = 0 if i == layer - 1 else down[:-k]
            down[-k:] = down[-k:] if i == layer - 1 else 0
        if drops.get("blocks"):
            m.layers[layer].mlp.down_proj.weight.zero_()
    m.layers[layer].input_layernorm = torch.nn.Identity()
    m.layers[layer].self_attn = _ReadsTail(torch.randn(k, 64, generator=torch.Generator().manual_seed(3)) * 0.3)
    return base


def _merged(base, p, tmp_path, ids, **kw):
    save_pruned(prune_model(copy.deepcopy(base), p), tmp_path / "pruned")
    fit = fit_merged(InMemoryStack(base), p, ids, progress=False, **{"ridge": 0.0, **kw})
    write_healed(tmp_path / "pruned", tmp_path / "healed", p, "test", fit.standins, fit.folded())
    return tmp_path / "healed", fit


@pytest.mark.parametrize("form", ["map", "projection"])
@pytest.mark.parametrize("fit_on", ["base", "healed"])
@pytest.mark.parametrize("drops", [{"attn": [2]}, {"blocks": [2]}], ids=["attention", "block"])
def test_merged_heal_reproduces_a_drop_that_is_linear_in_its_host(drops, fit_on, form, tmp_path):
    base = _linear_in_host(drops)
    ids = _ids()
    healed_dir, fit = _merged(base, plan(**drops, layers=4), tmp_path, ids, fit_on=fit_on, form=form, ridge=1e-9)
    assert sorted(fit.maps) == [3]  # MLP 1 hosts
    assert fit.explained[3] == pytest.approx(1.0, abs=1e-5) and fit.plain[3] < 0.9
    healed = load_pruned(healed_dir)
    assert sum(p.numel() for p in healed.parameters()) == sum(p.numel() for p in load_pruned(tmp_path / "pruned")
                                                               .parameters())
    with torch.no_grad():
        want, got = base(ids[:2]).logits, healed(ids[:2]).logits
        plain = load_pruned(tmp_path / "pruned")(ids[:2]).logits
    assert (got - want).abs().max() < 1e-3 < (plain - want).abs().max()


def test_cuts_join_adjacent_drops_and_find_the_kept_sublayer_before_them():
    # blocks 1 + attention 2: one cut into MLP 0; MLP 3 + attention 4: a cut into attention 3's o_proj.
    cuts = plan_cuts(plan(attn=[2, 4], mlp=[3], blocks=[1], layers=6))
    assert cuts == [Cut(2, 4), Cut(7, 8)]
    assert [c.describe() for c in cuts] == ["attn 1 .. attn 2 into mlp 0", "mlp 3 .. attn 4 into attn 3"]
    assert plan_cuts(plan(attn=[0, 1], layers=4))[0].host is None
    assert fallback_layers(plan(attn=[2], blocks=[0, 1], layers=4)) == [0, 1, 2]
    assert fallback_layers(plan(attn=[0], blocks=[2], layers=4)) == [0]
    assert fallback_layers(plan(attn=[1], layers=4)) == []


def test_a_dropped_host_extends_the_cut_to_the_sublayer_before_it(tmp_path):
    """Attention 2's natural host (MLP 1) is dropped too: one map at attention 1's o_proj covers both."""
    base = make_tiny_llama(layers=4)
    p = plan(attn=[2], mlp=[1], layers=4)
    ids = _ids()
    healed_dir, fit = _merged(base, p, tmp_path, ids, ridge=1e-3)
    assert sorted(fit.maps) == [2] and fit.cuts == [Cut(3, 4)]
    healed, pruned = load_pruned(healed_dir), load_pruned(tmp_path / "pruned")
    changed = [n for n, t in healed.state_dict().items() if not torch.equal(t, pruned.state_dict()[n])]
    assert changed == ["model.layers.1.self_attn.o_proj.weight"]
    with torch.no_grad():
        ref = base(ids).logits.log_softmax(-1)
        kl = {name: (ref.exp() * (ref - m(ids).logits.log_softmax(-1))).sum(-1).mean().item()
              for name, m in (("healed", healed), ("pruned", pruned))}
    assert kl["healed"] < kl["pruned"]


@pytest.mark.parametrize("fallback", ["linear", "none"])
def test_a_cut_at_the_first_attention_falls_back_as_asked(fallback, tmp_path, caplog):
    base = make_tiny_llama(layers=4)
    p = plan(attn=[0, 2], layers=4)
    with caplog.at_level(logging.INFO, logger="dropquant.heal.merged"):
        healed_dir, fit = _merged(base, p, tmp_path, _ids(), ridge=1e-3, fallback=fallback)
    assert sorted(fit.maps) == [3]
    healed = load_pruned(healed_dir)
    if fallback == "linear":
        assert sorted(fit.standins.weights) == [0] and healed.config.dropquant["linear_attn"] == [0]
        assert any("heal.fallback=linear" in r.getMessage() for r in caplog.records)
    else:
        assert not fit.standins.weights and not healed.config.dropquant["linear_attn"]


def test_a_merged_block_drop_is_a_plain_checkpoint(tmp_path):
    """Vanilla transformers loads it with no missing or unexpected weight, and computes what dropquant does."""
    from transformers import AutoModelForCausalLM

    base = make_tiny_llama(layers=6)
    healed_dir, fit = _merged(base, plan(blocks=[2, 3], layers=6), tmp_path, _ids(), ridge=1e-3)
    assert sorted(fit.maps) == [3]
    vanilla, info = AutoModelForCausalLM.from_pretrained(healed_dir, output_loading_info=True)
    assert not any(info.values()), info
    assert vanilla.config.num_hidden_layers == 4
    ids = _ids(n=2)
    with torch.no_grad():
        assert torch.equal(vanilla.eval()(ids).logits, load_pruned(healed_dir)(ids).logits)


@pytest.mark.parametrize("drops", [{"blocks": [2, 3]}, {"attn": [1, 4]}], ids=["block", "attention"])
def test_gguf_parity_of_a_merged_heal(drops, tmp_path, tokenizer_gguf):
    from dropquant.gguf.export import ARCH_DECI, export_checkpoint

    base = tiny_llama()
    ids = torch.tensor([random_ids(48, seed=s) for s in range(4)])
    healed_dir, fit = _merged(base, plan(**drops), tmp_path, ids, ridge=1e-3)
    assert fit.maps
    healed = load_pruned(healed_dir)
    test_ids = random_ids(48, seed=11)
    ref = torch_logits(healed, test_ids)
    info = export_checkpoint(healed_dir, tmp_path / "model.gguf", tokenizer_gguf=tokenizer_gguf)
    assert info.arch == ("llama" if "blocks" in drops else ARCH_DECI)
    got = llama_logits(tmp_path / "model.gguf", test_ids)
    assert np.abs(got - ref).max() <= 1e-2
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    check_q8_0_runs(tmp_path / "model.gguf", tmp_path, ref, test_ids)


@pytest.mark.parametrize("method", ["merged", "merged+distill"])
def test_heal_writes_the_merged_record(method, tmp_path):
    from dropquant.heal.apply import heal
    from dropquant.params import HealParams

    base = make_tiny_llama(layers=4)
    p = plan(attn=[0, 2], layers=4)
    save_pruned(prune_model(copy.deepcopy(base), p), tmp_path / "pruned")
    hp = HealParams(method=method, steps=2, eval_every=1, holdout=2)
    record = heal(method=method, heal_params=hp, plan={**p.to_json(), "plan_id": "x"}, pruned_dir=tmp_path / "pruned",
                  out_dir=tmp_path / "out", tokens=_ids(n=8), calibration_sha256="c", open_base=lambda: InMemoryStack(base),
                  dtype=torch.float32, device="cpu", progress=False)
    m = record["merged"]
    assert [c["cut"] for c in m["cuts"]] == ["attn 0", "attn 2 into mlp 1"]
    assert m["fallback_layers"] == [0] and m["params_added"] == 64 * 64 + 64 and m["params_changed"] == 128 * 64  # MLP 1's down_proj
    assert record["checkpoint"] == "model" and ("distill" in record) == (method == "merged+distill")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"]  # the merged student removed
    assert json.loads((tmp_path / "out" / "model" / "config.json").read_text())["dropquant"]["heal_id"] == \
        record["heal_id"]


def test_the_cosine_objective_refines_the_least_squares_fit_deterministically(tmp_path):
    base = make_tiny_llama(layers=4)
    p, ids = plan(attn=[2], layers=4), _ids()
    fits = [fit_merged(InMemoryStack(base), p, ids, ridge=0.3, objective=o, cosine_steps=20, cosine_lr=1e-3,
                       progress=False) for o in ("ls", "cosine", "cosine")]
    assert torch.equal(fits[1].maps[3], fits[2].maps[3])
    assert not torch.allclose(fits[0].maps[3], fits[1].maps[3])
