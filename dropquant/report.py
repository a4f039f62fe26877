"""A sweep's comparison report: rows of variants -> Markdown table, Pareto plot (PNG) and a self-contained HTML page.

Input is the JSON of `dvc exp show --json` (a data format; nothing here runs DVC). The HTML embeds the plot as
base64 and uses no external script or style, so it renders offline.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Iterable, Optional

from .atomic import atomic_dir, write_json, write_text

METRICS_FILE = "data/eval/metrics.json"
MARKERS = {"none": "*", "attn": "o", "mlp": "s", "block": "^", "joint": "D"}
COLUMNS = (  # (header, row key, format); a column no row has a value for is left out, and a note says why
    ("experiment", "name", "{}"), ("method", "method", "{}"), ("n", "n", "{}"), ("quant", "quant_type", "{}"),
    ("heal", "heal", "{}"),
    ("avg acc ± se (items)", "acc_cell", "{}"), ("Δ acc ± se", "delta_cell", "{}"),
    ("tg speed-up", "speedup_cell", "{}"), ("pp speed-up", "speedup_pp_cell", "{}"),
    ("size MB", "size_mb", "{:.1f}"), ("KV MiB", "kv_mib", "{:.0f}"), ("ppl", "ppl", "{:.2f}"), ("KLD", "kld", "{:.4f}"),
    ("KLD vs source", "kld_source", "{:.4f}"), ("top-1 agree", "top1_agree", "{:.3f}"),
    ("KL recovered", "kld_recovered", "{:.0%}"),
    ("IFEval prompt strict", "ifeval", "{:.3f}"), ("GSM8K strict", "gsm8k", "{:.3f}"),
    ("MT-Bench loops", "mt_loops", "{:.0%}"), ("note", "note", "{}"),
)
ALWAYS = {"name", "method", "n", "quant_type", "heal", "acc_cell", "delta_cell", "size_mb", "note"}
STALE = "metrics.json was measured for other parameters (evaluate did not run for this variant): not shown"
BASE_NAME = "unpruned (base)"
# Stage inputs only the evaluate stage reads: their hash in its dvc.lock record equals the producing stage's output
# hash unless evaluate did not run after them (a partial `dvc exp run ... quantize`).
EVALUATE_INPUTS = ("data/gguf", "data/baseline/eval")


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _first(metrics: dict, *keys: str) -> Any:
    """The first of `keys` present: metrics.json's short names, then the names of older metrics files."""
    return next((metrics[k] for k in keys if metrics.get(k) is not None), None)


def _pm(value, se, fmt: str, n=None, signed=False) -> Optional[str]:
    if value is None:
        return None
    cell = (f"{value:+{fmt}}" if signed else f"{value:{fmt}}") + ("" if se is None else f" ± {se:{fmt}}")
    return cell + ("" if n is None else f" ({n})")


def _x(value, noisy) -> Optional[str]:
    return None if value is None else f"{value:.2f}×" + (" (noisy)" if noisy else "")


