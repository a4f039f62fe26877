"""Greedy generation: all prompts decoded together (parallel sequences, one KV stream each) against one prompt at
a time, on the same prompts of the embedded model, in one process; beside llama.cpp's own llama-batched-bench.

    python -m benchmarks.bench_generate [--prompts 32] [--tokens 96] [--parallel 32] [--threads 1] [--repeats 3]
                                        [--gguf FILE] [--no-llamacpp] [--no-controls] [--ignore-eos]

Target (issue #24): our batched / one-at-a-time ratio >= 0.9x llama-batched-bench's at the same batch size and
threads (issue #12's older target, >= 4x, is printed too). The prompts are MT-Bench's first turns under the model's
chat template (what the chat evaluation sends), at Q8_0 (the pipeline's default type; built here unless --gguf
names a file). The batched runs use what the chat evaluation uses: one KV stream of --n-ctx cells per sequence;
the one-at-a-time runs a plain single-sequence context. --prompts defaults to --parallel, so that the batch is
--parallel wide from start to end, as llama-batched-bench's is; --ignore-eos also makes every sequence run for
the whole budget, as theirs do (else a sequence that ends early narrows the batch for the rest of the round).

Each round runs one-at-a-time, batched, then `llama-batched-bench -npp P -ntg T -npl 1,N -t THREADS -c N*n_ctx
-fa on` (P: the prompts' mean length, T: --tokens, N: --parallel; llama.cpp's tools are built from the pinned
sdist by scripts/llama-cpp-tools.sh, skipped with a message when they cannot be). Both ratios count the prompt's
evaluation: ours is the time for the same greedy outputs (wall clock; also CPU time, which a busy neighbour moves
less), theirs is S t/s at N sequences over S t/s at 1 (same tokens per sequence, so a ratio of times too); their
generation-only ratio (S_TG) is printed beside it. A busy neighbour slows every run, so each round's figures are
printed, then medians with [min-max]; spreads over 15% are flagged.

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
import subprocess
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


def run(lm, prompts, tokens: int, parallel: int, share: bool = True, cpu: bool = False):
    """(generations, wall seconds), or with cpu=True (generations, (wall seconds, CPU seconds of this process))."""
    from dropquant.evaluation.generation import generate_batched, generate_sequential, prepare

    seqs = [prepare(lm, p, [], tokens) for p in prompts]
    t, c = time.perf_counter(), time.process_time()
    if parallel == 0:
        out = [generate_sequential(lm, s) for s in seqs]
    else:
        out = generate_batched(lm, seqs, parallel, progress=False, share=share)
    wall = time.perf_counter() - t
    return out, ((wall, time.process_time() - c) if cpu else wall)


def batched_bench(tools: Path, gguf, npp: int, ntg: int, parallel: int, threads: int, n_ctx: int) -> dict:
    """llama-batched-bench at 1 and `parallel` sequences, our context's settings (one KV stream of n_ctx cells per
    sequence, its default; n_batch = n_ubatch = 512; flash attention on): {"tg": S_TG ratio, "s": S ratio, ...}."""
    cmd = [str(tools / "llama-batched-bench"), "-m", str(gguf), "-npp", str(npp), "-ntg", str(ntg),
           "-npl", f"1,{parallel}", "-t", str(threads), "-tb", str(threads), "-c", str(n_ctx * parallel),
           "-b", "512", "-ub", "512", "-fa", "on", "--output-format", "jsonl"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    rows = {r["pl"]: r for r in (json.loads(x) for x in (proc.stdout + proc.stderr).splitlines()
                                 if x.startswith("{"))}
    if proc.returncode != 0 or set(rows) != {1, parallel}:
        raise RuntimeError(f"llama-batched-bench failed ({proc.returncode}): {proc.stderr[-1500:]}")
    one, many = rows[1], rows[parallel]
    return {"tg": many["speed_tg"] / one["speed_tg"], "s": many["speed"] / one["speed"],
            "tg1": one["speed_tg"], "tgN": many["speed_tg"]}


def spread(xs) -> str:
    """median [min-max], flagged when (max - min) / median > 15%."""
    med = float(np.median(xs))
    noisy = (max(xs) - min(xs)) / med > 0.15
    return f"{med:.2f}x [{min(xs):.2f}-{max(xs):.2f}]{' [noisy: spread > 15%]' if noisy else ''}"


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


def controls(args, gguf, f32, one_lm, lm, prompts, got, want) -> None:
    """Why batched outputs differ where they do, and the controls that show it is rounding, not a bug."""
    from dropquant.evaluation.llamacpp_lm import LlamaCppLM

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


def _tools() -> Path | None:
    """llama.cpp's tools (built on first use), or None with the reason printed (exit 3: no compiler or cmake)."""
    from benchmarks.bench_llamacpp import tools_dir

    tools = tools_dir()
    if tools is None:
        print("llama-batched-bench comparison skipped")
    return tools


