"""Scores -> drop plan: every method and selection picks what its definition says; bad requests fail early."""
from __future__ import annotations

import itertools

import pytest

from dropquant.errors import DropquantError
from dropquant.params import parse_params
from dropquant.prune.selection import DropPlan, check_scores, select

L = 6
ATTN = [0.30, 0.05, 0.40, 0.02, 0.10, 0.50]
MLP = [0.60, 0.20, 0.03, 0.35, 0.04, 0.70]
BLOCK = [0.80, 0.15, 0.25, 0.09, 0.12, 0.90]


def make_scores(fingerprint="abc", layers=L, attn=ATTN, mlp=MLP, block=BLOCK, span=None):
    if span is None:
        # Distance between boundaries i < j grows with j - i, plus a dip for the span 2..4.
        span = [[0.1 * abs(j - i) for j in range(layers + 1)] for i in range(layers + 1)]
        span[2][4] = span[4][2] = 0.01
    return {"model": {"fingerprint": fingerprint, "source": "tiny", "num_hidden_layers": layers},
            "metric": "cosine", "importance": {"attn": attn, "mlp": mlp, "block": block},
            "span_angular": span}


def plan_for(scores=None, num_layers=L, **drop):
    return select(parse_params({"drop": drop}), num_layers, scores if scores is not None else make_scores())


def test_attn_mlp_block_pick_the_lowest():
    assert plan_for(method="attn", n=2).attn == [1, 3]
    assert plan_for(method="mlp", n=3).mlp == [1, 2, 4]
    p = plan_for(method="block", n=2)
    assert (p.blocks, p.attn, p.mlp) == ([3, 4], [], [])


def test_joint_ranks_attention_and_mlp_in_one_list():
    # The paper's definition, written out: one list of 2L (importance, kind, layer), the n lowest dropped.
    for n in range(0, 2 * L):
        pooled = sorted([(v, "attn", i) for i, v in enumerate(ATTN)] + [(v, "mlp", i) for i, v in enumerate(MLP)])
        want_attn = sorted(i for _, kind, i in pooled[:n] if kind == "attn")
        want_mlp = sorted(i for _, kind, i in pooled[:n] if kind == "mlp")
        p = plan_for(method="joint", n=n)
        assert (p.attn, p.mlp, p.blocks) == (want_attn, want_mlp, [])
    p = plan_for(method="joint", n=4)
    assert (p.attn, p.mlp) == ([1, 3], [2, 4])  # 0.02 0.03 0.04 0.05


def test_joint_can_take_both_halves_of_a_layer():
    p = plan_for(make_scores(attn=[0.9, 0.01, 0.9, 0.9, 0.9, 0.9], mlp=[0.9, 0.02, 0.9, 0.9, 0.9, 0.9]),
                 method="joint", n=2)
    assert (p.attn, p.mlp) == ([1], [1])


def test_ties_go_to_the_lower_layer_then_attention():
    flat = [0.5] * L
    assert plan_for(make_scores(attn=flat, mlp=flat), method="joint", n=3).attn == [0, 1]
    assert plan_for(make_scores(attn=flat, mlp=flat), method="joint", n=3).mlp == [0]


def test_none_drops_nothing():
    p = plan_for(method="none", n=5)
    assert p.is_empty and p.method == "none"


def test_protect_is_honoured_including_negative_indices():
    # Without protection block drop takes 3 and 4; protecting 3 moves it to 1.
    p = plan_for(method="block", n=2, protect=[3])
    assert p.blocks == [1, 4]
    p = plan_for(make_scores(attn=[0.0, 0.5, 0.5, 0.5, 0.5, 0.01]), method="attn", n=2, protect=[0, -1])
    assert 0 not in p.attn and 5 not in p.attn and p.protect == [0, 5]


def test_random_is_reproducible_and_respects_protect():
    a = plan_for(method="joint", n=5, selection="random", seed=3, protect=[0])
    b = plan_for(method="joint", n=5, selection="random", seed=3, protect=[0])
    assert (a.attn, a.mlp) == (b.attn, b.mlp) and a.seed == 3
    assert 0 not in a.attn + a.mlp and len(a.attn) + len(a.mlp) == 5
    draws = {tuple(plan_for(method="attn", n=3, selection="random", seed=s).attn) for s in range(8)}
    assert len(draws) > 1  # the seed matters


def test_reverse_takes_the_last_n_in_execution_order():
    assert plan_for(method="attn", n=2, selection="reverse").attn == [4, 5]
    assert plan_for(method="block", n=3, selection="reverse", protect=[5]).blocks == [2, 3, 4]
    p = plan_for(method="joint", n=3, selection="reverse")  # ... attn4 mlp4 attn5 mlp5
    assert (p.attn, p.mlp) == ([5], [4, 5])