def _row(entry: dict, metrics_file: str) -> dict:
    data = entry.get("data") or {}
    params = _get(data, "params", "params.yaml", "data") or {}
    metrics = _get(data, "metrics", metrics_file, "data") or {}
    stale = bool(metrics) and not measured_with(metrics, params, data)
    if stale:
        metrics = {}
    m = lambda *keys: _first(metrics, *keys)  # noqa: E731
    noisy = m("speed_noisy")
    avg, avg_se, n_items = m("avg"), m("avg_se"), m("avg_n")
    row = {
        "name": entry.get("name") or (entry.get("rev") or "")[:7],
        "rev": entry.get("rev"),
        "method": m("method") or _get(params, "drop", "method"),
        "n": m("n") if m("n") is not None else _get(params, "drop", "n"),
        "quant_type": m("quant_type") or _get(params, "quantize", "type"),
        "heal": m("heal") or _get(params, "heal", "method") or "none",
        "avg": avg, "base_avg": m("base_avg"), "avg_delta": m("avg_delta"), "avg_delta_se": m("avg_delta_se"),
        "avg_n": n_items,
        "speedup": m("tg_x", "speedup_tg", "speedup_pp"), "speedup_pp": m("pp_x", "speedup_pp"),
        "size_mb": m("size_mb"), "base_size_mb": m("base_size_mb"), "ppl": m("ppl"), "base_ppl": m("base_ppl"),
        "kld": m("kld"), "kld_source": m("kld_source"), "kld_recovered": m("kld_recovered"),
        "kv_mib": m("kv_mib", "kv_cache_mib"), "base_kv_mib": m("base_kv_mib", "base_kv_cache_mib"),
        "speed_noisy": {True: "yes", False: "no"}.get(noisy),  # the speed-ups' rounds disagreed
        "top1_agree": m("top1", "top1_agree"), "has_metrics": bool(metrics),
        "ifeval": m("ifeval") if "ifeval" in metrics else _get(metrics, "chat", "ifeval", "prompt_strict"),
        "base_ifeval": m("base_ifeval"), "base_gsm8k": m("base_gsm8k"), "base_loops": m("base_loops"),
        "gsm8k": m("gsm8k") if "gsm8k" in metrics else _get(metrics, "chat", "gsm8k", "strict"),
        "mt_loops": m("loops") if "loops" in metrics else _get(metrics, "chat", "mt_bench", "loop_rate"),
        "params": {"speed": _get(params, "eval", "speed"), "chat": _get(params, "eval", "chat", "tasks"),
                   "source_kld": _get(params, "eval", "source_kld")},
        "error": (entry.get("error") or {}).get("msg") if isinstance(entry.get("error"), dict) else entry.get("error"),
        "note": STALE if stale else None,
    }
    if avg_se is None and row["avg_delta_se"] is not None:
        avg_se = row["avg_delta_se"] / 2 ** 0.5  # one evaluation's standard error, at the base's accuracy
    row["acc_cell"] = _pm(avg, avg_se, ".3f", n_items)
    row["delta_cell"] = _pm(row["avg_delta"], row["avg_delta_se"], ".3f", signed=True)
    row["speedup_cell"], row["speedup_pp_cell"] = _x(row["speedup"], noisy), _x(row["speedup_pp"], noisy)
    return row


def base_row(rows: list[dict]) -> Optional[dict]:
    """The unpruned model at the variants' quant type, from the figures every variant's metrics carry about it
    (the first variant that has them; one row per quant type)."""
    out = []
    for qt in dict.fromkeys(r.get("quant_type") for r in rows):
        r = next((r for r in rows if r.get("quant_type") == qt and r.get("base_avg") is not None
                  or r.get("quant_type") == qt and r.get("base_size_mb") is not None), None)
        if r is None:
            continue
        se = None if r.get("avg_delta_se") is None else r["avg_delta_se"] / 2 ** 0.5
        measured = r.get("speedup") is not None
        out.append({"name": BASE_NAME, "method": "none", "n": 0, "quant_type": qt, "heal": "none",
                    "avg": r.get("base_avg"), "acc_cell": _pm(r.get("base_avg"), se, ".3f", r.get("avg_n")),
                    "delta_cell": "—", "speedup": 1.0 if measured else None,
                    "speedup_cell": "1×" if measured else None, "speedup_pp_cell": "1×" if measured else None,
                    "size_mb": r.get("base_size_mb"), "kv_mib": r.get("base_kv_mib"), "ppl": r.get("base_ppl"),
                    "kld": 0.0 if r.get("kld") is not None else None, "top1_agree": 1.0 if r.get("top1_agree") else None,
                    "ifeval": r.get("base_ifeval"), "gsm8k": r.get("base_gsm8k"), "mt_loops": r.get("base_loops"),
                    "is_base": True, "has_metrics": True})
    return out or None


def not_measured(rows: list[dict]) -> list[str]:
    """One line per figure no variant has, with the setting that turned it off where the parameters say."""
    measured = [r for r in rows if r.get("has_metrics") and not r.get("is_base")]
    if not measured:
        return []
    setting = lambda key: {r["params"].get(key) if isinstance(r["params"].get(key), (bool, type(None)))  # noqa: E731
                           else tuple(r["params"][key]) for r in measured if r.get("params")}
    out = []
    if all(r.get("speedup") is None for r in measured):
        why = " (eval.speed: false)" if setting("speed") == {False} else ""
        out.append(f"Speed and KV cache not measured{why}: no speed-up columns, no speed panel.")
    if all(r.get("mt_loops") is None and r.get("ifeval") is None for r in measured):
        why = " (eval.chat.tasks: [])" if setting("chat") == {()} else ""
        out.append(f"Chat quality (IFEval, GSM8K, MT-Bench) not measured{why}.")
    if all(r.get("avg") is None for r in measured):
        out.append("Accuracy not measured (no task data: eval.tasks, eval.data_dir).")
    return out


