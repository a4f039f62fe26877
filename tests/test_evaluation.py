"""The evaluate stage's pieces: the llama.cpp lm-eval adapter, fidelity metrics, task data handling, metrics keys."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _torch_logprob(model, ctx: list[int], cont: list[int]) -> float:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_loglikelihood_matches_torch(tiny_gguf):
    from dropquant.evaluation.llamacpp_lm import LlamaCppLM

    model, path = tiny_gguf
    rng = np.random.default_rng(0)
    contexts = [rng.integers(100, 49000, size=n).tolist() for n in (5, 23, 60)]
    reqs = [(None, ctx, rng.integers(100, 49000, size=k).tolist()) for ctx in contexts for k in (1, 3, 7)]
    reqs.append((None, contexts[1][:10], contexts[1][10:23]))  # a continuation lying inside a cached sequence
    lm = LlamaCppLM(path, n_ctx=256, threads=1)
    got = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    naive = LlamaCppLM(path, n_ctx=256, threads=1, reuse_kv=False)._loglikelihood_tokens(reqs, disable_tqdm=True)
    # KV reuse must not change the numbers, and must save work (one context evaluation shared by its choices).
    assert lm.tokens_evaluated < sum(len(c) + len(t) - 1 for _, c, t in reqs)
    for (_, ctx, cont), (lp, greedy), (lp_naive, _) in zip(reqs, got, naive):
        want = _torch_logprob(model, ctx, cont)
        # llama.cpp keeps K and V in F16 (relative precision 2^-11) and flash attention rounds Q to F16, so
        # log-probs of this peaked random model (|sum| ~ 12 nats a token) differ from torch's float32 by up to
        # ~3e-3 nats a token (measured), depending on how tokens are split into batches. 5e-3 per token
        # still catches any real mistake: a wrong token, position or logit row moves the sum by nats.
        assert abs(lp - want) <= 5e-3 * len(cont), (lp, want)
        assert abs(lp - lp_naive) <= 5e-3 * len(cont), (lp, lp_naive)
        assert isinstance(greedy, bool)


def test_plan_packs_lays_out_each_request_as_one_sequence():
    from dropquant.evaluation.llamacpp_lm import plan_packs

    rng = np.random.default_rng(3)
    shared = [5, 6, 7]  # a prefix common to every item, like a prompt template
    evals, need_from = [], []
    for n_ctx, n_choices in ((4, 4), (9, 2), (30, 3), (2, 1), (12, 5)):
        ctx = shared + rng.integers(10, 99, size=n_ctx).tolist()
        for _ in range(n_choices):
            evals.append(ctx + rng.integers(10, 99, size=int(rng.integers(1, 6))).tolist())
            need_from.append(len(ctx) - 1)
    evals.append(list(evals[0]))  # a duplicate request
    need_from.append(need_from[0])
    targets = [[0] * (len(e) - f) for e, f in zip(evals, need_from)]
    order = sorted(range(len(evals)), key=lambda i: evals[i])
    for max_cells, max_seqs, pack_cells in ((1000, 256, None), (60, 4, 40), (48, 2, 20)):
        packs = plan_packs(evals, need_from, targets, order, max_cells, max_seqs, pack_cells)
        seen = set()
        cache: list[int] = []  # what the KV cache holds for the previous pack's last sequence
        for pack in packs:
            assert pack.reuse + len(pack.tokens) <= max_cells and pack.n_seq <= max_seqs
            for sid in range(pack.n_seq):  # each sequence is one root-to-leaf chain, in stream order
                n = sum(sid in s for s in pack.seqs)
                assert [p for p, s in zip(pack.pos, pack.seqs) if sid in s] == list(range(pack.reuse, pack.reuse + n))
            for i in pack.reqs:
                assert evals[i][:pack.reuse] == cache[:pack.reuse] and pack.reuse <= need_from[i]
            for i in set(pack.pair_req):
                seen.add(i)
                nodes = [n for n, r in zip(pack.pair_node, pack.pair_req) if r == i]
                sid = pack.seqs[nodes[-1]][0]
                chain = [n for n, s in enumerate(pack.seqs) if sid in s]
                # the request's tokens are the cached prefix then the chain's tokens; it scores the right positions
                k = pack.reuse
                assert [pack.tokens[n] for n in chain[:len(evals[i]) - k]] == evals[i][k:]
                assert nodes == chain[need_from[i] - k:len(evals[i]) - k]
                assert all(pack.out[n] for n in nodes)
            last = [n for n, s in enumerate(pack.seqs) if pack.last_seq in s]
            cache = cache[:pack.reuse] + [pack.tokens[n] for n in last]
            assert cache == evals[pack.reqs[-1]][:len(cache)]
        if len(packs) > 1:  # the template shared by all items stays in the cache from pack to pack
            assert all(p.reuse >= len(shared) for p in packs[1:])
        assert seen == set(range(len(evals)))
        if max_cells == 1000:  # shared prefixes are evaluated once
            assert len(packs) == 1 and len(packs[0].tokens) < sum(map(len, evals)) - 30


def test_batched_matches_sequential_and_torch(tiny_gguf):
    """Many items of 1-5 choices packed into multi-sequence batches of 64 tokens (contexts longer than a batch,
    a prefix shared across items and kept in the cache from item to item, one item without it, a duplicate) give
    what one evaluation per request gives, and torch's numbers."""
    from dropquant.evaluation.llamacpp_lm import LlamaCppLM

    model, path = tiny_gguf
    rng = np.random.default_rng(4)
    prefix = rng.integers(100, 49000, size=40).tolist()  # like a few-shot prompt shared by every item
    reqs = []
    for n_ctx, n_choices in ((5, 4), (150, 3), (20, 1), (70, 2), (33, 5), (9, 4), (40, 2), (12, 3)):
        ctx = prefix + rng.integers(100, 49000, size=n_ctx).tolist()
        reqs += [(None, ctx, rng.integers(100, 49000, size=int(rng.integers(1, 14))).tolist())
                 for _ in range(n_choices)]
    reqs.append(reqs[3])
    ctx = prefix[:20] + rng.integers(100, 49000, size=30).tolist()  # shares only half the prefix
    reqs += [(None, ctx, rng.integers(100, 49000, size=3).tolist()) for _ in range(2)]
    packed = LlamaCppLM(path, n_ctx=512, threads=1, n_batch=64)
    got = packed._loglikelihood_tokens(reqs, disable_tqdm=True)
    seq = LlamaCppLM(path, n_ctx=512, threads=1, reuse_kv=False)
    want_seq = seq._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert packed.n_seq_max > 1 and packed.decode_calls < seq.decode_calls
    assert packed.tokens_evaluated < seq.tokens_evaluated / 2
    assert packed.tokens_reused >= 7 * len(prefix)  # the other 8 items start from the cached prefix
    for (_, ctx, cont), (lp, greedy), (lp_seq, greedy_seq) in zip(reqs, got, want_seq):
        assert abs(lp - lp_seq) <= 5e-3 * len(cont), (lp, lp_seq)
        assert abs(lp - _torch_logprob(model, ctx, cont)) <= 5e-3 * len(cont)
        assert greedy == greedy_seq
    # the cache is left clean: a second call (other packs) gives the same numbers
    again = packed._loglikelihood_tokens(reqs[:2], disable_tqdm=True)
    # (not bit-identical: in the first call this item's prefix came from the cache, computed in another batch)
    assert all(abs(a[0] - b[0]) <= 5e-3 * len(r[2]) for a, b, r in zip(again, got[:2], reqs))