def test_contiguous_drops_the_span_with_the_closest_boundaries():
    p = plan_for(method="block", n=2, selection="contiguous")
    assert p.blocks == [2, 3]
    assert p.scores["span_angular"]["start"] == 2
    assert p.scores["span_angular"]["by_start"][2] == 0.01
    p = plan_for(method="block", n=2, selection="contiguous", protect=[3])
    assert p.blocks != [2, 3] and 3 not in p.blocks


def test_explicit_layers_replace_the_scores():
    p = select(parse_params({"drop": {"method": "joint", "layers": {"attn": [4, 1], "mlp": [2]}}}), L, None)
    assert (p.attn, p.mlp, p.blocks, p.selection, p.n) == ([1, 4], [2], [], "explicit", 3)
    p = select(parse_params({"drop": {"method": "block", "layers": {"blocks": [0]}}}), L, None)
    assert p.blocks == [0]


def test_plan_json_round_trip():
    p = plan_for(method="joint", n=4)
    data = p.to_json({"fingerprint": "abc"})
    assert {"method", "n", "attn", "mlp", "blocks", "scores", "model"} <= set(data)
    assert data["scores"]["importance"]["attn"] == ATTN
    assert DropPlan.from_json(data) == p


@pytest.mark.parametrize("drop, message", [
    ({"method": "attn", "n": 7}, "drop.n=7 is larger than"),
    ({"method": "block", "n": 6}, "drop.n=6 is larger than method .block.*at most 5"),
    ({"method": "joint", "n": 12}, "at most 11"),
    ({"method": "attn", "n": 5, "protect": [0, 1]}, "at most 4 attention layers"),
    ({"method": "block", "n": 4, "selection": "contiguous", "protect": [2]}, "at most 3 adjacent blocks"),
    ({"method": "block", "n": 3, "selection": "contiguous", "protect": [1, 3]}, "at most 2 adjacent blocks"),
    ({"method": "attn", "n": 2, "selection": "contiguous"}, "contiguous works with drop.method=block"),
    ({"method": "attn", "n": 1, "protect": [6]}, "drop.protect: layer indices \\[6\\] out of range"),
    ({"method": "attn", "layers": {"attn": [6]}}, "drop.layers.attn: layer indices \\[6\\] out of range"),
    ({"method": "attn", "layers": {"attn": [1, 1]}}, "named more than once"),
    ({"method": "attn", "layers": {"mlp": [1]}}, "drop.layers.mlp is not allowed with drop.method=attn"),
    ({"method": "none", "layers": {"attn": [1]}}, "not allowed with drop.method=none"),
    ({"method": "block", "layers": {"blocks": list(range(6))}}, "every one of the 6 layers"),
    ({"method": "joint", "layers": {"attn": list(range(6)), "mlp": list(range(6))}}, "every one"),
    ({"method": "attn", "layers": {"attn": [0]}, "protect": [0]}, "protected"),
    ({"method": "attn", "layers": {}}, "drop.layers is empty"),
])
def test_bad_requests_fail_with_one_clear_message(drop, message):
    with pytest.raises(DropquantError, match=message):
        plan_for(**drop)


def test_importance_needs_scores_but_explicit_and_random_do_not():
    with pytest.raises(DropquantError, match="needs a scores file"):
        select(parse_params({"drop": {"method": "attn", "n": 2}}), L, None)
    assert select(parse_params({"drop": {"method": "attn", "n": 2, "selection": "random"}}), L, None).attn


def test_scores_from_another_model_are_refused():
    check_scores(make_scores(), L, "abc")
    with pytest.raises(DropquantError, match="computed for another model"):
        check_scores(make_scores("zzz"), L, "abc")
    with pytest.raises(DropquantError, match="has 6 values but the model has 8"):
        check_scores(make_scores(), 8, None)
    with pytest.raises(DropquantError, match="not a scores file"):
        check_scores({"model": {}}, L, "abc")


def test_every_selection_of_every_method_is_within_range():
    for method, selection, n in itertools.product(("attn", "mlp", "block", "joint"), ("importance", "random", "reverse"),
                                                  (0, 1, 3, 5)):
        p = plan_for(method=method, n=n, selection=selection)
        ids = p.attn + p.mlp + p.blocks
        assert len(ids) == n and all(0 <= i < L for i in ids)
        for part in (p.attn, p.mlp, p.blocks):
            assert len(set(part)) == len(part)
