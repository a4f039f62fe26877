"""Chat quality of a GGUF, under its own chat template, greedy: IFEval and GSM8K through lm-eval's tasks and
checkers, and the MT-Bench conversations `mt_bench` compares.

Per-item scores are kept, so a variant is compared with the base on the same items: each difference gets
the standard error of the paired differences, which is what says whether a drop changed anything.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DropquantError
from . import mt_bench
from .accuracy import lm_eval_tasks
from .tasks import CHAT_TASKS

log = logging.getLogger(__name__)

# our key -> (lm-eval metric, filter); inst_* are per instruction, the rest per prompt
LM_EVAL_METRICS = {
    "ifeval": {"prompt_strict": ("prompt_level_strict_acc", "none"), "inst_strict": ("inst_level_strict_acc", "none"),
               "prompt_loose": ("prompt_level_loose_acc", "none"), "inst_loose": ("inst_level_loose_acc", "none")},
    "gsm8k": {"strict": ("exact_match", "strict-match"), "flexible": ("exact_match", "flexible-extract")},
}


def open_chat_lm(gguf: str | Path, chat, threads: int, parallel: Optional[int] = None, gpu_layers: int = 0):
    """The llama.cpp model for chat: up to `chat.parallel` sequences (no more than a task has prompts), each in a
    KV stream of `chat.n_ctx` cells (the cache is allocated whole: parallel x n_ctx cells)."""
    from .llamacpp_lm import LlamaCppLM

    parallel = parallel or (min(chat.parallel, chat.limit) if chat.limit else chat.parallel)
    return LlamaCppLM(gguf, n_ctx=chat.n_ctx * parallel, threads=threads, n_seq_max=parallel, parallel=parallel,
                      max_gen_toks=chat.max_tokens, chat=True, kv_unified=False, gpu_layers=gpu_layers)


def _per_item(samples: list[dict], metric: str, filt: str) -> list:
    return [s[metric] for s in sorted(samples, key=lambda s: s["doc_id"]) if s.get("filter", "none") == filt]


def _score(values: list) -> dict:
    """Mean and standard error; per-instruction lists are pooled over instructions, with the standard error of
    a ratio of sums over prompts (instructions of one prompt are not independent)."""
    if values and isinstance(values[0], list):
        a = np.array([sum(v) for v in values], dtype=np.float64)
        m = np.array([len(v) for v in values], dtype=np.float64)
        p = a.sum() / m.sum()
        n = len(a)
        se = float(np.sqrt(n / (n - 1) * ((a - p * m) ** 2).sum()) / m.sum()) if n > 1 else None
        return {"value": float(p), "stderr": se, "n": n, "n_units": int(m.sum())}
    x = np.asarray(values, dtype=np.float64)
    se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else None
    return {"value": float(x.mean()), "stderr": se, "n": len(x)}


def run_lm_eval_chat(lm, tasks: list[str], limit: int, data_dir: Optional[Path], seed: int = 0) -> dict:
    """IFEval / GSM8K on `lm` (chat template applied, GSM8K's exemplars as earlier turns); per task, each metric
    with its standard error, and the per-item values behind them."""
    import lm_eval

    names = [t for t in tasks if t in CHAT_TASKS]
    out: dict = {"tasks": {}, "skipped": []}
    if not names:
        return out
    if "ifeval" in names:
        from .nltk_data import use_offline_nltk

        use_offline_nltk()  # before lm-eval imports IFEval's checker, which looks for punkt_tab on import
    with lm_eval_tasks(names, data_dir) as (tm, ready, skipped):
        out["skipped"] = skipped
        for name in ready:
            spec = CHAT_TASKS[name]
            log.info("chat: %s (lm-eval %s), limit %s, %d tokens per answer", name, spec.lm_eval_name,
                     limit or "all", lm.max_gen_toks)
            res = lm_eval.simple_evaluate(
                model=lm, tasks=[spec.lm_eval_name], task_manager=tm, limit=limit or None, bootstrap_iters=0,
                log_samples=True, apply_chat_template=True, fewshot_as_multiturn=name == "gsm8k",
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                gen_kwargs={"max_gen_toks": lm.max_gen_toks})
            samples = res["samples"][spec.lm_eval_name]
            task = {key: {**_score(items := _per_item(samples, metric, filt)), "items": items}
                    for key, (metric, filt) in LM_EVAL_METRICS[name].items()}
            task["stops"] = dict(Counter(g.stop for g in lm.generations))  # eog / until / budget
            out["tasks"][name] = task
    return out


def evaluate_chat(gguf: str | Path, chat, threads: int, data_dir: Optional[Path], lm=None, gpu_layers: int = 0) -> dict:
    """Everything one model is asked on its own: lm-eval's chat tasks and its MT-Bench conversations. A model
    without a chat template (a base model) skips them all, with a warning."""
    tasks = list(chat.tasks)
    lm = lm or open_chat_lm(gguf, chat, threads, gpu_layers=gpu_layers)
    out: dict = {"tasks": {}, "skipped": [], "mt_bench": None, "limit": chat.limit, "max_tokens": chat.max_tokens}
    if tasks and lm.chat_template(True) is None:
        log.warning("chat: skipping %s: %s has no chat template (tokenizer.chat_template)", ", ".join(tasks), gguf)
        return {**out, "skipped": tasks, "reason": "no chat template"}
    out.update(run_lm_eval_chat(lm, tasks, chat.limit, data_dir))
    if "mt_bench" in tasks:
        questions = mt_bench.load_questions(data_dir, chat.limit)
        if questions is None:
            log.warning("chat: skipping mt_bench: no local data (%s missing)",
                        Path(data_dir or ".") / mt_bench.QUESTIONS)
            out["skipped"].append("mt_bench")
        else:
            out["mt_bench"] = mt_bench.converse(lm, questions, chat.max_tokens)
    return out


def paired(variant: dict, base: dict) -> dict:
    """variant - base on the same items, with the standard error of the paired differences."""
    v, b = variant["items"], base["items"]
    if len(v) != len(b):
        raise DropquantError(f"chat: the variant was scored on {len(v)} items, the base on {len(b)}")
    if v and isinstance(v[0], list):  # per instruction: pair instructions of the same prompts
        v, b = [x for row in v for x in row], [x for row in b for x in row]
    d = np.asarray(v, np.float64) - np.asarray(b, np.float64)
    return {"delta": float(d.mean()) if len(d) else None,
            "delta_stderr": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None}


def compare_chat(variant_gguf: str | Path, base_gguf: str | Path, chat, threads: int, data_dir: Optional[Path],
                 base_chat: dict, gpu_layers: int = 0) -> dict:
    """The variant's own chat results, its MT-Bench drift from the base (teacher-forced on the base's
    conversations and free-running), and every figure beside the base's."""
    variant_lm = open_chat_lm(variant_gguf, chat, threads, gpu_layers=gpu_layers)
    own = evaluate_chat(variant_gguf, chat, threads, data_dir, lm=variant_lm)
    tasks = {}
    for name, task in own["tasks"].items():
        base = (base_chat.get("tasks") or {}).get(name)
        if base is None:
            continue
        tasks[name] = {key: {**{k: task[key][k] for k in ("value", "stderr", "n")}, "base": base[key]["value"],
                             "base_stderr": base[key]["stderr"], **paired(task[key], base[key])}
                       for key in LM_EVAL_METRICS[name]}
        tasks[name]["stops"], tasks[name]["base_stops"] = task["stops"], base.get("stops")
    mt = None
    if own["mt_bench"] is not None and base_chat.get("mt_bench") is not None:
        # teacher forcing: one sequence at a time
        base_lm = open_chat_lm(base_gguf, chat, threads, parallel=1, gpu_layers=gpu_layers)
        tf_rows = mt_bench.teacher_forced(variant_lm, base_lm, base_chat["mt_bench"])
        mt = {"summary": mt_bench.summarize(tf_rows, own["mt_bench"], base_chat["mt_bench"]),
              "teacher_forced": tf_rows, "conversations": own["mt_bench"]}
    skipped = sorted(set(own["skipped"]) | set(base_chat.get("skipped") or []))
    return {"tasks": tasks, "mt_bench": mt, "skipped": skipped, "limit": chat.limit, "max_tokens": chat.max_tokens}
