"""Speed-ups that hold on a busy machine: attn-8 against the unpruned embedded model (Q8_0), measured quiet, then
again while a CPU hog (one busy-looping process) runs.

    python -m benchmarks.bench_speed_noise [--attn 5,6,7,22,25,26,28,29] [--threads N] [--gguf-dir DIR]

Both GGUFs are built by the pipeline's own code (export to F32, llama.cpp's quantizer) into a temporary folder,
or read from DIR/base.gguf and DIR/variant.gguf (built there when missing). Each measurement is the evaluate
stage's `ab_compare` with the default `eval` parameters (`--threads` overrides eval.speed_threads). Target:
under load each headline speed-up (speedup_pp, speedup_tg) within 15% of the quiet figure, or flagged
speed_noisy. The hog is killed on every way out.
"""
from __future__ import annotations

import argparse
import copy
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOLERANCE = 0.15
HEADLINE = ("speedup_pp", "speedup_tg")


def build_ggufs(folder: Path, attn: list[int]) -> tuple[Path, Path]:
    """(base, variant) Q8_0 GGUFs of the embedded model, unpruned and with `attn` attention layers dropped."""
    base, variant = folder / "base.gguf", folder / "variant.gguf"
    if base.is_file() and variant.is_file():
        return base, variant
    from dropquant.gguf.export import export_model
    from dropquant.model.loading import decoder_layers, embedded_gguf_path, load_model, resolve_source
    from dropquant.prune.surgery import prune_model
    from dropquant.gguf.quantize import quantize_gguf
    from dropquant.prune.selection import DropPlan

    model = load_model(resolve_source("embedded"))
    plan = DropPlan(method="attn", n=len(attn), selection="explicit", attn=sorted(attn),
                    num_layers=len(decoder_layers(model)))
    for out, m in ((base, model), (variant, prune_model(copy.deepcopy(model), plan))):
        f32 = out.with_suffix(".f32.gguf")
        export_model(m, f32, tokenizer_gguf=embedded_gguf_path(), out_type="F32", name="SmolLM2-135M-Instruct")
        quantize_gguf(f32, out, "Q8_0")
        f32.unlink()
    return base, variant


def measure(base: Path, variant: Path, threads) -> tuple[dict, dict, float]:
    from dropquant.evaluation.metrics import speed_metrics
    from dropquant.evaluation.speed import ab_compare
    from dropquant.params import EvalParams

    e = EvalParams()
    t = time.perf_counter()
    speed = ab_compare(variant, base, rounds=e.speed_rounds, max_rounds=e.speed_max_rounds,
                       tolerance=e.speed_tolerance, threads=threads or e.speed_threads, tg_tokens=e.speed_tg_tokens)
    return speed, speed_metrics(speed), time.perf_counter() - t


def print_figures(label: str, speed: dict, m: dict, seconds: float) -> None:
    print(f"\n{label}: {m['speed_rounds']} rounds, {m['speed_threads']} threads, {seconds:.0f} s, "
          f"CPU share {m['speed_cpu_share']}, speed_noisy={m['speed_noisy']}")
    print(f"  {'test':7s} {'setting':8s} {'variant tok/s':>13s} {'base tok/s':>10s} {'speed-up':>8s} {'spread':>7s}"
          "  per-round ratios")
    for test, up in speed["speedup"].items():
        for name, r in up.items():
            v = speed["fastest"]["variant"][r["variant_setting"]][test]
            b = speed["fastest"]["base"][r["base_setting"]][test]
            setting = name if name != "best" else f"{r['variant_setting'][3:]}/{r['base_setting'][3:]}"
            print(f"  {test:7s} {setting:8s} {v:13.1f} {b:10.1f} {r['value']:7.3f}x {r['spread']:7.3f}  "
                  + " ".join(f"{x:.3f}" for x in r["per_round"]))
    print(f"  KV cache @4096 MiB (variant / base): flash attention on {m['kv_cache_mib']} / {m['base_kv_cache_mib']}, "
          f"off {m['kv_cache_mib_fa_off']} / {m['base_kv_cache_mib_fa_off']}; peak RSS MB (flash attention on) "
          f"{m['peak_rss_mb']} / {m['base_peak_rss_mb']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attn", default="5,6,7,22,25,26,28,29", help="attention layers dropped in the variant")
    parser.add_argument("--threads", type=int, default=None, help="default: eval.speed_threads")
    parser.add_argument("--gguf-dir", type=Path, default=None, help="keep/reuse base.gguf and variant.gguf here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("dropquant.evaluation.speed").setLevel(logging.INFO)  # one line per round
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        folder = args.gguf_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        base, variant = build_ggufs(folder, [int(i) for i in args.attn.split(",")])
        quiet = measure(base, variant, args.threads)
        print_figures("quiet", *quiet)
        hog = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
        try:
            loaded = measure(base, variant, args.threads)
        finally:
            hog.kill()
            hog.wait()
        print_figures("with a CPU hog", *loaded)
    ok = loaded[1]["speed_noisy"] or all(abs(loaded[1][k] / quiet[1][k] - 1) <= TOLERANCE for k in HEADLINE)
    drift = ", ".join(f"{k} {loaded[1][k] / quiet[1][k] - 1:+.1%}" for k in HEADLINE)
    print(f"\nunder load against quiet: {drift}; target: within {TOLERANCE:.0%} or flagged speed_noisy: "
          f"{'OK' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
