"""Co-activation of experts within one layer: which experts are chosen together in a token's top-k.

Every one of the C(k,2) slot pairs of a token is counted (symmetric E x E matrix). Reported as
joint P(a and b chosen), conditional P(b | a) and NPMI (Bouma 2009). Analytic chance for uniform
random top-k sets: joint k(k-1)/(E(E-1)), conditional (k-1)/(E-1). The load-weighted baseline
draws each token's set independently from the observed per-expert loads (Gumbel top-k, i.e.
sampling without replacement proportional to load), which keeps load imbalance but no pairing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.analysis._common import check_layer, check_trace, npmi, pair_counts, token_mask
from moelab.errors import AnalysisError
from moelab.trace.schema import NO_EXPERT, Trace


@dataclass
class Coactivation:
    """Within-layer co-activation matrices for one layer (diagonal is 0)."""

    layer: int
    counts: np.ndarray  # [E, E] symmetric pair counts
    joint: np.ndarray  # [E, E] P(a and b in the token's top-k)
    conditional: np.ndarray  # [E, E] P(b | a) = counts[a, b] / N(a)
    npmi: np.ndarray  # [E, E]
    chance_joint: float
    chance_conditional: float
    baseline_conditional: np.ndarray  # [E, E] from load-weighted independent sets
    n_tokens: int


def pair_matrix(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[E, E] symmetric counts over all C(k,2) slot pairs of each row (NO_EXPERT skipped)."""
    k = ids.shape[1]
    c = np.zeros((num_experts, num_experts))
    for i in range(k):
        for j in range(i + 1, k):
            c += pair_counts(
                ids[:, i].astype(np.int64), ids[:, j].astype(np.int64), num_experts, num_experts
            )
    c = c + c.T
    np.fill_diagonal(c, 0.0)
    return c


def load_weighted_sets(load: np.ndarray, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[n, k] sets drawn without replacement proportional to `load` (Gumbel top-k)."""
    logp = np.log(np.maximum(load, 1e-12))
    g = rng.gumbel(size=(n, load.size)) + logp
    return (
        np.argpartition(-g, k - 1, axis=1)[:, :k]
        if k < load.size
        else np.tile(np.arange(k), (n, 1))
    )


def coactivation(
    trace: Trace, layer: int, seed: int = 0, max_baseline: int = 50_000
) -> Coactivation:
    """Co-activation matrices of `layer` over all C(k,2) pairs."""
    check_trace(trace, "co-activation")
    layer = check_layer(trace, layer, "co-activation")
    k, num_e = trace.meta.top_k, trace.meta.num_experts
    if k < 2:
        raise AnalysisError(f"co-activation: needs top_k >= 2 to form pairs; the trace has k={k}")
    ids = trace.expert_ids[token_mask(trace), layer, :]
    n = ids.shape[0]
    if n == 0:
        raise AnalysisError("co-activation: no non-BOS tokens in the trace")
    counts = pair_matrix(ids, num_e)
    valid = ids[ids != NO_EXPERT].astype(np.int64)
    n_e = np.bincount(valid, minlength=num_e).astype(np.float64)
    return from_counts(layer, counts, n_e, n, k, seed, max_baseline)


def from_counts(
    layer: int,
    counts: np.ndarray,
    n_e: np.ndarray,
    n: int,
    k: int,
    seed: int = 0,
    max_baseline: int = 50_000,
) -> Coactivation:
    """Coactivation from the [E, E] pair counts, the [E] slot counts and the token count (the
    one derivation both the in-memory and the out-of-core paths use)."""
    num_e = n_e.size
    p = n_e / n
    joint = counts / n
    with np.errstate(divide="ignore", invalid="ignore"):
        cond = np.where(n_e[:, None] > 0, counts / np.where(n_e[:, None] > 0, n_e[:, None], 1), 0.0)
    nm = npmi(joint, p, p)
    np.fill_diagonal(nm, 0.0)
    rng = np.random.default_rng(seed)
    m = min(n, max_baseline)
    base_ids = load_weighted_sets(n_e / max(n_e.sum(), 1), m, k, rng)
    bc = pair_matrix(base_ids, num_e)
    bn = np.bincount(base_ids.ravel(), minlength=num_e).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        base_cond = np.where(bn[:, None] > 0, bc / np.where(bn[:, None] > 0, bn[:, None], 1), 0.0)
    return Coactivation(
        layer,
        counts,
        joint,
        cond,
        nm,
        k * (k - 1) / (num_e * (num_e - 1)),
        (k - 1) / (num_e - 1),
        base_cond,
        n,
    )
