"""Figures for the routing analyses (matplotlib for static PNG, plotly for interactive HTML).

Plotting only: every function takes already computed arrays and returns a Figure; nothing here
computes statistics. Heatmaps use a diverging colour scale centred on the chance value, so
white means "what uniform routing would give".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402


def heatmap(
    mat: np.ndarray,
    title: str,
    xlabel: str,
    ylabel: str,
    center: float | None = None,
    xticklabels: Sequence[str] | None = None,
    yticklabels: Sequence[str] | None = None,
    cbar_label: str = "",
) -> Any:
    """Matrix heatmap; diverging around `center` when given (white = chance)."""
    mat = np.asarray(mat, dtype=np.float64)
    h, w = mat.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.35 * w, 14), min(1.5 + 0.28 * h, 12)))
    if center is not None:
        lo, hi = np.nanmin(mat), np.nanmax(mat)
        lo, hi = min(lo, center - 1e-9), max(hi, center + 1e-9)
        im = ax.imshow(
            mat,
            aspect="auto",
            cmap="RdBu_r",
            norm=TwoSlopeNorm(center, lo, hi),
            interpolation="nearest",
        )
    else:
        im = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label=cbar_label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xticklabels is not None and len(xticklabels) <= 64:
        ax.set_xticks(range(len(xticklabels)), list(xticklabels), rotation=90, fontsize=7)
    if yticklabels is not None and len(yticklabels) <= 64:
        ax.set_yticks(range(len(yticklabels)), list(yticklabels), fontsize=7)
    fig.tight_layout()
    return fig


def lines(
    x: np.ndarray,
    series: dict[str, np.ndarray],
    title: str,
    xlabel: str,
    ylabel: str,
    hlines: dict[str, float] | None = None,
    dashed: Sequence[str] = (),
) -> Any:
    """Per-layer curves with horizontal chance lines (grey dotted)."""
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for name, y in series.items():
        ax.plot(x, y, marker="o", ms=3, ls="--" if name in dashed else "-", label=name)
    for name, v in (hlines or {}).items():
        if v == v:
            ax.axhline(v, color="grey", ls=":", lw=1.2)
            ax.annotate(
                name, (x[-1] if len(x) else 0, v), fontsize=7, color="grey", va="bottom", ha="right"
            )
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def token_grid(grid: np.ndarray, tokens: Sequence[str], num_experts: int, title: str) -> Any:
    """Token x layer grid coloured by top-1 expert, tokens as row labels."""
    t, num_l = grid.shape
    fig, ax = plt.subplots(figsize=(min(3 + 0.3 * num_l, 16), min(1.5 + 0.22 * t, 18)))
    cmap = plt.get_cmap("tab20" if num_experts > 10 else "tab10", max(num_experts, 1))
    im = ax.imshow(
        np.where(grid < 0, np.nan, grid),
        aspect="auto",
        cmap=cmap,
        vmin=-0.5,
        vmax=num_experts - 0.5,
        interpolation="nearest",
    )
    ax.set_yticks(range(t), [repr(s)[1:-1][:16] for s in tokens], fontsize=7)
    ax.set_xlabel("MoE layer")
    ax.set_title(title)
    cb = fig.colorbar(im, ax=ax, label="top-1 expert")
    if num_experts <= 20:
        cb.set_ticks(range(num_experts))
    fig.tight_layout()
    return fig


def usage_plotly(share: np.ndarray, chance: float, title: str) -> Any:
    """Interactive usage heatmap (layer x expert), colour centred on chance."""
    import plotly.graph_objects as go

    lo, hi = float(share.min()), float(share.max())
    span = max(hi - chance, chance - lo, 1e-9)
    fig = go.Figure(
        go.Heatmap(
            z=share,
            colorscale="RdBu_r",
            zmin=chance - span,
            zmax=chance + span,
            hovertemplate="layer %{y}<br>expert %{x}<br>share %{z:.4f}<extra></extra>",
        )
    )
    fig.update_layout(title=title, xaxis_title="expert", yaxis_title="MoE layer", height=420)
    return fig


def sankey(
    flows: list[np.ndarray], layers: Sequence[int], title: str, min_share: float = 0.002
) -> Any:
    """Plotly Sankey of top-1 expert flow across consecutive layers (flows [E, E] per step)."""
    import plotly.graph_objects as go

    num_e = flows[0].shape[0]
    labels = [f"L{layer}·E{e}" for layer in layers for e in range(num_e)]
    src, dst, val = [], [], []
    for step, f in enumerate(flows):
        tot = f.sum()
        for a in range(num_e):
            for b in range(num_e):
                if tot > 0 and f[a, b] / tot >= min_share:
                    src.append(step * num_e + a)
                    dst.append((step + 1) * num_e + b)
                    val.append(float(f[a, b]))
    palette = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    ]
    colors = [palette[i % num_e % len(palette)] for i in range(len(labels))]
    fig = go.Figure(
        go.Sankey(
            node={"label": labels, "color": colors, "pad": 6, "thickness": 10},
            link={"source": src, "target": dst, "value": val},
        )
    )
    fig.update_layout(title=title, height=520, font_size=9)
    return fig


def scatter_plotly(coords: np.ndarray, labels: np.ndarray, names: Sequence[str], title: str) -> Any:
    """Interactive 2-D scatter of an embedding coloured by label."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, name in enumerate(names):
        sel = labels == i
        if sel.any():
            fig.add_trace(
                go.Scatter(
                    x=coords[sel, 0],
                    y=coords[sel, 1],
                    mode="markers",
                    name=str(name),
                    marker={"size": 4, "opacity": 0.7},
                )
            )
    fig.update_layout(title=title, height=480)
    return fig


def scatter(coords: np.ndarray, labels: np.ndarray, names: Sequence[str], title: str) -> Any:
    """Static 2-D scatter of an embedding coloured by label."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for i, name in enumerate(names):
        sel = labels == i
        if sel.any():
            ax.scatter(coords[sel, 0], coords[sel, 1], s=4, alpha=0.6, label=str(name))
    ax.set_title(title)
    if len(names) <= 12:
        ax.legend(fontsize=7, markerscale=3)
    fig.tight_layout()
    return fig