def test_rolling_matches_sum_of_tokens(tiny_gguf):
    from lm_eval.api.instance import Instance

    from dropquant.evaluation.llamacpp_lm import LlamaCppLM

    model, path = tiny_gguf
    lm = LlamaCppLM(path, n_ctx=64, threads=1)
    text = "The quick brown fox jumps over the lazy dog. " * 12
    toks = lm.tok_encode(text)
    assert len(toks) > 64  # several rolling windows
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    first = _torch_logprob(model, [lm.prefix_token_id], toks[:63])
    assert got < first < 0  # more tokens, more negative log-likelihood
    assert np.isfinite(got)


def test_generate_until_stops_at_stop_string(embedded):
    from lm_eval.api.instance import Instance

    from dropquant.evaluation.llamacpp_lm import LlamaCppLM

    lm = LlamaCppLM(embedded, n_ctx=512, threads=1)
    prompt = "The capital of France is"
    free = lm.greedy_until(prompt, [], 24)
    assert len(free) > 30, free
    stop = free[12:16]
    cut = lm.greedy_until(prompt, [stop], 24)
    assert cut == free[: free.find(stop)] and stop not in cut
    # through lm-eval's interface, with several stop strings: the earliest one wins
    stops = [free[20:24], free[6:9]]
    (out,) = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": stops, "max_gen_toks": 24}), 0)],
                               disable_tqdm=True)
    assert out == free[: min(free.find(x) for x in stops)]


