"""Choosing a cache configuration from a calibration trace, never from the scored split:
`--policy auto` (replay every candidate policy on the calibration routing, keep the best) and an
uneven per-layer split of a cache budget (greedy on each layer's hit-rate-vs-slots curve, so
layers whose routing is hard to cache may get every expert and easy ones the floor).

The greedy split is the marginal-gain allocation used for cache partitioning (e.g. Qureshi &
Patt 2006, "Utility-Based Cache Partitioning"), with each layer's curve measured by replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moelab.errors import ConfigError, OffloadError
from moelab.offload.cache import ExpertCache, usage_counts

# Candidates auto tries: the named policies with their defaults plus a few parameter variants.
AUTO_CANDIDATES = (
    "lru",
    "lfu",
    "lfru",
    "lfuda",
    "wlfu:window=64",
    "wlfu:window=512",
    "decay-lfu:half_life=128",
    "decay-lfu:half_life=1024",
    "decay-lfu:half_life=1024:rank_weight=0.5",
    "arc",
    "s3fifo",
    "lirs",
    "least-stale",
    "predict",
    "predict:coact=1",
    "predict:steps=16",
    "adaptive",
    "static",
)


@dataclass
class AutoChoice:
    """The policy auto picked, its calibration score and every candidate's score."""

    policy: str
    score: float
    metric: str
    calibration: str
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        """One line: what was chosen and by how much it beat the runner-up."""
        ranked = sorted(self.scores.items(), key=lambda kv: -kv[1])
        second = next(((p, s) for p, s in ranked if p != self.policy), None)
        tail = (
            f", runner-up {second[0]} {second[1]:.4f}"
            if second is not None
            else ", no other candidate"
        )
        return (
            f"auto -> {self.policy}: best {self.metric} {self.score:.4f} replaying the"
            f" {self.calibration} split ({len(self.scores)} candidates{tail})"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "policy": self.policy,
            "score": self.score,
            "metric": self.metric,
            "calibration": self.calibration,
            "scores": dict(self.scores),
            "reason": self.reason,
        }


def choose_policy(
    calib_ids: np.ndarray,
    num_experts: int,
    capacity: int,
    candidates: Sequence[str] | None = None,
    *,
    metric: str = "hit_rate",
    calibration: str = "calibration",
    plan: Any = None,
    **sim_kwargs: Any,
) -> AutoChoice:
    """Replay each candidate on the calibration routing [N, L, k] (with the same prefetch plan
    and cache options as the scored run) and return the best by `metric` (hit_rate,
    timely_hit_rate or tokens_per_s). Ties keep the earlier candidate. `static` pins counted on
    this routing itself (static_counts absent or equal to its usage) are scored cross-fitted:
    pins from one half, hits on the other."""
    from moelab.offload.simulate import simulate

    if metric not in ("hit_rate", "timely_hit_rate", "tokens_per_s"):
        raise ConfigError(
            f"auto policy metric {metric!r}: expected hit_rate, timely_hit_rate or tokens_per_s"
        )
    calib_ids = np.asarray(calib_ids)
    if calib_ids.ndim != 3 or calib_ids.shape[0] == 0:
        raise OffloadError(
            f"auto policy: the calibration routing must be a non-empty [N, L, k] array, got"
            f" shape {calib_ids.shape}"
        )
    k = calib_ids.shape[2]
    cands = [c for c in (candidates or AUTO_CANDIDATES) if c not in ("auto", "belady")]
    sim_kwargs = dict(sim_kwargs)
    calib_counts = usage_counts(calib_ids, num_experts)
    given = sim_kwargs.get("static_counts")
    # Pins counted on the calibration routing itself would score `static` in-sample there (it
    # would look better than it does on unseen tokens): cross-fit it over the two halves instead.
    in_sample = given is None or np.array_equal(np.asarray(given), calib_counts)
    sim_kwargs.setdefault("static_counts", calib_counts)
    scores: dict[str, float] = {}
    for pol in cands:
        if pol.split(":")[0] == "static" and capacity <= k:
            continue  # no slack slot beside the pins
        if pol.split(":")[0] == "static" and in_sample:
            v = _cross_fitted(calib_ids, num_experts, capacity, pol, metric, plan, sim_kwargs)
        else:
            r = simulate(calib_ids, num_experts, capacity, pol, plan=plan, **sim_kwargs)
            v = float(getattr(r, metric))
        scores[pol] = v if np.isfinite(v) else float("-inf")
    if not scores:
        raise OffloadError(f"auto policy: no candidate can run at capacity {capacity}")
    best = max(scores, key=lambda p: (scores[p], -cands.index(p)))
    return AutoChoice(best, scores[best], metric, calibration, scores)


