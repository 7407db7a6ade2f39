"""Shared helpers of the routing analyses: input checks, masks, expert-set indexing, entropies.

Expert sets are indexed with the combinatorial number system (Knuth, TAOCP 7.2.1.3): the sorted
set s_0 < s_1 < ... < s_{k-1} maps to sum_i C(s_i, i+1), a bijection onto 0..C(E,k)-1, so top-k
choices are compared order-free.
"""

from __future__ import annotations

import weakref
from math import comb
from typing import Any

import numpy as np

from moelab.errors import AnalysisError
from moelab.trace.schema import NO_EXPERT, Trace

MAX_DENSE_SETS = 4096  # largest C(E,k) for which set-level matrices are built densely


def check_trace(trace: Trace, what: str) -> None:
    """Raise AnalysisError if the trace has no tokens or no layers."""
    if trace.num_tokens == 0:
        raise AnalysisError(f"{what}: the trace is empty (0 tokens); trace some text first")
    if trace.meta.num_layers == 0 or trace.meta.top_k == 0:
        raise AnalysisError(
            f"{what}: the trace has {trace.meta.num_layers} MoE layers and k={trace.meta.top_k};"
            " expected at least one layer and one slot"
        )


def check_layer(trace: Trace, layer: int, what: str) -> int:
    """Return `layer` (negative counts from the end) or raise AnalysisError if out of range."""
    n_layers = trace.meta.num_layers
    if not -n_layers <= layer < n_layers:
        raise AnalysisError(
            f"{what}: layer={layer} is out of range; the trace has {n_layers} MoE layers"
        )
    return layer % n_layers


def require_logits(trace: Trace, what: str) -> np.ndarray:
    """Return trace.logits or raise AnalysisError explaining how to record them."""
    check_trace(trace, what)
    if trace.logits is None:
        raise AnalysisError(
            f"{what} needs full router logits, but this trace has none; retrace with logits=True"
            " (`moelab trace ... --logits`)"
        )
    return trace.logits


def token_mask(trace: Trace) -> np.ndarray:
    """[N] bool: rows analysed (BOS/padding rows excluded; padding is never traced)."""
    return ~np.asarray(trace.is_bos, dtype=bool)


def full_rows(trace: Trace, layer: int) -> np.ndarray:
    """[N] bool: rows with every one of the k slots of `layer` filled (no NO_EXPERT)."""
    return np.all(trace.expert_ids[:, layer, :] != NO_EXPERT, axis=1)


def n_sets(num_experts: int, k: int) -> int:
    """C(E, k): the number of distinct order-free top-k sets."""
    return comb(num_experts, k)


