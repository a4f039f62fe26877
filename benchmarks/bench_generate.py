"""Greedy generation: all prompts decoded together (parallel sequences in one unified KV cache) against one
prompt at a time, on the same prompts of the embedded model, in one process.

    python -m benchmarks.bench_generate [--prompts 48] [--tokens 96] [--parallel 32] [--repeats 3] [--gguf FILE]

Target (issue #12): batched tokens/s >= 4x one-at-a-time tokens/s. The prompts are MT-Bench's first turns under
the model's chat template (what the chat evaluation sends), at Q8_0 (the pipeline's default type; built here
unless --gguf names a file). The batched runs use what the chat evaluation uses: one KV stream of --n-ctx cells
per sequence; the one-at-a-time runs a plain single-sequence context. Runs alternate (one-at-a-time, batched,
...), so a busy neighbour slows both; the ratio of each pair is printed, then the median and the spread
(max - min) / median. One more batched run with a unified cache (all sequences' cells in one, every token
attending over all of them, masked) shows why streams are used.

Also printed: the share of prompts whose batched output equals the one-at-a-time output, and why it is not
all: for each differing prompt the reference's top-two margin at the first differing token; how far one token's
logits move when it is decoded in a batch of 16 sequences instead of alone; the share without shared prefixes
(each prompt's prefill whole, as the reference does it, instead of a copied prefix plus the rest); and two
controls: the batched code with one sequence at a time (must match 100%) and the F32 file.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def prompts_of(lm, n: int) -> list[list[int]]:
    from dropquant.evaluation.mt_bench import load_questions

    questions = load_questions(DATA, n)
    if questions is None:
        raise SystemExit(f"bench_generate: MT-Bench questions not found under {DATA}")
    return [lm.tok_encode(lm.apply_chat_template([{"role": "user", "content": q["turns"][0]}])) for q in questions]


def run(lm, prompts, tokens: int, parallel: int, share: bool = True):
    from dropquant.evaluation.generation import generate_batched, generate_sequential, prepare

    seqs = [prepare(lm, p, [], tokens) for p in prompts]
    t = time.perf_counter()
    if parallel == 0:
        out = [generate_sequential(lm, s) for s in seqs]
    else:
        out = generate_batched(lm, seqs, parallel, progress=False, share=share)
    return out, time.perf_counter() - t


def margins_at_divergence(lm, prompts, got, want) -> list[tuple[int, float]]:
    """(first differing token, the reference's top-two logit margin there) for each prompt that differs."""
    from dropquant.evaluation.generation import prepare

    out = []
    for p, g, w in zip(prompts, got, want):
        if g.tokens == w.tokens:
            continue
        k = next(i for i, (a, b) in enumerate(zip(g.tokens + [-1], w.tokens + [-2])) if a != b)
        lm._clear()
        row = np.sort(lm._last_logits(prepare(lm, p, [], 1).prompt + w.tokens[:k], 0))
        out.append((k, float(row[-1] - row[-2])))
    return out


def typical_margin(lm, prompts, want, n: int = 4) -> float:
    """Median top-two margin of the reference over its generated positions (first n prompts), for scale."""
    from dropquant.evaluation.generation import prepare

    ms: list = []
    for p, w in list(zip(prompts, want))[:n]:
        toks = prepare(lm, p, [], 1).prompt + w.tokens
        out = np.zeros(len(toks) - 1, dtype=bool)
        out[len(toks) - 1 - len(w.tokens):] = True  # the positions that chose the generated tokens
        lm._clear()
        for _, _, logits in lm._decode(toks[:-1], np.arange(len(toks) - 1), out):
            if logits is not None:
                srt = np.sort(logits, axis=1)
                ms += list(srt[:, -1] - srt[:, -2])
    return float(np.median(ms))


def logit_gap(one_lm, lm, prompts, n: int = 16) -> tuple[float, float]:
    """Median and max |logit difference| between one token decoded alone and the same token decoded in a batch
    of n sequences (each prompt's last token, after its prefix was decoded alone in both)."""
    prompts = prompts[:min(n, lm.parallel)]
    alone, together = [], []
    for p in prompts:
        one_lm._clear()
        one_lm._last_logits(p[:-1], 0)
        alone.append(one_lm._last_logits(p[-1:], len(p) - 1))
    lm._clear()
    for sid, p in enumerate(prompts):
        for _ in lm._decode(p[:-1], np.arange(len(p) - 1), np.zeros(len(p) - 1, bool), [[sid]] * (len(p) - 1)):
            pass
    for _, _, logits in lm._decode([p[-1] for p in prompts], [len(p) - 1 for p in prompts],
                                   np.ones(len(prompts), bool), [[sid] for sid in range(len(prompts))]):
        together = logits.copy()
    diff = np.abs(np.asarray(alone) - together)
    return float(np.median(diff.max(axis=1))), float(diff.max())


def same_share(got, want) -> float:
    return sum(g.text == w.text for g, w in zip(got, want)) / len(want)


def main(argv=None) -> int:
    from benchmarks.bench_eval import embedded_q8_0
    from dropquant.evaluation.llamacpp_lm import LlamaCppLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=96, help="token budget per prompt")
    ap.add_argument("--parallel", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=1024, help="KV cells per sequence")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf", type=Path, help="GGUF of the embedded model (default: built here at Q8_0)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        gguf, f32 = args.gguf, None
        if gguf is None:
            from dropquant.model.loading import load_model, resolve_source

            gguf, f32 = embedded_q8_0(load_model(resolve_source("embedded")), Path(tmp), keep_f32=True)
        one_lm = LlamaCppLM(gguf, n_ctx=args.n_ctx, threads=args.threads, n_seq_max=1, chat=True)
        lm = LlamaCppLM(gguf, n_ctx=args.n_ctx * args.parallel, threads=args.threads, n_seq_max=args.parallel,
                        chat=True, kv_unified=False)
        prompts = prompts_of(lm, args.prompts)
        print(f"{len(prompts)} MT-Bench prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens), "
              f"budget {args.tokens} tokens, {args.parallel} parallel, {args.threads} threads, {Path(gguf).name}")
        ratios, shares = [], []
        for r in range(args.repeats):
            want, ts = run(one_lm, prompts, args.tokens, 0)
            got, tb = run(lm, prompts, args.tokens, args.parallel)
            seq_tps = sum(len(w.tokens) for w in want) / ts
            bat_tps = sum(len(g.tokens) for g in got) / tb
            ratios.append(bat_tps / seq_tps)
            shares.append(same_share(got, want))
            print(f"  pair {r + 1}: one at a time {seq_tps:6.1f} tok/s ({ts:5.1f} s), batched {bat_tps:6.1f} tok/s "
                  f"({tb:5.1f} s): {ratios[-1]:.2f}x; identical outputs {shares[-1]:.0%}")
        med = float(np.median(ratios))
        spread = (max(ratios) - min(ratios)) / med
        print(f"batched / one-at-a-time tokens/s: {med:.2f}x median of {len(ratios)} pairs, spread {spread:.0%} "
              f"(target >= 4x: {'met' if med >= 4 else 'MISSED'}){'  [noisy: spread > 15%]' if spread > 0.15 else ''}")
        print(f"identical to one-at-a-time: {shares[-1]:.0%} of {len(prompts)} prompts"
              f"{'' if shares[-1] >= 0.95 else ' (below 95%: see below)'}")
        div = margins_at_divergence(one_lm, prompts, got, want)
        if div:
            print(f"  differing prompts: first differing token at {sorted(k for k, _ in div)}; the reference's "
                  f"top-two margin there: median {np.median([m for _, m in div]):.3f}, max "
                  f"{max(m for _, m in div):.3f} logits (typical margin over generated tokens: "
                  f"{typical_margin(one_lm, prompts, want):.2f})")
        gap = logit_gap(one_lm, lm, prompts)
        print(f"  a token decoded alone vs in a batch of 16 sequences: max |logit difference| per token median "
              f"{gap[0]:.3f}, max {gap[1]:.3f}")
        whole, tw = run(lm, prompts, args.tokens, args.parallel, share=False)
        print(f"  batched without shared prefixes (every prompt evaluated whole): identical {same_share(whole, want):.0%}"
              f", {sum(len(g.tokens) for g in whole) / tw:.1f} tok/s")
        one, _ = run(lm, prompts, args.tokens, 1)
        print(f"  control, batched code with one sequence at a time: identical {same_share(one, want):.0%}")
        uni = LlamaCppLM(gguf, n_ctx=args.n_ctx * args.parallel, threads=args.threads, n_seq_max=args.parallel,
                         chat=True)
        gu, tu = run(uni, prompts, args.tokens, args.parallel)
        print(f"  unified cache instead of streams: {sum(len(g.tokens) for g in gu) / tu:.1f} tok/s")
        del uni
        if f32 is not None:
            one32 = LlamaCppLM(f32, n_ctx=args.n_ctx, threads=args.threads, n_seq_max=1, chat=True)
            lm32 = LlamaCppLM(f32, n_ctx=args.n_ctx * args.parallel, threads=args.threads, n_seq_max=args.parallel,
                              chat=True, kv_unified=False)
            w32, _ = run(one32, prompts, args.tokens, 0)
            g32, _ = run(lm32, prompts, args.tokens, args.parallel)
            gap32 = logit_gap(one32, lm32, prompts)
            print(f"  control, the F32 file: identical {same_share(g32, w32):.0%}; max |logit difference| alone vs "
                  f"batched: median {gap32[0]:.4f}, max {gap32[1]:.4f}")
        print(json.dumps({"ratio_median": round(med, 3), "ratio_spread": round(spread, 3),
                          "ratios": [round(x, 3) for x in ratios], "identical": shares}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
