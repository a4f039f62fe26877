"""Benchmark accuracy through lm-evaluation-harness: acc and acc_norm per task, and the paper's average."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

from ..errors import DropquantError
from .tasks import SPECS, TASKS, fewshot_for, lm_eval_tasks_dir, offline_env, prepare_tasks

log = logging.getLogger(__name__)


def make_lm(model: str | Path, n_ctx: int = 2048, threads: int = 2, batch_size: int = 8, gpu_layers: int = 0):
    """lm-eval model for a GGUF file (our llama.cpp adapter, `gpu_layers` of it on the GPU) or a Hugging Face
    directory (lm-eval's HFLM)."""
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        from .llamacpp_lm import LlamaCppLM

        return LlamaCppLM(path, n_ctx=n_ctx, threads=threads, gpu_layers=gpu_layers)
    if path.is_dir() and (path / "config.json").is_file():
        import torch
        from lm_eval.models.huggingface import HFLM

        torch.set_num_threads(threads)
        config = json.loads((path / "config.json").read_text())
        if "dropquant" in config:  # a pruned checkpoint: transformers alone cannot build its missing modules
            from dropquant.prune.pruned_checkpoint import load_checkpoint_tokenizer, load_pruned

            return HFLM(pretrained=load_pruned(path), tokenizer=load_checkpoint_tokenizer(path),
                        batch_size=batch_size, max_length=n_ctx, device="cpu")
        return HFLM(pretrained=str(path), dtype="float32", batch_size=batch_size, max_length=n_ctx, device="cpu")
    raise DropquantError(f"cannot evaluate '{model}': expected a .gguf file or a Hugging Face model directory")


@contextlib.contextmanager
def _env(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _task_manager(tasks: list[str], include_dir: Path):
    from lm_eval.tasks import TaskManager

    # Index only the built-in folders we need (the full index parses ~14000 YAML files: ~25 s), then our
    # local overrides, which win over same-named built-ins.
    builtin = lm_eval_tasks_dir()
    folders = sorted({str(builtin / Path(SPECS[t].yaml).parent) for t in tasks})
    index_log = logging.getLogger("lm_eval.tasks._index")
    level = index_log.level
    index_log.setLevel(logging.ERROR)  # "task X overrides existing task": intended here
    try:
        return TaskManager(include_path=[*folders, str(include_dir)], include_defaults=False)
    finally:
        index_log.setLevel(level)


def _loadable(tm, name: str) -> bool:
    try:
        tm.load_task_or_group([SPECS[name].lm_eval_name])
        return True
    except Exception as err:  # no network, dataset missing from the hub cache, ...
        log.warning("eval: skipping task '%s': its data cannot be loaded (%s: %s)", name, type(err).__name__,
                    str(err).splitlines()[0][:200] if str(err) else "")
        return False


def _metric(result: dict, name: str) -> Optional[float]:
    value = result.get(f"{name},none")
    return float(value) if isinstance(value, (int, float)) else None


@contextlib.contextmanager
def lm_eval_tasks(tasks: list[str], data_dir: Optional[Path]):
    """lm-eval's TaskManager for `tasks` (re-pointed at data_dir's files, offline), the tasks it can load and
    those skipped with a warning for want of data: (tm, ready, skipped)."""
    with tempfile.TemporaryDirectory(prefix="dropquant-tasks-") as tmp, _env(offline_env(data_dir)):
        runnable, skipped = prepare_tasks(tasks, data_dir, Path(tmp))
        tm = _task_manager(tasks, Path(tmp))
        ready = []
        for name in runnable:
            (ready if _loadable(tm, name) else skipped).append(name)
        yield tm, ready, skipped


def evaluate_accuracy(lm, tasks: list[str], limit: int = 0, fewshot: Union[int, str] = 0,
                      data_dir: Optional[Path] = None, seed: int = 0) -> dict:
    """Run lm-eval's tasks on `lm`; tasks without data are skipped (with a warning), never fatal."""
    import lm_eval

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise DropquantError(f"eval.tasks: unknown task(s) {unknown} (allowed: {', '.join(TASKS)})")
    with lm_eval_tasks(tasks, data_dir) as (tm, ready, skipped):
        out: dict = {"tasks": {}, "skipped": skipped, "limit": limit, "fewshot": fewshot,
                     "data_dir": str(data_dir) if data_dir else None}
        by_shots: dict[int, list[str]] = {}
        for name in ready:
            by_shots.setdefault(fewshot_for(name, fewshot), []).append(name)
        for shots, names in sorted(by_shots.items()):
            log.info("eval: %s, %d-shot, limit %s", ", ".join(names), shots, limit or "all")
            res = lm_eval.simple_evaluate(
                model=lm, tasks=[TASKS[n].lm_eval_name for n in names], task_manager=tm,
                num_fewshot=shots, limit=limit or None, bootstrap_iters=0, log_samples=False,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
            for name in names:
                key = TASKS[name].lm_eval_name
                r = res["results"][key]
                n_samples = res.get("n-samples", {})
                if name == "mmlu":
                    n = sum(v.get("effective", 0) for k, v in n_samples.items() if k.startswith("mmlu_"))
                else:
                    n = n_samples.get(key, {}).get("effective")
                out["tasks"][name] = {"acc": _metric(r, "acc"), "acc_norm": _metric(r, "acc_norm"),
                                      "n": n, "fewshot": shots}
    out["avg"] = average(out["tasks"])
    return out


def paper_score(task: dict) -> Optional[float]:
    """The paper reports acc_norm where a task has it, else acc."""
    return task["acc_norm"] if task.get("acc_norm") is not None else task.get("acc")


def average(tasks: dict) -> Optional[float]:
    scores = [paper_score(t) for t in tasks.values() if paper_score(t) is not None]
    return sum(scores) / len(scores) if scores else None
