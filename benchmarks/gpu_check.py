"""The device check: the GPU paths measured on one CUDA GPU, as one command that needs no network (docs/gpu.md).

    python -m benchmarks.gpu_check [--out reports/gpu_check] [--budget 450] [--parts tests scores heal stream speed]
                                   [--device cuda|cpu] [--quick]

Parts, each in its own process under its own time limit (the whole within `--budget` seconds, 7.5 minutes by
default, so that it fits 8 minutes of one H100), the report rewritten after each:

  tests   `pytest -m gpu tests/test_gpu.py tests/test_streaming.py`: the tests marked `gpu`
  scores  the embedded model's scores on the GPU against the CPU's, same tokens, float32 (max |difference| per unit,
          the attention-8 plan each gives), and in bfloat16 on the GPU
  heal    `linear+distill` of the embedded model's attention-8 plan on the GPU: with the CPU run's settings (32
          samples of 512 tokens, 28 fitted + 4 held out, heal.* defaults: 120 LoRA steps) and with a 10x budget
          (samples x steps: 144 samples, 240 steps; float32, and bfloat16 where the GPU has it), each with its time
          and KL recovered on the held-out samples
  stream  scores of a random Llama-3-8B-shaped model (16 layers, bfloat16, written to a scratch folder) streamed one
          layer at a time onto the GPU: time and peak GPU memory
  speed   with a CUDA build of llama.cpp only: attention-8 against the unpruned model, Q8_0, every layer on the GPU
          (the evaluate stage's A/B rounds)

Calibration text: the offline text the fidelity measure falls back to (Python's own docstrings), so nothing is
sampled or downloaded. It writes OUT.json (every figure) and OUT.md (a summary). Exit status: 0 when every part ran
(or was skipped with its reason), 1 when one failed or ran out of time, 3 when there is no CUDA device (nothing is
measured; the report says so). `--device cpu --quick` runs the same code small on the CPU (tests/test_gpu.py).
Not part of `make bench` (benchmarks/__main__.py runs the bench_* modules only).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARTS = {"tests": 90, "scores": 75, "heal": 180, "stream": 120, "speed": 90}  # each part's own limit, seconds
BUDGET_S = 450
NO_CUDA = 3
GPU_TEST_FILES = ("test_gpu.py", "test_streaming.py")  # the files with tests marked `gpu`
ATTN_8 = [5, 6, 7, 9, 25, 26, 28, 29]  # the embedded model's attention-8 plan on the CPU (docs/heal.md)
LLAMA3_VOCAB = 128256
# The CPU run of docs/heal.md: 32 x 512 calibration tokens, heal.* defaults (steps 120); the 10x budget multiplies
# training samples x steps by 10: (144 - 4) x 240 = 10 x (32 - 4) x 120.
HEAL_RUNS = {"cpu_settings": (32, 120), "budget_10x": (144, 240)}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


# --- the parts (each runs in a child process: `--part NAME --result FILE`) -------------------------------------

class Result(dict):
    """A part's figures, written to its file after every step, so that a part cut off by its limit keeps them."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def save(self, **values) -> None:
        self.update(values)
        self.path.write_text(json.dumps(self, indent=2, default=str))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _offline_tokens(tokenizer, n: int, seq: int):
    """n x seq token ids of the offline text, cut into blocks without padding (as a text calibration is)."""
    import torch

    from dropquant.evaluation.fidelity import _offline_text

    ids = tokenizer(_offline_text())["input_ids"]
    if len(ids) < n * seq:
        raise RuntimeError(f"the offline text has {len(ids)} tokens, fewer than {n} x {seq}")
    return torch.tensor(ids[:n * seq], dtype=torch.int64).view(n, seq)


def _embedded(device: str):
    import torch

    from dropquant.model.loading import load_model, load_tokenizer, resolve_source

    source = resolve_source("embedded")
    return load_model(source, torch.float32, device), load_tokenizer(source)


