"""Scoring models larger than memory: streamed scoring's peak memory must not grow with the model's depth.

    python -m benchmarks.bench_scale [--layers-small 4] [--layers-large 16] [--tokens 8x128] [--seed 0]
                                     [--batch-size 2] [--repeats 3] [--workdir DIR] [--keep]
                                     [--hidden H --intermediate I --heads N --kv-heads K | --quick]
                                     [--check-harness]

Random bf16 checkpoints with Llama-3-8B's layer shape (dropquant.model.random_model) at the small and the large
depth (~2.5 GB and ~7.8 GB) are written to a temporary folder under --workdir ($TMPDIR, else ../tmp, else the
system's), and removed afterwards unless --keep. Each measurement runs in a fresh subprocess: streamed scoring
at both depths, in-memory scoring at the small one. Targets:
  - peak RSS, streamed: large / small <= 1.1 (memory does not grow with depth);
  - peak RSS, streamed, large model: <= 1/3 of its weight bytes;
  - time at the small depth: streamed / in-memory <= 1.3.
--quick (hidden 256, intermediate 512, 8 heads, 2 KV heads) checks the harness end to end in seconds; its
figures are the interpreter's, not the scorer's, so only the 8B shape's count against the targets.
--check-harness runs a dummy child that allocates 1 GiB and checks the measurement finds it, nothing else.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
PEAK_GROWTH_TARGET = 1.1
PEAK_OVER_MODEL_TARGET = 1 / 3
STREAM_TIME_TARGET = 1.3
QUICK_SHAPE = {"hidden": 256, "intermediate": 512, "heads": 8, "kv_heads": 2}
CHILD_TIMEOUT_S = 3600
HARNESS_ALLOC = 1 << 30
HARNESS_TOLERANCE = 0.05


class BenchError(RuntimeError):
    pass


def score(path: str, input_ids, *, stream: bool, batch_size: int) -> dict:
    """The score stage's own path: weights read from disk (streamed layer by layer, or loaded whole), then scored."""
    import torch

    from dropquant.model.layerwise import source_stack
    from dropquant.model.loading import resolve_source
    from dropquant.prune.scoring import score_stack

    stack = source_stack(resolve_source(path), torch.bfloat16, "cpu", stream)
    return score_stack(stack, input_ids, batch_size, "cosine", progress=False)


# --- the child: one measurement in a process of its own ------------------------------------------------------

def _status_bytes(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes.

    VmHWM, not ru_maxrss: Linux carries the parent's high-water mark into a child's ru_maxrss across fork and
    exec, so a child of a parent that just wrote a 2 GB shard would report at least 2 GB. VmHWM is the
    child's own address space's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"{field} not in /proc/self/status (not Linux?)")


