"""A search's report: candidates.json (every candidate it looked at, each figure marked measured or estimated),
frontier.png (KL against size and against estimated generation speed-up, the budget drawn), report.md and a
self-contained report.html (the plot embedded, no external resource)."""
from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Optional

from dropquant.atomic import atomic_dir, write_json, write_text
from dropquant.plots import PNG_METADATA, pyplot
from dropquant.report import html_document, html_table, png_img

COLORS = {"none": "black", "attn": "tab:blue", "mlp": "tab:orange", "block": "tab:green", "joint": "tab:purple"}
MARKERS = {"Q8_0": "o", "Q6_K": "s", "Q4_K_M": "^"}


def frontier_png(candidates: list[dict], max_kld: float, title: str) -> bytes:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    shown = [c for c in candidates if c["kld"] is not None]
    ref = max((c.get("tg_cost") or 0) for c in candidates) or 1
    for ax, key, label in ((axes[0], "size_bytes", "GGUF size (MB)"),
                           (axes[1], "tg_cost", "estimated generation speed-up (weight bytes per token, vs the largest)")):
        for c in shown:
            x = c["size_bytes"] / 1e6 if key == "size_bytes" else ref / c["tg_cost"]
            measured = c["kld_measured"]
            ax.scatter([x], [c["kld"]], marker=MARKERS.get(c["quant_type"], "D"), s=60 if measured else 30,
                       facecolors=COLORS.get(c["method"], "gray") if measured else "none",
                       edgecolors=COLORS.get(c["method"], "gray"), zorder=3)
            if c["status"] == "picked":
                ax.scatter([x], [c["kld"]], marker="*", s=400, facecolors="gold", edgecolors="black", zorder=4)
                ax.annotate(c["name"], (x, c["kld"]), textcoords="offset points", xytext=(8, 8), fontsize=9)
        ax.axhline(max_kld, color="red", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("KL divergence from the reference")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=m) for m, c in COLORS.items()]
    handles += [plt.Line2D([], [], marker=mk, linestyle="", color="gray", label=q) for q, mk in MARKERS.items()]
    handles += [plt.Line2D([], [], marker="o", linestyle="", markerfacecolor="gray", color="gray", label="measured"),
                plt.Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="gray", label="estimated"),
                plt.Line2D([], [], color="red", linestyle="--", label=f"budget {max_kld:g}"),
                plt.Line2D([], [], marker="*", linestyle="", markerfacecolor="gold", color="black", markersize=12,
                           label="pick")]
    fig.legend(handles=handles, fontsize=8, loc="lower center", ncol=len(handles))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata=PNG_METADATA)
    plt.close(fig)
    return buf.getvalue()


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def candidates_table(candidates: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["candidate", "status", "size MB", "KL", "KL is", "± stderr", "drop KL est.", "quant KL", "ppl", "top-1"]
    rows = []
    order = {"picked": 0, "measured within budget": 1, "measured over budget": 2, "measured earlier": 3}
    for c in sorted(candidates, key=lambda c: (order.get(c["status"], 4), c["size_bytes"])):
        rows.append([c["name"], c["status"], f"{c['size_bytes'] / 1e6:.1f}" + ("" if c["size_measured"] else " (est.)"),
                     _fmt(c["kld"], ".4f") or (c.get("kld_bound") or ""),
                     "measured" if c["kld_measured"] else ("estimated" if c["kld"] is not None else "bounded"),
                     _fmt(c["kld_stderr"], ".4f"), _fmt(c["drop_kld_estimate"], ".4f"), _fmt(c["quant_kld"], ".4f"),
                     _fmt(c["ppl"], ".2f"), _fmt(c["top1_agree"], ".3f")])
    return head, rows


def write_search_report(out_dir: str | Path, summary: dict, candidates: list[dict], notes: list[str],
                        title: Optional[str] = None) -> dict[str, Path]:
    """Write candidates.json, frontier.png, report.md and report.html into `out_dir`, all or nothing."""
    out_dir = Path(out_dir)
    title = title or f"dropquant search: {summary['objective']} within KL <= {summary['max_kld']:g}"
    png = frontier_png(candidates, summary["max_kld"], title)
    head, rows = candidates_table(candidates)
    md = [f"# {title}", "", *(f"{n}\n" for n in notes),
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows),
          "", "![KL against size and estimated speed-up](frontier.png)", ""]
    body = ("".join(f"<p>{html.escape(n)}</p>" for n in notes) + "\n" +
            png_img(png, "KL divergence against size and estimated speed-up") + "\n" + html_table(head, rows))
    page = html_document(title, body)
    with atomic_dir(out_dir) as tmp:
        (tmp / "frontier.png").write_bytes(png)
        write_text(tmp / "report.md", "\n".join(md))
        write_text(tmp / "report.html", page)
        write_json(tmp / "candidates.json", {**summary, "candidates": candidates})
    return {name: out_dir / name for name in ("report.md", "report.html", "frontier.png", "candidates.json")}
