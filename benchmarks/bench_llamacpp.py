"""Our fidelity figures beside llama.cpp's own tools, on the embedded model's Attn-8 variant at Q8_0.

    python -m benchmarks.bench_llamacpp [--base FILE --variant FILE] [--chunks 8] [--ctx 512] [--threads 2]
                                        [--no-speed] [--speed-module]

llama-perplexity and llama-bench are built once from the pinned llama-cpp-python sdist's vendored llama.cpp
(scripts/llama-cpp-tools.sh; cached under ~/.cache/dropquant/llama-cpp-tools; skipped with a message when there
is no compiler). The same text (WikiText-2 raw test from ../shared/data, else what the evaluate stage falls back
to) goes to both: ours is dropquant.evaluation.fidelity (build_reference + compare, as the evaluate stage runs it);
theirs is `llama-perplexity -c CTX --chunks N --kl-divergence-base` on the base, then `--kl-divergence` on the
variant. Target (issue: figures that agree with llama.cpp's own tools): KLD within 3%.

Speed: llama-bench's pp512 / tg16 (at depth 0 and 2048) tok/s of both files, flash attention on, in A/B rounds,
and the median variant/base ratios with their spread; `--speed-module` also runs dropquant.evaluation.speed's
A/B (slower) and prints its ratios.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ATTN_8 = [5, 6, 7, 22, 25, 26, 28, 29]  # the embedded model's Attn-8 plan (C4 calibration, importance)
TARGET = 0.03

# llama-perplexity --kl-divergence output line -> our fidelity key; (scale: theirs is in percent for some)
THEIRS = {
    "ppl": (r"Mean PPL\(Q\)\s*:\s*([-\d.]+)", 1.0),
    "kld": (r"Mean\s+KLD:\s*([-\d.]+)", 1.0),
    "kld_median": (r"Median\s+KLD:\s*([-\d.]+)", 1.0),
    "kld_p99": (r"99\.0%\s+KLD:\s*([-\d.]+)", 1.0),
    "top1_agree": (r"Same top p:\s*([-\d.]+)", 0.01),
    "rms_dp": (r"RMS Δp\s*:\s*([-\d.]+)", 0.01),
}


def tools_dir() -> Path | None:
    """The cached llama.cpp tools, built on first use; None (and a message) when they cannot be built here."""
    script = ROOT / "scripts" / "llama-cpp-tools.sh"
    t0 = time.time()
    proc = subprocess.run([str(script), sys.executable], capture_output=True, text=True)
    if proc.returncode == 3:
        print(f"skipped: {proc.stderr.strip()}")
        return None
    if proc.returncode != 0:
        print(f"skipped: building llama.cpp's tools failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        return None
    if time.time() - t0 > 5:
        print(f"built llama-perplexity and llama-bench in {time.time() - t0:.0f} s")
    return Path(proc.stdout.strip().splitlines()[-1])


def embedded_variants(folder: Path) -> tuple[Path, Path]:
    """The embedded model, unpruned and Attn-8, exported and quantized to Q8_0 by the pipeline's own code."""
    from benchmarks.bench_eval import embedded_q8_0
    from dropquant.gguf.export import export_model
    from dropquant.model.loading import embedded_gguf_path, load_model, resolve_source
    from dropquant.prune.surgery import prune_model
    from dropquant.gguf.quantize import quantize_gguf
    from dropquant.prune.selection import DropPlan

    model = load_model(resolve_source("embedded"))
    base = embedded_q8_0(copy.deepcopy(model), folder)
    plan = DropPlan(method="attn", n=len(ATTN_8), selection="explicit", attn=ATTN_8,
                    num_layers=model.config.num_hidden_layers)
    f32, q8 = folder / "attn8-f32.gguf", folder / "attn8-Q8_0.gguf"
    export_model(prune_model(model, plan), f32, tokenizer_gguf=embedded_gguf_path(), out_type="F32",
                 name="SmolLM2-135M-Instruct")
    quantize_gguf(f32, q8, "Q8_0")
    f32.unlink()
    return base, q8