def measured_with(metrics: dict, params: dict, data: Optional[dict] = None) -> bool:
    """Whether the metrics were measured for this experiment. A partial run (`dvc exp run ... quantize`) carries
    the previous variant's metrics.json along: the evaluate stage's recorded inputs then differ from what the
    stages before it made (DVC's own records: deps and outs of `dvc exp show --json`). Metrics written before
    metrics.json was curated carry a digest of the parameters they were measured with instead."""
    from .artifacts import params_digest
    from .errors import DropquantError

    recorded = _get(metrics, "variant", "params")
    if recorded is not None:
        try:
            return recorded == params_digest(params)
        except DropquantError:  # parameters of another schema: nothing to compare with
            return False
    if "avg_n" not in metrics and "pp_x" not in metrics:  # an old metrics file without its digest
        return False
    deps, outs = (data or {}).get("deps") or {}, (data or {}).get("outs") or {}
    for path in EVALUATE_INPUTS:
        used, made = _get(deps, path, "hash"), _get(outs, path, "hash")
        if used is not None and made is not None and used != made:
            return False
    return True


def rows_from_exp_show(exp_show: list, names: Optional[Iterable[str]] = None,
                       metrics_file: str = METRICS_FILE) -> list[dict]:
    """One row per experiment in `dvc exp show --json` output (all baselines), optionally only the named ones.

    When a name occurs under several baselines, the newest experiment wins.
    """
    wanted = None if names is None else list(names)
    found: dict[str, tuple[str, dict]] = {}
    for baseline in exp_show or []:
        for group in baseline.get("experiments") or []:
            for entry in group.get("revs") or []:
                name = entry.get("name")
                if name is None or (wanted is not None and name not in wanted):
                    continue
                stamp = _get(entry, "data", "timestamp") or ""
                if name not in found or stamp > found[name][0]:
                    found[name] = (stamp, _row(entry, metrics_file))
    order = wanted if wanted is not None else sorted(found)
    return [found[n][1] for n in order if n in found]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _columns(rows: list[dict]):
    return [c for c in COLUMNS if c[1] in ALWAYS or any(r.get(c[1]) is not None for r in rows)]


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells, the base row(s) first; columns no row has a value for are left out."""
    rows = [*(base_row(rows) or []), *rows]
    cols = _columns(rows)
    return [h for h, _, _ in cols], [[_cell(r, k, f) for _, k, f in cols] for r in rows]


def markdown_table(rows: list[dict]) -> str:
    head, body = table_rows(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


READING = ("Accuracy: the average over tasks (acc_norm where defined, else acc) ± the binomial standard error of one "
           "evaluation of these items (at the base's accuracy), with the items each model answered; Δ ± the standard "
           "error of a difference of two (unpaired, so conservative). A Δ within about two standard errors is noise. Speed-ups are against the unpruned "
           "model at the same quant type, measured side by side.")


def pareto_front(points: list[tuple[float, float]], maximize_x: bool = True) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (y is always maximized), sorted by x."""
    front = []
    for x, y in points:
        dominated = any(
            (ox >= x if maximize_x else ox <= x) and oy >= y and (ox, oy) != (x, y) and
            ((ox > x if maximize_x else ox < x) or oy > y)
            for ox, oy in points)
        if not dominated:
            front.append((x, y))
    return sorted(set(front))


def _label(r: dict) -> str:
    heal = "" if (r.get("heal") or "none") == "none" else f" +{r['heal']}"
    return f"{r['method']}-{r['n']} {r['quant_type']}{heal}"


