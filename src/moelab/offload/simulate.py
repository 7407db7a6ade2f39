"""Replay simulator: a routing Trace replayed against an ExpertCache + prefetch plan on a hardware
model (one serial link with bandwidth and latency, a compute time per MoE layer), giving hit
rate, timely-hit rate, bytes per token, stall time and an estimated tokens/s.

Timeline per token step and MoE layer l: stale queued prefetches (target at or before (step, l))
are cancelled; each needed expert is either resident and arrived (timely hit), resident but still
in transfer (late hit: wait), queued-not-started (taken over by a demand load) or absent (miss:
a demand load that goes ahead of queued prefetches, after the transfer in progress); the layer
then computes while the predictions issued at this point are queued on the link. A prefetch
still in transfer when its target layer starts without needing it is stopped at the end of its
current chunk (chunk_bytes, as the live Prefetcher reads), so it frees the link early and never
enters the cache; each chunk beyond the first costs hw.chunk_overhead, and the part read costs
its share of hw.background_overhead. This is the
overlap of loading and computing of Eliseev & Mazur 2023 (arXiv:2312.17238); the upper bound is
Belady 1966 MIN eviction with the same prefetches.

Hardware presets are assumptions, stated in their descriptions; "this-machine" is measured.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from moelab.errors import ConfigError, OffloadError
from moelab.offload.cache import ExpertCache, Key, static_keys_from_counts, usage_counts
from moelab.offload.prefetch import PREFETCH_CHUNK_BYTES

Plan = dict[tuple[int, int], list[tuple[int, int, list[int]]]]  # (step, layer) -> predictions

MIXTRAL_EXPERT_BYTES = 3 * 4096 * 14336 * 2  # w1, w2, w3 of Mixtral-8x7B in bf16 (336 MiB)


@dataclass
class Hardware:
    """A link (bandwidth bytes/s, latency s per transfer) and compute time per MoE layer."""

    name: str
    bandwidth: float
    latency: float
    layer_compute: float  # seconds per MoE layer for one decode token (attention + experts)
    token_overhead: float = 0.0  # seconds per token outside the MoE layers
    expert_bytes: int | None = None  # None: take the trace's/store's expert size
    predict_overhead: float = 0.0  # seconds per layer spent running the predictor
    description: str = ""
    fill_overhead: float = 0.0  # extra seconds of a load into a free cache slot (fresh memory)
    background_overhead: float = 0.0  # foreground seconds each finished prefetch load costs
    chunk_overhead: float = 0.0  # extra seconds per chunk of a chunked (abortable) prefetch read
    # a prefetch read runs beside the compute (which streams weights through the same memory): it
    # takes this times a demand read, which runs while the decode waits (measure_background)
    prefetch_slowdown: float = 1.0

    def transfer(self, nbytes: int) -> float:
        """Seconds to move nbytes over the link."""
        return self.latency + nbytes / self.bandwidth

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)


PRESETS: dict[str, Hardware] = {
    "pcie4-mixtral": Hardware(
        "pcie4-mixtral",
        bandwidth=25e9,
        latency=10e-6,
        layer_compute=0.7e-3,
        expert_bytes=MIXTRAL_EXPERT_BYTES,
        description=(
            "PCIe 4.0 x16 host->GPU (32 GB/s peak, 25 GB/s effective assumed, 10 us per transfer); "
            "Mixtral-8x7B bf16 experts (336 MiB); 0.7 ms per layer all-resident decode (~45 tok/s, "
            "assumed for a 32-layer model on one large GPU)"
        ),
    ),
    "nvme-ram": Hardware(
        "nvme-ram",
        bandwidth=3.5e9,
        latency=80e-6,
        layer_compute=4e-3,
        expert_bytes=MIXTRAL_EXPERT_BYTES,
        description=(
            "NVMe SSD (PCIe 4.0 x4, 3.5 GB/s sequential, 80 us per request assumed) -> RAM with "
            "CPU compute at 4 ms per Mixtral-8x7B layer (~8 tok/s all-resident, assumed)"
        ),
    ),
}


def measure_this_machine(
    store: Any,
    layer_compute: float,
    token_overhead: float = 0.0,
    reads: int = 16,
    seed: int = 0,
) -> Hardware:
    """'this-machine' preset: link measured by timing single-expert reads from `store`'s tier."""
    m = store.measure(reads=reads, seed=seed)
    return Hardware(
        "this-machine",
        bandwidth=m["expert_bytes"] / m["seconds_per_expert"],
        latency=0.0,
        layer_compute=layer_compute,
        token_overhead=token_overhead,
        expert_bytes=int(m["expert_bytes"]),
        description=(
            f"measured: {store.tier} reads from {store.path} at "
            f"{m['expert_bytes'] / m['seconds_per_expert'] / 1e6:.1f} MB/s per expert read; "
            f"{layer_compute * 1e3:.3f} ms per layer measured all-resident"
        ),
    )


