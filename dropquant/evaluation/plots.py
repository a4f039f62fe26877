"""Plot data for DVC (CSV, one row per task / speed test, variant and base side by side), PNGs, and an offline
HTML template for `dvc plots show --html-template` (DVC's default page loads Vega from a CDN: blank offline)."""
from __future__ import annotations

import csv
from pathlib import Path

from ..atomic import atomic_path, write_text
from .accuracy import paper_score
from .speed import TESTS as SPEED_TESTS

VEGA_DIR = Path(__file__).parent / "vega"


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)


def accuracy_rows(accuracy: dict, base_accuracy: dict) -> list[list]:
    rows = []
    for name, v in accuracy["tasks"].items():
        b = base_accuracy["tasks"].get(name)
        if b is not None:
            rows.append([name, round(paper_score(v), 4), round(paper_score(b), 4)])
    return rows


def speed_rows(speed: dict) -> list[list]:
    """Per test: each model in its faster flash-attention setting, then both in each setting."""
    rows = []
    for test in SPEED_TESTS:
        for name, r in speed["speedup"][test].items():
            v_fa, b_fa = r["variant_setting"], r["base_setting"]
            label = f"{test} best ({v_fa[3:]}/{b_fa[3:]})" if name == "best" else f"{test} {name}"
            rows.append([label, round(speed["fastest"]["variant"][v_fa][test], 1),
                         round(speed["fastest"]["base"][b_fa][test], 1), round(r["value"], 3), round(r["spread"], 3)])
    return rows


def _bar_png(path: Path, labels, variant, base, title: str, xlabel: str) -> None:
    import numpy as np

    from ..plots import pyplot

    plt = pyplot()

    y = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(labels) + 1.5))
    ax.barh(y - 0.2, base, 0.4, label="base (unpruned)", color="#999999")
    ax.barh(y + 0.2, variant, 0.4, label="variant", color="#1f77b4")
    ax.set_yticks(y, labels)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_plots(out_dir: Path, accuracy: dict, base_accuracy: dict, speed: dict | None, label: str) -> None:
    acc = accuracy_rows(accuracy, base_accuracy)
    _write_csv(out_dir / "accuracy.csv", ["task", "variant", "base"], acc)
    _bar_png(out_dir / "accuracy.png", [r[0] for r in acc], [r[1] for r in acc], [r[2] for r in acc],
             f"Accuracy ({label}; acc_norm where defined)", "accuracy")
    rows = speed_rows(speed) if speed else []
    _write_csv(out_dir / "speed.csv", ["test", "variant", "base", "speedup", "spread"], rows)
    # Always written (a declared DVC output): empty bars when eval.speed is off.
    title = (f"llama.cpp speed ({label}; fastest of {speed['rounds']} A/B rounds{', NOISY' if speed['noisy'] else ''})"
             if rows else "speed not measured (eval.speed: false)")
    _bar_png(out_dir / "speed.png", [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], title,
             "tokens/s")


def write_heatmap(path: Path, plan: dict, label: str) -> None:
    """The importance heatmap the plan was chosen from, titled with the model's name, its dropped units marked."""
    from ..naming import model_name
    from ..plots import importance_heatmap, plan_units, pyplot

    source = (plan.get("model") or {}).get("source") or "model"
    try:
        name = model_name(source)
    except Exception:  # a title is never worth failing the stage over (a moved model folder, say)
        name = source
    scores = plan.get("scores") or {}
    importance = scores.get("importance")
    if importance:
        importance_heatmap(importance, path, f"{name}: importance ({scores.get('metric')}), {label}",
                           dropped=plan_units(plan))
        return
    plt = pyplot()  # an explicit plan (drop.layers) was chosen without scores: say so in the declared output
    fig, ax = plt.subplots(figsize=(6, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, f"{name}, {label}: no importance scores (explicit drop.layers)", ha="center", va="center")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def offline_template() -> str:
    scripts = "\n".join(f"<script>{(VEGA_DIR / name).read_text(encoding='utf-8')}</script>"
                        for name in ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js"))
    return ("<!DOCTYPE html>\n<html>\n<head>\n{refresh_tag}\n<meta charset=\"utf-8\">\n<title>dropquant plots</title>\n"
            + scripts + "\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n")


def write_offline_template(path: Path) -> None:
    write_text(path, offline_template())
