"""What the evaluate stage reports: every figure (details.json's `metrics`, which the report and plots read) and
the curated headline set in metrics.json, the file `dvc exp show` lists.

metrics.json is small on purpose: `dvc exp show --only-changed` draws one column per key that differs between
experiments, and a sweep's comparison must fit a terminal (docs/evaluate.md lists the keys).
"""
from __future__ import annotations

import math
from typing import Optional

from .accuracy import average, paper_score
from .speed import SETTINGS, TESTS

MIB = 2**20


def _r(x, nd=4):
    return None if x is None else round(float(x), nd)


# metrics key stem -> speed test: the headline pair, then the short-prompt / empty-context pair.
SPEEDUP_KEYS = {"pp": "pp2048", "tg": "tg2048", "pp512": "pp512", "tg0": "tg0"}
PER_SETTING = ("pp", "tg")  # the speed-ups whose per-setting ratios are metrics too (all are in details.json)


def _mib(b):
    return _r(None if b is None else b / MIB, 2)


def speed_metrics(speed: Optional[dict]) -> dict:
    """Speed keys: tok/s and speed-ups of each model in its faster flash-attention setting (the headline), each
    setting's own speed-ups, every speed-up's spread over rounds, `speed_noisy`, and memory (null when unmeasured)."""
    s = speed or {}
    fast, best, up, mem = (s.get(k, {}) for k in ("fastest", "best_setting", "speedup", "memory"))

    def tok_s(test):
        return _r(fast["variant"][best["variant"][test]][test], 1) if fast else None

    def fa_on_is_best(who, test):  # true: the model was faster with flash attention on
        return best[who][test] == "fa_on" if best else None

    out = {f"{t}_tok_s": tok_s(t) for t in TESTS}
    for stem, test in SPEEDUP_KEYS.items():
        for name in ("best",) + (SETTINGS if stem in PER_SETTING else ()):
            r = up.get(test, {}).get(name, {})
            key = f"speedup_{stem}" + ("" if name == "best" else f"_{name}")
            out[key], out[f"{key}_spread"] = _r(r.get("value"), 3), _r(r.get("spread"), 3)
    for stem in PER_SETTING:
        out[f"flash_attn_{stem}"] = fa_on_is_best("variant", SPEEDUP_KEYS[stem])
        out[f"base_flash_attn_{stem}"] = fa_on_is_best("base", SPEEDUP_KEYS[stem])
    out.update(speed_noisy=s.get("noisy"), speed_rounds=s.get("rounds"), speed_threads=s.get("threads"),
               speed_cpu_share=_r(s.get("cpu_share"), 3))
    for prefix, who in (("", "variant"), ("base_", "base")):
        m = mem.get(who, {})
        out[f"{prefix}kv_cache_mib"] = _mib(m.get("fa_on", {}).get("kv_cache_bytes"))
        out[f"{prefix}kv_cache_mib_fa_off"] = _mib(m.get("fa_off", {}).get("kv_cache_bytes"))
        rss = m.get("fa_on", {}).get("peak_rss_bytes")
        out[f"{prefix}peak_rss_mb"] = _r(None if rss is None else rss / 1e6, 1)
    return out


MT_BENCH_KEYS = ("kld", "kld_stderr", "top1_agree", "answer_nll", "base_answer_nll", "rougeL", "rougeL_stderr",
                 "loop_rate", "base_loop_rate", "empty_rate", "base_empty_rate", "truncated_rate",
                 "base_truncated_rate", "answers")
MT_BENCH_GROUP_KEYS = ("kld", "top1_agree", "rougeL", "loop_rate", "truncated_rate")  # per turn and category


