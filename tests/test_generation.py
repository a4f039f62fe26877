"""Batched greedy generation (many prompts, one unified KV cache) against the one-at-a-time reference."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module", params=[True, False], ids=["unified-cache", "one-stream-per-sequence"])
def lm(tiny_gguf, request):
    from dropquant.evaluation.llamacpp_lm import LlamaCppLM

    lm = LlamaCppLM(tiny_gguf[1], n_ctx=1024, threads=1, n_seq_max=4, kv_unified=request.param)
    assert lm.unified == request.param and lm.seq_ctx == (1024 if request.param else 256)
    return lm


def assert_same_greedy(lm, prompts, got, want, tie=1e-2):
    """Batched == one-at-a-time, token for token; a divergence is allowed only where the reference's top two
    logits were within `tie` (llama.cpp's batched kernels sum in another order), and only for a few prompts."""
    from dropquant.evaluation.generation import prepare

    differ = 0
    for p, g, w in zip(prompts, got, want):
        if g.tokens == w.tokens:
            assert g.text == w.text and g.stop == w.stop
            continue
        k = next(i for i, (a, b) in enumerate(zip(g.tokens + [-1], w.tokens + [-2])) if a != b)
        ctx = prepare(lm, p, [], 1).prompt
        lm._clear()
        row = np.sort(lm._last_logits(ctx + w.tokens[:k], 0))
        assert row[-1] - row[-2] < tie, f"diverged at token {k} where the margin was {row[-1] - row[-2]:.3g}"
        differ += 1
    assert differ <= max(1, len(want) // 5)


def _prompts(lm, n=10):
    rng = np.random.default_rng(3)
    shared = rng.integers(100, 40000, 40).tolist()  # a common preamble, as few-shot prompts have
    out = []
    for i in range(n):
        tail = rng.integers(100, 40000, int(rng.integers(1, 30))).tolist()
        out.append((shared if i % 3 else []) + tail)
    return out


def test_batched_equals_sequential_greedy_on_an_f32_model(lm):
    from dropquant.evaluation.generation import generate_batched, generate_sequential, prepare

    prompts = _prompts(lm)
    budgets = [1, 5, 40, 17, 0, 33, 64, 9, 40, 2]
    seqs = lambda: [prepare(lm, p, [], b) for p, b in zip(prompts, budgets)]  # noqa: E731
    want = [generate_sequential(lm, s) for s in seqs()]
    reused = lm.tokens_reused
    got = generate_batched(lm, seqs(), parallel=4, progress=False)
    assert_same_greedy(lm, prompts, got, want)
    assert all(len(g.tokens) <= b for g, b in zip(got, budgets))
    assert lm.tokens_reused - reused >= 40  # the shared preamble was copied, not evaluated again


def test_stop_strings_cut_like_the_reference(lm):
    from dropquant.evaluation.generation import generate_batched, generate_sequential, prepare

    prompts = _prompts(lm, 6)
    free = [generate_sequential(lm, prepare(lm, p, [], 30)) for p in prompts]
    stops = [[f.text[10:13]] if len(f.text) > 14 else [] for f in free]
    got = generate_batched(lm, [prepare(lm, p, s, 30) for p, s in zip(prompts, stops)], progress=False)
    for f, s, g in zip(free, stops, got):
        if s and s[0]:
            assert g.stop == "until" and g.text == f.text[:f.text.find(s[0])] and s[0] not in g.text
        else:
            assert g.text == f.text


def test_a_full_cache_makes_prompts_wait_not_fail(tiny_gguf):
    """Prompts whose prompt + budget do not all fit the cache at once are admitted as others finish."""
    from dropquant.evaluation.generation import generate_batched, generate_sequential, prepare
    from dropquant.evaluation.llamacpp_lm import LlamaCppLM

    lm = LlamaCppLM(tiny_gguf[1], n_ctx=256, threads=1, n_seq_max=8)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(100, 40000, 60).tolist() for _ in range(6)]  # 6 x (60 + 40) cells > 256
    want = [generate_sequential(lm, prepare(lm, p, [], 40)) for p in prompts]
    got = generate_batched(lm, [prepare(lm, p, [], 40) for p in prompts], progress=False)
    assert_same_greedy(lm, prompts, got, want)


def test_generate_until_is_batched_and_matches_parallel_1(tiny_gguf):
    from lm_eval.api.instance import Instance

    from dropquant.evaluation.llamacpp_lm import LlamaCppLM

    reqs = [Instance("generate_until", {}, (f"Question {i}: what is {i} + {i}?", {"until": ["\n\n"],
                                                                                   "max_gen_toks": 12 + i}), 0)
            for i in range(5)]
    batched = LlamaCppLM(tiny_gguf[1], n_ctx=512, threads=1, n_seq_max=8)
    one = LlamaCppLM(tiny_gguf[1], n_ctx=512, threads=1, parallel=1)
    assert batched.parallel == 8 and one.parallel == 1
    texts = batched.generate_until(reqs, disable_tqdm=True)
    assert texts == [g.text for g in batched.generations]
    one.generate_until(reqs, disable_tqdm=True)
    prompts = [batched.tok_encode(r.args[0]) for r in reqs]
    assert_same_greedy(one, prompts, batched.generations, one.generations)
    assert [len(g.tokens) <= 12 + i for i, g in enumerate(batched.generations)] == [True] * 5


def test_loop_detector():
    from dropquant.evaluation.mt_bench import loops

    sentence = list(range(100, 112))  # 12 tokens
    assert loops([1, 2, 3] + sentence * 3)        # one sentence over and over (36 tokens)
    assert loops(list(range(40)) + [7] * 32)      # "the the the ..."
    assert not loops([7] * 20)                    # too short to call it a loop
    assert not loops(list(range(200)))            # no repetition
    assert not loops(sentence * 2 + list(range(300, 340)))  # repeated once, then moved on


def test_common_prefix():
    from dropquant.evaluation.prefix import common_prefix

    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2  # one is a prefix of the other
    assert common_prefix([5, 2], [1, 2]) == 0
    assert common_prefix([], [1]) == 0


def test_generation_and_the_lm_import_no_cycle():
    """generation needs only the shared helpers; llamacpp_lm imports generation at module level, not inside
    methods (which is how the cycle used to be hidden)."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import dropquant.evaluation as ev

    code = ("import sys, dropquant.evaluation.generation; "
            "sys.exit('dropquant.evaluation.llamacpp_lm' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    folder = Path(ev.__file__).parent
    lm_tree = ast.parse((folder / "llamacpp_lm.py").read_text())
    nested = [n for f in ast.walk(lm_tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)
              if isinstance(n, ast.ImportFrom) and n.module == "generation"]
    assert not nested
    assert any(isinstance(n, ast.ImportFrom) and n.module == "generation" and n.level == 1 for n in lm_tree.body)


def test_bench_generate_reads_llama_batched_bench(tmp_path):
    """The comparison's parser and ratios, on a stand-in tool that prints llama-batched-bench's jsonl rows."""
    import json

    from benchmarks.bench_generate import batched_bench, spread

    rows = [{"pl": 1, "speed_tg": 50.0, "speed": 100.0}, {"pl": 8, "speed_tg": 150.0, "speed": 250.0}]
    tool = tmp_path / "llama-batched-bench"
    tool.write_text("#!/bin/sh\necho 'main: n_kv_max = 8192' >&2\n"
                    + "".join(f"echo '{json.dumps(r)}' >&2\n" for r in rows))
    tool.chmod(0o755)
    got = batched_bench(tmp_path, "model.gguf", npp=100, ntg=96, parallel=8, threads=1, n_ctx=1024)
    assert got["tg"] == 3.0 and got["s"] == 2.5
    with pytest.raises(RuntimeError):
        batched_bench(tmp_path, "model.gguf", npp=100, ntg=96, parallel=16, threads=1, n_ctx=1024)
    assert spread([1.0, 2.0, 3.0]).endswith("[noisy: spread > 15%]") and spread([2.0, 2.1]) == "2.05x [2.00-2.10]"