def part_scores(args, out: Result) -> None:
    import copy

    import torch

    from dropquant.model.layerwise import InMemoryStack
    from dropquant.prune.scoring import score_stack

    n, seq = (4, 64) if args.quick else (32, 512)
    model, tokenizer = _embedded("cpu")
    tokens = _offline_tokens(tokenizer, n, seq)
    out.save(tokens=[n, seq], device=args.device)
    runs = {}
    # "gpu" is --device: the CPU too in a --device cpu plumbing run
    for name, dev, dtype in (("cpu_float32", "cpu", torch.float32), ("gpu_float32", args.device, torch.float32),
                             ("gpu_bfloat16", args.device, torch.bfloat16)):
        m = copy.deepcopy(model).to(dev, dtype)
        _sync(dev)
        start = time.perf_counter()
        runs[name] = score_stack(InMemoryStack(m), tokens, batch_size=2, progress=False)
        _sync(dev)
        seconds = time.perf_counter() - start
        del m
        imp = runs[name]["importance"]
        attn8 = sorted(sorted(range(len(imp["attn"])), key=imp["attn"].__getitem__)[:8])
        out.setdefault("runs", {})[name] = {"device": dev, "seconds": round(seconds, 2), "attn8": attn8}
        if name != "cpu_float32":
            ref = runs["cpu_float32"]["importance"]
            out["runs"][name]["max_abs_diff"] = {u: max(abs(a - b) for a, b in zip(imp[u], ref[u])) for u in imp}
        out.save()
    gpu = out["runs"]["gpu_float32"]
    out.save(within_1e3=max(gpu["max_abs_diff"].values()) <= 1e-3,
             same_plan=gpu["attn8"] == out["runs"]["cpu_float32"]["attn8"])


def part_heal(args, out: Result) -> None:
    import torch

    import dropquant as dq

    model, tokenizer = _embedded(args.device)
    runs = {"cpu_settings": (6, 2), "budget_10x": (9, 4)} if args.quick else HEAL_RUNS
    seq = 64 if args.quick else 512
    tokens = _offline_tokens(tokenizer, max(n for n, _ in runs.values()), seq)
    scores = dq.score(model, tokens[:runs["cpu_settings"][0]], device=args.device, progress=False)
    n_layers = len(scores.importance["attn"])
    layers = ATTN_8 if n_layers == 30 else list(range(1, n_layers, 3))
    plan = dq.plan(scores, "attn", layers={"attn": layers})
    out.save(plan=plan.attn, seq_len=seq, device=args.device, plan_from_scores=dq.plan(scores, "attn", len(layers)).attn)
    precisions = ["float32"] + (["bfloat16"] if args.device.startswith("cuda") and torch.cuda.is_bf16_supported() else [])
    with tempfile.TemporaryDirectory(prefix="gpu-check-heal-") as scratch:
        for name, (n, steps) in runs.items():
            for precision in precisions if name == "budget_10x" else ["float32"]:
                label = name if precision == "float32" else f"{name}_bfloat16"
                _sync(args.device)
                start = time.perf_counter()
                dq.drop(model, plan, heal="linear+distill", out=Path(scratch) / label, calibration=tokens[:n],
                        tokenizer=tokenizer, device=args.device, progress=False,
                        heal_options={"steps": steps, "precision": precision})
                _sync(args.device)
                seconds = time.perf_counter() - start
                record = json.loads((Path(scratch) / label / "heal.json").read_text())
                kl = record.get("heldout_kl") or {}
                distill = record.get("distill") or {}
                out.setdefault("runs", {})[label] = {
                    "samples": n, "train_samples": n - 4, "steps": steps, "precision": precision,
                    "seconds": round(seconds, 1), "linear_seconds": (record.get("linear") or {}).get("seconds"),
                    "distill_seconds": round(distill.get("seconds", 0.0), 1), "steps_run": distill.get("steps"),
                    "best_step": distill.get("best_step"), "kl_unhealed": kl.get("unhealed"),
                    "kl_healed": kl.get("healed"), "kl_recovered": kl.get("recovered")}
                out.save()


