"""Throughput of the lm-eval adapters on the same requests: llama.cpp with KV-cache reuse (ours), llama.cpp one
evaluation per request (naive), and lm-eval's own HF model (torch float32), all on the embedded model.

    python -m benchmarks.bench_eval [--limit 50] [--tasks arc_easy,hellaswag,piqa] [--threads 2]

Targets (issue #5): ours >= 3x naive, and ahead of HFLM on this CPU. Prints requests/s and the ratios.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def build_requests(tasks: list[str], limit: int, data_dir: Path):
    from dropquant.evaluation.accuracy import _task_manager
    from dropquant.evaluation.tasks import TASKS, prepare_tasks

    tmp = Path(tempfile.mkdtemp(prefix="bench-tasks-"))
    runnable, _ = prepare_tasks(tasks, data_dir, tmp)
    tm = _task_manager(runnable, tmp)
    reqs = []
    for name in runnable:
        task = tm.load_task_or_group([TASKS[name].lm_eval_name])[TASKS[name].lm_eval_name]
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        reqs += [inst for inst in task.instances if inst.request_type == "loglikelihood"]
    return reqs


def timed(lm, reqs) -> tuple[float, list]:
    t = time.perf_counter()
    out = lm.loglikelihood(reqs, disable_tqdm=True)
    return time.perf_counter() - t, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=50, help="items per task")
    parser.add_argument("--tasks", default="arc_easy,hellaswag,piqa")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--no-hf", action="store_true", help="skip lm-eval's HF model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not DATA.is_dir():
        print(f"bench_eval: shared data not found at {DATA}; nothing to measure")
        return 0

    import torch

    from dropquant.evaluation.llamacpp_lm import LlamaCppLM
    from dropquant.models import embedded_gguf_path, load_model, load_tokenizer, resolve_source

    torch.set_num_threads(args.threads)
    reqs = build_requests(args.tasks.split(","), args.limit, DATA)
    n_tok = None
    print(f"{len(reqs)} loglikelihood requests ({args.tasks}, {args.limit} items each), {args.threads} threads")
    results = {}
    for name, lm in (("llama.cpp + KV reuse", lambda: LlamaCppLM(embedded_gguf_path(), 2048, args.threads)),
                     ("llama.cpp naive", lambda: LlamaCppLM(embedded_gguf_path(), 2048, args.threads, reuse_kv=False))):
        model = lm()
        secs, out = timed(model, reqs)
        results[name] = (secs, out)
        n_tok = n_tok or model.tokens_evaluated
        print(f"  {name:22s} {secs:7.1f} s  {len(reqs) / secs:7.1f} req/s  tokens evaluated {model.tokens_evaluated}")
    if not args.no_hf:
        from lm_eval.models.huggingface import HFLM

        source = resolve_source("embedded")
        hf = HFLM(pretrained=load_model(source), tokenizer=load_tokenizer(source), batch_size=args.hf_batch_size,
                  device="cpu", max_length=2048)
        secs, out = timed(hf, reqs)
        results["lm-eval HFLM (torch f32)"] = (secs, out)
        print(f"  {'lm-eval HFLM (torch f32)':22s} {secs:7.1f} s  {len(reqs) / secs:7.1f} req/s  batch {args.hf_batch_size}")
    ours = results["llama.cpp + KV reuse"][0]
    print(f"speed-up over naive: {results['llama.cpp naive'][0] / ours:.2f}x (target >= 3x)")
    if "lm-eval HFLM (torch f32)" in results:
        print(f"speed-up over HFLM:  {results['lm-eval HFLM (torch f32)'][0] / ours:.2f}x (target > 1x)")
    a = [x for x, _ in results["llama.cpp + KV reuse"][1]]
    b = [x for x, _ in results["llama.cpp naive"][1]]
    print(f"max |loglik(reuse) - loglik(naive)|: {max(abs(x - y) for x, y in zip(a, b)):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
