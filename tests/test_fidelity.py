"""Fidelity metrics (dropquant/evaluation/fidelity.py): the full-vocabulary KL against a torch reference, its
statistics as llama-perplexity computes them, and the top-64 bound's place below it."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
N_CTX = 128  # small chunks keep the tiny model's runs fast; the code path is the same as at 512


def _text() -> str:
    path = DATA / "wikitext2" / "wiki.test.raw-lines.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")[:20000]
    from dropquant.evaluation.fidelity import _offline_text

    return _offline_text()[:20000]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny random Llama over SmolLM2's vocabulary (49152 tokens), a perturbed copy, both as F32 GGUFs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dropquant.gguf.export import export_model
    from dropquant.model.loading import embedded_gguf_path

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    base = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked distributions with a long tail: the bound is then visibly below the full KL
        for p in base.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    variant = copy.deepcopy(base)
    with torch.no_grad():
        for p in variant.parameters():
            p.add_(torch.randn_like(p) * 0.3 * p.std())
    folder = tmp_path_factory.mktemp("fidelity")
    paths = {}
    for name, model in (("base", base), ("variant", variant)):
        paths[name] = folder / f"{name}.gguf"
        export_model(model, paths[name], tokenizer_gguf=embedded_gguf_path(), out_type="F32", name=name)
    return base, variant, paths["base"], paths["variant"]


@pytest.fixture(scope="module")
def ref(pair):
    from dropquant.evaluation.fidelity import build_reference

    return build_reference(pair[2], _text(), 2 * N_CTX, threads=1, source="test", n_ctx=N_CTX)


def _torch_logp(model, chunks: np.ndarray) -> np.ndarray:
    """float64 log-probabilities at the scored positions (second half of each chunk), [positions, vocab]."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor(chunks, dtype=torch.long)).logits.double()
    first = chunks.shape[1] // 2
    return torch.log_softmax(logits[:, first:-1], dim=-1).reshape(-1, logits.shape[-1]).numpy()