def get_hardware(name: str, **overrides: Any) -> Hardware:
    """A preset by name with fields overridden (None values ignored)."""
    if name not in PRESETS:
        raise ConfigError(
            f"hardware preset {name!r}: expected one of {sorted(PRESETS)} or 'this-machine' "
            "(which needs a model and store to measure)"
        )
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


# --------------------------------------------------------------------------- plans
def steps_per_row(trace: Any) -> list[np.ndarray]:
    """One decode step per trace row (every document replayed token by token)."""
    return [np.array([i]) for i in range(trace.num_tokens)]


def oracle_plan(expert_ids: np.ndarray, layers_ahead: int = 1) -> Plan:
    """Perfect predictions: the true experts of layer l+d issued after layer l (upper bound)."""
    N, L, _ = expert_ids.shape
    plan: Plan = {}
    for n in range(N):
        for layer in range(L - layers_ahead):
            t = layer + layers_ahead
            ex = [int(e) for e in expert_ids[n, t] if e >= 0]
            plan[(n, layer)] = [(n, t, ex)]
    return plan


def plan_from_scores(
    trace: Any,
    scores: dict[int, np.ndarray],
    layers_ahead: int = 0,
    tokens_ahead: int = 0,
    top: int | None = None,
    wrap: bool = False,
) -> Plan:
    """Turn per-target-layer scores [N, E] (NaN = unavailable) into a per-row plan.

    Spatial d: issued after layer l-d of the same row; with `wrap`, a target layer l < d is
    issued after layer l - d + L of the previous row in the document (a wrapping HiddenProbe).
    Temporal t: issued after layer l of the row t positions earlier in the same document
    (steps = rows).
    """
    k = trace.meta.top_k
    m = top or k
    plan: Plan = {}
    src = None
    L = trace.meta.num_layers if wrap else 0
    prev = trace.prev_row() if wrap else None
    if tokens_ahead:
        src = np.arange(trace.num_tokens) - tokens_ahead
        ok = src >= 0
        ok[ok] &= trace.doc_id[src[ok]] == trace.doc_id[ok]
        src = np.where(ok, src, -1)
    for layer, s in scores.items():
        s = np.asarray(s, dtype=np.float32)
        good = np.isfinite(s).all(1)
        order = np.argsort(-np.nan_to_num(s, nan=-np.inf), axis=1, kind="stable")[:, :m]
        for n in np.flatnonzero(good):
            if tokens_ahead:
                if src[n] < 0:
                    continue
                issue = (int(src[n]), layer)
            elif layer - layers_ahead >= 0:
                issue = (int(n), layer - layers_ahead)
            elif prev is not None and prev[n] >= 0:
                issue = (int(prev[n]), layer - layers_ahead + L)
            else:
                continue
            plan.setdefault(issue, []).append((int(n), layer, order[n].tolist()))
    return plan


def plan_from_predictor(predictor: Any, trace: Any, top: int | None = None) -> Plan:
    """Score every target layer of `trace` with a fitted moelab.predict Predictor -> plan."""
    hz = predictor.horizon
    scores = {layer: predictor.predict_scores(trace, layer) for layer in predictor.target_layers()}
    wrap = bool(getattr(predictor, "wrap", False))
    return plan_from_scores(trace, scores, int(hz.layers_ahead), int(hz.tokens_ahead), top, wrap)


