"""Quality vs experts per layer: prune (by importance, frequency, gate mass or index) and merge
(MC-SMoE) to each size, score held-out perplexity, tabulate and plot.

Selection statistics (ablation importance, routing frequency, gate mass, merge groups) come from
a calibration split; perplexity from a different, held-out split, so the choice of experts is
never scored on the text it was chosen on.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from moelab._io import atomic_write_with
from moelab.errors import ConfigError
from moelab.experts.ablate import ablation_importance
from moelab.experts.heldout import EvalSample, ratio_and_se, sequence_sums
from moelab.experts.prune import merge_model, prune_model, routing_stats, select_experts

__all__ = ["METHODS", "shrink_model", "shrink_sweep", "plot_sweep"]

METHODS = ("importance", "frequency", "gate_mass", "index", "merge")


def shrink_model(
    model: nn.Module,
    method: str,
    keep: int,
    calib: EvalSample,
    importance: np.ndarray | None = None,
    stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """(model with `keep` experts per MoE layer, what was kept/merged) by the named method."""
    if method not in METHODS:
        raise ConfigError(f"shrink: method={method!r}; expected one of {METHODS}")
    E = model.cfg.moe.num_experts
    if not 1 <= keep <= E:
        raise ConfigError(f"shrink: --keep {keep} experts per layer must be in [1, {E}]")
    freq, mass = stats if stats is not None else routing_stats(model, calib.input_ids)
    if method == "merge":
        new, groups = merge_model(model, calib.input_ids, keep, freq=freq)
        return new, {"groups": groups}
    if method == "importance":
        if importance is None:
            importance = ablation_importance(
                model, calib, modes=("reroute",), show_progress=False
            ).importance("reroute")
        scores = importance
    elif method == "frequency":
        scores = freq
    elif method == "gate_mass":
        scores = mass
    else:
        scores = None
    keep_lists = select_experts(scores, keep, E)
    return prune_model(model, keep_lists), {"kept": keep_lists}


def shrink_sweep(
    model: nn.Module,
    calib: EvalSample,
    evalset: EvalSample,
    sizes: list[int],
    methods: tuple[str, ...] = METHODS,
    importance: np.ndarray | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Held-out loss/perplexity of every (method, experts per layer), with paired standard errors
    of the loss change against the unshrunk model."""
    E = model.cfg.moe.num_experts
    for s in sizes:
        if not 1 <= s <= E:
            raise ConfigError(f"shrink: size {s} must be in [1, {E}] experts per layer")
    stats = routing_stats(model, calib.input_ids)
    if "importance" in methods and importance is None:
        importance = ablation_importance(model, calib, modes=("reroute",)).importance("reroute")
    base_s, counts = sequence_sums(model, evalset, batch_size)
    base, base_se = ratio_and_se(base_s.sum(1), counts.sum(1))
    rows = []
    for method in methods:
        for keep in sizes:
            with torch.no_grad():
                new, info = shrink_model(model, method, keep, calib, importance, stats)
            s, _ = sequence_sums(new, evalset, batch_size)
            loss, se = ratio_and_se(s.sum(1), counts.sum(1))
            d, d_se = ratio_and_se((s - base_s).sum(1), counts.sum(1))
            rows.append(
                {"method": method, "experts": keep, "top_k": new.cfg.moe.top_k, "loss": loss,
                 "loss_se": se, "ppl": math.exp(loss), "delta_loss": d, "delta_loss_se": d_se,
                 "ppl_ratio": math.exp(d), **info}
            )  # fmt: skip
    return {
        "calibration_split": calib.split,
        "eval_split": evalset.split,
        "eval_tokens": evalset.num_tokens,
        "num_experts": E,
        "full_loss": base,
        "full_loss_se": base_se,
        "full_ppl": math.exp(base),
        "frequency": stats[0].tolist(),
        "gate_mass": stats[1].tolist(),
        "importance": None if importance is None else np.asarray(importance).tolist(),
        "rows": rows,
    }


def plot_sweep(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """PNG: held-out perplexity vs experts per layer, one line per method (error bars 1 SE)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        rs = sorted(
            (r for r in result["rows"] if r["method"] == method), key=lambda r: r["experts"]
        )
        x = [r["experts"] for r in rs]
        y = [r["ppl"] for r in rs]
        err = [r["ppl"] * r["delta_loss_se"] for r in rs]
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, label=method)
    ax.axhline(
        result["full_ppl"],
        color="gray",
        ls="--",
        lw=0.8,
        label=f"all {result['num_experts']} experts",
    )
    ax.set_xlabel("experts per MoE layer")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"pruning / merging ({result['eval_tokens']} held-out tokens)")
    fig.tight_layout()
    atomic_write_with(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
