"""Layer-to-layer transitions of expert choices (layer l -> l+n) for the same token.

Two views: single experts (E x E; each token contributes all k x k pairs of its slot choices at
l and l+n — counting only slot i -> slot i, or only top-1, is the mistake some published scripts
make) and order-free top-k sets (C(E,k) x C(E,k); each token contributes one pair). Each is given
as counts, joint, row-conditional P(col | row), lift and NPMI (Bouma 2009). Chance = independence
(lift 1, NPMI 0, conditional rows equal to the l+n marginal). The shuffle baseline permutes the
rows of layer l+n, which keeps both marginals and breaks the link. The per-layer summary reports
normalised mutual information I/sqrt(H H) and the in-sample top-1 predictability from the
previous layer (chance = the most frequent top-1 expert's share).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.analysis._common import (
    MAX_DENSE_SETS,
    check_layer,
    check_trace,
    layer_sets,
    lift,
    mutual_information,
    n_sets,
    nmi,
    npmi,
    pair_counts,
    row_normalize,
    sparse_mi,
    token_mask,
    top1,
)
from moelab.errors import AnalysisError
from moelab.trace.schema import NO_EXPERT, Trace


@dataclass
class TransitionMatrix:
    """Counts and derived matrices for pairs (row at layer l, column at layer l+n)."""

    layer: int
    n: int
    counts: np.ndarray  # [R, C]
    joint: np.ndarray  # counts / total
    conditional: np.ndarray  # row-normalised P(col | row)
    lift: np.ndarray
    npmi: np.ndarray
    baseline_lift: np.ndarray  # lift after shuffling the rows of layer l+n
    kind: str  # "expert" | "set"


def _derive(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    total = counts.sum()
    joint = counts / total if total > 0 else counts.copy()
    px, py = joint.sum(1), joint.sum(0)
    return joint, row_normalize(counts), lift(joint, px, py), npmi(joint, px, py)


def _check_pair(trace: Trace, layer: int, n: int, what: str) -> int:
    check_trace(trace, what)
    layer = check_layer(trace, layer, what)
    if n < 1 or layer + n >= trace.meta.num_layers:
        raise AnalysisError(
            f"{what}: layer {layer} -> {layer}+{n} is outside the {trace.meta.num_layers} MoE layers;"
            " expected n >= 1 and layer + n < num_layers"
        )
    return layer


def expert_pair_counts(a: np.ndarray, b: np.ndarray, num_experts: int) -> np.ndarray:
    """[E, E] counts over all k x k pairs (a[t, i], b[t, j]); NO_EXPERT slots are skipped."""
    ne2 = num_experts * num_experts
    code = a.astype(np.int64)[:, :, None] * num_experts + b[:, None, :]  # [n, k, k] all pairs
    if a.size and (a.min() < 0 or b.min() < 0):  # NO_EXPERT slots go to an overflow bin
        code[(a < 0)[:, :, None] | (b < 0)[:, None, :]] = ne2
    c = np.bincount(code.ravel(), minlength=ne2 + 1)[:ne2]
    return c.reshape(num_experts, num_experts).astype(np.float64)


def expert_transitions(trace: Trace, layer: int, n: int = 1, seed: int = 0) -> TransitionMatrix:
    """E x E transition matrices from layer `layer` to `layer + n`, all k x k pairs counted."""
    layer = _check_pair(trace, layer, n, "expert transitions")
    rows = token_mask(trace)
    a = trace.expert_ids[:, layer, :][rows]
    b = trace.expert_ids[:, layer + n, :][rows]
    num_e = trace.meta.num_experts
    counts = expert_pair_counts(a, b, num_e)
    perm = np.random.default_rng(seed).permutation(a.shape[0])
    base = expert_pair_counts(a, b[perm], num_e)
    joint, cond, lf, nm = _derive(counts)
    return TransitionMatrix(layer, n, counts, joint, cond, lf, nm, _derive(base)[2], "expert")


def set_transitions(trace: Trace, layer: int, n: int = 1, seed: int = 0) -> TransitionMatrix:
    """C(E,k) x C(E,k) transitions between order-free top-k sets at `layer` and `layer + n`."""
    layer = _check_pair(trace, layer, n, "set transitions")
    num_e, k = trace.meta.num_experts, trace.meta.top_k
    s = n_sets(num_e, k)
    if s > MAX_DENSE_SETS:
        raise AnalysisError(
            f"set transitions: C({num_e},{k}) = {s} sets is too many for a dense matrix"
            f" (limit {MAX_DENSE_SETS}); use expert_transitions or transition_summary instead"
        )
    rows = token_mask(trace)
    a = layer_sets(trace, layer)[rows]
    b = layer_sets(trace, layer + n)[rows]
    counts = pair_counts(a, b, s, s)
    perm = np.random.default_rng(seed).permutation(a.shape[0])
    joint, cond, lf, nm = _derive(counts)
    return TransitionMatrix(
        layer, n, counts, joint, cond, lf, nm, _derive(pair_counts(a, b[perm], s, s))[2], "set"
    )


@dataclass
class TransitionSummary:
    """Per layer pair (l -> l+n), l = 0..L-n-1."""

    n: int
    nmi_set: np.ndarray  # NMI between top-k sets; chance 0
    nmi_top1: np.ndarray  # NMI between top-1 experts; chance 0
    nmi_set_shuffled: np.ndarray  # plug-in bias: NMI after shuffling rows of layer l+n
    nmi_top1_shuffled: np.ndarray
    top1_predictability: np.ndarray  # acc. of argmax_j P(top1_{l+n}=j | top1_l) (in-sample)
    top1_chance: np.ndarray  # share of the most frequent top-1 at l+n (always guess it)
    top1_shuffled: np.ndarray  # the same predictor after shuffling rows of layer l+n


def _top1_predict(a: np.ndarray, b: np.ndarray, num_e: int) -> float:
    c = pair_counts(a, b, num_e, num_e)
    tot = c.sum()
    return float(c.max(axis=1).sum() / tot) if tot > 0 else 0.0


def transition_summary(trace: Trace, n: int = 1, seed: int = 0) -> TransitionSummary:
    """NMI and top-1 predictability from layer l to l+n for every l."""
    check_trace(trace, "transition summary")
    num_l, num_e, k = trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k
    if n < 1:
        raise AnalysisError(
            f"transition summary: n={n}: the layer distance must be >= 1 (MoE layer l to l+n)"
        )
    if n >= num_l:
        raise AnalysisError(
            f"transition summary: n={n} needs at least n+1 MoE layers; the trace has {num_l}"
        )
    rows = token_mask(trace)
    if not rows.any():
        raise AnalysisError("transition summary: no non-BOS tokens in the trace")
    rng = np.random.default_rng(seed)
    m = int(rows.sum())
    s = n_sets(num_e, k)
    sets = [layer_sets(trace, layer)[rows] for layer in range(num_l)]
    tops = [top1(trace, layer)[rows] for layer in range(num_l)]
    out = {key: np.zeros(num_l - n) for key in ("ns", "nt", "nss", "nts", "p", "pc", "ps")}
    for layer in range(num_l - n):
        perm = rng.permutation(m)
        a, b = sets[layer], sets[layer + n]
        if s <= MAX_DENSE_SETS:
            out["ns"][layer] = nmi(*mutual_information(pair_counts(a, b, s, s)))
            out["nss"][layer] = nmi(*mutual_information(pair_counts(a, b[perm], s, s)))
        else:
            out["ns"][layer] = nmi(*sparse_mi(a, b))
            out["nss"][layer] = nmi(*sparse_mi(a, b[perm]))
        ta, tb = tops[layer], tops[layer + n]
        out["nt"][layer] = nmi(*mutual_information(pair_counts(ta, tb, num_e, num_e)))
        out["nts"][layer] = nmi(*mutual_information(pair_counts(ta, tb[perm], num_e, num_e)))
        out["p"][layer] = _top1_predict(ta, tb, num_e)
        out["ps"][layer] = _top1_predict(ta, tb[perm], num_e)
        valid = tb[tb != NO_EXPERT]
        out["pc"][layer] = np.bincount(valid, minlength=num_e).max() / max(valid.size, 1)
    return TransitionSummary(
        n, out["ns"], out["nt"], out["nss"], out["nts"], out["p"], out["pc"], out["ps"]
    )
