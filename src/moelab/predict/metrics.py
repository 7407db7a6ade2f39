"""Metrics for expert prediction: scores [n, E] against the true top-k sets [n, k].

recall@m (share of the true experts inside the predicted top-m; "expert recall" of offloading
work, e.g. Eliseev & Mazur 2023; m > k are prefetch budgets), precision@k (hits / k),
exact-set match (the top-|S| prediction equals the true set S; "exact pair" for k = 2),
top-1-in-true-set (the seed metric of gate lookahead on Mixtral), and the distribution of the
number of hits among the top-k (0..k). Ties in scores break towards the lower expert index.
Slots equal to NO_EXPERT are not part of the true set; rows with an empty true set are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.errors import InputError
from moelab.trace.schema import NO_EXPERT


def ranks(scores: np.ndarray) -> np.ndarray:
    """[n, E] rank of each expert (0 = highest score; ties -> lower index first)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    r = np.empty_like(order)
    np.put_along_axis(
        r, order, np.arange(scores.shape[1])[None, :].repeat(scores.shape[0], 0), axis=1
    )
    return r


@dataclass
class RowHits:
    """Per-row quantities from which every metric is an average (kept for pooling)."""

    set_size: np.ndarray  # [n] |S|
    true_ranks: np.ndarray  # [n, k] rank of each true expert (large where the slot is empty)
    k: int
    num_experts: int

    def hits_at(self, m: int | np.ndarray) -> np.ndarray:
        """[n] number of true experts inside the predicted top-m (m scalar or per row)."""
        m = np.asarray(m)
        return (self.true_ranks < (m[:, None] if m.ndim else m)).sum(1)


def row_hits(scores: np.ndarray, true_ids: np.ndarray) -> RowHits:
    """Validate and reduce (scores [n, E], true ids [n, k]) to ranks of the true experts."""
    scores = np.asarray(scores)
    true_ids = np.asarray(true_ids).astype(np.int64)
    if scores.ndim != 2 or true_ids.ndim != 2 or scores.shape[0] != true_ids.shape[0]:
        raise InputError(
            f"metrics: expected scores [n, E] and true ids [n, k], got {scores.shape}, {true_ids.shape}"
        )
    e = scores.shape[1]
    if np.isnan(scores).any():
        raise InputError(
            "metrics: scores contain NaN (unavailable rows must be removed before scoring)"
        )
    valid = true_ids != NO_EXPERT
    if ((true_ids < 0) & valid).any() or (true_ids >= e).any():
        raise InputError(f"metrics: true expert ids must be in 0..{e - 1} or NO_EXPERT={NO_EXPERT}")
    r = ranks(scores)
    tr = np.where(valid, np.take_along_axis(r, np.where(valid, true_ids, 0), axis=1), e + 1)
    return RowHits(set_size=valid.sum(1), true_ranks=tr, k=true_ids.shape[1], num_experts=e)


def metric_sums(h: RowHits, budgets: list[int]) -> dict[str, float]:
    """Sums (not means) of each metric over rows with a non-empty true set; 'rows' counts them."""
    keep = h.set_size > 0
    size = h.set_size[keep]
    tr = h.true_ranks[keep]
    sub = RowHits(size, tr, h.k, h.num_experts)
    hk = sub.hits_at(h.k)
    out: dict[str, float] = {
        "rows": float(keep.sum()),
        "recall@k": float((hk / size).sum()),
        "precision@k": float((hk / h.k).sum()),
        "exact_set": float((sub.hits_at(size) == size).sum()),
        "top1_in_true": float((tr == 0).any(1).sum()),
    }
    for j in range(h.k + 1):
        out[f"hits={j}"] = float((hk == j).sum())
    for m in budgets:
        out[f"recall@{m}"] = float((sub.hits_at(min(m, h.num_experts)) / size).sum())
    return out


def finalize(sums: dict[str, float]) -> dict[str, float]:
    """Turn sums into means (rows stays a count)."""
    n = sums.get("rows", 0.0)
    return {k: (v if k == "rows" else (v / n if n else float("nan"))) for k, v in sums.items()}


def add_sums(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Elementwise sum of two metric-sum dicts."""
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in set(a) | set(b)}


def default_budgets(k: int, num_experts: int) -> list[int]:
    """Prefetch budgets m > k reported by default: k+1, 2k, 3k, 4k capped at E (unique)."""
    return sorted(
        {min(m, num_experts) for m in (k + 1, 2 * k, 3 * k, 4 * k) if m > k and k < num_experts}
    )


def score_rows(
    scores: np.ndarray, true_ids: np.ndarray, budgets: list[int] | None = None
) -> dict[str, float]:
    """All metrics (means) for scores [n, E] against true ids [n, k]."""
    h = row_hits(scores, true_ids)
    b = default_budgets(h.k, h.num_experts) if budgets is None else budgets
    return finalize(metric_sums(h, b))