def _child(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_scale --child")
    p.add_argument("--task", choices=("score", "alloc"), required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--tokens", type=Path)
    p.add_argument("--stream", type=int, choices=(0, 1), default=1)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--alloc-bytes", type=int, default=HARNESS_ALLOC)
    args = p.parse_args(argv)
    import torch

    if args.task == "score":
        importlib.import_module("dropquant.model.layerwise")  # its imports count in the baseline, not in the peak

        input_ids = torch.load(args.tokens)
        work = lambda: score(args.checkpoint, input_ids, stream=bool(args.stream), batch_size=args.batch_size)
    else:
        work = lambda: {"last": int(torch.ones(args.alloc_bytes, dtype=torch.uint8)[-1])}
    baseline = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    out = work()
    wall = time.perf_counter() - t0
    record = {"wall_s": wall, "peak_bytes": _status_bytes("VmHWM"), "baseline_bytes": baseline,
              "importance": out.get("importance"), "n_tokens": out.get("n_tokens")}
    args.result.write_text(json.dumps(record))
    return 0


# --- the parent ----------------------------------------------------------------------------------------------

@dataclass
class Measurement:
    label: str
    wall_s: float
    peak_bytes: int
    baseline_bytes: int
    model_bytes: int
    importance: Optional[dict] = None
    walls: list = field(default_factory=list)

    def line(self) -> str:
        gb = 1e9
        return (f"  {self.label:<22} {self.wall_s:8.1f} s   peak RSS {self.peak_bytes / gb:6.2f} GB "
                f"(baseline {self.baseline_bytes / gb:.2f})   model {self.model_bytes / gb:6.2f} GB   "
                f"RSS / model {self.peak_bytes / self.model_bytes:6.3f}")


def run_child(folder: Path, label: str, child_args: list[str]) -> dict:
    """One `--child` run in a fresh interpreter; its output goes to a log shown when it fails."""
    stem = label.replace(" ", "-")
    result, log = folder / f"{stem}.json", folder / f"{stem}.log"
    cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--child", "--result", str(result), *child_args]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=CHILD_TIMEOUT_S)
    if proc.returncode != 0 or not result.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise BenchError(f"{label}: the child exited with {proc.returncode}:\n{tail}")
    return json.loads(result.read_text())


def score_run(folder: Path, label: str, checkpoint: Path, tokens: Path, *, stream: bool, batch_size: int) -> dict:
    return run_child(folder, label, ["--task", "score", "--checkpoint", str(checkpoint), "--tokens", str(tokens),
                                     "--stream", str(int(stream)), "--batch-size", str(batch_size)])


def summarize(label: str, runs: list[dict], checkpoint: Path) -> Measurement:
    """Median wall time and highest peak of the runs, each made in its own process."""
    from dropquant.model.checkpoint import Checkpoint

    m = Measurement(label, statistics.median(r["wall_s"] for r in runs), max(r["peak_bytes"] for r in runs),
                    min(r["baseline_bytes"] for r in runs), Checkpoint(checkpoint).total_bytes(), runs[0]["importance"],
                    [r["wall_s"] for r in runs])
    print(m.line(), flush=True)
    return m


def check_harness(folder: Path) -> bool:
    """A dummy child allocating a known amount, started while this process holds more than that: the
    measurement must find the child's own allocation, not this process's."""
    held = bytearray(2 * HARNESS_ALLOC)  # zero-filled, so resident
    r = run_child(folder, "harness", ["--task", "alloc", "--alloc-bytes", str(HARNESS_ALLOC)])
    del held
    found = r["peak_bytes"] - r["baseline_bytes"]
    ok = abs(found - HARNESS_ALLOC) <= HARNESS_TOLERANCE * HARNESS_ALLOC
    print(f"  harness: child allocated {HARNESS_ALLOC / 2**20:.0f} MiB, measured peak - baseline "
          f"{found / 2**20:.0f} MiB (parent held {2 * HARNESS_ALLOC / 2**20:.0f} MiB) {verdict(ok)}")
    return ok


def build(folder: Path, layers: int, shape: dict, seed: int) -> Path:
    from dropquant.model.checkpoint import Checkpoint
    from dropquant.model.random_model import write_random_checkpoint

    path = folder / f"random-{layers}L-h{shape['hidden']}"
    t0 = time.perf_counter()
    write_random_checkpoint(path, layers=layers, seed=seed, progress=False, **shape)
    print(f"  built {path.name}: {Checkpoint(path).total_bytes() / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return path


def write_tokens(folder: Path, checkpoint: Path, spec: str, seed: int) -> tuple[Path, int]:
    import torch

    n, seq = parse_tokens(spec)
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))
    path = folder / "tokens.pt"
    torch.save(ids, path)
    return path, ids.numel()


def parse_tokens(spec: str) -> tuple[int, int]:
    try:
        n, seq = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise BenchError(f"--tokens must be SAMPLESxLENGTH, e.g. 8x128; got '{spec}'") from None
    if n < 1 or seq < 1:
        raise BenchError(f"--tokens: both numbers must be positive, got '{spec}'")
    return n, seq


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def ratio_line(name: str, value: float, target: float, target_text: str) -> str:
    return f"  {name:<42} {value:7.3f}  (target <= {target_text}) {verdict(value <= target)}"


def report(small: Measurement, large: Measurement, inmem: Measurement) -> dict:
    ratios = {
        "peak_large_over_small": large.peak_bytes / small.peak_bytes,
        "peak_large_over_model_large": large.peak_bytes / large.model_bytes,
        "stream_over_inmemory_time": statistics.median(a / b for a, b in zip(small.walls, inmem.walls)),
    }
    per_pair = [a / b for a, b in zip(small.walls, inmem.walls)]
    print(ratio_line("peak RSS streamed, large / small", ratios["peak_large_over_small"], PEAK_GROWTH_TARGET,
                     f"{PEAK_GROWTH_TARGET}"))
    print(ratio_line("peak RSS streamed large / its model bytes", ratios["peak_large_over_model_large"],
                     PEAK_OVER_MODEL_TARGET, "1/3"))
    print(ratio_line("time small: streamed / in-memory", ratios["stream_over_inmemory_time"], STREAM_TIME_TARGET,
                     f"{STREAM_TIME_TARGET}"))
    ratios["stream_over_inmemory_spread"] = (max(per_pair) - min(per_pair)) / ratios["stream_over_inmemory_time"]
    print(f"    median of {len(per_pair)} alternating pairs: {', '.join(f'{r:.3f}' for r in per_pair)} "
          f"(spread {ratios['stream_over_inmemory_spread']:.1%}"
          f"{'; a single pair: interference cannot be told apart' if len(per_pair) < 2 else ''})")
    diff = importance_gap(small.importance, inmem.importance)
    if diff is not None:
        print(f"  streamed vs in-memory importance, small: max |difference| {diff:.2e}")
    return ratios


def importance_gap(a: Optional[dict], b: Optional[dict]) -> Optional[float]:
    """Largest difference between two runs' importance lists (the two stacks should agree)."""
    if not a or not b:
        return None
    return max((abs(x - y) for k in a if k in b for x, y in zip(a[k], b[k])), default=None)


def workdir_base(arg: Optional[str]) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("TMPDIR"):
        return Path(os.environ["TMPDIR"])
    if (ROOT.parent / "tmp").is_dir():
        return ROOT.parent / "tmp"
    return Path(tempfile.gettempdir())


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers-small", type=int, default=4)
    p.add_argument("--layers-large", type=int, default=16)
    p.add_argument("--tokens", default="8x128", help="calibration tokens, SAMPLESxLENGTH (default 8x128)")
    p.add_argument("--seed", type=int, default=0, help="of the weights and of the tokens")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (median time, highest peak)")
    p.add_argument("--workdir", help="where the temporary folder goes (default $TMPDIR, else ../tmp)")
    p.add_argument("--keep", action="store_true", help="leave the checkpoints and logs in place")
    p.add_argument("--quick", action="store_true", help="a small hidden size: checks the harness end to end")
    p.add_argument("--check-harness", action="store_true", help="only the dummy-child memory check")
    for name in ("hidden", "intermediate", "heads", "kv_heads"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int)
    return p.parse_args(argv)


def layer_shape(args) -> dict:
    from dropquant.model.random_model import LLAMA3_8B_SHAPE

    shape = dict(LLAMA3_8B_SHAPE, **(QUICK_SHAPE if args.quick else {}))
    shape.update({k: v for k in QUICK_SHAPE if (v := getattr(args, k)) is not None})
    return shape


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        raise SystemExit(_child(argv[1:]))
    args = parse_args(argv)
    base = workdir_base(args.workdir)
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=base))
    try:
        return run(args, folder)
    except BenchError as err:
        print(f"scale bench failed: {err}", flush=True)
        return {"error": str(err)}
    finally:
        if args.keep:
            print(f"  kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def run(args, folder: Path) -> dict:
    if args.check_harness:
        return {"harness_ok": check_harness(folder)}
    shape = layer_shape(args)
    print(f"scale bench: llama layers of hidden {shape['hidden']}, intermediate {shape['intermediate']}, "
          f"{shape['heads']}/{shape['kv_heads']} heads, bf16; {args.layers_small} and {args.layers_large} layers; "
          f"tokens {args.tokens}, batch {args.batch_size}, in {folder}", flush=True)
    parse_tokens(args.tokens)  # a typo fails before gigabytes are written
    small_ckpt = build(folder, args.layers_small, shape, args.seed)
    large_ckpt = build(folder, args.layers_large, shape, args.seed)
    tokens, n_tokens = write_tokens(folder, small_ckpt, args.tokens, args.seed)
    # Streamed and in-memory alternate, so that a neighbour's load falls on both; each pair gives one ratio.
    pairs = [(score_run(folder, f"streamed-{r}", small_ckpt, tokens, stream=True, batch_size=args.batch_size),
              score_run(folder, f"in-memory-{r}", small_ckpt, tokens, stream=False, batch_size=args.batch_size))
             for r in range(args.repeats)]
    small = summarize(f"streamed {args.layers_small}L", [a for a, _ in pairs], small_ckpt)
    inmem = summarize(f"in-memory {args.layers_small}L", [b for _, b in pairs], small_ckpt)
    large = summarize(f"streamed {args.layers_large}L",
                      [score_run(folder, f"large-{r}", large_ckpt, tokens, stream=True, batch_size=args.batch_size)
                       for r in range(args.repeats)], large_ckpt)
    if not args.keep:  # the large checkpoint is most of the disk; the report needs only its size, already read
        shutil.rmtree(large_ckpt, ignore_errors=True)
    ratios = report(small, large, inmem)
    if args.quick or shape["hidden"] != 4096:
        print("  (not the 8B shape: these figures check the harness; the targets are for --hidden 4096)")
    return {"n_tokens": n_tokens, **ratios}


if __name__ == "__main__":
    raise SystemExit(1 if "error" in main() else 0)
