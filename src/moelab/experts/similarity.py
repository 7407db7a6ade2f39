"""How similar experts are: by weights after neuron alignment, and by outputs on the same tokens.

Neuron order inside an FFN is arbitrary (permuting hidden units leaves the function unchanged),
so weights are compared after aligning the neurons of one expert to another: each hidden neuron
j is described by its gate row, up row and down column; the Pearson correlation between neuron
descriptions gives a cost matrix and the Hungarian algorithm (Kuhn 1955;
``scipy.optimize.linear_sum_assignment``) the permutation that maximises total correlation --
the weight matching of Ainsworth et al. 2023 ("Git Re-Basin"), used for experts by MC-SMoE
(Li et al. 2024, "Merge, Then Compress") before merging.

Output similarity runs every expert of a layer on the same tokens (that layer's router inputs):
linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited",
Eq. 4: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred outputs) and the mean cosine of the
two output vectors per token. Across layers, each expert runs on its own layer's inputs for the
same token positions, so CKA compares the representations of the same tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from moelab._io import atomic_write_with
from moelab.errors import InputError
from moelab.experts.access import LayerExperts, expert_forward

__all__ = [
    "neuron_features",
    "align_neurons",
    "permute_expert",
    "weight_similarity",
    "linear_cka",
    "output_cosine",
    "SimilarityMatrices",
    "expert_similarity",
    "plot_heatmaps",
]


def neuron_features(gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """[F, (n_in/F + 1) * D]: per hidden neuron its input rows (gate and up) and output column."""
    f = down.shape[1]
    rows = [gate_up[i * f : (i + 1) * f] for i in range(gate_up.shape[0] // f)]
    return torch.cat([*rows, down.t()], dim=1).double()


def _standardise(a: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(dim=1, keepdim=True)
    return a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)


def align_neurons(
    gate_up_a: torch.Tensor, down_a: torch.Tensor, gate_up_b: torch.Tensor, down_b: torch.Tensor
) -> tuple[np.ndarray, float]:
    """(perm, mean matched correlation): neuron perm[i] of expert b matches neuron i of a."""
    fa, fb = neuron_features(gate_up_a, down_a), neuron_features(gate_up_b, down_b)
    if fa.shape != fb.shape:
        raise InputError(
            f"align_neurons: experts of shapes {tuple(fa.shape)} and {tuple(fb.shape)}"
        )
    corr = (_standardise(fa) @ _standardise(fb).t()).cpu().numpy()
    rows, cols = linear_sum_assignment(corr, maximize=True)
    perm = np.empty_like(cols)
    perm[rows] = cols
    return perm, float(corr[rows, cols].mean())


def permute_expert(
    gate_up: torch.Tensor, down: torch.Tensor, perm: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert weights with hidden neurons reordered so that new neuron i = old neuron perm[i]."""
    f = down.shape[1]
    p = torch.as_tensor(perm, dtype=torch.long, device=down.device)
    n_mats = gate_up.shape[0] // f
    idx = torch.cat([p + i * f for i in range(n_mats)])
    return gate_up[idx], down[:, p]


def _flat(gu: torch.Tensor, dn: torch.Tensor) -> torch.Tensor:
    return torch.cat([gu.reshape(-1), dn.reshape(-1)]).double()


def weight_similarity(
    gate_up_a: torch.Tensor, down_a: torch.Tensor, gate_up_b: torch.Tensor, down_b: torch.Tensor
) -> tuple[float, float]:
    """(cosine of the flattened weights before alignment, after aligning b's neurons to a)."""
    va = _flat(gate_up_a, down_a)
    before = float(torch.nn.functional.cosine_similarity(va, _flat(gate_up_b, down_b), dim=0))
    perm, _ = align_neurons(gate_up_a, down_a, gate_up_b, down_b)
    gb, db = permute_expert(gate_up_b, down_b, perm)
    after = float(torch.nn.functional.cosine_similarity(va, _flat(gb, db), dim=0))
    return before, after


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations [T, D1], [T, D2] of the same T tokens (1 = same up to
    an orthogonal transform and isotropic scaling)."""
    if x.shape[0] != y.shape[0]:
        raise InputError(f"linear_cka: {x.shape[0]} vs {y.shape[0]} tokens; need the same tokens")
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    num = (y.t() @ x).pow(2).sum()
    den = torch.linalg.matrix_norm(x.t() @ x) * torch.linalg.matrix_norm(y.t() @ y)
    return float(num / den) if float(den) > 0 else float("nan")


def output_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over tokens of the cosine between two output vectors [T, D]."""
    return float(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=1).mean())