def test_fidelity_identical_files(embedded, tmp_path):
    from dropquant.evaluation.fidelity import Reference, build_reference, compare

    text = (DATA / "wikitext2" / "wiki.test.raw-lines.txt").read_text() if DATA.is_dir() else None
    if text is None:
        from dropquant.evaluation.fidelity import _offline_text

        text = _offline_text()
    ref = build_reference(embedded, text, 1024, threads=1, source="test")
    ref.save(tmp_path / "ref.npz")
    ref = Reference.load(tmp_path / "ref.npz")
    assert ref.chunks.shape == (2, 512) and ref.top_ids.shape == (2 * 255, 64)
    out = compare(embedded, ref, threads=1, base_path=embedded)
    assert abs(out["kld"]) < 1e-6 and out["top1_agree"] == 1.0
    assert out["ppl"] == pytest.approx(out["base_ppl"], rel=1e-6) and 1 < out["ppl"] < 1000


def test_tasks_missing_locally_are_skipped_with_a_warning(tmp_path, caplog):
    from dropquant.evaluation.tasks import prepare_tasks

    (tmp_path / "data" / "piqa").mkdir(parents=True)
    (tmp_path / "data" / "piqa" / "validation.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n')
    with caplog.at_level(logging.WARNING):
        run, skipped = prepare_tasks(["piqa", "boolq", "mmlu"], tmp_path / "data", tmp_path / "inc")
    assert run == ["piqa"] and skipped == ["boolq", "mmlu"]
    assert "'boolq'" in caplog.text and "'mmlu'" in caplog.text
    assert "include:" in (tmp_path / "inc" / "piqa.yaml").read_text()


class _NoCallLM:
    """Stands in for a model where no request may arrive (every task is skipped)."""

    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name}) although no task had data")


