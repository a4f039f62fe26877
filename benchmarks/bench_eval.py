"""Throughput of the lm-eval adapters on the same requests: llama.cpp with shared-context batching (ours), llama.cpp
one evaluation per request (naive), and lm-eval's own HF model (torch float32), all on the embedded model.

    python -m benchmarks.bench_eval [--limit 20] [--tasks arc_easy,hellaswag,piqa] [--threads 2]

Targets (issue #5): ours >= 3x naive, and ahead of HFLM on this CPU. The three run in one process with the same
threads, interleaved task by task in rotating order (a busy machine slows all three alike); prints requests/s,
tokens evaluated, the ratios against the targets, and how far our log-likelihoods are from the naive adapter's.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OURS, NAIVE, HF = "llama.cpp shared context", "llama.cpp naive", "lm-eval HFLM torch f32"


def build_requests(tasks: list[str], limit: int, data_dir: Path) -> dict[str, list]:
    from dropquant.evaluation.accuracy import _task_manager
    from dropquant.evaluation.tasks import TASKS, prepare_tasks

    tmp = Path(tempfile.mkdtemp(prefix="bench-tasks-"))
    runnable, _ = prepare_tasks(tasks, data_dir, tmp)
    tm = _task_manager(runnable, tmp)
    reqs = {}
    for name in runnable:
        task = tm.load_task_or_group([TASKS[name].lm_eval_name])[TASKS[name].lm_eval_name]
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        reqs[name] = [inst for inst in task.instances if inst.request_type == "loglikelihood"]
    return reqs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=20, help="items per task")
    parser.add_argument("--tasks", default="arc_easy,hellaswag,piqa")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--no-hf", action="store_true", help="skip lm-eval's HF model")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="GGUF of the embedded model for the llama.cpp adapters (default: the shipped Q4_1 file; "
                             "e.g. data/baseline/gguf/model.gguf, the pipeline's Q8_0 export)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not DATA.is_dir():
        print(f"bench_eval: shared data not found at {DATA}; nothing to measure")
        return 0

    import torch

    from dropquant.evaluation.llamacpp_lm import LlamaCppLM
    from dropquant.models import embedded_gguf_path, load_model, load_tokenizer, resolve_source

    torch.set_num_threads(args.threads)
    by_task = build_requests(args.tasks.split(","), args.limit, DATA)
    n_req = sum(map(len, by_task.values()))
    print(f"{n_req} loglikelihood requests ({', '.join(by_task)}; {args.limit} items each), {args.threads} threads, "
          f"interleaved task by task")
    gguf = args.gguf or embedded_gguf_path()
    models = {OURS: LlamaCppLM(gguf, 2048, args.threads),
              NAIVE: LlamaCppLM(gguf, 2048, args.threads, reuse_kv=False)}
    if not args.no_hf:
        from lm_eval.models.huggingface import HFLM

        source = resolve_source("embedded")
        models[HF] = HFLM(pretrained=load_model(source), tokenizer=load_tokenizer(source),
                          batch_size=args.hf_batch_size, device="cpu", max_length=2048)
    names = list(models)
    secs = dict.fromkeys(names, 0.0)
    out: dict[str, list] = {n: [] for n in names}
    for r, reqs in enumerate(by_task.values()):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            t = time.perf_counter()
            out[name] += models[name].loglikelihood(reqs, disable_tqdm=True)
            secs[name] += time.perf_counter() - t

    for name in names:
        extra = (f"tokens evaluated {models[name].tokens_evaluated:6d}, {models[name].decode_calls} llama_decode calls"
                 if name != HF else f"batch {args.hf_batch_size}")
        print(f"  {name:24s} {secs[name]:7.1f} s  {n_req / secs[name]:6.1f} req/s  {extra}")

    def verdict(ratio, target, strict=False):
        ok = ratio > target if strict else ratio >= target
        return "OK" if ok else "MISSED"

    r = secs[NAIVE] / secs[OURS]
    print(f"speed-up over naive: {r:.2f}x  (target >= 3x: {verdict(r, 3.0)})")
    if HF in secs:
        r = secs[HF] / secs[OURS]
        print(f"speed-up over HFLM:  {r:.2f}x  (target > 1x: {verdict(r, 1.0, strict=True)})")
    reqs = [x for v in by_task.values() for x in v]
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