@dataclass
class SimilarityMatrices:
    """Square matrices over all experts of all MoE layers (index = layer_pos * E + expert)."""

    layers: list[int]
    num_experts: int
    weight_cos_raw: np.ndarray  # cosine of flattened weights, neurons as stored
    weight_cos_aligned: np.ndarray  # after Hungarian neuron alignment
    neuron_corr: np.ndarray  # mean correlation of matched neurons
    output_cka: np.ndarray  # linear CKA of outputs on the same tokens
    output_cos: np.ndarray  # mean per-token cosine of outputs
    tokens: int
    aligned_null: float = float("nan")  # aligned cosine of random Gaussian experts, same shape

    def within_layer(self, name: str, layer_pos: int) -> np.ndarray:
        """[E, E] block of one matrix for one MoE layer."""
        E = self.num_experts
        m = getattr(self, name)
        return m[layer_pos * E : (layer_pos + 1) * E, layer_pos * E : (layer_pos + 1) * E]

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean off-diagonal value per matrix, within layers and across layers."""
        E, L = self.num_experts, len(self.layers)
        same = np.kron(np.eye(L, dtype=bool), np.ones((E, E), dtype=bool))
        off = ~np.eye(L * E, dtype=bool)
        out = {"null_aligned_cosine_of_random_experts": {"value": self.aligned_null}}
        for name in (
            "weight_cos_raw",
            "weight_cos_aligned",
            "neuron_corr",
            "output_cka",
            "output_cos",
        ):
            m = getattr(self, name)
            out[name] = {
                "within_layer": float(np.nanmean(m[same & off])) if E > 1 else float("nan"),
                "across_layers": float(np.nanmean(m[~same])) if L > 1 else float("nan"),
            }
        return out


@torch.no_grad()
def expert_similarity(
    experts: list[LayerExperts],
    router_inputs: list[torch.Tensor],
    across_layers: bool = True,
    max_tokens: int = 4096,
) -> SimilarityMatrices:
    """All similarity matrices for the experts of every MoE layer (across layers if asked; the
    cross-layer weight entries need equal expert sizes, else they are NaN)."""
    L = len(experts)
    if len(router_inputs) != L:
        raise InputError(f"expert_similarity: {len(router_inputs)} input sets for {L} MoE layers")
    E = experts[0].num_experts
    T = min(min(x.shape[0] for x in router_inputs), max_tokens)
    if T < 2:
        raise InputError("expert_similarity: need at least 2 tokens of router inputs")
    n = L * E
    mats = {k: np.full((n, n), np.nan) for k in ("raw", "aligned", "corr", "cka", "cos")}
    outs = []
    for le, x in zip(experts, router_inputs, strict=True):
        xs = x[:T].to(le.gate_up.dtype).to(le.gate_up.device)
        outs.append(
            [expert_forward(le.gate_up[e], le.down[e], le.act, xs).float().cpu() for e in range(E)]
        )
    # CKA pieces computed once per expert: centred outputs, ||Yc^T Yc||_F, unit rows for cosine
    flat = [y for layer in outs for y in layer]
    cen = [y - y.mean(0, keepdim=True) for y in flat]
    self_norm = [float(torch.linalg.matrix_norm(c.t() @ c)) for c in cen]
    unit = [y / y.norm(dim=1, keepdim=True).clamp_min(1e-12) for y in flat]
    for a in range(n):
        la, ea = divmod(a, E)
        for b in range(a, n):
            lb, eb = divmod(b, E)
            if la != lb and not across_layers:
                continue
            A, B = experts[la], experts[lb]
            den = self_norm[a] * self_norm[b]
            cka = float((cen[b].t() @ cen[a]).pow(2).sum()) / den if den > 0 else float("nan")
            mats["cka"][a, b] = mats["cka"][b, a] = cka
            mats["cos"][a, b] = mats["cos"][b, a] = float((unit[a] * unit[b]).sum(1).mean())
            if A.gate_up.shape == B.gate_up.shape and A.act == B.act:
                ga, da = A.gate_up[ea].cpu(), A.down[ea].cpu()
                gb, db = B.gate_up[eb].cpu(), B.down[eb].cpu()
                perm, corr = align_neurons(ga, da, gb, db)
                gbp, dbp = permute_expert(gb, db, perm)
                va = _flat(ga, da)
                raw = torch.nn.functional.cosine_similarity(va, _flat(gb, db), dim=0)
                ali = torch.nn.functional.cosine_similarity(va, _flat(gbp, dbp), dim=0)
                mats["raw"][a, b] = mats["raw"][b, a] = float(raw)
                mats["aligned"][a, b] = mats["aligned"][b, a] = float(ali)
                mats["corr"][a, b] = mats["corr"][b, a] = corr
    # what alignment alone gives: two random Gaussian experts of the same shape (3 pairs)
    g = torch.Generator().manual_seed(0)
    ref = experts[0]
    nulls = []
    for _ in range(3):
        ga, gb = (
            torch.randn(ref.gate_up.shape[1:], generator=g, dtype=torch.float64) for _ in "ab"
        )
        da, db = (torch.randn(ref.down.shape[1:], generator=g, dtype=torch.float64) for _ in "ab")
        nulls.append(weight_similarity(ga, da, gb, db)[1])
    return SimilarityMatrices(
        aligned_null=float(np.mean(nulls)),
        layers=[le.layer for le in experts],
        num_experts=E,
        weight_cos_raw=mats["raw"],
        weight_cos_aligned=mats["aligned"],
        neuron_corr=mats["corr"],
        output_cka=mats["cka"],
        output_cos=mats["cos"],
        tokens=T,
    )


def plot_heatmaps(sim: SimilarityMatrices, path: str | os.PathLike[str]) -> None:
    """PNG: aligned-weight cosine, output CKA and output cosine over all experts of all layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("weight_cos_aligned", "weight cosine (neurons aligned)"),
        ("output_cka", "output linear CKA"),
        ("output_cos", "output cosine"),
    )
    E, L = sim.num_experts, len(sim.layers)
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    for ax, (name, title) in zip(axes, panels, strict=True):
        m = getattr(sim, name).copy()
        np.fill_diagonal(m, np.nan)  # the diagonal (=1) would squash the colour scale
        im = ax.imshow(m, cmap="viridis", interpolation="nearest")
        for b in range(1, L):
            ax.axhline(b * E - 0.5, color="white", lw=0.8)
            ax.axvline(b * E - 0.5, color="white", lw=0.8)
        ticks = [i * E + E / 2 - 0.5 for i in range(L)]
        ax.set_xticks(ticks, [f"L{x}" for x in sim.layers])
        ax.set_yticks(ticks, [f"L{x}" for x in sim.layers])
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"expert similarity, {E} experts x {L} MoE layers, outputs on {sim.tokens} tokens")
    fig.tight_layout()
    atomic_write_with(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
