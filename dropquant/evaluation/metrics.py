"""The one metrics file `dvc exp show` reads: flat-ish keys, every key always present (null when not measured)."""
from __future__ import annotations

from typing import Optional

from .accuracy import average
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
    chat.mt_bench.*, every key present, null when not measured; the own standard errors are in details.json."""
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


def build_metrics(*, method: str, n: int, quant_type: str, tasks: list[str], accuracy: dict, base_accuracy: dict,
                  fidelity: Optional[dict], speed: Optional[dict], variant_bytes: int,
                  chat: Optional[dict] = None, heal: str = "none") -> dict:
    per_task = {}
    for name in tasks:
        v = accuracy["tasks"].get(name, {})
        b = base_accuracy["tasks"].get(name, {})
        per_task[name] = {"acc": _r(v.get("acc")), "acc_norm": _r(v.get("acc_norm")),
                          "base_acc": _r(b.get("acc")), "base_acc_norm": _r(b.get("acc_norm"))}
    # Averages over the tasks both models were evaluated on, so a skipped task cannot tilt the comparison.
    common = [t for t in tasks if t in accuracy["tasks"] and t in base_accuracy["tasks"]]
    avg = average({t: accuracy["tasks"][t] for t in common})
    base_avg = average({t: base_accuracy["tasks"][t] for t in common})
    f = fidelity or {}
    return {
        "method": method, "n": n, "quant_type": quant_type, "heal": heal,
        "size_mb": _r(variant_bytes / 1e6, 2),
        "ppl": _r(f.get("ppl")), "base_ppl": _r(f.get("base_ppl")),
        "kld": _r(f.get("kld"), 6), "kld_median": _r(f.get("kld_median"), 6), "kld_p99": _r(f.get("kld_p99"), 6),
        "kld_top64_bound": _r(f.get("kld_top64_bound"), 6), "top1_agree": _r(f.get("top1_agree")),
        "rms_dp": _r(f.get("rms_dp")),
        "tasks": per_task,
        "avg": _r(avg), "base_avg": _r(base_avg), "avg_delta": _r(None if avg is None or base_avg is None else avg - base_avg),
        **speed_metrics(speed),
        "skipped_tasks": sorted(set(tasks) - set(common)),
        "chat": chat_metrics(chat),
    }


REQUIRED_KEYS = ("method", "n", "quant_type", "size_mb", "ppl", "kld", "top1_agree", "tasks", "avg",
                 "pp512_tok_s", "pp2048_tok_s", "tg0_tok_s", "tg2048_tok_s", "speedup_pp", "speedup_tg",
                 "speedup_pp_spread", "speedup_tg_spread", "speed_noisy", "kv_cache_mib")
