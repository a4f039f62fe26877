"""Scores equal the paper's definition, computed here by running each layer's modules by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dropquant.prune.scoring import score_model
from tests.conftest import FAMILIES, make_tiny


def reference_scores(model, input_ids):
    """Per layer: X, X + attn(LN(X)), then + mlp(LN(.)), with an explicit causal mask; cosines averaged over tokens."""
    m = model.model
    n_layers = len(m.layers)
    sums = {u: [0.0] * n_layers for u in ("attn", "mlp", "block")}
    boundaries = []
    with torch.no_grad():
        for row in input_ids:
            ids = row.unsqueeze(0)
            x = m.embed_tokens(ids)
            t = ids.shape[1]
            pos = torch.arange(t).unsqueeze(0)
            pe = m.rotary_emb(x, pos)
            mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
            states = [x]
            for i, layer in enumerate(m.layers):
                attn_out = layer.self_attn(layer.input_layernorm(x), attention_mask=mask, position_embeddings=pe)[0]
                mid = x + attn_out
                y = mid + layer.mlp(layer.post_attention_layernorm(mid))
                for unit, (a, b) in {"attn": (x, mid), "mlp": (mid, y), "block": (x, y)}.items():
                    sums[unit][i] += F.cosine_similarity(a, b, dim=-1).sum().item()
                x = y
                states.append(x)
            boundaries.append(torch.stack(states))
    n = input_ids.numel()
    cos = {u: [s / n for s in v] for u, v in sums.items()}
    b = torch.cat(boundaries, dim=1)  # [L+1, n_rows, T, d]
    span = [[(torch.arccos(F.cosine_similarity(b[i], b[j], dim=-1).clamp(-1, 1)) / math.pi).mean().item()
             for j in range(n_layers + 1)] for i in range(n_layers + 1)]
    return cos, span


@pytest.fixture
def tokens():
    return torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_match_hand_computed_reference(family, tokens):
    tiny_llama = make_tiny(family)
    got = score_model(tiny_llama, tokens, batch_size=4, progress=False)
    ref_cos, ref_span = reference_scores(tiny_llama, tokens)
    assert got["n_tokens"] == tokens.numel()
    for unit in ("attn", "mlp", "block"):
        assert got["cosine"][unit] == pytest.approx(ref_cos[unit], abs=1e-5)
        assert got["importance"][unit] == pytest.approx([1 - c for c in ref_cos[unit]], abs=1e-5)
    n = len(tiny_llama.model.layers)
    for i in range(n + 1):
        for j in range(i + 1, n + 1):
            assert got["span_angular"][i][j] == pytest.approx(ref_span[i][j], abs=2e-4)  # float16 boundaries
    # A block's span distance is the block's own angular distance.
    assert [got["span_angular"][i][i + 1] for i in range(n)] == pytest.approx(got["angular"]["block"], abs=2e-4)


def test_batch_size_does_not_change_scores(tiny_llama, tokens):
    a = score_model(tiny_llama, tokens, batch_size=1, progress=False)
    b = score_model(tiny_llama, tokens, batch_size=6, progress=False)
    for unit in ("attn", "mlp", "block"):
        assert a["importance"][unit] == pytest.approx(b["importance"][unit], abs=1e-6)


def test_angular_metric(tiny_llama, tokens):
    got = score_model(tiny_llama, tokens, batch_size=3, metric="angular", progress=False)
    assert got["metric"] == "angular"
    n = len(tiny_llama.model.layers)
    assert got["importance"]["block"] == got["angular"]["block"]
    # The block's angular distance is the span distance between its two boundaries, checked by hand above.
    assert got["importance"]["block"] == pytest.approx([got["span_angular"][i][i + 1] for i in range(n)], abs=2e-4)
    for unit in ("attn", "mlp"):
        assert got["importance"][unit] == got["angular"][unit]
        assert all(0.0 <= v <= 1.0 for v in got["importance"][unit])


def test_hooks_are_removed(tiny_llama, tokens):
    score_model(tiny_llama, tokens[:1], progress=False)
    for layer in tiny_llama.model.layers:
        assert not layer._forward_hooks and not layer._forward_pre_hooks
        assert not layer.post_attention_layernorm._forward_pre_hooks
