"""Router saturation between two checkpoints of one model traced on the same text (OLMoE,
Muennighoff et al. 2024, Eq. 5).

Saturation(t, T) = 1/(N k) * sum_i |E_i^(t) ∩ E_i^(T)|, the share of the final checkpoint's
top-k experts that an earlier checkpoint already picks for the same token, per layer, for k=1
(top-1 only) and k=K (the full top-K). With router logits the top-k is taken from the logits
(any k <= E); otherwise from the recorded slots ordered by gate weight (k <= recorded k).
Chance: k/E (an unrelated uniform router); the shuffle baseline pairs tokens at random.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.analysis._common import check_trace, token_mask
from moelab.errors import AnalysisError
from moelab.trace.schema import NO_EXPERT, Trace


@dataclass
class SaturationResult:
    """Per-layer saturation for each k in `ks`."""

    ks: list[int]
    saturation: dict[int, np.ndarray]  # k -> [L]
    shuffled: dict[int, np.ndarray]  # k -> [L]
    chance: dict[int, float]  # k -> k/E
    n_tokens: int


def top_k_ids(trace: Trace, layer: int, k: int) -> np.ndarray:
    """[N, k] the k highest-scoring experts of `layer` (from logits if present, else from slots)."""
    if trace.logits is not None:
        lg = trace.logits[:, layer, :]
        return np.argsort(-lg, axis=1, kind="stable")[:, :k]
    if k > trace.meta.top_k:
        raise AnalysisError(
            f"router saturation: k={k} exceeds the {trace.meta.top_k} recorded slots and the trace"
            " has no logits; retrace with logits=True"
        )
    ids = trace.expert_ids[:, layer, :]
    w = np.where(ids != NO_EXPERT, trace.weights[:, layer, :], -np.inf)
    order = np.argsort(-w, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1).astype(np.int64)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    hit = np.zeros(a.shape[0], dtype=np.int64)
    for i in range(a.shape[1]):
        hit += np.any(a[:, [i]] == b, axis=1) & (a[:, i] != NO_EXPERT)
    return hit


def router_saturation(
    early: Trace, final: Trace, ks: list[int] | None = None, seed: int = 0
) -> SaturationResult:
    """OLMoE Eq. 5 saturation of `early` against `final` per layer, for k=1 and k=K by default."""
    check_trace(early, "router saturation (early checkpoint)")
    check_trace(final, "router saturation (final checkpoint)")
    if early.num_tokens != final.num_tokens or not np.array_equal(early.token_id, final.token_id):
        raise AnalysisError(
            "router saturation: the two traces must cover the same tokens in the same order"
            f" (got {early.num_tokens} and {final.num_tokens} rows or differing token ids);"
            " trace both checkpoints on the same text"
        )
    m1, m2 = early.meta, final.meta
    if (m1.num_layers, m1.num_experts) != (m2.num_layers, m2.num_experts):
        raise AnalysisError(
            f"router saturation: layers/experts differ ({m1.num_layers}x{m1.num_experts} vs"
            f" {m2.num_layers}x{m2.num_experts}); compare checkpoints of the same model"
        )
    ks = sorted({1, m2.top_k}) if ks is None else list(ks)
    for k in ks:
        if not 1 <= k <= m2.num_experts:
            raise AnalysisError(f"router saturation: k={k}; expected 1 <= k <= E={m2.num_experts}")
    rows = token_mask(final) & token_mask(early)
    n = int(rows.sum())
    if n == 0:
        raise AnalysisError("router saturation: no non-BOS tokens")
    perm = np.random.default_rng(seed).permutation(n)
    sat, shuf = {}, {}
    for k in ks:
        sat[k] = np.zeros(m2.num_layers)
        shuf[k] = np.zeros(m2.num_layers)
        for layer in range(m2.num_layers):
            a = top_k_ids(early, layer, k)[rows]
            b = top_k_ids(final, layer, k)[rows]
            sat[k][layer] = _intersection(a, b).sum() / (n * k)
            shuf[k][layer] = _intersection(a[perm], b).sum() / (n * k)
    return SaturationResult(ks, sat, shuf, {k: k / m2.num_experts for k in ks}, n)
