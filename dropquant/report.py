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
ACCURACY = "avg"
# Generation speed after a long prompt is what a chat user feels; prompt speed is the fallback.
SPEEDUPS = ("speedup_tg", "speedup_pp")
SIZE = "size_mb"
MARKERS = {"none": "*", "attn": "o", "mlp": "s", "block": "^", "joint": "D"}
COLUMNS = (  # (header, row key, format)
    ("experiment", "name", "{}"), ("method", "method", "{}"), ("n", "n", "{}"), ("quant", "quant_type", "{}"),
    ("heal", "heal", "{}"),
    ("avg acc", "avg", "{:.4f}"), ("Δ acc", "avg_delta", "{:+.4f}"), ("tg speed-up", "speedup", "{:.3f}×"),
    ("pp speed-up", "speedup_pp", "{:.3f}×"), ("speed noisy", "speed_noisy", "{}"),
    ("size MB", "size_mb", "{:.1f}"), ("ppl", "ppl", "{:.3f}"), ("KLD", "kld", "{:.4f}"),
    ("top-1 agree", "top1_agree", "{:.3f}"), ("IFEval prompt strict", "ifeval", "{:.3f}"),
    ("GSM8K strict", "gsm8k", "{:.3f}"), ("MT-Bench KLD", "mt_kld", "{:.3f}"), ("MT-Bench ROUGE-L", "mt_rouge", "{:.3f}"),
    ("MT-Bench loops", "mt_loops", "{:.3f}"), ("note", "note", "{}"),
)
STALE = "metrics.json was measured for other parameters (evaluate did not run for this variant): not shown"


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _row(entry: dict, metrics_file: str) -> dict:
    data = entry.get("data") or {}
    params = _get(data, "params", "params.yaml", "data") or {}
    metrics = _get(data, "metrics", metrics_file, "data") or {}
    stale = bool(metrics) and not measured_with(metrics, params)
    if stale:
        metrics = {}
    speedup = next((metrics.get(k) for k in SPEEDUPS if metrics.get(k) is not None), None)
    return {
        "name": entry.get("name") or (entry.get("rev") or "")[:7],
        "rev": entry.get("rev"),
        "method": metrics.get("method", _get(params, "drop", "method")),
        "n": metrics.get("n", _get(params, "drop", "n")),
        "quant_type": metrics.get("quant_type", _get(params, "quantize", "type")),
        "heal": metrics.get("heal", _get(params, "heal", "method") or "none"),
        "avg": metrics.get(ACCURACY), "base_avg": metrics.get("base_avg"), "avg_delta": metrics.get("avg_delta"),
        "speedup": speedup, "speedup_pp": metrics.get("speedup_pp"), "size_mb": metrics.get(SIZE), "ppl": metrics.get("ppl"), "kld": metrics.get("kld"),
        "kld_source": metrics.get("kld_source"),
        "speed_noisy": {True: "yes", False: "no"}.get(metrics.get("speed_noisy")),  # the speed-ups' rounds disagreed
        "top1_agree": metrics.get("top1_agree"), "has_metrics": bool(metrics),
        "ifeval": _get(metrics, "chat", "ifeval", "prompt_strict"), "gsm8k": _get(metrics, "chat", "gsm8k", "strict"),
        "mt_kld": _get(metrics, "chat", "mt_bench", "kld"), "mt_rouge": _get(metrics, "chat", "mt_bench", "rougeL"),
        "mt_loops": _get(metrics, "chat", "mt_bench", "loop_rate"),
        "error": (entry.get("error") or {}).get("msg") if isinstance(entry.get("error"), dict) else entry.get("error"),
        "note": STALE if stale else None,
    }


def measured_with(metrics: dict, params: dict) -> bool:
    """Whether the metrics were measured with exactly these parameters. A partial run (`dvc exp run ... quantize`)
    carries the previous variant's metrics.json along; its recorded params digest then differs."""
    from .artifacts import params_digest
    from .errors import DropquantError

    recorded = _get(metrics, "variant", "params")
    try:
        return recorded is not None and recorded == params_digest(params)
    except DropquantError:  # parameters of another schema: nothing to compare with
        return False


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


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    return [h for h, _, _ in COLUMNS], [[_cell(r, k, f) for _, k, f in COLUMNS] for r in rows]


def markdown_table(rows: list[dict]) -> str:
    head, body = table_rows(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


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


def pareto_png(rows: list[dict], title: str = "") -> bytes:
    """Average accuracy against speed-up (left) and file size (right), one marker per method, Pareto front dashed."""
    from .plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    panels = ((axes[0], "speedup", "generation speed-up vs. unpruned (×)", True),
              (axes[1], "size_mb", "GGUF file size (MB)", False))
    for ax, key, label, maximize in panels:
        pts = [r for r in rows if r.get("avg") is not None and r.get(key) is not None]
        for method in sorted({r["method"] for r in pts}, key=lambda m: list(MARKERS).index(m) if m in MARKERS else 99):
            mine = [r for r in pts if r["method"] == method]
            ax.scatter([r[key] for r in mine], [r["avg"] for r in mine], marker=MARKERS.get(method, "x"), s=60,
                       label=method, zorder=3)
            for r in mine:
                ax.annotate(f"{r['n']} {r['quant_type']}", (r[key], r["avg"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        if key == "speedup":
            base = next((r["base_avg"] for r in rows if r.get("base_avg") is not None), None)
            if base is not None:
                ax.scatter([1.0], [base], marker="*", s=160, color="black", label="unpruned", zorder=4)
        front = pareto_front([(r[key], r["avg"]) for r in pts], maximize_x=maximize)
        if len(front) > 1:
            ax.plot(*zip(*front), "--", color="grey", lw=1, zorder=2, label="Pareto front")
        if not pts:
            ax.text(0.5, 0.5, f"no variant has both accuracy and {key}", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
        ax.set_xlabel(label)
        ax.set_ylabel("average accuracy")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title or "dropquant sweep: accuracy vs. speed and size")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


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
    md = f"# {title}\n\n" + "".join(f"{n}\n\n" for n in notes) + markdown_table(rows)
    md += "\n![accuracy vs. speed-up and size](pareto.png)\n" + failures_markdown(failures)
    with atomic_dir(out_dir) as tmp:
        (tmp / "pareto.png").write_bytes(png)
        write_text(tmp / "report.md", md)
        write_text(tmp / "report.html", html_page(title, rows, png, failures, notes))
        write_json(tmp / "sweep.json", {"title": title, "rows": rows, "failures": failures, **(extra or {})})
    return {name: out_dir / name for name in ("report.md", "pareto.png", "report.html", "sweep.json")}
