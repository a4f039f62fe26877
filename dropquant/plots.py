"""Static PNG plots (matplotlib, headless) so results can be looked at offline."""
from __future__ import annotations

from pathlib import Path

from .atomic import atomic_path

# No "Software: Matplotlib vX" chunk: the same figure has the same bytes whichever matplotlib drew it.
PNG_METADATA = {"Software": None}


def pyplot():
    """matplotlib's pyplot on the headless Agg backend (no display here or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def importance_heatmap(importance: dict[str, list[float]], path: str | Path, title: str,
                       dropped: dict[str, list[int]] | None = None) -> None:
    """One row per unit (attention, MLP, block), one column per layer; darker = more redundant.

    dropped: {"attn"|"mlp"|"block": [layer, ...]}, the units a plan removed, outlined in red with an x."""
    import numpy as np

    plt = pyplot()
    rows = ["attn", "mlp", "block"]
    # Drawn from 4 significant digits (more than a colour shows), so float noise in the last bits of a
    # score can never change the picture's bytes and make DVC see a changed output.
    data = np.array([[float(f"{v:.4g}") for v in importance[r]] for r in rows])
    n_layers = data.shape[1]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * n_layers + 2), 2.6 + (0.3 if dropped else 0)))
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    # Log scale: the first and last layers are often orders of magnitude above the rest.
    positive = data[data > 0]
    norm = LogNorm(vmin=max(float(positive.min()), 1e-6), vmax=float(positive.max())) if positive.size else None
    im = ax.imshow(np.clip(data, 1e-6, None), aspect="auto", cmap="viridis_r", norm=norm)
    marked = 0
    for r, unit in enumerate(rows):
        for layer in (dropped or {}).get(unit, []):
            ax.add_patch(Rectangle((layer - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
            ax.text(layer, r, "x", ha="center", va="center", color="red", fontsize=9, fontweight="bold")
            marked += 1
    ax.set_yticks(range(len(rows)), ["attention", "MLP", "block"])
    ax.set_xticks(range(n_layers))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("layer" + ("; red x = dropped by the plan" if marked else ""))
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="importance\n(low = redundant)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight", metadata=PNG_METADATA)
    plt.close(fig)


def plan_units(plan: dict) -> dict[str, list[int]]:
    """The units a drop plan (plan.json) removed, keyed as the heatmap's rows."""
    return {"attn": list(plan.get("attn") or []), "mlp": list(plan.get("mlp") or []),
            "block": list(plan.get("blocks") or [])}