def test_chunks_follow_llama_perplexity(pair, ref):
    """Tokenized with add_special (BOS only where the vocabulary asks for it); each chunk starts with BOS only then."""
    from dropquant.evaluation.fidelity import tokenize
    from dropquant.evaluation.llamacpp_lm import open_llama

    llama = open_llama(pair[2], N_CTX, 1)
    tokens, bos = tokenize(llama, _text())
    assert bos == (llama.token_bos() if llama._model.add_bos_token() else -1)
    expect = np.asarray(tokens[:2 * N_CTX]).reshape(2, N_CTX)
    if bos >= 0:
        expect[:, 0] = bos
    np.testing.assert_array_equal(ref.chunks, expect)
    assert ref.nll.shape == (2 * (N_CTX // 2 - 1),)


def test_full_kl_matches_torch(pair, ref):
    from dropquant.evaluation.fidelity import compare

    base, variant, base_path, variant_path = pair
    out = compare(variant_path, ref, threads=1, base_path=base_path)
    lb, lv = _torch_logp(base, ref.chunks), _torch_logp(variant, ref.chunks)
    kl = (np.exp(lb) * (lb - lv)).sum(-1)
    targets = ref.chunks[:, N_CTX // 2 + 1:].reshape(-1)
    rows = np.arange(len(targets))
    assert out["kld_mode"] == "full" and out["fidelity_tokens"] == len(kl)
    assert out["kld"] == pytest.approx(kl.mean(), rel=1e-2) and out["kld"] > 0.1
    assert out["kld_median"] == pytest.approx(np.median(kl), rel=2e-2)
    assert out["ppl"] == pytest.approx(np.exp(-lv[rows, targets].mean()), rel=1e-2)
    assert out["base_ppl"] == pytest.approx(np.exp(-lb[rows, targets].mean()), rel=1e-2)
    assert out["top1_agree"] == pytest.approx((lb.argmax(-1) == lv.argmax(-1)).mean(), abs=0.02)
    dp = np.exp(lv[rows, targets]) - np.exp(lb[rows, targets])
    assert out["rms_dp"] == pytest.approx(np.sqrt((dp ** 2).mean()), rel=2e-2)
    # the top-64 bound sits below the full KL, and is reported under its own name
    assert out["kld_top64_bound"] <= out["kld"] + 1e-9
    bound = compare(variant_path, ref, threads=1, kld="top64-bound")
    assert bound["kld"] is None and bound["kld_median"] is None
    assert bound["kld_top64_bound"] == pytest.approx(out["kld_top64_bound"], rel=1e-6)
    assert bound["ppl"] == pytest.approx(out["ppl"], rel=1e-6) and bound["top1_agree"] == out["top1_agree"]


def test_kl_of_a_model_with_itself_is_zero(pair, ref):
    from dropquant.evaluation.fidelity import compare

    out = compare(pair[2], ref, threads=1, base_path=pair[2])
    assert out["kld"] == 0.0 and out["kld_stats"]["max"] == 0.0 and out["kld_top64_bound"] == pytest.approx(0, abs=1e-9)
    assert out["top1_agree"] == 1.0 and out["same_top_p"] == 1.0 and out["rms_dp"] == 0.0
    assert out["ppl"] == out["base_ppl"] == pytest.approx(ref.ppl, rel=1e-5)


def _log_softmax_pair(rows: int, vocab: int):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(rows, vocab)) * 3
    b = a + rng.normal(size=(rows, vocab))
    return tuple(x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in (a, b))


def test_full_kl_and_bound_on_distributions():
    from dropquant.evaluation.fidelity import bucketed_kl, full_kl

    la, lb = _log_softmax_pair(6, 400)
    ref = np.array([sum(np.exp(la[i, v]) * (la[i, v] - lb[i, v]) for v in range(400)) for i in range(6)])
    np.testing.assert_allclose(full_kl(la, lb), ref, rtol=1e-10)
    assert np.all(full_kl(la, la) == 0.0)
    k = np.argsort(-la, axis=-1)[:, :20]
    assert np.all(bucketed_kl(np.take_along_axis(la, k, -1), k, lb) <= full_kl(la, lb) + 1e-12)


def test_bucketed_kl_is_exact_with_full_vocab_and_a_lower_bound_otherwise():
    from dropquant.evaluation.fidelity import bucketed_kl

    la, lb = _log_softmax_pair(5, 300)
    full = (np.exp(la) * (la - lb)).sum(-1)
    order = np.argsort(-la, axis=-1)
    exact = bucketed_kl(np.take_along_axis(la, order, -1), order, lb)
    np.testing.assert_allclose(exact, full, rtol=1e-9, atol=1e-12)
    k = order[:, :20]
    approx = bucketed_kl(np.take_along_axis(la, k, -1), k, lb)
    assert np.all(approx <= full + 1e-12) and np.all(approx > 0.3 * full)
    assert np.allclose(bucketed_kl(np.take_along_axis(la, k, -1), k, la), 0.0, atol=1e-12)


def _llama_percentile(values, fraction):
    """llama.cpp perplexity.cpp's `percentile` lambda, transcribed."""
    values = sorted(values)
    if fraction <= 0:
        return values[0]
    if fraction >= 1:
        return values[-1]
    p = fraction * (len(values) - 1)
    ip = int(p)
    p -= ip
    return (1 - p) * values[ip] + p * values[min(ip + 1, len(values) - 1)]


def test_statistics_as_llama_perplexity_computes_them():
    from dropquant.evaluation.fidelity import KLD_PERCENTILES, summarize

    rng = np.random.default_rng(2)
    kl = rng.exponential(0.5, size=37)
    nll, base_nll = rng.uniform(0.1, 5, size=37), rng.uniform(0.1, 5, size=37)
    agree = rng.random(37) < 0.6
    out = summarize(nll=nll, base_nll=base_nll, agree=agree, kl=kl, kl_bound=kl * 0.9, mode="full", n_ctx=8,
                    source="x")
    s = sorted(kl)
    assert out["kld_median"] == pytest.approx(s[18])  # odd count: the middle value
    for name, q in KLD_PERCENTILES.items():
        assert out["kld_stats"][name] == pytest.approx(_llama_percentile(kl, q / 100)), name
    assert out["kld_p99"] == out["kld_stats"]["p99"] and out["kld"] == pytest.approx(kl.mean())
    assert out["kld_stats"]["stderr"] == pytest.approx(np.sqrt((np.mean(kl ** 2) - kl.mean() ** 2) / 36))
    assert out["same_top_p"] == out["top1_agree"] == pytest.approx(agree.sum() / 37)
    dp = np.exp(-nll) - np.exp(-base_nll)
    assert out["rms_dp"] == pytest.approx(np.sqrt(np.mean(dp ** 2))) and out["mean_dp"] == pytest.approx(dp.mean())
    assert out["ppl"] == pytest.approx(np.exp(nll.mean())) and out["base_ppl"] == pytest.approx(np.exp(base_nll.mean()))
    even = summarize(nll=nll[:4], base_nll=base_nll[:4], agree=agree[:4], kl=np.array([4.0, 1.0, 3.0, 2.0]),
                     kl_bound=np.zeros(4), mode="full", n_ctx=8, source="x")
    assert even["kld_median"] == 2.5  # even count: the mean of the middle two, as llama.cpp


def test_unknown_mode_and_missing_base_are_errors(ref, pair):
    from dropquant.errors import DropquantError
    from dropquant.evaluation.fidelity import compare

    with pytest.raises(DropquantError, match="eval.kld"):
        compare(pair[3], ref, threads=1, kld="top32")
    with pytest.raises(DropquantError, match="base GGUF"):
        compare(pair[3], ref, threads=1)