def part_stream(args, out: Result) -> None:
    import torch

    from dropquant.evaluation.speed import peak_rss_bytes
    from dropquant.model.layerwise import StreamedStack
    from dropquant.model.loading import load_config, resolve_source
    from dropquant.model.random_model import LLAMA3_8B_SHAPE, TINY_SHAPE, write_random_checkpoint
    from dropquant.prune.scoring import score_stack

    layers, shape, (n, seq) = (3, TINY_SHAPE, (2, 32)) if args.quick else (16, LLAMA3_8B_SHAPE, (8, 512))
    vocab = 512 if args.quick else LLAMA3_VOCAB  # random token ids are scored: no tokenizer needed
    with tempfile.TemporaryDirectory(prefix="gpu-check-stream-", dir=args.scratch) as scratch:
        start = time.perf_counter()
        path = write_random_checkpoint(Path(scratch) / "model", layers=layers, dtype="bfloat16", progress=False,
                                       tokenizer_source=None, vocab=vocab, **shape)
        weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        out.save(layers=layers, hidden=shape["hidden"], weights_gb=round(weights / 1e9, 2), tokens=[n, seq],
                 write_seconds=round(time.perf_counter() - start, 1), device=args.device)
        config = load_config(resolve_source(str(path)))
        ids = torch.randint(0, config.vocab_size, (n, seq), generator=torch.Generator().manual_seed(0))
        on_gpu = args.device.startswith("cuda")
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        scores = score_stack(StreamedStack(path, config, torch.bfloat16, args.device), ids, batch_size=2,
                             progress=False)
        _sync(args.device)
        out.save(seconds=round(time.perf_counter() - start, 1), n_tokens=scores["n_tokens"],
                 finite=all(x == x for u in scores["importance"].values() for x in u),
                 peak_rss_gb=round(peak_rss_bytes() / 1e9, 2))
        if on_gpu:
            embedding = config.vocab_size * config.hidden_size * 2  # read onto the GPU whole for each batch
            layer_bytes = (weights - 2 * embedding) / layers
            out.save(peak_gpu_gb=round((torch.cuda.max_memory_allocated() - before) / 1e9, 2),
                     embedding_gb=round(embedding / 1e9, 3),
                     gpu_after_gb=round((torch.cuda.memory_allocated() - before) / 1e9, 3),
                     reserved_after_gb=round(torch.cuda.memory_reserved() / 1e9, 3),
                     layer_gb=round(layer_bytes / 1e9, 3), gpu=torch.cuda.get_device_name())


def part_speed(args, out: Result) -> None:
    import dropquant as dq
    from dropquant.evaluation.device import describe, gpu_offload_supported
    from dropquant.evaluation.metrics import speed_metrics
    from dropquant.evaluation.speed import ab_compare

    if not gpu_offload_supported():
        out.save(status="skipped", reason="this llama-cpp-python build has no GPU backend: `make clean-setup setup` "
                                          "on a machine with nvidia-smi and nvcc builds the CUDA one (docs/gpu.md)")
        return
    with tempfile.TemporaryDirectory(prefix="gpu-check-speed-") as scratch:
        scratch = Path(scratch)
        model, tokenizer = _embedded("cpu")  # the GGUFs are written from the CPU; llama.cpp runs them on the GPU
        scores = dq.score(model, _offline_tokens(tokenizer, 2, 64), progress=False)
        plan = dq.plan(scores, "attn", layers={"attn": ATTN_8})
        start = time.perf_counter()
        dq.drop(model, plan, out=scratch / "pruned", tokenizer=tokenizer, progress=False)
        variant = dq.to_gguf(scratch / "pruned", scratch / "attn8-Q8_0.gguf", "Q8_0", source="embedded")
        base = dq.to_gguf("embedded", scratch / "base-Q8_0.gguf", "Q8_0")
        out.save(plan=ATTN_8, export_seconds=round(time.perf_counter() - start, 1), device=describe(-1, variant))
        start = time.perf_counter()
        speed = ab_compare(variant, base, rounds=2 if args.quick else 3, max_rounds=2 if args.quick else 4,
                           gpu_layers=-1, tg_tokens=16)
        m = speed_metrics(speed)
        out.save(seconds=round(time.perf_counter() - start, 1), clock=speed.get("clock"), rounds=speed["rounds"],
                 noisy=speed["noisy"], metrics={k: v for k, v in m.items() if v is not None},
                 memory=speed["memory"])


PART_FUNCS = {"scores": part_scores, "heal": part_heal, "stream": part_stream, "speed": part_speed}


def run_part(args) -> int:
    out = Result(Path(args.result))
    try:
        PART_FUNCS[args.part](args, out)
    except Exception as err:  # the parent reports it beside the other parts' figures
        import traceback

        out.save(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:])
        return 1
    if "status" not in out:
        out.save(status="ok")
    return 0


# --- the parent: parts under limits, the report ----------------------------------------------------------------