def pareto_png(rows: list[dict], title: str = "") -> bytes:
    from .plots import pyplot

    fig = pareto_figure(rows, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    pyplot().close(fig)
    return buf.getvalue()


def pareto_figure(rows: list[dict], title: str = ""):
    """Average accuracy against speed-up (left, only when speed was measured) and file size (right), one marker
    per method with its standard error, the unpruned model as a black star, the Pareto front dashed."""
    from .plots import pyplot

    plt = pyplot()
    bases = base_row(rows) or []
    panels = [("size_mb", "GGUF file size (MB)", False, "base_size_mb")]
    if any(r.get("speedup") is not None and r.get("avg") is not None for r in rows):
        panels.insert(0, ("speedup", "generation speed-up vs. unpruned (×)", True, None))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.8 * len(panels), 4.6), squeeze=False)
    for ax, (key, label, maximize, base_key) in zip(axes[0], panels):
        pts = [r for r in rows if r.get("avg") is not None and r.get(key) is not None]
        for method in sorted({r["method"] for r in pts}, key=lambda m: list(MARKERS).index(m) if m in MARKERS else 99):
            mine = [r for r in pts if r["method"] == method]
            ax.errorbar([r[key] for r in mine], [r["avg"] for r in mine],
                        yerr=[(r.get("avg_delta_se") or 0) / 2 ** 0.5 for r in mine], fmt=MARKERS.get(method, "x"),
                        ms=7, capsize=3, label=method, zorder=3)
            for r in mine:
                ax.annotate(_label(r), (r[key], r["avg"]), textcoords="offset points", xytext=(5, 5), fontsize=7,
                            annotation_clip=False)
        for b in bases:
            x = 1.0 if base_key is None else b.get("size_mb")
            if b.get("avg") is not None and x is not None:
                ax.scatter([x], [b["avg"]], marker="*", s=180, color="black", label=f"unpruned {b['quant_type']}",
                           zorder=4)
                ax.annotate(f"unpruned {b['quant_type']}", (x, b["avg"]), textcoords="offset points",
                            xytext=(5, -11), fontsize=7, annotation_clip=False)
        front = pareto_front([(r[key], r["avg"]) for r in pts], maximize_x=maximize)
        if len(front) > 1:
            ax.plot(*zip(*front), "--", color="grey", lw=1, zorder=2, label="Pareto front")
        if not pts:
            # Above the axes, never across a marker.
            ax.set_title("no variant has accuracy and " + ("a speed-up" if key == "speedup" else "a size"),
                         fontsize=9, color="grey")
        ax.margins(x=0.25, y=0.2)  # room for the labels right of the markers
        ax.set_xlabel(label)
        ax.set_ylabel("average accuracy (± se)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(title or "dropquant sweep: accuracy vs. speed and size")
    fig.tight_layout()
    return fig


def failures_markdown(failures: list[dict]) -> str:
    if not failures:
        return ""
    out = ["\n## Failed variants\n"]
    for f in failures:
        params = " ".join(f.get("params") or [])
        out.append(f"- **{f['name']}** (`{params}`)" + (f", stage `{f['stage']}`" if f.get("stage") else "") + ":")
        out.append("  ```\n" + "\n".join("  " + line for line in str(f.get("error", "")).splitlines()) + "\n  ```")
    return "\n".join(out) + "\n"


def html_table(head: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    return ("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>" +
            "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>" for cells in rows) +
            "</tbody></table>")


def html_document(title: str, body: str) -> str:
    """A self-contained page: inline style, no script, no external resource (renders offline)."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, td:nth-child(2) {{ text-align: left; }}
pre {{ background: #f8f8f8; padding: 6px; white-space: pre-wrap; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{body}
</body></html>
"""


def png_img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def html_page(title: str, rows: list[dict], png: bytes, failures: list[dict], notes: list[str]) -> str:
    esc = html.escape
    fails = "".join(
        f"<li><b>{esc(f['name'])}</b> <code>{esc(' '.join(f.get('params') or []))}</code>"
        f"{(' stage <code>' + esc(f['stage']) + '</code>') if f.get('stage') else ''}"
        f"<pre>{esc(str(f.get('error', '')))}</pre></li>" for f in failures)
    body = ("".join(f"<p>{esc(n)}</p>" for n in notes) + "\n" + html_table(*table_rows(rows)) +
            "\n<h2>Pareto plot</h2>\n" + png_img(png, "average accuracy against speed-up and file size") + "\n" +
            (f"<h2>Failed variants</h2><ul>{fails}</ul>" if failures else ""))
    return html_document(title, body)


def write_report(out_dir: str | Path, rows: list[dict], failures: list[dict] = (), title: str = "dropquant sweep",
                 notes: list[str] = (), extra: Optional[dict] = None) -> dict[str, Path]:
    """Write report.md, pareto.png, report.html and sweep.json into `out_dir`, all or nothing."""
    out_dir = Path(out_dir)
    failures, notes = list(failures), list(notes)
    png = pareto_png(rows, title)
    notes = [*notes, *not_measured(rows), READING]
    md = f"# {title}\n\n" + "".join(f"{n}\n\n" for n in notes) + markdown_table(rows)
    md += "\n![accuracy vs. speed-up and size](pareto.png)\n" + failures_markdown(failures)
    with atomic_dir(out_dir) as tmp:
        (tmp / "pareto.png").write_bytes(png)
        write_text(tmp / "report.md", md)
        write_text(tmp / "report.html", html_page(title, rows, png, failures, notes))
        write_json(tmp / "sweep.json", {"title": title, "rows": rows, "failures": failures, **(extra or {})})
    return {name: out_dir / name for name in ("report.md", "pareto.png", "report.html", "sweep.json")}
