"""Throughput of the lm-eval adapters on the same requests: llama.cpp with shared contexts (ours), llama.cpp
one evaluation per request (naive), and lm-eval's own HF model (torch float32), all on the embedded model.

    python -m benchmarks.bench_eval [--tasks paper] [--fewshot paper] [--limit 5] [--gguf FILE] [--threads 2]

Targets (issue #5): ours >= 3x naive, and ahead of HFLM on this CPU. The requests are exactly those the evaluate
stage sends (recorded from lm_eval.simple_evaluate over ../shared/data), by default the paper's nine tasks at the
paper's few-shot settings; MMLU is limited to a few subjects (`--mmlu-subjects`), since `--limit` counts items
per subject. The llama.cpp adapters read the embedded model quantized to Q8_0 (the pipeline's default type;
built here unless --gguf names a file). The three run in one process with the same threads, interleaved task by
task in rotating order (a busy machine slows all three alike); prints per task and in total the seconds, the
tokens evaluated, the ratios against the targets, and how far our log-likelihoods are from the naive adapter's.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from lm_eval.api.model import LM

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OURS, NAIVE, HF = "ours", "naive", "HFLM"


class _Recorder(LM):
    """Records the loglikelihood requests lm-eval makes (and answers them with zeros)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list = []

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self.requests += requests
        return [(0.0, False)] * len(requests)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def record_requests(tasks: list[str], limit: int, fewshot, data_dir: Path, mmlu_subjects: list[str]) -> dict:
    """{task: (shots, requests)}: what the evaluate stage would ask of a model, task by task."""
    import datasets
    import lm_eval

    from dropquant.evaluation.accuracy import _env, _task_manager
    from dropquant.evaluation.tasks import TASKS, fewshot_for, offline_env, prepare_tasks

    datasets.disable_progress_bars()
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-tasks-") as tmp, _env(offline_env(data_dir)):
        runnable, _ = prepare_tasks(tasks, data_dir, Path(tmp))
        tm = _task_manager(runnable, Path(tmp))
        for name in runnable:
            names = [f"mmlu_{s}" for s in mmlu_subjects] if name == "mmlu" else [TASKS[name].lm_eval_name]
            rec, shots = _Recorder(), fewshot_for(name, fewshot)
            lm_eval.simple_evaluate(model=rec, tasks=names, task_manager=tm, num_fewshot=shots, limit=limit,
                                    bootstrap_iters=0, log_samples=False, random_seed=0, numpy_random_seed=0,
                                    torch_random_seed=0, fewshot_random_seed=0)
            out[name] = (shots, rec.requests)
    return out


