"""Trajectories: each token's path of top-k expert sets (or top-1 experts) through the layers.

Reports the number of distinct paths, the path entropy (bits) and the most frequent paths, also
for every path prefix of depth 1..L, against the analytic chance for uniform independent routing
(expected distinct paths S^L (1 - (1 - S^-L)^N), entropy close to min(L log2 S, log2 N)) and a
shuffle baseline (each layer's column permuted independently: keeps per-layer loads, breaks the
chaining). Also builds the layer-to-layer top-1 flow (for a Sankey figure) and a token x layer
grid of top-1 experts for one text. Paths are hashed to uint64 per prefix (collisions have
probability ~N^2 / 2^64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.analysis._common import (
    check_trace,
    entropy,
    layer_sets,
    n_sets,
    pair_counts,
    token_mask,
    top1,
)
from moelab.errors import AnalysisError
from moelab.trace.schema import Trace

_MULT = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class TrajectoryResult:
    """Path statistics over all analysed tokens."""

    unit: str  # "set" | "top1"
    n_tokens: int
    n_states: int  # S = C(E,k) for sets, E for top-1
    depths: np.ndarray  # [D] prefix depths d (paths over layers 0..d-1): 1, 2, 4, ..., L
    distinct: np.ndarray  # [D] distinct paths per depth
    entropy_bits: np.ndarray  # [D] plug-in path entropy of prefixes
    distinct_shuffled: np.ndarray  # [D]
    entropy_shuffled: np.ndarray  # [D]
    distinct_chance: np.ndarray  # [D] expected distinct paths under uniform routing
    entropy_chance: np.ndarray  # [D] min(d log2 S, log2 N) (upper-bound approximation)
    top_paths: list[tuple[tuple[int, ...], int]]  # (path of state ids, count), most frequent first


def _states(trace: Trace, unit: str, rows: np.ndarray) -> tuple[np.ndarray, int]:
    num_l, num_e, k = trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k
    if unit == "set":
        out = np.stack([layer_sets(trace, layer)[rows] for layer in range(num_l)], 1)
        return out, n_sets(num_e, k)
    if unit == "top1":
        return np.stack([top1(trace, layer)[rows] for layer in range(num_l)], 1), num_e
    raise AnalysisError(f"trajectories: unit={unit!r}; expected 'set' or 'top1'")


def depths(num_layers: int) -> np.ndarray:
    """Prefix depths reported: 1, 2, 4, 8, ... and the full depth."""
    return np.unique(np.r_[2 ** np.arange(int(np.log2(num_layers)) + 1), num_layers]).astype(
        np.int64
    )


def _prefix_stats(states: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distinct paths and entropy at each depth of depths(L); first rows and counts at full depth."""
    n, num_l = states.shape
    want = set(depths(num_l).tolist())
    h = np.zeros(n, dtype=np.uint64)
    distinct, ent = [], []
    with np.errstate(over="ignore"):
        for d in range(num_l):
            h = (h ^ (states[:, d].astype(np.uint64) + np.uint64(1))) * _MULT
            h ^= h >> np.uint64(29)
            if d + 1 in want:
                uniq, first, counts = np.unique(h, return_index=True, return_counts=True)
                distinct.append(uniq.size)
                ent.append(entropy(counts / n) / np.log(2))
    return np.array(distinct, float), np.array(ent), first, counts


def trajectories(trace: Trace, unit: str = "set", top: int = 20, seed: int = 0) -> TrajectoryResult:
    """Distinct paths, path entropy and most frequent paths (with uniform and shuffle baselines)."""
    check_trace(trace, "trajectories")
    rows = token_mask(trace)
    n = int(rows.sum())
    if n == 0:
        raise AnalysisError("trajectories: no non-BOS tokens in the trace")
    states, s = _states(trace, unit, rows)
    distinct, ent, first, counts = _prefix_stats(states)
    order = np.argsort(-counts, kind="stable")[:top]
    top_paths = [(tuple(int(v) for v in states[first[i]]), int(counts[i])) for i in order]
    rng = np.random.default_rng(seed)
    shuf = np.stack([states[rng.permutation(n), d] for d in range(states.shape[1])], 1)
    d_s, e_s, _, _ = _prefix_stats(shuf)
    dep = depths(states.shape[1])
    depth = dep.astype(np.float64)
    log_space = depth * np.log(float(s))
    with np.errstate(over="ignore"):
        # S^d (1 - (1 - S^-d)^N) computed stably: = S^d * -expm1(N log1p(-S^-d))
        inv = np.exp(-log_space)
        chance_d = np.where(
            log_space < 700, np.exp(np.minimum(log_space, 700)) * -np.expm1(n * np.log1p(-inv)), n
        )
    chance_d = np.minimum(chance_d, n)
    chance_e = np.minimum(log_space / np.log(2), np.log2(n))
    return TrajectoryResult(unit, n, s, dep, distinct, ent, d_s, e_s, chance_d, chance_e, top_paths)


def top1_flow(trace: Trace, layers: list[int] | None = None) -> list[np.ndarray]:
    """[E, E] top-1 flow counts between consecutive chosen layers (for a Sankey figure)."""
    check_trace(trace, "top-1 flow")
    num_l, num_e = trace.meta.num_layers, trace.meta.num_experts
    layers = list(range(num_l)) if layers is None else layers
    rows = token_mask(trace)
    tops = {layer: top1(trace, layer)[rows] for layer in layers}
    return [
        pair_counts(tops[a], tops[b], num_e, num_e)
        for a, b in zip(layers[:-1], layers[1:], strict=True)
    ]


def token_grid(
    trace: Trace, doc: int | None = None, max_tokens: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(rows [T], top-1 expert grid [T, L]) for the first `max_tokens` tokens of one document."""
    check_trace(trace, "token grid")
    doc = int(trace.doc_id[0]) if doc is None else doc
    rows = np.flatnonzero(trace.doc_id == doc)
    if rows.size == 0:
        raise AnalysisError(f"token grid: document id {doc} is not in the trace")
    rows = rows[:max_tokens]
    grid = np.stack([top1(trace, layer)[rows] for layer in range(trace.meta.num_layers)], 1)
    return rows, grid