def run_perplexity(tools: Path, base: Path, variant: Path, text_file: Path, work: Path, args) -> dict:
    exe = str(tools / "llama-perplexity")
    common = ["-c", str(args.ctx), "--chunks", str(args.chunks), "-t", str(args.threads)]
    kld_file = work / "base.kld"
    run = subprocess.run([exe, "-m", str(base), "-f", str(text_file), *common, "--kl-divergence-base", str(kld_file)],
                         check=True, capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([-\d.]+)", run.stdout + run.stderr)
    out = subprocess.run([exe, "-m", str(variant), *common, "--kl-divergence-base", str(kld_file), "--kl-divergence"],
                         check=True, capture_output=True, text=True)
    log = out.stdout + out.stderr
    (work / "llama-perplexity.log").write_text(log)
    found = {"base_ppl": float(m.group(1)) if m else None}
    q = re.search(r"Mean PPL\(base\)\s*:\s*([-\d.]+)", log)  # from the uint16-quantized base log-probs
    found["base_ppl_quantized"] = float(q.group(1)) if q else None
    for key, (pattern, scale) in THEIRS.items():
        m = re.search(pattern, log)
        found[key] = float(m.group(1)) * scale if m else None
    return found


def _bench_once(tools: Path, model: Path, threads: int) -> dict:
    """One llama-bench run of one file: tok/s per (test, depth), flash attention on, one repetition."""
    out = subprocess.run([str(tools / "llama-bench"), "-m", str(model), "-p", "512", "-n", "16", "-d", "0,2048",
                          "-fa", "on", "-t", str(threads), "-r", "1", "-o", "json"],
                         check=True, capture_output=True, text=True)
    return {(f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}", r.get("n_depth", 0)): r["avg_ts"]
            for r in json.loads(out.stdout)}


def run_bench(tools: Path, base: Path, variant: Path, threads: int, rounds: int) -> dict:
    """llama-bench tok/s of both files in A/B rounds (AB, BA, AB, ...: a busy machine slows both alike):
    {(test, depth): {"base": [...], "variant": [...], "ratio": [...]}}, one entry per round."""
    rows: dict = {}
    for i in range(rounds):
        order = [("base", base), ("variant", variant)]
        got = dict((who, _bench_once(tools, path, threads)) for who, path in (order if i % 2 == 0 else order[::-1]))
        for key, b in got["base"].items():
            r = rows.setdefault(key, {"base": [], "variant": [], "ratio": []})
            r["base"].append(b)
            r["variant"].append(got["variant"][key])
            r["ratio"].append(got["variant"][key] / b)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="unpruned GGUF (default: the embedded model at Q8_0, built here)")
    ap.add_argument("--variant", type=Path, help="pruned GGUF (default: the embedded model's Attn-8 at Q8_0)")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-speed", action="store_true", help="skip llama-bench")
    ap.add_argument("--rounds", type=int, default=3, help="llama-bench A/B rounds")
    ap.add_argument("--speed-threads", type=int, help="llama-bench threads (default: as eval.speed_threads null, "
                    "one fewer than the CPUs available: all of them collapse when another process takes one)")
    ap.add_argument("--speed-module", action="store_true", help="also run dropquant.evaluation.speed's A/B")
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when piped (make bench | tee)

    tools = tools_dir()
    if tools is None:
        return 0
    from dropquant.evaluation.fidelity import build_reference, compare, heldout_text

    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp:
        work = Path(tmp)
        if args.base and args.variant:
            base, variant = args.base, args.variant
        else:
            base, variant = embedded_variants(work)
        text, source = heldout_text(DATA if DATA.is_dir() else None)
        text_file = work / "heldout.txt"
        text_file.write_text(text, encoding="utf-8")
        print(f"text: {source}; {args.chunks} chunks x {args.ctx} tokens, {args.threads} threads")
        print(f"base: {base}\nvariant: {variant}")

        t0 = time.time()
        ref = build_reference(base, text, args.chunks * args.ctx, args.threads, source=source, n_ctx=args.ctx)
        ours = compare(variant, ref, args.threads, base_path=base)
        t_ours = time.time() - t0
        t0 = time.time()
        theirs = run_perplexity(tools, base, variant, text_file, work, args)
        t_theirs = time.time() - t0

        print(f"\n{'':16}{'ours':>12}{'llama.cpp':>12}{'diff':>9}")
        worst = 0.0
        for key in ("base_ppl", *THEIRS):
            a, b = ours.get(key), theirs.get(key)
            diff = (a - b) / b if a is not None and b else None
            if key == "kld" and diff is not None:
                worst = abs(diff)
            print(f"{key:16}{a:12.4f}{b if b is not None else float('nan'):12.4f}"
                  f"{'' if diff is None else f'{100 * diff:+8.2f}%':>9}")
        print(f"(llama.cpp's base_ppl is the base run's 'Final estimate'; its --kl-divergence run's 'Mean PPL(base)', "
              f"{theirs['base_ppl_quantized']}, comes from its uint16-quantized copy of the base's log-probs)")
        print(f"{'kld_top64_bound':16}{ours['kld_top64_bound']:12.4f}  (the cheap lower bound, eval.kld=top64-bound)")
        print(f"time: ours {t_ours:.0f} s (reference + one pass over base and variant), "
              f"llama-perplexity {t_theirs:.0f} s (two runs)")
        ok = theirs.get("kld") is not None and worst <= TARGET
        print(f"KLD within {100 * TARGET:.0f}% of llama-perplexity: {'OK' if ok else 'MISSED'}")

        if not args.no_speed:
            from dropquant.evaluation.speed import default_threads

            threads = args.speed_threads or default_threads()
            print(f"\nllama-bench (flash attention on, {threads} threads, {args.rounds} A/B rounds): median tok/s, "
                  f"median variant/base ratio [min - max over rounds]")
            for (test, depth), r in sorted(run_bench(tools, base, variant, threads, args.rounds).items()):
                med = {k: float(np.median(v)) for k, v in r.items()}
                print(f"  {test}@d{depth:<5} base {med['base']:8.1f}  variant {med['variant']:8.1f}  "
                      f"ratio {med['ratio']:5.2f}x [{min(r['ratio']):.2f} - {max(r['ratio']):.2f}]")
        if args.speed_module:
            from dropquant.evaluation.metrics import speed_metrics
            from dropquant.evaluation.speed import ab_compare

            m = speed_metrics(ab_compare(variant, base, threads=args.speed_threads))
            print("dropquant.evaluation.speed: " + ", ".join(
                f"{k} {m.get(k)}" for k in ("speedup_pp512", "speedup_pp", "speedup_tg0", "speedup_tg")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
