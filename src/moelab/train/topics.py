"""Per-topic expert activation histograms: which experts each domain's tokens are routed to.

For every MoE layer and domain, the share of that domain's (token, slot) assignments each
expert receives. Uniform routing gives 1/E everywhere; domain specialisation shows up as
rows that differ from each other (the analysis of Jiang et al. 2024, "Mixtral of Experts",
Sec. 5 / Fig. 7, and the per-topic histograms of MoE encoders trained with MLM). The numbers
go to topics.json and one PNG with a panel per MoE layer (domain x expert histogram bars).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab._io import atomic_write_json, atomic_write_with
from moelab.data.dataset import PackedBlocks
from moelab.errors import AnalysisError
from moelab.models import MoETransformer

__all__ = ["domain_expert_counts", "topic_histograms", "plot_topic_histograms"]


@torch.no_grad()
def domain_expert_counts(
    model: MoETransformer,
    blocks: PackedBlocks,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Counts [n_domains, n_moe_layers, E] of routed assignments per domain, layer and expert."""
    layers = model.moe_layer_indices()
    if not layers:
        raise AnalysisError("topic histograms need an MoE model; this model has no MoE layer")
    E = model.cfg.moe.num_experts  # type: ignore[union-attr]
    D = len(blocks.domains)
    counts = np.zeros((D, len(layers), E), dtype=np.int64)
    was = model.training
    model.eval()
    for i in range(0, len(blocks), batch_size):
        x = blocks.input_ids[i : i + batch_size].to(device)
        dom = blocks.domain[i : i + batch_size].reshape(-1).to(torch.int64)
        out = model(x)
        for j, layer in enumerate(layers):
            r = out.routing[layer]
            ids = r.expert_ids.to("cpu")  # [T, k]
            k = ids.shape[1]
            d = dom[:, None].expand(-1, k).reshape(-1)
            e = ids.reshape(-1)
            ok = e >= 0
            if r.dropped is not None:
                ok &= ~r.dropped.to("cpu").reshape(-1)
            flat = torch.bincount(d[ok] * E + e[ok], minlength=D * E)[: D * E].reshape(D, E)
            counts[:, j, :] += flat.numpy()
    model.train(was)
    return counts


def plot_topic_histograms(
    share: np.ndarray, domains: list[str], layers: list[int], path: str | os.PathLike[str]
) -> None:
    """PNG: one panel per MoE layer, grouped bars (expert on x, one bar per domain)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    D, L, E = share.shape
    cols = min(2, L)
    rows = (L + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols + 1.5, 3.2 * rows), squeeze=False)
    width = 0.8 / max(D, 1)
    cmap = plt.get_cmap("tab20" if D > 10 else "tab10")
    x = np.arange(E)
    for j in range(L):
        ax = axes[j // cols][j % cols]
        for d in range(D):
            ax.bar(
                x - 0.4 + (d + 0.5) * width,
                share[d, j],
                width,
                label=domains[d],
                color=cmap(d % cmap.N),
            )
        ax.axhline(1.0 / E, color="k", lw=0.8, ls="--")
        ax.set_title(f"MoE layer {layers[j]}: expert share per domain (dashed = uniform)")
        ax.set_xticks(x)
        ax.set_xlabel("expert")
        ax.set_ylabel("share of routed slots")
    for j in range(L, rows * cols):
        axes[j // cols][j % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, title="domain")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    atomic_write_with(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def topic_histograms(
    model: MoETransformer,
    blocks: PackedBlocks,
    out_dir: str | os.PathLike[str],
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Compute expert share per domain per MoE layer; write topics.json and topic_histograms.png."""
    counts = domain_expert_counts(model, blocks, batch_size=batch_size, device=device)
    present = counts.sum(axis=(1, 2)) > 0
    if not present.any():
        raise AnalysisError("topic histograms: no routed tokens in the given blocks")
    counts = counts[present]
    tokens = np.bincount(blocks.domain.reshape(-1).numpy(), minlength=len(blocks.domains))
    domains = [d for d, p in zip(blocks.domains, present, strict=True) if p]
    share = counts / np.maximum(counts.sum(axis=2, keepdims=True), 1)
    overall = counts.sum(axis=0)
    overall_share = overall / np.maximum(overall.sum(axis=1, keepdims=True), 1)
    # total-variation distance of each domain's expert distribution from the all-domain one
    tv = 0.5 * np.abs(share - overall_share[None]).sum(axis=2)
    layers = model.moe_layer_indices()
    out = Path(out_dir)
    result = {
        "domains": domains,
        "layers": layers,
        "num_experts": int(counts.shape[2]),
        "tokens_per_domain": tokens[present].tolist(),
        "share": share.tolist(),
        "counts": counts.tolist(),
        "tv_from_overall": tv.tolist(),
    }
    atomic_write_json(out / "topics.json", result)
    plot_topic_histograms(share, domains, layers, out / "topic_histograms.png")
    return result
