"""The search (dropquant/search) on a tiny random Llama over a small space: the same pick as measuring every
candidate, a step back when the estimate is optimistic, one clear message for an impossible budget, no work
twice, bad axes refused before any work. The flow end to end is in tests/test_flows.py."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import SHARED_DATA
from dropquant.errors import DropquantError
from dropquant.search.pick import NoCandidate, search
from dropquant.search.space import Candidate, Space, check_space
from flow_helpers import make_tiny_model

SPACE = Space(["attn", "block"], [0, 1, 2], ["Q8_0", "Q4_0"])


@pytest.fixture(scope="module")
def tiny_params(tmp_path_factory):
    from dropquant.params import parse_params

    model = make_tiny_model(tmp_path_factory.mktemp("search-model") / "tiny")
    return parse_params({"model": {"source": str(model)},
                         "drop": {"selection": "reverse"},  # no scores needed: the last n modules
                         "eval": {"fidelity_tokens": 512, "data_dir": str(SHARED_DATA), "threads": 1}})


def _bench(params, cache):
    from dropquant.search.workbench import Workbench

    return Workbench(params, None, "none", cache, estimate_tokens=512, threads=1, progress=False)


@pytest.fixture(scope="module")
def grid_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("grid")


@pytest.fixture(scope="module")
def grid(tiny_params, grid_cache):
    """Every candidate of SPACE measured: the ground truth (its cache serves the tests that need no fresh
    measurement)."""
    bench = _bench(tiny_params, grid_cache)
    try:
        return {c: bench.measure(c) for c in SPACE.candidates()}
    finally:
        bench.close()


def _grid_pick(grid, budget):
    return min((r["size_bytes"], r["kld"]) for r in grid.values() if r["kld"] <= budget)


def _budgets(grid):
    """Budgets between the measured KLs, so each one changes the pick."""
    kls = sorted({round(r["kld"], 6) for r in grid.values()})
    return [(a + b) / 2 for a, b in zip(kls, kls[1:])][1::3]


@pytest.fixture(scope="module")
def searched(tiny_params, grid, tmp_path_factory):
    """A cold search (its own empty cache) per budget: budget -> (result, measured count, cache folder)."""
    out = {}
    for budget in _budgets(grid):
        cache = tmp_path_factory.mktemp("search")
        bench = _bench(tiny_params, cache)
        try:
            out[budget] = (search(bench, SPACE, budget), bench.counts["measured"], cache)
        finally:
            bench.close()
    return out


def test_the_search_picks_what_the_exhaustive_grid_picks(grid, searched):
    assert len(searched) >= 3
    for budget, (result, measured, _) in searched.items():
        size, kld = _grid_pick(grid, budget)
        assert result.pick.measured["size_bytes"] == size, (budget, result.pick.candidate, result.notes)
        assert result.pick.measured["kld"] <= budget
        assert measured < len(grid)  # cheaper than the grid: not every candidate is measured
        entries = {e.candidate: e for e in result.entries}
        assert all(entries[c].measured is None or entries[c].measured["kld"] == pytest.approx(grid[c]["kld"], rel=1e-6)
                   for c in grid)


def test_an_optimistic_estimate_makes_it_step_back(tiny_params, grid, tmp_path):
    budget = _budgets(grid)[1]
    bench = _bench(tiny_params, tmp_path / "optimistic")
    real = bench.estimate
    bench.estimate = lambda drops: {k: v * 0.01 for k, v in real(drops).items()}  # far too optimistic
    try:
        result = search(bench, SPACE, budget, slack=0.0)
    finally:
        bench.close()
    assert result.stepped_back, "the first measured pick was within budget: the estimate was not optimistic"
    for name in result.stepped_back:
        entry = next(e for e in result.entries if e.candidate.name == name)
        assert entry.status == "measured over budget" and entry.measured["kld"] > budget
    assert result.pick.measured["size_bytes"] == _grid_pick(grid, budget)[0]


def test_an_impossible_budget_names_the_best_candidate(tiny_params, grid, grid_cache):
    space = Space(["attn"], [0, 1], ["Q4_0"])
    best = min(grid[c]["kld"] for c in space.candidates())
    bench = _bench(tiny_params, grid_cache)
    try:
        with pytest.raises(NoCandidate) as err:
            search(bench, space, 1e-9)
    finally:
        bench.close()
    assert "no candidate meets KL <= 1e-09" in str(err.value)
    assert f"{best:.4f}" in str(err.value)


def test_a_search_run_again_measures_nothing_again(tiny_params, searched):
    budget, (first, measured, cache) = next(iter(searched.items()))
    assert measured > 0
    again = _bench(tiny_params, cache)
    try:
        b = search(again, SPACE, budget)
    finally:
        again.close()
    assert again.counts["measured"] == 0 and again.counts["reused"] >= measured
    assert b.pick.candidate == first.pick.candidate


@pytest.mark.parametrize("space, message", [
    (Space(["attn", "heads"], [1], ["Q8_0"]), "unknown drop method(s) ['heads']"),
    (Space(["attn"], [1], ["Q8_0", "Q9_X"]), "unknown quant type 'Q9_X'"),
    (Space(["attn"], [1], ["mix:4.8bits"]), "quantize.target='4.8bits'"),
    (Space(["attn"], [1], ["Q8_0"], ["none", "magic"]), "unknown heal method(s) ['magic']"),
    (Space(["attn"], [1], ["IQ2_XS"]), "need an importance matrix"),
])
def test_bad_axes_are_refused(space, message):
    with pytest.raises(DropquantError, match=re.escape(message)):
        check_space(space)


@pytest.mark.parametrize("section, values, message", [
    ("quantize", {"imatrix": True}, "quantize.imatrix is true"),
    ("drop", {"layers": {"attn": [1], "mlp": [], "blocks": []}}, "drop.layers is set"),
])
def test_parameters_the_search_cannot_honour_are_refused(tiny_params, tmp_path, section, values, message):
    params = tiny_params.model_copy(deep=True)
    setattr(params, section, getattr(params, section).model_copy(update=values))
    with pytest.raises(DropquantError, match=message):
        _bench(params, tmp_path / "refused")


def test_an_impossible_n_is_refused_before_any_measurement(tiny_params, tmp_path):
    bench = _bench(tiny_params, tmp_path / "n")
    try:
        with pytest.raises(DropquantError, match="drop.n"):
            search(bench, Space(["block"], [0, 9], ["Q8_0"]), 0.5)
    finally:
        bench.close()
    assert bench.counts == {"measured": 0, "reused": 0, "estimated": 0}


def test_the_estimate_is_the_kl_of_the_pruned_model(tiny_params, tmp_path):
    """The multi-stream layer-wise estimate equals the KL computed from two whole-model forwards."""
    import copy

    from dropquant.prune.surgery import prune_model
    from dropquant.search.estimate import Drop, estimate_kl
    from dropquant.model.layerwise import InMemoryStack

    bench = _bench(tiny_params, tmp_path / "est")
    model = bench.model()
    plan = bench.plan("joint", 3)
    ids = torch.randint(0, 49152, (2, 64))
    kl, base = estimate_kl(InMemoryStack(model), ids, {"p": Drop.of(plan)}, progress=False)
    pruned = prune_model(copy.deepcopy(model), plan)
    with torch.no_grad():
        lb = torch.log_softmax(model(ids).logits[:, 32:63].float(), -1)
        lv = torch.log_softmax(pruned(ids).logits[:, 32:63].float(), -1)
    expected = float((lb.exp() * (lb - lv)).sum(-1).mean())
    bench.close()
    assert kl["p"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert torch.allclose(base, lb, atol=1e-5)


def test_candidate_names_are_the_sweeps():
    from flows.plan import variant_name

    for c in (Candidate("attn", 4, "Q8_0"), Candidate("joint", 0, "Q4_K_M"), Candidate("block", 2, "Q6_K", "linear"),
              Candidate("attn", 2, "mix:4.8bpw")):
        method, n = c.drop
        assert c.name == variant_name(method, n, c.quant_type, c.heal)
    mixed = Candidate("attn", 2, "mix:4.8bpw")
    assert mixed.name == "attn-2-mix-4.8bpw"
    assert "quantize.type=mix" in mixed.overrides() and "quantize.target=4.8bpw" in mixed.overrides()
    assert "quantize.target=null" in Candidate("attn", 2, "Q8_0").overrides()


def test_a_mix_target_is_one_more_quant_type(tiny_params, tmp_path):
    """mix:<target> measured as the quantize stage makes it (here by the drop scores' importance: no pass)."""
    params = tiny_params.model_copy(deep=True)
    params.quantize = params.quantize.model_copy(update={"mix_by": "importance", "mix_types": ["Q4_0", "Q8_0"]})
    scores = {"importance": {"attn": [0.5, 0.1, 0.2, 0.3], "mlp": [0.9, 0.1, 0.1, 0.4], "block": [0.9, 0.2, 0.3, 0.5]}}
    from dropquant.search.workbench import Workbench

    bench = Workbench(params, scores, "scores", tmp_path / "mix", estimate_tokens=512, threads=1, progress=False)
    try:
        q4, q8 = bench.measure(Candidate("attn", 2, "Q4_0")), bench.measure(Candidate("attn", 2, "Q8_0"))
        mid = (q4["size_bytes"] + q8["size_bytes"]) / 2 / 1e6
        r = bench.measure(Candidate("attn", 2, f"mix:{mid:.3f}MB"))
        assert q4["size_bytes"] < r["size_bytes"] <= mid * 1e6
        assert r["mix"]["by"] == "importance" and set(r["mix"]["tensor_counts"]) == {"Q4_0", "Q8_0"}
        assert q8["kld"] <= r["kld"] <= q4["kld"]
    finally:
        bench.close()


def test_heal_is_one_more_axis(tiny_params, tmp_path):
    """A healed candidate is estimated by running the heal (a linear stand-in here) and measured from the healed
    checkpoint; healing the same drop changes its KL."""
    from dropquant.search.workbench import Workbench

    tokens = torch.randint(0, 49152, (8, 32))
    bench = Workbench(tiny_params, None, "none", tmp_path / "heal", calibration=(tokens, "random-tokens"),
                      estimate_tokens=512, threads=1, progress=False)
    try:
        space = Space(["attn"], [0, 2], ["Q8_0"], ["none", "linear"])
        result = search(bench, space, 1e3)  # everything within budget: the smallest file wins
        entries = {e.candidate: e for e in result.entries}
        plain, healed = entries[Candidate("attn", 2, "Q8_0")], entries[Candidate("attn", 2, "Q8_0", "linear")]
        assert plain.drop_est is not None and healed.drop_est is not None
        assert healed.drop_est != pytest.approx(plain.drop_est)
        measured = bench.measure(healed.candidate)
        assert measured["heal"] == "linear" and measured["size_bytes"] > bench.measure(plain.candidate)["size_bytes"]
    finally:
        bench.close()


@pytest.mark.parametrize("objective", ["kv", "tg"])
def test_other_objectives_pick_their_own_best(tiny_params, grid, grid_cache, objective):
    """With every candidate within budget, the pick is the cheapest by the objective (size breaking ties)."""
    bench = _bench(tiny_params, grid_cache)
    try:
        result = search(bench, SPACE, 1e3, objective)
        best = min(result.entries, key=lambda e: e.cost)
        assert result.pick.cost[0] == best.cost[0]
        if objective == "kv":
            assert bench.kv_bytes_per_token(*result.pick.candidate.drop) == min(
                bench.kv_bytes_per_token(*c.drop) for c in SPACE.candidates())
        else:
            assert result.pick.tg_cost == min(e.tg_cost for e in result.entries)
    finally:
        bench.close()