def set_index(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[n, k] expert ids -> [n] int64 index of the order-free set in 0..C(E,k)-1; -1 where a slot
    is NO_EXPERT or an expert repeats."""
    ids = np.asarray(ids)
    n, k = ids.shape
    if k == 1:
        a = ids[:, 0].astype(np.int64)
        return np.where(a >= 0, a, -1)
    if k == 2:  # C(hi, 2) + C(lo, 1) without a sort
        lo = np.minimum(ids[:, 0], ids[:, 1]).astype(np.int64)
        hi = np.maximum(ids[:, 0], ids[:, 1]).astype(np.int64)
        return np.where((lo >= 0) & (lo != hi), hi * (hi - 1) // 2 + lo, -1)
    s = np.sort(ids.astype(np.int64), axis=1)
    out = np.zeros(n, dtype=np.int64)
    for i in range(k):
        table = np.array([comb(int(v), i + 1) for v in range(num_experts)], dtype=np.int64)
        out += table[np.clip(s[:, i], 0, num_experts - 1)]
    bad = s[:, 0] < 0
    if k > 1:
        bad |= np.any(np.diff(s, axis=1) == 0, axis=1)
    out[bad] = -1
    return out


def set_members(index: int, num_experts: int, k: int) -> tuple[int, ...]:
    """Inverse of set_index for one index: the sorted expert ids of the set."""
    out = []
    rest = int(index)
    for i in range(k, 0, -1):
        v = i - 1
        while v + 1 < num_experts and comb(v + 1, i) <= rest:
            v += 1
        out.append(v)
        rest -= comb(v, i)
    return tuple(sorted(out))


def all_sets(num_experts: int, k: int) -> np.ndarray:
    """[C(E,k), k] sorted members of every set, row i = set index i."""
    from itertools import combinations

    combos = np.array(list(combinations(range(num_experts), k)), dtype=np.int64).reshape(-1, k)
    idx = set_index(combos, num_experts)
    out = np.empty_like(combos)
    out[idx] = combos
    return out


_CACHE: dict[int, dict[Any, np.ndarray]] = {}


def _cache(trace: Trace) -> dict[Any, np.ndarray]:
    """Per-trace memo of derived per-layer arrays (traces are treated as immutable once analysed)."""
    key = id(trace)
    entry = _CACHE.get(key)
    if entry is None or entry.get("ref") is None or entry["ref"]() is not trace:
        entry = {"ref": weakref.ref(trace)}
        _CACHE[key] = entry
        weakref.finalize(trace, _CACHE.pop, key, None)
    return entry


def layer_sets(trace: Trace, layer: int) -> np.ndarray:
    """[N] cached set index of `layer` (see set_index), stored in the smallest integer dtype."""
    c = _cache(trace)
    if ("set", layer) not in c:
        s = n_sets(trace.meta.num_experts, trace.meta.top_k)
        dt = np.int16 if s < 2**15 else np.int32 if s < 2**31 else np.int64
        c[("set", layer)] = set_index(trace.expert_ids[:, layer, :], trace.meta.num_experts).astype(
            dt
        )
    return c[("set", layer)]


def top1(trace: Trace, layer: int) -> np.ndarray:
    """[N] the highest-weight expert of `layer` per row (NO_EXPERT if no slot is filled); cached."""
    c = _cache(trace)
    if ("top1", layer) not in c:
        c[("top1", layer)] = _top1(trace, layer).astype(
            np.int16 if trace.meta.num_experts < 2**15 else np.int32
        )
    return c[("top1", layer)]


def _top1(trace: Trace, layer: int) -> np.ndarray:
    ids = trace.expert_ids[:, layer, :]
    if ids.shape[1] == 1:
        return ids[:, 0].astype(np.int64)
    w = np.where(ids != NO_EXPERT, trace.weights[:, layer, :], -np.inf)
    j = np.argmax(w, axis=1)
    return ids[np.arange(ids.shape[0]), j].astype(np.int64)


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats of probability vectors along `axis` (0 log 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log(p), 0.0)
    return -t.sum(axis=axis)


def mutual_information(joint_counts: np.ndarray) -> tuple[float, float, float]:
    """Plug-in (I, H(X), H(Y)) in nats from a joint count matrix."""
    total = joint_counts.sum()
    if total <= 0:
        return 0.0, 0.0, 0.0
    pj = joint_counts / total
    px, py = pj.sum(1), pj.sum(0)
    hx, hy = float(entropy(px)), float(entropy(py))
    hxy = float(entropy(pj.ravel()))
    return max(hx + hy - hxy, 0.0), hx, hy


def nmi(mi: float, hx: float, hy: float) -> float:
    """Normalised mutual information I / sqrt(H(X) H(Y)) (0 when either entropy is 0)."""
    d = np.sqrt(hx * hy)
    return float(mi / d) if d > 0 else 0.0


def pair_counts(a: np.ndarray, b: np.ndarray, na: int, nb: int) -> np.ndarray:
    """[na, nb] counts of (a_i, b_i) pairs, skipping pairs where either is negative."""
    code = a.astype(np.int64) * nb + b
    if a.size and (a.min() < 0 or b.min() < 0):
        code[(a < 0) | (b < 0)] = na * nb  # overflow bin, dropped
    return np.bincount(code, minlength=na * nb + 1)[: na * nb].reshape(na, nb).astype(np.float64)


def sparse_mi(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Plug-in (I, H(X), H(Y)) in nats for label arrays of any cardinality (via np.unique)."""
    ok = (a >= 0) & (b >= 0)
    a, b = a[ok], b[ok]
    n = a.shape[0]
    if n == 0:
        return 0.0, 0.0, 0.0

    def h(x: np.ndarray) -> float:
        _, c = np.unique(x, return_counts=True)
        return float(entropy(c / n))

    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    hx, hy = h(ia), h(ib)
    hxy = h(ia.astype(np.int64) * (int(ib.max()) + 1) + ib)
    return max(hx + hy - hxy, 0.0), hx, hy


def npmi(joint: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Normalised PMI log(p(x,y)/(p(x)p(y))) / -log p(x,y); -1 where p(x,y)=0, 0 where undefined."""
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(joint / np.outer(px, py))
        out = pmi / -np.log(joint)
    out = np.where(joint > 0, out, -1.0)
    out = np.where((np.outer(px, py) > 0), out, 0.0)
    out = np.where(joint >= 1.0, 1.0, out)
    return np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=-1.0)


def lift(joint: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """p(x,y) / (p(x)p(y)); 1 = independence; 0 where a marginal is 0."""
    denom = np.outer(px, py)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(denom > 0, joint / denom, 0.0)
    return out


def row_normalize(counts: np.ndarray) -> np.ndarray:
    """Divide each row by its sum (rows of zeros stay zero)."""
    s = counts.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(s > 0, counts / np.where(s > 0, s, 1), 0.0)


def doc_split(doc_id: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """[N] bool, True for rows whose document falls in the held-out part (split by document)."""
    docs = np.unique(doc_id)
    rng = np.random.default_rng(seed)
    n_test = max(1, int(round(test_fraction * docs.size))) if docs.size > 1 else 0
    if n_test >= docs.size:
        n_test = docs.size - 1
    test_docs = rng.choice(docs, size=n_test, replace=False) if n_test > 0 else docs[:0]
    return np.isin(doc_id, test_docs)


def mode_by_group(
    group: np.ndarray, label: np.ndarray, n_groups: int, n_labels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Most frequent label per group -> (mode [G] (-1 if empty), mode count [G], group size [G])."""
    ok = (group >= 0) & (label >= 0)
    g, y = group[ok].astype(np.int64), label[ok].astype(np.int64)
    size = np.bincount(g, minlength=n_groups)
    mode = np.full(n_groups, -1, dtype=np.int64)
    cnt = np.zeros(n_groups, dtype=np.int64)
    single = size[g] == 1  # groups seen once: their one label is the mode
    mode[g[single]] = y[single]
    cnt[g[single]] = 1
    multi = np.flatnonzero(size > 1)
    if multi.size == 0:
        return mode, cnt, size
    remap = np.full(n_groups, -1, dtype=np.int64)
    remap[multi] = np.arange(multi.size)
    gm, ym = remap[g[~single]], y[~single]
    if multi.size * n_labels <= 20_000_000:
        c = np.bincount(gm * n_labels + ym, minlength=multi.size * n_labels).reshape(
            multi.size, n_labels
        )
        m = np.argmax(c, axis=1)
        mode[multi] = m
        cnt[multi] = c[np.arange(multi.size), m]
    else:
        uk, uc = np.unique(gm * n_labels + ym, return_counts=True)
        ug, uy = uk // n_labels, uk % n_labels
        order = np.lexsort((-uc, ug))
        ug, uy, uc = ug[order], uy[order], uc[order]
        first = np.ones(ug.size, dtype=bool)
        first[1:] = ug[1:] != ug[:-1]
        mode[multi[ug[first]]] = uy[first]
        cnt[multi[ug[first]]] = uc[first]
    return mode, cnt, size


def softmax_probs(logits: np.ndarray, score_fn: str = "softmax") -> np.ndarray:
    """Router probabilities over experts along the last axis (sigmoid scores renormalised)."""
    x = np.asarray(logits, dtype=np.float32)
    if score_fn == "sigmoid":
        p = 1.0 / (1.0 + np.exp(-x))
        return p / p.sum(axis=-1, keepdims=True)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def layers_arg(trace: Trace, layers: list[int] | None, what: str) -> list[int]:
    """Validated list of layers (all when None)."""
    if layers is None:
        return list(range(trace.meta.num_layers))
    return [check_layer(trace, int(v), what) for v in layers]
