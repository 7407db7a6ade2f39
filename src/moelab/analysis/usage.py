"""Expert usage U[layer, expert], load balance per layer and per-token routing entropy.

Usage comes in two normalisations: share of filled slots (sums to 1 per layer, uniform = 1/E)
and share of tokens whose top-k covers the expert (sums to k, uniform = k/E), optionally
gate-weighted, for all tokens, one token id, or one token id after given previous ids (the
"can" vs "I can" comparison of Mixtral's routing analysis, Jiang et al. 2024 §5). Balance
metrics follow the usual load-balance literature (Shazeer et al. 2017 CV; Gini; normalised
entropy); experts with a slot share below `dead_fraction / E` count as dead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.analysis._common import (
    _cache,
    check_trace,
    entropy,
    require_logits,
    softmax_probs,
    token_mask,
)
from moelab.errors import AnalysisError
from moelab.trace.schema import NO_EXPERT, Trace


@dataclass
class UsageResult:
    """U[L, E] with the value uniform routing would give and a random-subset baseline."""

    share: np.ndarray  # [L, E]
    counts: np.ndarray  # [L, E] slot counts (or summed weights when weighted)
    normalize: str  # "slots" | "tokens"
    weighted: bool
    chance: float  # uniform-routing value of every cell
    n_tokens: int  # tokens selected
    baseline: np.ndarray | None  # [L, E] usage of a random token subset of the same size
    selection: str  # human-readable description of the tokens used


def select_rows(
    trace: Trace,
    token_id: int | None = None,
    prev_ids: tuple[int, ...] | list[int] | None = None,
    min_count: int = 1,
) -> tuple[np.ndarray, str]:
    """Bool mask [N] of non-BOS rows with the given token id (and previous ids, oldest first)."""
    check_trace(trace, "usage")
    mask = token_mask(trace)
    desc = "all tokens"
    if token_id is not None:
        mask = mask & (trace.token_id == token_id)
        desc = f"token id {token_id}"
        if not mask.any():
            raise AnalysisError(
                f"usage: token id {token_id} does not occur in the trace ({trace.num_tokens} tokens,"
                f" {np.unique(trace.token_id).size} distinct ids); pick an id that occurs"
            )
        if prev_ids:
            prev = trace.prev_row()
            rows = np.flatnonzero(mask)
            cur = rows
            ok = np.ones(rows.size, dtype=bool)
            for pid in reversed(list(prev_ids)):
                cur = np.where(ok, prev[cur], -1)
                ok &= cur >= 0
                ok &= np.where(cur >= 0, trace.token_id[np.maximum(cur, 0)] == pid, False)
            mask = np.zeros_like(mask)
            mask[rows[ok]] = True
            desc = f"token id {token_id} after {list(prev_ids)}"
            if not mask.any():
                raise AnalysisError(
                    f"usage: token id {token_id} never follows previous ids {list(prev_ids)} in the"
                    " trace; pick a context that occurs"
                )
    elif prev_ids:
        raise AnalysisError("usage: prev_ids given without token_id; pass the current token id too")
    n = int(mask.sum())
    if n == 0:
        raise AnalysisError("usage: no non-BOS tokens in the trace")
    if n < min_count:
        raise AnalysisError(
            f"usage: only {n} tokens match ({desc}); min_count={min_count} — lower min_count or"
            " trace more text"
        )
    return mask, desc


def usage_counts(trace: Trace, mask: np.ndarray, weighted: bool = False) -> np.ndarray:
    """[L, E] slot counts (or summed gate weights) of the rows in `mask`."""
    num_l, num_e = trace.meta.num_layers, trace.meta.num_experts
    out = np.zeros((num_l, num_e), dtype=np.float64)
    dense = mask.mean() > 0.5  # most rows: mask by an overflow bin instead of copying rows
    for layer in range(num_l):
        if dense:
            code = trace.expert_ids[:, layer, :].astype(np.int64)
            code[(code < 0) | ~mask[:, None]] = num_e
            w = trace.weights[:, layer, :].astype(np.float64).ravel() if weighted else None
            out[layer] = np.bincount(code.ravel(), weights=w, minlength=num_e + 1)[:num_e]
        else:
            ids = trace.expert_ids[mask, layer, :]
            ok = ids != NO_EXPERT
            w = trace.weights[mask, layer, :][ok].astype(np.float64) if weighted else None
            out[layer] = np.bincount(ids[ok].astype(np.int64), weights=w, minlength=num_e)[:num_e]
    return out


def _all_token_counts(trace: Trace, mask: np.ndarray, weighted: bool) -> np.ndarray:
    """usage_counts over all non-BOS rows, memoised per trace (shared by usage and balance)."""
    c = _cache(trace)
    key = ("usage_counts", weighted)
    if key not in c:
        c[key] = usage_counts(trace, mask, weighted)
    return c[key]


def usage(
    trace: Trace,
    normalize: str = "slots",
    weighted: bool = False,
    token_id: int | None = None,
    prev_ids: tuple[int, ...] | list[int] | None = None,
    min_count: int = 1,
    seed: int = 0,
) -> UsageResult:
    """Usage heatmap U[layer, expert] for all tokens / one token id / a token id in context."""
    if normalize not in ("slots", "tokens"):
        raise AnalysisError(f"usage: normalize={normalize!r}; expected 'slots' or 'tokens'")
    mask, desc = select_rows(trace, token_id, prev_ids, min_count)
    n = int(mask.sum())
    k, num_e = trace.meta.top_k, trace.meta.num_experts

    def norm(c: np.ndarray) -> np.ndarray:
        if normalize == "slots":
            s = c.sum(axis=1, keepdims=True)
            return np.where(s > 0, c / np.where(s > 0, s, 1), 0.0)
        return c / n

    counts = (
        _all_token_counts(trace, mask, weighted)
        if token_id is None
        else usage_counts(trace, mask, weighted)
    )
    if normalize == "slots":
        chance = 1.0 / num_e
    elif weighted:
        chance = float(trace.weights[mask].sum(axis=2).mean()) / num_e
    else:
        chance = k / num_e
    baseline = None
    if token_id is not None:
        rng = np.random.default_rng(seed)
        pool = np.flatnonzero(token_mask(trace))
        sub = np.zeros(trace.num_tokens, dtype=bool)
        sub[rng.choice(pool, size=min(n, pool.size), replace=False)] = True
        baseline = norm(usage_counts(trace, sub, weighted))
    return UsageResult(norm(counts), counts, normalize, weighted, chance, n, baseline, desc)


@dataclass
class BalanceResult:
    """Per-layer balance of the slot-share distribution, with uniform values and a finite-sample
    baseline (same number of slots drawn uniformly)."""

    norm_entropy: np.ndarray  # [L] H(share)/log E; uniform 1
    max_over_mean: np.ndarray  # [L]; uniform 1
    cv: np.ndarray  # [L] std/mean; uniform 0
    gini: np.ndarray  # [L]; uniform 0
    dead: np.ndarray  # [L] experts with share < dead_fraction/E; uniform 0
    dead_fraction: float
    baseline: dict[str, np.ndarray]  # same metrics for uniform random routing of equal size
    chance: dict[str, float]


def balance_metrics(share: np.ndarray, dead_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """Balance metrics of rows of slot shares [L, E] (each row sums to 1)."""
    share = np.asarray(share, dtype=np.float64)
    num_e = share.shape[-1]
    mean = share.mean(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        srt = np.sort(share, axis=-1)
        idx = np.arange(1, num_e + 1)
        tot = srt.sum(axis=-1)
        gini = np.where(
            tot > 0,
            (2 * (srt * idx).sum(-1) / (num_e * np.where(tot > 0, tot, 1))) - (num_e + 1) / num_e,
            0,
        )
        return {
            "norm_entropy": entropy(share) / np.log(num_e)
            if num_e > 1
            else np.ones(share.shape[0]),
            "max_over_mean": np.where(mean > 0, share.max(-1) / np.where(mean > 0, mean, 1), 0.0),
            "cv": np.where(mean > 0, share.std(-1) / np.where(mean > 0, mean, 1), 0.0),
            "gini": gini,
            "dead": (share < dead_fraction / num_e).sum(-1).astype(np.float64),
        }


def balance(trace: Trace, dead_fraction: float = 0.1, seed: int = 0) -> BalanceResult:
    """Balance per layer (normalised entropy, max/mean, CV, Gini, dead experts)."""
    u = usage(trace, normalize="slots")
    m = balance_metrics(u.share, dead_fraction)
    rng = np.random.default_rng(seed)
    slots = u.counts.sum(axis=1).astype(np.int64)
    num_e = trace.meta.num_experts
    sample = np.stack([rng.multinomial(max(int(s), 1), np.full(num_e, 1.0 / num_e)) for s in slots])
    base = balance_metrics(sample / sample.sum(axis=1, keepdims=True), dead_fraction)
    chance = {"norm_entropy": 1.0, "max_over_mean": 1.0, "cv": 0.0, "gini": 0.0, "dead": 0.0}
    return BalanceResult(
        m["norm_entropy"],
        m["max_over_mean"],
        m["cv"],
        m["gini"],
        m["dead"],
        dead_fraction,
        base,
        chance,
    )


@dataclass
class RoutingEntropyResult:
    """Mean per-token entropy of the router distribution per layer, normalised by log E."""

    mean_norm_entropy: np.ndarray  # [L]; 1 = router output uniform (maximal uncertainty)
    mean_top1_prob: np.ndarray  # [L]; uniform router 1/E
    chance: float  # 1.0 for a router that outputs uniform probabilities


def routing_entropy(trace: Trace, chunk: int = 65536) -> RoutingEntropyResult:
    """Mean per-token normalised routing entropy H(p_t)/log E per layer (needs logits)."""
    logits = require_logits(trace, "routing entropy")
    mask = np.flatnonzero(token_mask(trace))
    if mask.size == 0:
        raise AnalysisError("routing entropy: no non-BOS tokens in the trace")
    num_l, num_e = trace.meta.num_layers, trace.meta.num_experts
    ent = np.zeros(num_l)
    top = np.zeros(num_l)
    for start in range(0, mask.size, chunk):
        rows = mask[start : start + chunk]
        x = np.asarray(logits[rows], dtype=np.float32)  # [n, L, E]
        if trace.meta.score_fn == "sigmoid":
            p = softmax_probs(x, "sigmoid")
            ent += entropy(p).sum(axis=0)
            top += p.max(axis=-1).sum(axis=0)
            continue
        # softmax entropy without log(p): H = log Z - sum_i p_i x_i, with x shifted by its max
        x -= x.max(axis=-1, keepdims=True)
        e = np.exp(x)
        z = e.sum(axis=-1)
        ent += (np.log(z) - (e * x).sum(axis=-1) / z).sum(axis=0, dtype=np.float64)
        top += (1.0 / z).sum(axis=0, dtype=np.float64)  # max p = exp(0) / Z
    denom = np.log(num_e) if num_e > 1 else 1.0
    return RoutingEntropyResult(ent / mask.size / denom, top / mask.size, 1.0)
