"""Consecutive-token repeat rate: does token t reuse the experts of token t-1 in the same layer?

Measured per layer over pairs of adjacent tokens of one document (BOS excluded): same top-1
expert, any overlap of the top-k sets, and mean overlap |S_t ∩ S_{t-1}|. Chance for uniform
routing: 1/E, 1 - C(E-k,k)/C(E,k) and k^2/E (Mixtral paper, Jiang et al. 2024 §5, Fig. 8
reports these three statistics). The load-weighted chance assumes consecutive tokens draw
independently from the observed marginals: sum_e p1(e)^2 for top-1, 1 - q^T D q for any overlap
(q the observed set distribution, D[S,S'] = 1 if disjoint), sum_e c(e)^2 for mean overlap
(c(e) = share of tokens covering e). The shuffle baseline pairs each token with a random token.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np

from moelab.analysis._common import (
    MAX_DENSE_SETS,
    all_sets,
    check_trace,
    layer_sets,
    n_sets,
    token_mask,
    top1,
)
from moelab.errors import AnalysisError
from moelab.trace.schema import NO_EXPERT, Trace


@dataclass
class RepeatResult:
    """Per-layer consecutive-token statistics with chances and a shuffle baseline."""

    same_top1: np.ndarray  # [L]
    any_overlap: np.ndarray  # [L]
    mean_overlap: np.ndarray  # [L]
    chance_top1: float  # 1/E
    chance_any: float  # 1 - C(E-k,k)/C(E,k)
    chance_mean: float  # k^2/E
    load_top1: np.ndarray  # [L] load-weighted chances
    load_any: np.ndarray
    load_mean: np.ndarray
    shuffled_top1: np.ndarray  # [L] random partner instead of the previous token
    shuffled_any: np.ndarray
    shuffled_mean: np.ndarray
    n_pairs: int


RATE_KEYS = ("t", "a", "m", "lt", "la", "lm", "st", "sa", "sm")


def empty_tallies(num_l: int) -> dict[str, np.ndarray]:
    """Per-layer rate arrays filled by both engines (keys of RepeatResult's layer fields)."""
    return {key: np.zeros(num_l) for key in RATE_KEYS}


def repeat_result(res: dict[str, np.ndarray], num_e: int, k: int, n_pairs: int) -> RepeatResult:
    """RepeatResult from per-layer tallies plus the uniform-routing chances of E experts, top-k."""
    chance_any = 1.0 - comb(num_e - k, k) / comb(num_e, k)
    return RepeatResult(
        res["t"], res["a"], res["m"], 1.0 / num_e, chance_any, k * k / num_e,
        res["lt"], res["la"], res["lm"], res["st"], res["sa"], res["sm"], int(n_pairs),
    )  # fmt: skip


def overlap_count(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n] |set(a_t) ∩ set(b_t)| for [n, k] id arrays (NO_EXPERT ignored, ids distinct per row)."""
    out = np.zeros(a.shape[0], dtype=np.int64)
    for i in range(a.shape[1]):
        hit = np.zeros(a.shape[0], dtype=bool)
        for j in range(b.shape[1]):
            hit |= a[:, i] == b[:, j]
        out += hit & (a[:, i] != NO_EXPERT)
    return out


def load_any(sets: np.ndarray, num_e: int, k: int, w: np.ndarray | None = None) -> float:
    """1 - q^T D q: chance that two independent draws from the set distribution q (set
    indices `sets`, with counts `w`) overlap; NaN when C(E,k) is too large for a dense D."""
    if n_sets(num_e, k) > MAX_DENSE_SETS:
        return float("nan")
    s = n_sets(num_e, k)
    ok = sets >= 0
    q = np.bincount(
        sets[ok], weights=None if w is None else w[ok].astype(np.float64), minlength=s
    ).astype(np.float64)
    if q.sum() == 0:
        return float("nan")
    q /= q.sum()
    members = all_sets(num_e, k)
    onehot = np.zeros((s, num_e))
    np.put_along_axis(onehot, members, 1.0, axis=1)
    disjoint = (onehot @ onehot.T) == 0
    return float(1.0 - q @ disjoint @ q)


def load_chances(
    top1_counts: np.ndarray,
    cover_counts: np.ndarray,
    sets: np.ndarray,
    rows: int,
    num_e: int,
    k: int,
    w: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """(top-1, any-overlap, mean-overlap) load-weighted chances from a layer's [E] top-1 and
    slot counts and its set indices (with counts `w`) over `rows` tokens (both engines)."""
    rows = max(int(rows), 1)
    p1, cov = top1_counts / rows, cover_counts / rows
    return float((p1**2).sum()), load_any(sets, num_e, k, w), float((cov**2).sum())


def repeat_rate(trace: Trace, seed: int = 0) -> RepeatResult:
    """Consecutive-token repeat statistics per layer (adjacent tokens of one document)."""
    check_trace(trace, "repeat rate")
    num_l, num_e, k = trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k
    prev = trace.prev_row()
    mask = token_mask(trace)
    cur = np.flatnonzero(mask & (prev >= 0))
    cur = cur[mask[prev[cur]]]
    pr = prev[cur]
    if cur.size == 0:
        raise AnalysisError(
            "repeat rate: no pair of consecutive non-BOS tokens in one document; trace longer texts"
        )
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(mask)
    rnd = rng.choice(pool, size=cur.size, replace=True)
    res = empty_tallies(num_l)
    for layer in range(num_l):
        t1 = top1(trace, layer)
        a = trace.expert_ids[cur, layer, :]
        b = trace.expert_ids[pr, layer, :]
        c = trace.expert_ids[rnd, layer, :]
        ov = overlap_count(a, b)
        ovs = overlap_count(a, c)
        res["t"][layer] = np.mean(t1[cur] == t1[pr])
        res["a"][layer] = np.mean(ov > 0)
        res["m"][layer] = ov.mean()
        res["st"][layer] = np.mean(t1[cur] == t1[rnd])
        res["sa"][layer] = np.mean(ovs > 0)
        res["sm"][layer] = ovs.mean()
        ids = trace.expert_ids[mask, layer, :]
        t1m = t1[mask]
        res["lt"][layer], res["la"][layer], res["lm"][layer] = load_chances(
            np.bincount(t1m[t1m >= 0], minlength=num_e),
            np.bincount(ids[ids != NO_EXPERT].astype(np.int64), minlength=num_e),
            layer_sets(trace, layer)[mask],
            int(mask.sum()),
            num_e,
            k,
        )
    return repeat_result(res, num_e, k, int(cur.size))