def chat_metrics(chat: Optional[dict]) -> dict:
    """chat.<task>.<metric>[_base|_delta|_delta_stderr] (the delta's standard error over paired items) and
    chat.mt_bench.*, every key present, null when not measured; the own standard errors are in details.json's
    `chat` section."""
    from . import mt_bench
    from .chat_eval import LM_EVAL_METRICS

    c = chat or {}
    out: dict = {}
    for name, keys in LM_EVAL_METRICS.items():
        t = (c.get("tasks") or {}).get(name, {})
        row: dict = {"n": next((t[k]["n"] for k in keys if k in t), None)}
        for key in keys:
            m = t.get(key, {})
            row.update({key: _r(m.get("value")), f"{key}_base": _r(m.get("base")),
                        f"{key}_delta": _r(m.get("delta")), f"{key}_delta_stderr": _r(m.get("delta_stderr"))})
        out[name] = row
    summary = ((c.get("mt_bench") or {}).get("summary")) or {}
    overall = summary.get("all", {})
    row = {k: _r(overall.get(k)) if k != "answers" else overall.get(k) for k in MT_BENCH_KEYS}
    for group in ("turn1", "turn2", *mt_bench.CATEGORIES):
        g = summary.get(group, {})
        row[group] = {k: _r(g.get(k)) for k in MT_BENCH_GROUP_KEYS}
    out["mt_bench"] = row
    out["skipped"] = c.get("skipped", [])
    return out


def binomial_se(p: Optional[float], n: Optional[int]) -> Optional[float]:
    """Standard error of a proportion over n items, as lm-eval computes it (sample standard deviation / sqrt n)."""
    if p is None or not n or n < 2:
        return None
    return math.sqrt(p * (1 - p) / (n - 1))


def _avg_se(ses: list[Optional[float]]) -> Optional[float]:
    """Standard error of a mean of independent task scores."""
    if not ses or any(s is None for s in ses):
        return None
    return math.sqrt(sum(s * s for s in ses)) / len(ses)


def _task_row(v: dict, b: dict) -> dict:
    score, base = paper_score(v) if v else None, paper_score(b) if b else None
    return {"metric": "acc_norm" if (v or b).get("acc_norm") is not None else "acc",
            "score": _r(score), "se": _r(binomial_se(score, v.get("n"))), "n": v.get("n"),
            "base_score": _r(base), "base_se": _r(binomial_se(base, b.get("n"))), "base_n": b.get("n"),
            "acc": _r(v.get("acc")), "acc_norm": _r(v.get("acc_norm")),
            "base_acc": _r(b.get("acc")), "base_acc_norm": _r(b.get("acc_norm"))}


def build_metrics(*, method: str, n: int, quant_type: str, tasks: list[str], accuracy: dict, base_accuracy: dict,
                  fidelity: Optional[dict], speed: Optional[dict], variant_bytes: int,
                  chat: Optional[dict] = None, heal: str = "none", base_bytes: Optional[int] = None,
                  device: Optional[dict] = None) -> dict:
    """Every figure of one evaluation (details.json's `metrics`), every key present, null when not measured.
    `device`: where llama.cpp ran (`dropquant.evaluation.device.describe`: device, backend, layers offloaded)."""
    per_task = {name: _task_row(accuracy["tasks"].get(name, {}), base_accuracy["tasks"].get(name, {}))
                for name in tasks if name in accuracy["tasks"] or name in base_accuracy["tasks"]}
    # Averages over the tasks both models were evaluated on, so a skipped task cannot tilt the comparison.
    common = [t for t in tasks if t in accuracy["tasks"] and t in base_accuracy["tasks"]]
    avg = average({t: accuracy["tasks"][t] for t in common})
    base_avg = average({t: base_accuracy["tasks"][t] for t in common})
    base_avg_se = _avg_se([binomial_se(paper_score(base_accuracy["tasks"][t]), base_accuracy["tasks"][t].get("n"))
                           for t in common])
    f = fidelity or {}
    return {
        "method": method, "n": n, "quant_type": quant_type, "heal": heal,
        "size_mb": _r(variant_bytes / 1e6, 2), "base_size_mb": _r(None if base_bytes is None else base_bytes / 1e6, 2),
        "ppl": _r(f.get("ppl")), "base_ppl": _r(f.get("base_ppl")),
        "kld": _r(f.get("kld"), 6), "kld_median": _r(f.get("kld_median"), 6), "kld_p99": _r(f.get("kld_p99"), 6),
        "kld_stderr": _r((f.get("kld_stats") or {}).get("stderr"), 6),
        "kld_top64_bound": _r(f.get("kld_top64_bound"), 6), "top1_agree": _r(f.get("top1_agree")),
        "rms_dp": _r(f.get("rms_dp")), "fidelity_tokens": f.get("fidelity_tokens"),
        "tasks": per_task,
        "avg": _r(avg), "base_avg": _r(base_avg), "avg_delta": _r(None if avg is None or base_avg is None else avg - base_avg),
        "avg_se": _r(_avg_se([per_task[t]["se"] for t in common])), "base_avg_se": _r(base_avg_se),
        # Two evaluations of these items at the base's accuracy differ by this much from noise alone (unpaired,
        # so conservative: both models answer the same items). One figure per base, so `dvc exp show
        # --only-changed` does not spend a column on it.
        "avg_delta_se": _r(None if base_avg_se is None else math.sqrt(2) * base_avg_se),
        "avg_n": sum(accuracy["tasks"][t].get("n") or 0 for t in common) or None,
        **speed_metrics(speed),
        "skipped_tasks": sorted(set(tasks) - set(common)),
        "chat": chat_metrics(chat),
        "device": device,
    }


