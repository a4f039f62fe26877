"""The one metrics file `dvc exp show` reads: flat-ish keys, every key always present (null when not measured)."""
from __future__ import annotations

from typing import Optional

from .accuracy import average

MIB = 2**20


def _r(x, nd=4):
    return None if x is None else round(float(x), nd)


def build_metrics(*, method: str, n: int, quant_type: str, tasks: list[str], accuracy: dict, base_accuracy: dict,
                  fidelity: Optional[dict], speed: Optional[dict], variant_bytes: int) -> dict:
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
    s = speed or {}
    var, base, up = s.get("variant", {}), s.get("base", {}), s.get("speedup", {})
    kv = var.get("kv_cache_bytes")
    base_kv = base.get("kv_cache_bytes")
    return {
        "method": method, "n": n, "quant_type": quant_type,
        "size_mb": _r(variant_bytes / 1e6, 2),
        "ppl": _r(f.get("ppl")), "base_ppl": _r(f.get("base_ppl")),
        "kld": _r(f.get("kld"), 6), "top1_agree": _r(f.get("top1_agree")),
        "tasks": per_task,
        "avg": _r(avg), "base_avg": _r(base_avg), "avg_delta": _r(None if avg is None or base_avg is None else avg - base_avg),
        "pp512_tok_s": _r(var.get("pp512"), 1), "pp2048_tok_s": _r(var.get("pp2048"), 1),
        "tg0_tok_s": _r(var.get("tg0"), 1), "tg2048_tok_s": _r(var.get("tg2048"), 1),
        "speedup_pp": _r(up.get("pp2048"), 3), "speedup_tg": _r(up.get("tg2048"), 3),
        "speedup_pp512": _r(up.get("pp512"), 3), "speedup_tg0": _r(up.get("tg0"), 3),
        "kv_cache_mib": _r(None if kv is None else kv / MIB, 2),
        "base_kv_cache_mib": _r(None if base_kv is None else base_kv / MIB, 2),
        "peak_rss_mb": _r(None if not var else var["peak_rss_bytes"] / 1e6, 1),
        "base_peak_rss_mb": _r(None if not base else base["peak_rss_bytes"] / 1e6, 1),
        "skipped_tasks": sorted(set(tasks) - set(common)),
    }


REQUIRED_KEYS = ("method", "n", "quant_type", "size_mb", "ppl", "kld", "top1_agree", "tasks", "avg",
                 "pp512_tok_s", "pp2048_tok_s", "tg0_tok_s", "tg2048_tok_s", "speedup_pp", "speedup_tg", "kv_cache_mib")