def main(argv=None) -> int:
    from benchmarks.bench_eval import embedded_q8_0
    from dropquant.evaluation.llamacpp_lm import LlamaCppLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, help="MT-Bench prompts (default: --parallel)")
    ap.add_argument("--tokens", type=int, default=96, help="token budget per prompt")
    ap.add_argument("--parallel", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=1024, help="KV cells per sequence")
    ap.add_argument("--repeats", type=int, default=3)
    # one thread: llama.cpp with n_threads = cores collapses when a neighbour takes a core (docs/evaluate.md)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gguf", type=Path, help="GGUF of the embedded model (default: built here at Q8_0)")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip llama-batched-bench")
    ap.add_argument("--no-controls", action="store_true", help="only the timed rounds and the identical share")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="every prompt generates --tokens tokens, as llama-batched-bench's sequences do (a sequence "
                         "that stops early leaves the batch narrower for the rest of its round)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tools = None if args.no_llamacpp else _tools()

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        gguf, f32 = args.gguf, None
        if gguf is None:
            from dropquant.model.loading import load_model, resolve_source

            gguf, f32 = embedded_q8_0(load_model(resolve_source("embedded")), Path(tmp), keep_f32=True)
        one_lm = LlamaCppLM(gguf, n_ctx=args.n_ctx, threads=args.threads, n_seq_max=1, chat=True)
        lm = LlamaCppLM(gguf, n_ctx=args.n_ctx * args.parallel, threads=args.threads, n_seq_max=args.parallel,
                        chat=True, kv_unified=False)
        if args.ignore_eos:
            for m in (one_lm, lm):
                m._is_eog = lambda token: False  # only Sequence.push asks: nothing else changes
        prompts = prompts_of(lm, args.prompts or args.parallel)
        npp = round(float(np.mean([len(p) for p in prompts])))
        print(f"{len(prompts)} MT-Bench prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens, mean "
              f"{npp}), budget {args.tokens} tokens{' (end of generation ignored)' if args.ignore_eos else ''}, "
              f"{args.parallel} parallel, {args.threads} threads, "
              f"{Path(gguf).name}")
        ratios, cpu_ratios, shares, theirs = [], [], [], []
        for r in range(args.repeats):
            want, (ts, cs) = run(one_lm, prompts, args.tokens, 0, cpu=True)
            got, (tb, cb) = run(lm, prompts, args.tokens, args.parallel, cpu=True)
            seq_tps = sum(len(w.tokens) for w in want) / ts
            bat_tps = sum(len(g.tokens) for g in got) / tb
            ratios.append(bat_tps / seq_tps)
            cpu_ratios.append((sum(len(g.tokens) for g in got) / cb) / (sum(len(w.tokens) for w in want) / cs))
            shares.append(same_share(got, want))
            line = (f"  round {r + 1}: one at a time {seq_tps:6.1f} tok/s ({ts:5.1f} s), batched {bat_tps:6.1f} tok/s "
                    f"({tb:5.1f} s): {ratios[-1]:.2f}x (CPU time {cpu_ratios[-1]:.2f}x); identical {shares[-1]:.0%}")
            if tools is not None:
                theirs.append(batched_bench(tools, gguf, npp, args.tokens, args.parallel, args.threads, args.n_ctx))
                t = theirs[-1]
                line += (f"; llama-batched-bench {t['s']:.2f}x (generation only {t['tg']:.2f}x: "
                         f"{t['tg1']:.1f} -> {t['tgN']:.1f} t/s)")
            print(line)
        med = float(np.median(ratios))
        print(f"ours, batched / one-at-a-time: {spread(ratios)} wall clock, {spread(cpu_ratios)} CPU time "
              f"(issue #12's target >= 4x: {'met' if med >= 4 else 'missed'})")
        if theirs:
            s_ratios = [t["s"] for t in theirs]
            frac = [o / t for o, t in zip(ratios, s_ratios)]
            print(f"llama-batched-bench -npp {npp} -ntg {args.tokens} -npl 1,{args.parallel} -t {args.threads}: "
                  f"{spread(s_ratios)} (generation only {spread([t['tg'] for t in theirs])})")
            print(f"ours / llama-batched-bench: {spread(frac)} per round, {med / float(np.median(s_ratios)):.2f} of "
                  f"medians (target >= 0.9: {'met' if float(np.median(frac)) >= 0.9 else 'MISSED'})")
        print(f"identical to one-at-a-time: {shares[-1]:.0%} of {len(prompts)} prompts"
              f"{'' if shares[-1] >= 0.95 else ' (below 95%: see below)'}")
        if not args.no_controls:
            controls(args, gguf, f32, one_lm, lm, prompts, got, want)
        print(json.dumps({"ratios": [round(x, 3) for x in ratios], "cpu_ratios": [round(x, 3) for x in cpu_ratios],
                          "llamacpp_ratios": [round(t["s"], 3) for t in theirs],
                          "llamacpp_tg_ratios": [round(t["tg"], 3) for t in theirs], "identical": shares}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