def test_offline_hub_tasks_are_skipped_not_fatal(monkeypatch, caplog):
    from dropquant.evaluation.accuracy import evaluate_accuracy

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("DROPQUANT_EVAL_DATA", raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", "/nonexistent-dropquant-cache")
    with caplog.at_level(logging.WARNING):
        out = evaluate_accuracy(_NoCallLM(), ["rte"], limit=5, data_dir=None)
    assert out["tasks"] == {} and out["skipped"] == ["rte"] and out["avg"] is None
    assert "'rte'" in caplog.text


def test_every_metric_key_present():
    from dropquant.evaluation.metrics import REQUIRED_KEYS, build_metrics

    acc = {"tasks": {"arc_easy": {"acc": 0.5, "acc_norm": 0.4, "n": 100}, "boolq": {"acc": 0.6, "acc_norm": None, "n": 100}}}
    base = {"tasks": {"arc_easy": {"acc": 0.6, "acc_norm": 0.5, "n": 100}, "boolq": {"acc": 0.7, "acc_norm": None, "n": 100}}}
    # The speed keys with a measurement: tests/test_speed.py.
    m = build_metrics(method="attn", n=8, quant_type="Q4_K_M", tasks=["arc_easy", "boolq", "piqa"], accuracy=acc,
                      base_accuracy=base, fidelity={"ppl": 20.0, "base_ppl": 18.0, "kld": 0.1, "top1_agree": 0.9},
                      speed=None, variant_bytes=50_000_000, base_bytes=60_000_000)
    assert all(k in m for k in REQUIRED_KEYS)
    assert set(m["tasks"]) == {"arc_easy", "boolq"}  # piqa: neither model has it
    assert all({"acc", "acc_norm", "score", "se", "n", "base_score", "base_se"} <= set(t) for t in m["tasks"].values())
    assert m["avg"] == pytest.approx((0.4 + 0.6) / 2) and m["base_avg"] == pytest.approx((0.5 + 0.7) / 2)
    assert m["speedup_pp"] is None and m["speed_noisy"] is None and m["kv_cache_mib"] is None
    assert m["skipped_tasks"] == ["piqa"] and m["size_mb"] == 50.0 and m["base_size_mb"] == 60.0
    # Binomial standard errors, as lm-eval's: sqrt(p (1 - p) / (n - 1)) per task, combined over the average.
    assert m["tasks"]["arc_easy"]["se"] == pytest.approx((0.4 * 0.6 / 99) ** 0.5, abs=1e-4)
    se = [(0.5 * 0.5 / 99) ** 0.5, (0.7 * 0.3 / 99) ** 0.5]
    assert m["base_avg_se"] == pytest.approx((se[0] ** 2 + se[1] ** 2) ** 0.5 / 2, abs=1e-4)
    assert m["avg_delta_se"] == pytest.approx(2 ** 0.5 * m["base_avg_se"], abs=1e-4) and m["avg_n"] == 200


def test_metrics_json_is_the_curated_headline():
    """metrics.json: about twenty figures under short names (each is a `dvc exp show` column), every other figure
    in details.json; kld_source and kld_recovered only when measured."""
    from dropquant.evaluation.metrics import HEADLINE, build_metrics, headline

    acc = {"tasks": {"arc_easy": {"acc": 0.5, "acc_norm": 0.41234, "n": 100}}}
    full = build_metrics(method="attn", n=8, quant_type="Q8_0", tasks=["arc_easy"], accuracy=acc, base_accuracy=acc,
                         fidelity={"ppl": 20.123, "base_ppl": 18.0, "kld": 0.0021312, "top1_agree": 0.91234},
                         speed=None, variant_bytes=50_000_000, base_bytes=60_000_000)
    m = headline(full)
    assert list(m) == list(HEADLINE) and 15 <= len(m) <= 23
    assert all(not isinstance(v, (dict, list)) for v in m.values())  # flat: one column each
    assert (m["avg"], m["ppl"], m["kld"], m["top1"], m["size_mb"], m["base_size_mb"]) == (
        0.412, 20.1, 0.00213, 0.912, 50.0, 60.0)
    assert m["pp_x"] is None and m["loops"] is None  # not measured: null, and DVC hides a column of nulls
    full.update(kld_source=0.123456, heal_kl={"unhealed": 0.4, "healed": 0.2, "recovered": 0.5})
    m = headline(full)
    assert m["kld_source"] == 0.123456 and m["kld_recovered"] == 0.5  # the search budgets on kld_source: unrounded


def test_integration_two_local_tasks(embedded):
    if not (DATA / "arc_easy").is_dir() or not (DATA / "piqa").is_dir():
        pytest.skip(f"shared task data not found at {DATA}")
    from dropquant.evaluation.accuracy import evaluate_accuracy, make_lm

    out = evaluate_accuracy(make_lm(embedded, n_ctx=1024, threads=1), ["arc_easy", "piqa"], limit=10, data_dir=DATA)
    assert out["skipped"] == []
    for name in ("arc_easy", "piqa"):
        t = out["tasks"][name]
        assert t["n"] == 10 and 0 <= t["acc"] <= 1 and 0 <= t["acc_norm"] <= 1
    assert out["avg"] == pytest.approx((out["tasks"]["arc_easy"]["acc_norm"] + out["tasks"]["piqa"]["acc_norm"]) / 2)


def test_prefix_kept_in_a_nearly_full_cache(tiny_gguf):
    """Items of ~240 cells in a 256-cell cache, each starting from a 100-token prefix left by the previous item:
    the freed cells are reused (no 'no KV slot' failure) and the numbers are the naive adapter's."""
    from dropquant.evaluation.llamacpp_lm import LlamaCppLM

    _, path = tiny_gguf
    rng = np.random.default_rng(5)
    prefix = rng.integers(100, 49000, size=100).tolist()
    reqs = []
    for _ in range(4):
        ctx = prefix + rng.integers(100, 49000, size=100).tolist()
        reqs += [(None, ctx, rng.integers(100, 49000, size=10).tolist()) for _ in range(4)]
    lm = LlamaCppLM(path, n_ctx=256, threads=1)
    got = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    want = LlamaCppLM(path, n_ctx=256, threads=1, reuse_kv=False)._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert lm.tokens_reused == 3 * len(prefix)
    for (lp, _), (lp_naive, _) in zip(got, want):
        assert abs(lp - lp_naive) <= 5e-3 * 10