def _cross_fitted(
    calib_ids: np.ndarray,
    num_experts: int,
    capacity: int,
    policy: str,
    metric: str,
    plan: Any,
    sim_kwargs: dict[str, Any],
) -> float:
    """`metric` of a policy that uses usage counts (static pins), out of sample on the calibration
    routing: pins counted on the first half of its steps score the second half and vice versa
    (the whole routing is replayed each time, only the other half counted); hits and time add."""
    from moelab.offload.simulate import simulate

    n = calib_ids.shape[0]
    steps = list(sim_kwargs.get("steps") or [np.array([i]) for i in range(n)])
    timed = list(sim_kwargs.get("timed") or [True] * len(steps))
    if len(steps) < 2:
        raise OffloadError(
            f"auto policy: cannot score {policy!r} out of sample on a calibration routing of"
            f" {len(steps)} step; give at least 2 steps or static_counts from another trace"
        )
    half = len(steps) // 2
    parts = (range(half), range(half, len(steps)))
    kw = {key: v for key, v in sim_kwargs.items() if key not in ("static_counts", "timed", "steps")}
    total = {"needed": 0, "timely": 0, "late": 0, "tokens": 0, "seconds": 0.0}
    for count_on, score_on in (parts, parts[::-1]):
        rows = np.concatenate([np.asarray(steps[i]).reshape(-1) for i in count_on])
        mask = [timed[i] and i in score_on for i in range(len(steps))]
        r = simulate(
            calib_ids, num_experts, capacity, policy, plan=plan, steps=steps, timed=mask,
            static_counts=usage_counts(calib_ids[rows], num_experts), **kw,
        )  # fmt: skip
        for f in total:
            total[f] += getattr(r, f)
    if metric == "tokens_per_s":
        return total["tokens"] / total["seconds"] if total["seconds"] > 0 else float("nan")
    hit = total["timely"] + (total["late"] if metric == "hit_rate" else 0)
    return hit / total["needed"] if total["needed"] else float("nan")


def layer_hit_curve(
    expert_ids: np.ndarray, layer: int, num_experts: int, policy: str = "lru", floor: int = 1
) -> list[int]:
    """Hits of one layer's demand accesses with a cache of s = floor..E experts (index s - floor),
    replaying the ExpertCache alone (the k experts of a token locked together)."""
    ids = np.asarray(expert_ids)[:, layer]
    k = ids.shape[1]
    seq = [sorted({int(e) for e in row if e >= 0}) for row in ids]
    future = [(0, e) for s in seq for e in s] if policy.split(":")[0] == "belady" else None
    out = []
    for slots in range(max(floor, k), num_experts + 1):
        c = ExpertCache(
            slots, policy, num_layers=1, num_experts=num_experts, top_k=k, future=future
        )
        for s in seq:
            keys = [(0, e) for e in s]
            c.lock(keys)
            for key in keys:
                if not c.access(key)[0]:
                    c.insert(key)
            c.unlock()
        out.append(c.counters.hits)
    return out


def split_layers(
    calib_ids: np.ndarray,
    num_experts: int,
    total: int,
    policy: str = "lru",
    floor: int | None = None,
) -> list[int]:
    """Per-layer expert counts summing to `total` (each >= floor, default top_k, and <= E) that
    maximise the calibration hits: start every layer at the floor, then repeatedly give the layer
    with the best hits-per-slot over any increment (UCP's lookahead, so a layer whose curve only
    rises once it holds its whole working set still gets it) that increment. Layers may end
    fully resident."""
    calib_ids = np.asarray(calib_ids)
    _, L, k = calib_ids.shape
    floor = k if floor is None else int(floor)
    if floor < k:
        raise ConfigError(f"split_layers floor={floor}: must be >= top_k={k}")
    if not L * floor <= total <= L * num_experts:
        raise OffloadError(
            f"split_layers: a budget of {total} experts cannot give {L} layers between"
            f" {floor} and {num_experts} experts each"
        )
    curves = [layer_hit_curve(calib_ids, layer, num_experts, policy, floor) for layer in range(L)]
    slots = [floor] * L
    left = total - L * floor
    while left > 0:
        best: tuple[float, int, int] | None = None  # (hits per slot, -layer, increment)
        for i in range(L):
            base = curves[i][slots[i] - floor]
            for j in range(1, min(left, num_experts - slots[i]) + 1):
                u = (curves[i][slots[i] - floor + j] - base) / j
                if best is None or (u, -i, -j) > (best[0], best[1], -best[2]):
                    best = (u, -i, j)
        if best is None:
            break
        slots[-best[1]] += best[2]
        left -= best[2]
    return slots
