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


def mix_heatmap(summary: dict, path: str | Path, title: str) -> None:
    """A mixed GGUF's types: one row per tensor group, one column per GGUF block, coloured by bits per weight and
    labelled with the type; the embedding and output types in the x label."""
    import numpy as np
    from matplotlib.colors import ListedColormap

    from dropquant.gguf.mix import layer_grid

    plt = pyplot()
    groups, blocks, grid, other = layer_grid(summary)
    bpw = {v["type"]: v["bpw"] for v in summary["tensors"].values()}
    data = np.full((len(groups), max(blocks, 1)), np.nan)
    for (g, b), t in grid.items():
        data[groups.index(g), b] = bpw[t]
    fig, ax = plt.subplots(figsize=(max(6, 0.42 * blocks + 2.5), 0.42 * len(groups) + 2.2))
    # Grey: a tensor the block does not have (a dropped attention or MLP).
    cmap = ListedColormap(plt.get_cmap("magma")(np.linspace(0.15, 0.95, 256))).with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap)
    for (g, b), t in grid.items():
        ax.text(b, groups.index(g), t.replace("_", "\n", 1) if len(t) > 4 else t, ha="center", va="center",
                fontsize=5, color="white" if bpw[t] < np.nanmean(data) else "black")
    ax.set_yticks(range(len(groups)), groups)
    ax.set_xticks(range(blocks))
    ax.tick_params(axis="x", labelsize=7)
    extra = ", ".join(f"{k}: {v}" for k, v in sorted(other.items()))
    ax.set_xlabel(f"GGUF block; grey = tensor not in the block" + (f"\n{extra}" if extra else ""))
    ax.set_title(f"{title}\n{summary['target']} target: {summary['file_bytes'] / 1e6:.1f} MB, "
                 f"{summary['bpw']:.2f} bpw, estimated KL {summary['estimated_kl']:.4f} ({summary['by']})",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label="bits per weight")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight", metadata=PNG_METADATA)
    plt.close(fig)
