"""One variant against the unpruned model on one screen: what `dropquant report` (and `make run`) print.

Reads details.json's `metrics` (every figure of the evaluate stage). Base and variant side by side with the
difference and standard errors; what was not measured is left out and named once; the last line is the verdict.
"""
from __future__ import annotations

from typing import Optional

WIDTH = 100


def _f(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _pm(x, se, fmt: str, signed: bool = False) -> str:
    if x is None:
        return ""
    return format(x, ("+" if signed else "") + fmt) + ("" if se is None else " ± " + format(se, fmt))


def _pct_change(v, b) -> str:
    return "" if v is None or not b else f"{100 * (v / b - 1):+.1f}%"


def _line(label: str, base: str = "", variant: str = "", delta: str = "") -> str:
    return f"  {label:<30}{base:>18}{variant:>18}   {delta}".rstrip()


def variant_label(m: dict) -> str:
    heal = "" if (m.get("heal") or "none") == "none" else f" healed ({m['heal']})"
    return f"{m.get('method')}-{m.get('n')} {m.get('quant_type')}{heal}"


def _accuracy(m: dict) -> list[str]:
    tasks = m.get("tasks") or {}
    if m.get("avg") is None:
        return []
    out = ["accuracy (acc_norm where defined, else acc; ± standard error, items)"]
    for name, t in tasks.items():
        if t.get("score") is None or t.get("base_score") is None:
            continue
        delta = None if t["score"] is None else t["score"] - t["base_score"]
        se = None if t.get("se") is None or t.get("base_se") is None else (t["se"] ** 2 + t["base_se"] ** 2) ** 0.5
        out.append(_line(f"{name} ({t.get('n')})", _pm(t["base_score"], t.get("base_se"), ".3f"),
                         _pm(t["score"], t.get("se"), ".3f"), _pm(delta, se, ".3f", signed=True)))
    out.append(_line(f"average ({m.get('avg_n')})", _pm(m.get("base_avg"), m.get("base_avg_se"), ".3f"),
                     _pm(m["avg"], m.get("avg_se"), ".3f"), _pm(m.get("avg_delta"), m.get("avg_delta_se"), ".3f",
                                                              signed=True)))
    return out


def _fidelity(m: dict) -> list[str]:
    if m.get("ppl") is None and m.get("kld_top64_bound") is None:
        return []
    out = [f"fidelity to the base ({m.get('fidelity_tokens') or '?'} scored held-out tokens)"]
    out.append(_line("perplexity", _f(m.get("base_ppl"), ".2f"), _f(m.get("ppl"), ".2f"),
                     _pct_change(m.get("ppl"), m.get("base_ppl"))))
    if m.get("kld") is not None:
        out.append(_line("KLD from the base (median, p99)", "", _pm(m["kld"], m.get("kld_stderr"), ".4f"),
                         f"({m.get('kld_median'):.3f}, {m.get('kld_p99'):.2f})" if m.get("kld_median") is not None
                         else ""))
    elif m.get("kld_top64_bound") is not None:
        out.append(_line("KLD lower bound (top-64)", "", _f(m["kld_top64_bound"], ".4f")))
    if m.get("kld_source") is not None:
        out.append(_line("KLD from the source precision", "", _pm(m["kld_source"], m.get("kld_source_stderr"), ".4f")))
    if m.get("top1_agree") is not None:
        out.append(_line("top-1 agreement", "100%", f"{100 * m['top1_agree']:.1f}%"))
    h = m.get("heal_kl") or {}
    if h.get("recovered") is not None:
        # On the heal's held-out calibration tokens, before quantization (dropquant/heal/recovered.py).
        out.append(_line("held-out KL, unhealed → healed", "", f"{h['unhealed']:.3f} → {h['healed']:.3f}",
                         f"{100 * h['recovered']:.0f}% recovered ({h.get('tokens')} tokens)"))
    return out


def _size(m: dict) -> list[str]:
    out = ["size and memory"]
    b, v = m.get("base_size_mb"), m.get("size_mb")
    out.append(_line("GGUF file (MB)", _f(b, ".1f"), _f(v, ".1f"),
                     "" if not b or v is None else f"{_pct_change(v, b)} ({100 * v / b:.0f}% of the size)"))
    if m.get("kv_cache_mib") is not None:
        out.append(_line("KV cache @4096, FA on (MiB)", _f(m.get("base_kv_cache_mib"), ".0f"),
                         _f(m["kv_cache_mib"], ".0f"), _pct_change(m["kv_cache_mib"], m.get("base_kv_cache_mib"))))
        out.append(_line("peak RSS (MB)", _f(m.get("base_peak_rss_mb"), ".0f"), _f(m.get("peak_rss_mb"), ".0f"),
                         _pct_change(m.get("peak_rss_mb"), m.get("base_peak_rss_mb"))))
    return out


def _speed(m: dict, speed: Optional[dict]) -> list[str]:
    if m.get("speedup_tg") is None:
        return []
    rounds = m.get("speed_rounds")
    out = [f"speed (llama.cpp, {m.get('speed_threads')} thread(s), {rounds} A/B rounds; ± spread)"
           + ("  NOISY: the rounds disagreed" if m.get("speed_noisy") else "")]
    fastest = (speed or {}).get("fastest") or {}
    best = (speed or {}).get("best_setting") or {}

    def base_tok_s(test):
        try:
            return f"{fastest['base'][best['base'][test]][test]:.1f}"
        except (KeyError, TypeError):
            return ""
    for label, test, key, stem in (("prompt, pp2048 (tok/s)", "pp2048", "pp2048_tok_s", "pp"),
                                   ("generation, tg2048 (tok/s)", "tg2048", "tg2048_tok_s", "tg")):
        out.append(_line(label, base_tok_s(test), _f(m.get(key), ".1f"),
                         _pm(m.get(f"speedup_{stem}"), m.get(f"speedup_{stem}_spread"), ".2f") + "×"))
    return out


def _chat(m: dict) -> list[str]:
    c = m.get("chat") or {}
    ife, gsm, mt = c.get("ifeval") or {}, c.get("gsm8k") or {}, c.get("mt_bench") or {}
    if ife.get("prompt_strict") is None and gsm.get("strict") is None and mt.get("loop_rate") is None:
        return []
    n = ife.get("n") or gsm.get("n")
    out = [f"chat ({n} prompts per task; MT-Bench {mt.get('answers')} answers)"]
    if ife.get("prompt_strict") is not None:
        out.append(_line("IFEval prompt-level strict", _f(ife.get("prompt_strict_base"), ".3f"),
                         _f(ife["prompt_strict"], ".3f"), _pm(ife.get("prompt_strict_delta"),
                                                             ife.get("prompt_strict_delta_stderr"), ".3f", True)))
    if gsm.get("strict") is not None:
        out.append(_line("GSM8K strict match", _f(gsm.get("strict_base"), ".3f"), _f(gsm["strict"], ".3f"),
                         _pm(gsm.get("strict_delta"), gsm.get("strict_delta_stderr"), ".3f", True)))
    if mt.get("loop_rate") is not None:
        out.append(_line("MT-Bench answers ending in a loop", f"{100 * mt['base_loop_rate']:.0f}%"
                         if mt.get("base_loop_rate") is not None else "", f"{100 * mt['loop_rate']:.0f}%"))
    if mt.get("kld") is not None:
        out.append(_line("MT-Bench KLD / ROUGE-L vs base", "", f"{mt['kld']:.3f} / {mt.get('rougeL') or 0:.3f}"))
    return out


def not_measured(m: dict, params: Optional[dict]) -> list[str]:
    """What is missing from the report and, where the parameters say, why: said once, not as empty rows."""
    e = (params or {}).get("eval") or {}
    out = []
    if m.get("speedup_tg") is None:
        out.append("speed and memory" + (" (eval.speed=false)" if e.get("speed") is False else ""))
    c = m.get("chat") or {}
    if all(v is None for v in ((c.get("ifeval") or {}).get("prompt_strict"), (c.get("gsm8k") or {}).get("strict"),
                               (c.get("mt_bench") or {}).get("loop_rate"))):
        out.append("chat" + (" (eval.chat.tasks=[])" if (e.get("chat") or {}).get("tasks") == [] else ""))
    if m.get("avg") is None:
        out.append("accuracy (no task data" + (f" in {e['data_dir']}" if e.get("data_dir") else "") + ")")
    if m.get("ppl") is None and m.get("kld_top64_bound") is None:
        out.append("fidelity" + (" (eval.fidelity_tokens=0)" if e.get("fidelity_tokens") == 0 else ""))
    skipped = m.get("skipped_tasks") or []
    if skipped:
        out.append(f"tasks without data: {', '.join(skipped)}")
    return out


def verdict(m: dict) -> str:
    parts = []
    if m.get("avg_delta") is not None:
        se = "" if m.get("avg_delta_se") is None else f" ± {100 * m['avg_delta_se']:.1f}"
        parts.append(f"{100 * m['avg_delta']:+.1f}".replace("-", "−") + f"{se} points accuracy (n={m.get('avg_n')})")
    if m.get("kld") is not None:
        parts.append(f"KLD {m['kld']:.2f}")
    h = m.get("heal_kl") or {}
    if h.get("recovered") is not None:
        parts.append(f"{100 * h['recovered']:.0f}% of the KL recovered by the heal")
    if m.get("speedup_tg") is not None:
        parts.append(f"{m['speedup_tg']:.2f}× faster generation")
    if m.get("size_mb") is not None and m.get("base_size_mb"):
        parts.append(f"{100 * m['size_mb'] / m['base_size_mb']:.0f}% of the size")
    return f"{variant_label(m)}: " + (", ".join(parts) if parts else "nothing measured")


def plan_line(plan: Optional[dict]) -> Optional[str]:
    if not plan:
        return None
    units = [f"{name} {plan[key]}" for name, key in (("attention", "attn"), ("MLP", "mlp"), ("blocks", "blocks"))
             if plan.get(key)]
    return "dropped: " + ("; ".join(units) if units else "nothing") + (
        f" of {plan['num_layers']} layers" if plan.get("num_layers") else "")


def render(m: dict, speed: Optional[dict] = None, plan: Optional[dict] = None, params: Optional[dict] = None,
           model: Optional[str] = None) -> str:
    """The report as text, at most WIDTH columns."""
    head = f"{variant_label(m)} against the unpruned model at {m.get('quant_type')}" + (f" · {model}" if model else "")
    lines = [head, *(x for x in [plan_line(plan)] if x), _line("", "base", "variant", "Δ")]
    for section in (_accuracy(m), _fidelity(m), _size(m), _speed(m, speed), _chat(m)):
        lines += section
    missing = not_measured(m, params)
    if missing:
        lines.append("not measured: " + "; ".join(missing))
    lines = [line if len(line) <= WIDTH else line[:WIDTH - 1] + "…" for line in lines]
    return "\n".join([*lines, verdict(m)]) + "\n"  # the verdict whole, whatever its length