# metrics.json key -> path in build_metrics' output. Short names: each is a column of `dvc exp show`.
HEADLINE = {
    "avg": ("avg",), "avg_delta": ("avg_delta",), "avg_delta_se": ("avg_delta_se",), "base_avg": ("base_avg",),
    "avg_n": ("avg_n",),
    "ppl": ("ppl",), "base_ppl": ("base_ppl",), "kld": ("kld",), "top1": ("top1_agree",),
    "size_mb": ("size_mb",), "base_size_mb": ("base_size_mb",),
    "pp_x": ("speedup_pp",), "tg_x": ("speedup_tg",), "speed_noisy": ("speed_noisy",),
    "kv_mib": ("kv_cache_mib",), "base_kv_mib": ("base_kv_cache_mib",),
    "ifeval": ("chat", "ifeval", "prompt_strict"), "base_ifeval": ("chat", "ifeval", "prompt_strict_base"),
    "gsm8k": ("chat", "gsm8k", "strict"), "base_gsm8k": ("chat", "gsm8k", "strict_base"),
    "loops": ("chat", "mt_bench", "loop_rate"), "base_loops": ("chat", "mt_bench", "base_loop_rate"),
}
# Present only when measured (eval.source_kld; a healed variant), so that no sweep carries an empty column.
OPTIONAL = {"kld_source": ("kld_source",), "kld_recovered": ("heal_kl", "recovered"), "bpw": ("mix", "bpw")}
# Present only when llama.cpp offloaded layers to a GPU: a CPU run's metrics.json is what it was before GPUs.
ON_GPU = {"gpu_layers": ("device", "gpu_layers")}
# Rounded for reading: more digits than the figures' standard errors support only widen the columns.
DIGITS = {"avg": 3, "avg_delta": 3, "avg_delta_se": 3, "base_avg": 3, "ppl": 1, "base_ppl": 2,
          "top1": 3, "size_mb": 1, "base_size_mb": 1, "pp_x": 2, "tg_x": 2, "kv_mib": 1, "base_kv_mib": 1,
          "kld_recovered": 3, "bpw": 2, "ifeval": 3, "base_ifeval": 3, "gsm8k": 3, "base_gsm8k": 3,
          "loops": 3, "base_loops": 3}


# Significant digits, not decimals: a KL divergence spans 0.001 (a quant type alone) to several nats.
SIGNIFICANT = {"kld": 3}


def _sig(x: float, digits: int) -> float:
    return x if x == 0 else round(x, digits - 1 - math.floor(math.log10(abs(x))))


def _path(d, path):
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def headline(full: dict) -> dict:
    """metrics.json: the curated figures of `full` (build_metrics' output), under short names."""
    out = {}
    for key, path in HEADLINE.items():
        out[key] = _path(full, path)
    for key, path in OPTIONAL.items():
        if _path(full, path) is not None:
            out[key] = _path(full, path)
    for key, path in ON_GPU.items():
        if _path(full, path):
            out[key] = _path(full, path)
    for k, v in out.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = _r(v, DIGITS[k]) if k in DIGITS else _sig(v, SIGNIFICANT[k]) if k in SIGNIFICANT else v
    return out


REQUIRED_KEYS = ("method", "n", "quant_type", "size_mb", "base_size_mb", "ppl", "kld", "top1_agree", "tasks", "avg",
                 "avg_se", "avg_delta_se", "avg_n", "pp512_tok_s", "pp2048_tok_s", "tg0_tok_s", "tg2048_tok_s",
                 "speedup_pp", "speedup_tg", "speedup_pp_spread", "speedup_tg_spread", "speed_noisy", "kv_cache_mib")