def merge_plans(*plans: Plan) -> Plan:
    """Concatenate plans (earlier plans' predictions are issued first)."""
    out: Plan = {}
    for p in plans:
        for k, v in p.items():
            out.setdefault(k, []).extend(v)
    return out


# --------------------------------------------------------------------------- link model
@dataclass
class _Transfer:
    key: Key
    issue: float
    start: float
    end: float
    target: tuple[int, int]
    pieces: int = 1
    issued_at: tuple[int, int] = (-1, -1)  # (step, layer) whose prediction queued it


class _Link:
    """One serial link: queued prefetches are chained after the transfer in progress; a demand
    load goes ahead of the queue; finished prefetches enter the cache when they complete; a
    prefetch in transfer can be stopped at a chunk boundary (chunk_bytes > 0)."""

    def __init__(self, hw: Hardware, chunk_bytes: int = 0) -> None:
        if chunk_bytes < 0:
            raise ConfigError(f"chunk_bytes={chunk_bytes}: must be >= 0 (0: whole reads)")
        self.hw, self.chunk_bytes = hw, int(chunk_bytes)
        self.busy_until = 0.0
        self.pending: deque[_Transfer] = deque()  # queued, not started
        self.pending_keys: dict[Key, _Transfer] = {}
        self.inflight: dict[Key, _Transfer] = {}  # started, not completed
        self.arrival: dict[Key, float] = {}  # completion time of resident keys

    def advance(self, t: float) -> list[_Transfer]:
        """Start what has started by t; return prefetches completed by t (in completion order)."""
        while self.pending and self.pending[0].start <= t:
            tr = self.pending.popleft()
            self.pending_keys.pop(tr.key, None)
            self.inflight[tr.key] = tr
            self.busy_until = max(self.busy_until, tr.end)
        done = sorted((tr for tr in self.inflight.values() if tr.end <= t), key=lambda tr: tr.end)
        for tr in done:
            del self.inflight[tr.key]
            self.arrival[tr.key] = tr.end
        return done

    def _rechain(self, cursor: float) -> None:
        for tr in self.pending:
            dur = tr.end - tr.start
            tr.start = max(cursor, tr.issue)
            tr.end = tr.start + dur
            cursor = tr.end

    def busy(self, key: Key) -> bool:
        """Queued or in flight."""
        return key in self.pending_keys or key in self.inflight

    def prefetch(
        self,
        key: Key,
        t: float,
        nbytes: int,
        target: tuple[int, int],
        fill: bool = False,
        issued_at: tuple[int, int] = (-1, -1),
    ) -> None:
        """Queue a transfer; `fill`: it lands in a free cache slot (pays hw.fill_overhead)."""
        last = self.pending[-1].end if self.pending else self.busy_until
        start = max(t, last)
        pieces = self.pieces(nbytes)
        dur = (
            self.hw.transfer(nbytes) * self.hw.prefetch_slowdown
            + (self.hw.fill_overhead if fill else 0.0)
            + (pieces - 1) * self.hw.chunk_overhead
        )
        tr = _Transfer(key, t, start, start + dur, target, pieces, issued_at)
        self.pending.append(tr)
        self.pending_keys[key] = tr

    def demand(self, key: Key, t: float, nbytes: int, fill: bool = False) -> float:
        """A demand load ahead of the queue -> its end time (`fill` as for prefetch)."""
        start = max(t, self.busy_until)
        end = start + self.hw.transfer(nbytes) + (self.hw.fill_overhead if fill else 0.0)
        self.busy_until = end
        self.arrival[key] = end
        self._rechain(end)
        return end

    def drop(self, key: Key) -> bool:
        """Remove a queued (not started) transfer of key; True if there was one."""
        tr = self.pending_keys.pop(key, None)
        if tr is None:
            return False
        self.pending.remove(tr)
        self._rechain(self.busy_until)
        return True

    def pieces(self, nbytes: int) -> int:
        """Chunks a prefetch of nbytes is read in (1: one whole read)."""
        return max(1, -(-int(nbytes) // self.chunk_bytes)) if self.chunk_bytes else 1

    def abort(self, target: tuple[int, int], needed: Sequence[Key], t: float) -> tuple[int, float]:
        """Stop the prefetches in transfer at time t whose target is at or before `target` and
        whose key is not `needed`: each ends with the chunk in progress (chunked reads only);
        the queue moves up. Returns (how many stopped, foreground seconds the parts read cost:
        their share of hw.background_overhead); stopped ones never enter the cache."""
        if not self.chunk_bytes:
            return 0, 0.0
        keep = set(needed)
        out = self._stop(lambda key, tr: tr.target <= target and key not in keep, t)
        return len(out), sum(out) * self.hw.background_overhead

    def _stop(self, pick: Callable[[Key, _Transfer], bool], t: float) -> list[float]:
        """Stop the transfers in flight at t that `pick` selects at the end of their current
        chunk; the queue moves up -> the fraction of each that was read."""
        out = []
        for key, tr in list(self.inflight.items()):
            if pick(key, tr) and tr.end > t:
                piece = (tr.end - tr.start) / tr.pieces
                stop = min(tr.end, tr.start + (math.floor((t - tr.start) / piece) + 1) * piece)
                del self.inflight[key]
                out.append((stop - tr.start) / max(tr.end - tr.start, 1e-300))
                self.busy_until = max([stop, *(o.end for o in self.inflight.values())])
        if out:
            self._rechain(self.busy_until)
        return out

    def revise(
        self, target: tuple[int, int], keep: set[Key], now: tuple[int, int], t: float
    ) -> tuple[int, int, float]:
        """A newer prediction for `target` (issued at `now`) supersedes earlier ones: transfers
        for that target queued before `now` whose key it no longer names are dropped (queued) or
        stopped at the chunk in progress (in transfer). -> (dropped, stopped, foreground seconds
        the stopped parts cost)."""
        old = [tr for tr in self.pending if tr.target == target and tr.issued_at < now
               and tr.key not in keep]  # fmt: skip
        for tr in old:
            self.drop(tr.key)
        if not self.chunk_bytes:
            return len(old), 0, 0.0
        out = self._stop(
            lambda key, tr: tr.target == target and tr.issued_at < now and key not in keep, t
        )
        return len(old), len(out), sum(out) * self.hw.background_overhead

    def stale(self, target: tuple[int, int]) -> list[Key]:
        """Queued transfers whose target is at or before `target` (not started)."""
        return [tr.key for tr in self.pending if tr.target <= target]


def _time_calls(cache: ExpertCache) -> list[float]:
    """Wrap the cache's per-access methods on this instance so their wall time adds up in the
    returned one-element list (what a policy's bookkeeping costs a live decode's CPU)."""
    spent = [0.0]
    for name in ("access", "insert", "hint", "lock", "unlock", "at", "has_room"):
        f = getattr(cache, name)

        def timed(*a: Any, _f: Any = f, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _f(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - t0

        setattr(cache, name, timed)
    return spent


# --------------------------------------------------------------------------- simulate
@dataclass
class SimResult:
    """Outcome of one replay."""

    policy: str
    capacity: int
    per_layer: bool
    hardware: str
    predictor: str
    tokens: int = 0
    seconds: float = 0.0
    stall_seconds: float = 0.0
    needed: int = 0
    timely: int = 0
    late: int = 0
    misses: int = 0
    bytes_loaded: int = 0
    cancelled: int = 0
    dropped_budget: int = 0
    aborted: int = 0  # prefetches stopped in transfer (their target layer did not need them)
    cache: dict[str, Any] = field(default_factory=dict)
    step_hits: list[int] = field(default_factory=list)  # per counted step (record_steps=True)
    step_needed: list[int] = field(default_factory=list)
    # wall seconds spent in the cache's bookkeeping (time_policy=True; measured, not modelled)
    policy_seconds: float | None = None
    layer_visits: int = 0  # (step, layer) visits replayed, counted or not

    @property
    def hit_rate(self) -> float:
        """Needed experts resident or in transfer when the layer started."""
        return (self.timely + self.late) / self.needed if self.needed else float("nan")

    @property
    def timely_hit_rate(self) -> float:
        """Needed experts resident and arrived when the layer started."""
        return self.timely / self.needed if self.needed else float("nan")

    @property
    def tokens_per_s(self) -> float:
        """Estimated decode throughput."""
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """Fields plus derived rates."""
        d = asdict(self)
        if not self.step_needed:  # only recorded on request
            d.pop("step_hits"), d.pop("step_needed")
        if self.policy_seconds is None:
            d.pop("policy_seconds")
        t = max(self.tokens, 1)
        d.update(
            hit_rate=self.hit_rate,
            timely_hit_rate=self.timely_hit_rate,
            tokens_per_s=self.tokens_per_s,
            stall_ms_per_token=1e3 * self.stall_seconds / t,
            bytes_per_token=self.bytes_loaded / t,
        )
        return d


def demand_sequence(expert_ids: np.ndarray, steps: Sequence[np.ndarray]) -> list[Key]:
    """The demand accesses in simulation order (Belady's future)."""
    L = expert_ids.shape[1]
    seq: list[Key] = []
    for rows in steps:
        for layer in range(L):
            ids = expert_ids[rows, layer].reshape(-1)
            seq += [(layer, int(e)) for e in sorted({int(e) for e in ids if e >= 0})]
    return seq


def simulate(
    expert_ids: np.ndarray,
    num_experts: int,
    capacity: int,
    policy: str = "lru",
    hardware: Hardware | None = None,
    plan: Plan | None = None,
    per_layer: bool = True,
    steps: Sequence[np.ndarray] | None = None,
    timed: Sequence[bool] | None = None,
    expert_bytes: int | None = None,
    static_counts: np.ndarray | None = None,
    budget: int | None = None,
    max_queue: int = 64,
    predictor_name: str = "none",
    warm: Sequence[Key] = (),
    seed: int = 0,
    hints: Plan | None = None,
    layer_slots: Sequence[int] | None = None,
    floor: int = 0,
    staging: int = 0,
    warm_counts: np.ndarray | None = None,
    half_life: float = 2048,
    on_cache: Any = None,
    record_steps: bool = False,
    chunk_bytes: int | None = None,
    time_policy: bool = False,
    revise: bool = True,
) -> SimResult:
    """Replay routing expert_ids [N, L, k] (steps: row groups, default one per row) -> SimResult.

    capacity is experts per layer (per_layer) or in total; `timed[i]` False replays step i without
    counting it (e.g. a prefill that only warms the cache); `warm` keys start resident.
    policy may carry parameters ("wlfu:window=128"); the plan's predictions (and `hints`, a plan of
    full rankings that is not prefetched) are passed to the cache as hints for predictor-aware
    eviction. layer_slots (uneven per-layer split), floor (global cache: experts each layer
    keeps), staging (prefetch buffer slots) and warm_counts ([L, E] saved usage: seeds the policy
    and preloads the most used experts) go to the ExpertCache; on_cache(cache) is called at the end.
    record_steps keeps each counted step's hits and needed experts (for paired block bootstraps).
    chunk_bytes: prefetch read pieces (None: the live Prefetcher's PREFETCH_CHUNK_BYTES; 0: whole,
    unstoppable reads).
    time_policy measures the wall time of the cache's calls (policy bookkeeping, victim choice)
    into SimResult.policy_seconds; the modelled times do not include it.
    revise: as the live Prefetcher, a prediction for a (row, layer) drops or stops the earlier
    predictions' transfers for it that it does not name (counted in cancelled / aborted).
    """
    expert_ids = np.asarray(expert_ids)
    if expert_ids.ndim != 3:
        raise OffloadError(f"simulate: expert_ids must be [N, L, k], got shape {expert_ids.shape}")
    N, L, k = expert_ids.shape
    hw = hardware or PRESETS["pcie4-mixtral"]
    nb = int(expert_bytes or hw.expert_bytes or 0)
    if nb <= 0:
        raise ConfigError(
            "simulate: expert size unknown; give expert_bytes or a hardware preset with it"
        )
    steps = list(steps) if steps is not None else [np.array([i]) for i in range(N)]
    timed = list(timed) if timed is not None else [True] * len(steps)
    plan = plan or {}
    static_keys = None
    pname = policy.split(":")[0]
    if pname == "static":
        counts = (
            static_counts if static_counts is not None else usage_counts(expert_ids, num_experts)
        )
        slots = capacity - k if per_layer else capacity - k
        static_keys = static_keys_from_counts(counts, max(slots, 0), per_layer)
    cache = ExpertCache(
        capacity,
        policy,
        per_layer,
        num_layers=L,
        num_experts=num_experts,
        expert_bytes=nb,
        top_k=k,
        static_keys=static_keys,
        future=demand_sequence(expert_ids, steps) if pname == "belady" else None,
        layer_slots=layer_slots,
        floor=floor,
        staging=staging,
        half_life=half_life,
    )
    link = _Link(hw, PREFETCH_CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
    spent = _time_calls(cache) if time_policy else None
    for key in list(cache.pinned) + list(warm):
        cache.preload(key)
    if warm_counts is not None:
        cache.warm_start(warm_counts)
    row_step = {int(r): si for si, rows in enumerate(steps) for r in np.asarray(rows).reshape(-1)}
    hints = hints or {}
    res = SimResult(policy, capacity, per_layer, hw.name, predictor_name)
    t = 0.0
    tc = hw.layer_compute + hw.predict_overhead

    def complete(upto: float) -> float:
        """Finished prefetches enter the cache; each cost the foreground hw.background_overhead."""
        done = link.advance(upto)
        for tr in done:
            cache.insert(tr.key, prefetched=True)
        return len(done) * hw.background_overhead

    for si, rows in enumerate(steps):
        t_step, stall0 = t, res.stall_seconds
        hit0, needed0 = res.timely + res.late, res.needed
        count = timed[si]
        left = budget
        for layer in range(L):
            ids = expert_ids[rows, layer]
            ranks: dict[int, int] = {}
            for row in ids.reshape(-1, ids.shape[-1]):
                for r, e in enumerate(row.tolist()):
                    if e >= 0:
                        ranks[int(e)] = min(ranks.get(int(e), r), r)
            keys = [(layer, e) for e in sorted(ranks)]
            t += complete(t)  # transfers done while the previous layer computed (nothing locked)
            cache.at(si, layer)
            cache.lock(keys)
            if cache.uses_hints:  # issued once layer l has routed, before its loads
                for t_row, t_layer, experts in hints.get((si, layer), []) + plan.get(
                    (si, layer), []
                ):
                    cache.hint(row_step.get(int(t_row), si), t_layer, experts)
            for key in link.stale((si, layer)):
                link.drop(key)
                res.cancelled += 1
            n_stopped, shared = link.abort((si, layer), keys, t)
            res.aborted += n_stopped
            t += shared  # the parts read shared the cores too
            ready = t
            for key in keys:
                if key in cache:
                    kind = "timely"
                    cache.access(key, ranks[key[1]])
                elif key in link.inflight:
                    kind = "late"
                    tr = link.inflight.pop(key)
                    link.arrival[key] = tr.end
                    cache.insert(key, prefetched=True)
                    cache.access(key, ranks[key[1]])
                    ready = max(ready, tr.end + hw.background_overhead)
                else:
                    kind = "miss"
                    link.drop(key)
                    cache.access(key, ranks[key[1]])
                    fill = cache.has_room(key)
                    ready = max(ready, link.demand(key, t, nb, fill))
                    cache.insert(key)
                if count:
                    res.needed += 1
                    res.timely += kind == "timely"
                    res.late += kind == "late"
                    res.misses += kind == "miss"
            res.stall_seconds += (ready - t) if count else 0.0
            t = ready
            for t_row, t_layer, experts in plan.get((si, layer), []):
                if revise:  # as the live Prefetcher.on_layer: before the request's slot limit
                    nd, ns, shared = link.revise(
                        (t_row, t_layer), {(t_layer, int(e)) for e in experts}, (si, layer), t
                    )
                    res.cancelled += nd
                    res.aborted += ns
                    t += shared
                if per_layer:  # as the live prefetcher: no more than a layer's slots
                    experts = list(experts)[: cache.slots]
                for e in experts:
                    key = (t_layer, int(e))
                    if key in cache or link.busy(key):
                        continue
                    if left is not None and left <= 0:
                        res.dropped_budget += 1
                        continue
                    if len(link.pending) >= max_queue:
                        continue
                    link.prefetch(
                        key, t, nb, (t_row, t_layer), cache.has_room(key, True), (si, layer)
                    )
                    if left is not None:
                        left -= 1
            t += tc
            cache.unlock()
        t += hw.token_overhead
        if count:
            res.tokens += len(rows)
            res.seconds += t - t_step
            if record_steps:
                res.step_hits.append(res.timely + res.late - hit0)
                res.step_needed.append(res.needed - needed0)
        else:
            res.stall_seconds = stall0
    cache.finish()
    res.layer_visits = len(steps) * L
    if spent is not None:
        res.policy_seconds = spent[0]
    if on_cache is not None:
        on_cache(cache)  # e.g. save its usage counts for a warm start
    res.cache = cache.summary()
    res.bytes_loaded = cache.counters.bytes_loaded
    return res


def simulate_trace(
    trace: Any, capacity: int | str, policy: str = "lru", **kwargs: Any
) -> SimResult:
    """simulate() on a moelab Trace (one decode step per row); capacity may be '25%' (of the
    experts the cache spans: a layer's, or all L x E with per_layer=False)."""
    from moelab.offload.cache import parse_capacity

    m = trace.meta
    cap = (
        parse_capacity(
            capacity, m.num_layers, m.num_experts, m.top_k, kwargs.get("per_layer", True)
        )
        if isinstance(capacity, str)
        else capacity
    )
    return simulate(trace.expert_ids, m.num_experts, cap, policy, **kwargs)


def hit_rate_curves(
    expert_ids: np.ndarray,
    num_experts: int,
    capacities: Sequence[int],
    policies: Sequence[str],
    plan: Plan | None = None,
    hardware: Hardware | None = None,
    expert_bytes: int | None = None,
    static_counts: np.ndarray | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """policy -> [SimResult.to_dict() per capacity] (the hit-rate-vs-cache-size curves)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for pol in policies:
        rows = []
        for c in capacities:
            if pol == "static" and c <= expert_ids.shape[2]:
                continue
            r = simulate(
                expert_ids,
                num_experts,
                c,
                pol,
                hardware,
                plan,
                expert_bytes=expert_bytes,
                static_counts=static_counts,
            )
            rows.append(r.to_dict())
        out[pol] = rows
    return out


def plot_curves(
    curves: dict[str, list[dict[str, Any]]], num_experts: int, path: str | Path, title: str = ""
) -> Path:
    """PNG of hit rate (solid) and timely-hit rate (dashed) vs cache size per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moelab._io import atomic_write_with

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (pol, rows) in enumerate(curves.items()):
        if not rows:
            continue
        x = [100.0 * r["capacity"] / num_experts for r in rows]
        color = f"C{i}"
        ax.plot(x, [r["hit_rate"] for r in rows], "-o", color=color, label=f"{pol} hit")
        ax.plot(
            x,
            [r["timely_hit_rate"] for r in rows],
            "--",
            color=color,
            alpha=0.6,
            label=f"{pol} timely",
        )
    ax.set_xlabel("cache size (% of experts per layer)")
    ax.set_ylabel("rate")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title or "hit rate vs cache size")
    fig.tight_layout()
    path = Path(path)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path
