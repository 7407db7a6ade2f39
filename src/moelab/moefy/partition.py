"""Split a SwiGLU FFN's intermediate neurons into E equal groups (MoEfication, Zhang et al. 2022;
LLaMA-MoE, Zhu et al. 2024) so that the sum of all E experts equals the original FFN exactly.

FFN(x) = W_down (silu(W_gate x) * (W_up x)) = sum_e W_down[:, S_e] (silu(W_gate[S_e] x) * (W_up[S_e] x))
for any partition {S_e} of the neurons, because SwiGLU acts neuron-wise.

Methods: "cluster" (balanced k-means over the neurons' normalised input weight rows
[W_gate | W_up], assignment solved exactly as a min-cost transport with equal cluster sizes),
"random" (a seeded permutation, the baseline), "coactivation" (balanced k-means over each neuron's
activation pattern on recorded tokens, so neurons that fire together share an expert).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from moelab.errors import ConfigError, InputError

METHODS = ("cluster", "random", "coactivation")


def balanced_kmeans(
    features: np.ndarray, num_groups: int, iters: int = 10, seed: int = 0
) -> np.ndarray:
    """Balanced k-means: [n, f] features -> [n] group ids, every group exactly n/num_groups rows.

    Each iteration solves the balanced assignment exactly (Hungarian algorithm on the cost of
    row i joining group g, with each group repeated n/num_groups times), then moves centroids.
    """
    n = features.shape[0]
    if num_groups < 1 or n % num_groups != 0:
        raise ConfigError(
            f"balanced_kmeans: num_groups={num_groups} must divide the number of neurons ({n})"
        )
    size = n // num_groups
    rng = np.random.default_rng(seed)
    x = features.astype(np.float64)
    centroids = x[rng.choice(n, num_groups, replace=False)]
    assign = np.zeros(n, dtype=np.int64)
    for it in range(iters):
        # squared distances [n, G]
        d = (x * x).sum(1, keepdims=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)
        cost = np.repeat(d, size, axis=1)  # column j -> group j // size
        rows, cols = linear_sum_assignment(cost)
        new = np.empty(n, dtype=np.int64)
        new[rows] = cols // size
        if it > 0 and np.array_equal(new, assign):
            break
        assign = new
        centroids = np.stack([x[assign == g].mean(0) for g in range(num_groups)])
    return assign


def partition_neurons(
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    num_experts: int,
    method: str = "cluster",
    activations: torch.Tensor | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Return E sorted index arrays (equal sizes) partitioning the F neurons of one FFN.

    w_gate, w_up: [F, D]; activations: [tokens, F] recorded |silu(gate) * up| (coactivation only).
    """
    if method not in METHODS:
        raise ConfigError(f"partition method={method!r}: expected one of {METHODS}")
    f = w_gate.shape[0]
    if w_up.shape != w_gate.shape:
        raise InputError(f"partition: gate {tuple(w_gate.shape)} and up {tuple(w_up.shape)} differ")
    if num_experts < 1 or f % num_experts != 0:
        raise ConfigError(
            f"--experts={num_experts}: must divide the FFN's intermediate size ({f}) into equal groups"
        )
    if method == "random":
        perm = np.random.default_rng(seed).permutation(f)
        return [np.sort(g) for g in np.split(perm, num_experts)]
    if method == "cluster":
        feats = torch.cat([w_gate, w_up], dim=1).float()
        feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    else:
        if activations is None:
            raise ConfigError(
                "partition method='coactivation' needs recorded activations [tokens, F]"
            )
        if activations.shape[1] != f:
            raise InputError(
                f"coactivation: activations have {activations.shape[1]} neurons, the FFN has {f}"
            )
        a = activations.float().abs().t()  # [F, tokens]
        a = (a > a.mean(dim=1, keepdim=True)).float()  # which tokens each neuron fires strongly on
        feats = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    assign = balanced_kmeans(feats.numpy(), num_experts, seed=seed)
    return [np.flatnonzero(assign == e) for e in range(num_experts)]


def split_ffn(
    w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, groups: list[np.ndarray]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack expert weights in moelab's ExpertBank layout from a partition.

    Returns gate_up_proj [E, 2F/E, D] (gate rows then up rows) and down_proj [E, D, F/E].
    """
    gate_up, down = [], []
    for idx in groups:
        t = torch.as_tensor(idx, dtype=torch.long)
        gate_up.append(torch.cat([w_gate[t], w_up[t]], dim=0))
        down.append(w_down[:, t])
    return torch.stack(gate_up), torch.stack(down)