def _run_limited(cmd: list[str], limit: float, env: dict) -> tuple[int | None, str]:
    """(exit status or None when cut off at `limit` seconds, the output's tail); the whole process group goes."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            text, _ = proc.communicate(timeout=limit)
            return proc.returncode, text[-4000:]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            text, _ = proc.communicate()
            return None, (text or "")[-4000:]


def _pytest_summary(text: str) -> dict:
    import re

    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)}
    return {"counts": counts, "ok": counts.get("failed", 0) == 0 and counts.get("error", counts.get("errors", 0)) == 0}


def _environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    try:
        import llama_cpp

        from dropquant.evaluation.device import backend, gpu_offload_supported

        info["llama_cpp"] = {"version": llama_cpp.__version__, "gpu_offload": gpu_offload_supported(),
                             "backend": backend()}
    except Exception as err:  # no llama.cpp here: the speed part says so
        info["llama_cpp"] = {"error": f"{type(err).__name__}: {err}"}
    return info


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    env = report["environment"]
    lines = [f"# GPU check ({report['started']})", "",
             f"Device: {env.get('gpu', 'no CUDA device')}; torch {env['torch']} (CUDA {env['torch_cuda']}); "
             f"llama.cpp: {env.get('llama_cpp')}; checked on `{report['device']}`{' (quick)' if report['quick'] else ''};"
             f" {report['seconds']:.0f} s of a {report['budget_s']} s budget.", ""]
    if report.get("note"):
        lines += [report["note"], ""]
    for name, part in report["parts"].items():
        status = part.get("status", "?")
        lines.append(f"## {name}: {status} ({part.get('wall_seconds', 0):.0f} s)")
        lines.append("")
        if part.get("reason") or part.get("error"):
            lines += [f"    {part.get('reason') or part.get('error')}", ""]
        figures = {k: v for k, v in part.items()
                   if k not in ("status", "wall_seconds", "reason", "error", "traceback", "output", "runs")}
        for key, value in figures.items():
            lines.append(f"- {key}: {json.dumps(value, default=str)}")
        for run, values in (part.get("runs") or {}).items():
            lines.append(f"- {run}: " + ", ".join(f"{k} {json.dumps(v, default=str)}" for k, v in values.items()))
        lines.append("")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out", type=Path, default=Path("reports/gpu_check"),
                        help="report path without suffix: OUT.json and OUT.md (default reports/gpu_check)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for all parts (default {BUDGET_S})")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (plumbing only)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: the plumbing, in seconds")
    parser.add_argument("--scratch", default=None, help="folder for the random 8B-shaped checkpoint (9.1 GB)")
    parser.add_argument("--part", choices=list(PART_FUNCS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    if args.part:
        return run_part(args)

    import torch

    start = time.perf_counter()
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": args.device, "quick": args.quick,
              "budget_s": args.budget, "environment": _environment(), "parts": {}, "seconds": 0.0}
    report["cuda"] = report["environment"]["cuda"]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        why = ("torch here is a CPU build" if torch.version.cuda is None else "torch sees no CUDA device")
        report["note"] = (f"no CUDA device ({why}, torch {torch.__version__}): nothing measured. Run it on a machine "
                          "with an NVIDIA GPU and a CUDA build of torch, or `--device cpu --quick` for the plumbing.")
        write_report(args.out, report)
        print(f"gpu_check: {report['note']}", file=sys.stderr)
        return NO_CUDA
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    failed = False
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name in args.parts:
            left = args.budget - (time.perf_counter() - start)
            if left < 20:
                report["parts"][name] = {"status": "skipped", "reason": f"no time left of the {args.budget} s budget"}
                continue
            limit = min(PARTS[name] * (0.5 if args.quick else 1), left)
            t0 = time.perf_counter()
            print(f"gpu_check: {name} (at most {limit:.0f} s)", flush=True)
            if name == "tests":
                rc, text = _run_limited([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                         *(str(root / "tests" / f) for f in GPU_TEST_FILES)], limit, env)
                part = {**_pytest_summary(text), "output": text[-1500:]}
                part["status"] = "timeout" if rc is None else "ok" if rc in (0, 5) and part["ok"] else "failed"
            else:
                result = Path(tmp) / f"{name}.json"
                cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--part", name, "--result", str(result),
                       "--device", args.device] + (["--quick"] if args.quick else []) + (
                       ["--scratch", args.scratch] if args.scratch else [])
                rc, text = _run_limited(cmd, limit, env)
                part = json.loads(result.read_text()) if result.is_file() else {}
                if rc is None:
                    part["status"] = "timeout"
                elif "status" not in part:
                    part.update(status="failed", error=text[-1500:])
            part["wall_seconds"] = round(time.perf_counter() - t0, 1)
            failed |= part["status"] in ("failed", "timeout")
            report["parts"][name] = part
            report["seconds"] = time.perf_counter() - start
            write_report(args.out, report)
            print(f"gpu_check: {name} {part['status']} in {part['wall_seconds']:.0f} s", flush=True)
    report["seconds"] = time.perf_counter() - start
    write_report(args.out, report)
    print(f"gpu_check: report in {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