def embedded_q8_0(model, folder: Path, keep_f32: bool = False):
    """The embedded model as the pipeline's baseline export at Q8_0 (F32 GGUF from the torch weights, then
    llama.cpp's quantizer); with keep_f32, (Q8_0 path, F32 path)."""
    from dropquant.gguf.export import export_model
    from dropquant.model.loading import embedded_gguf_path
    from dropquant.gguf.quantize import quantize_gguf

    f32, q8 = folder / "model-f32.gguf", folder / "model-Q8_0.gguf"
    export_model(model, f32, tokenizer_gguf=embedded_gguf_path(), out_type="F32", name="SmolLM2-135M-Instruct")
    quantize_gguf(f32, q8, "Q8_0")
    if keep_f32:
        return q8, f32
    f32.unlink()
    return q8


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="paper", help="comma-separated, or 'paper' (all nine of eval.tasks)")
    parser.add_argument("--fewshot", default="paper", help="an integer, or 'paper' (as eval.fewshot)")
    parser.add_argument("--limit", type=int, default=5, help="items per task (per subject for mmlu)")
    parser.add_argument("--mmlu-subjects", default="abstract_algebra,anatomy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--no-hf", action="store_true", help="skip lm-eval's HF model")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="GGUF of the embedded model for the llama.cpp adapters (default: built here at Q8_0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task few-shot notices
    if not DATA.is_dir():
        print(f"bench_eval: shared data not found at {DATA}; nothing to measure")
        return 0

    import torch

    from dropquant.evaluation.llamacpp_lm import LlamaCppLM
    from dropquant.evaluation.tasks import TASKS
    from dropquant.model.loading import load_model, load_tokenizer, resolve_source

    torch.set_num_threads(args.threads)
    tasks = sorted(TASKS) if args.tasks == "paper" else args.tasks.split(",")
    fewshot = args.fewshot if args.fewshot == "paper" else int(args.fewshot)
    by_task = record_requests(tasks, args.limit, fewshot, DATA, args.mmlu_subjects.split(","))
    n_req = sum(len(r) for _, r in by_task.values())
    print(f"{n_req} loglikelihood requests, {args.limit} items per task (mmlu: per subject, "
          f"{args.mmlu_subjects}), few-shot {args.fewshot}, {args.threads} threads, interleaved task by task")

    source = resolve_source("embedded")
    model = load_model(source)
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        gguf = args.gguf or embedded_q8_0(model, Path(tmp))
        models = {OURS: LlamaCppLM(gguf, 2048, args.threads),
                  NAIVE: LlamaCppLM(gguf, 2048, args.threads, reuse_kv=False)}
        if not args.no_hf:
            from lm_eval.models.huggingface import HFLM

            models[HF] = HFLM(pretrained=model, tokenizer=load_tokenizer(source), batch_size=args.hf_batch_size,
                              device="cpu", max_length=2048)
        names = list(models)
        secs = {t: dict.fromkeys(names, 0.0) for t in by_task}
        tokens = {t: {} for t in by_task}
        out: dict[str, list] = {n: [] for n in names}
        for r, (task, (_, reqs)) in enumerate(by_task.items()):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
                lm = models[name]
                before = getattr(lm, "tokens_evaluated", 0)
                t = time.perf_counter()
                out[name] += lm.loglikelihood(reqs, disable_tqdm=True)
                secs[task][name] = time.perf_counter() - t
                tokens[task][name] = getattr(lm, "tokens_evaluated", 0) - before

    print(f"\n{'task':14s} {'shots':>5s} {'req':>5s} {'tokens naive':>12s} {'ours':>7s}  "
          + "  ".join(f"{n + ' s':>8s}" for n in names) + f"  {'ours/naive':>10s}" + (f"  {'ours/HF':>8s}" if HF in names else ""))
    for task, (shots, reqs) in by_task.items():
        s = secs[task]
        print(f"{task:14s} {shots:5d} {len(reqs):5d} {tokens[task][NAIVE]:12d} {tokens[task][OURS]:7d}  "
              + "  ".join(f"{s[n]:8.1f}" for n in names) + f"  {s[NAIVE] / s[OURS]:9.2f}x"
              + (f"  {s[HF] / s[OURS]:7.2f}x" if HF in names else ""))
    total = {n: sum(secs[t][n] for t in by_task) for n in names}
    print(f"{'total':14s} {'':5s} {n_req:5d} {sum(t[NAIVE] for t in tokens.values()):12d} "
          f"{sum(t[OURS] for t in tokens.values()):7d}  " + "  ".join(f"{total[n]:8.1f}" for n in names))
    print(f"  ours: {models[OURS].decode_calls} llama_decode calls, {models[OURS].tokens_reused} prefix tokens "
          f"kept in the cache from item to item; {n_req / total[OURS]:.1f} req/s against {n_req / total[NAIVE]:.1f}")

    def verdict(ratio, target, strict=False):
        return "OK" if (ratio > target if strict else ratio >= target) else "MISSED"

    r = total[NAIVE] / total[OURS]
    print(f"speed-up over naive: {r:.2f}x  (target >= 3x: {verdict(r, 3.0)})")
    if HF in total:
        r = total[HF] / total[OURS]
        print(f"speed-up over HFLM:  {r:.2f}x  (target > 1x: {verdict(r, 1.0, strict=True)})")
    reqs = [x for _, v in by_task.values() for x in v]
    n_cont = np.array([max(1, len(models[OURS].tok_encode(x.args[1]))) for x in reqs])
    ours = np.array([x for x, _ in out[OURS]])
    for name in names[1:]:
        d = np.abs(ours - np.array([x for x, _ in out[name]])) / n_cont
        agree = np.mean([a[1] == b[1] for a, b in zip(out[OURS], out[name])])
        print(f"|loglik(ours) - loglik({name})| per continuation token: mean {d.mean():.4f}, max {d.max():.4f}"
              f" (is_greedy agrees on {agree:.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
