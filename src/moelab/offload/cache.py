"""ExpertCache: which experts are resident in fast memory, with replacement policies and counters.

One ExpertCache serves the replay simulator (values None) and live generation (values are the
expert's weight tensors). The k experts a token-layer needs are locked together (`lock`), so a
token's second expert never evicts its first. Groups: one per MoE layer (`per_layer=True`, with
an optional uneven `layer_slots` split, e.g. some layers fully resident) or one global group over
all layers (a global budget in experts or bytes, with optional per-layer `floor`s). A `staging`
buffer holds prefetched experts apart: they enter the cache (evicting per policy) only when used,
so a wrong guess never evicts a resident expert. Decayed usage counts are kept for warm starts
(`save_usage` / `load_usage` / `warm_start`, JSON). Policies live in moelab.offload.policies
(LRU, LFU, LFRU, static, Belady, LFUDA, W-LFU, decayed LFU, ARC, S3-FIFO, Least-Stale, predictor-
aware); "static" pins a fixed most-used set. Shared experts are never offloaded, so they are
always resident and not counted here.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moelab.errors import ConfigError, OffloadError
from moelab.offload.policies import (  # noqa: F401  (re-exported: older imports use cache.*)
    POLICY_REGISTRY,
    REPLAY_ONLY,
    BeladyPolicy,
    Decayed,
    LFRUPolicy,
    LFUPolicy,
    LRUPolicy,
    Policy,
    make_policy,
    parse_policy,
)

Key = tuple[int, int]  # (MoE layer, expert)
POLICIES = tuple(POLICY_REGISTRY)
USAGE_FORMAT = "moelab-expert-usage"


@dataclass
class CacheCounters:
    """What happened to demand accesses and loads."""

    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0  # first demand use of an expert brought in by the prefetcher
    wasted_prefetches: int = 0  # prefetched experts evicted/removed before any use
    prefetch_loads: int = 0
    demand_loads: int = 0
    evictions: int = 0
    bytes_loaded: int = 0  # demand + prefetch bytes moved into the cache
    bytes_prefetched: int = 0

    @property
    def accesses(self) -> int:
        """hits + misses."""
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        """hits / accesses (nan if none)."""
        return self.hits / self.accesses if self.accesses else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """Counters plus hit rate."""
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        return d


# --------------------------------------------------------------------------- the cache
def parse_capacity(
    spec: str | int | float,
    num_layers: int,
    num_experts: int,
    top_k: int = 1,
    per_layer: bool = True,
) -> int:
    """'25%' / 0.25 / '3' -> experts per layer (per_layer) or in total over all L x E experts
    (per_layer=False): a percentage is of the experts the cache spans, rounded, then raised to at
    least `top_k` (the fewest experts that hold one token's choices in a layer); an explicit
    count must be >= top_k."""
    span = num_experts if per_layer else num_layers * num_experts
    if isinstance(spec, str):
        s = spec.strip()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", s)
        if m:
            frac = float(m.group(1)) / 100.0
        elif re.fullmatch(r"\d+", s):
            return _check_count(int(s), spec, span, top_k, per_layer)
        elif re.fullmatch(r"0?\.\d+|1\.0*", s):
            frac = float(s)
        else:
            raise ConfigError(
                f"capacity {spec!r}: expected a percentage like '25%', a fraction like 0.25 or "
                "an expert count like 2"
            )
    elif isinstance(spec, float):
        frac = spec
    else:
        return _check_count(int(spec), spec, span, top_k, per_layer)
    if not 0 < frac <= 1:
        raise ConfigError(f"capacity {spec!r}: fraction must be in (0, 1]")
    return min(span, max(1, top_k, int(round(frac * span))))


def _check_count(n: int, spec: object, span: int, top_k: int, per_layer: bool = True) -> int:
    """An explicit expert count: at least top_k (one token's experts of a layer), at most span."""
    where = "per layer" if per_layer else "in total"
    if n < max(1, top_k):
        raise ConfigError(
            f"capacity {spec!r}: {n} experts {where} cannot hold one token's top_k={top_k}"
            f" experts; give a count >= {max(1, top_k)} (of {span}) or a percentage"
            " (percentages are raised to top_k)"
        )
    if not per_layer and n > span:
        raise ConfigError(f"capacity {spec!r}: {n} experts in total, the model has only {span}")
    return n


class ExpertCache:
    """Resident experts with a replacement policy; thread-safe; counts hits, misses and loads.

    capacity: experts per layer (per_layer=True) or in total, or bytes if unit="bytes".
    policy: a name of moelab.offload.POLICIES, optionally with parameters ("wlfu:window=128").
    num_layers/num_experts/expert_bytes describe the model (expert_bytes: int or one per layer).
    top_k: experts a layer needs at once; capacity below it raises OffloadError.
    static_keys: pinned experts for policy "static"; future: demand sequence for "belady".
    layer_slots: per-layer experts (per_layer only; an uneven split, capacity is then their sum).
    floor: global cache only: each layer keeps at least this many of its resident experts.
    staging: experts per group set aside for prefetches, which enter the cache only when used.
    half_life: accesses over which the saved usage counts halve (warm starts).
    """

    def __init__(
        self,
        capacity: int,
        policy: str = "lru",
        per_layer: bool = True,
        *,
        num_layers: int,
        num_experts: int,
        expert_bytes: int | Sequence[int] = 0,
        unit: str = "experts",
        top_k: int = 1,
        static_keys: Iterable[Key] | None = None,
        future: Sequence[Key] | None = None,
        lfru_privileged: float = 0.5,
        layer_slots: Sequence[int] | None = None,
        floor: int = 0,
        staging: int = 0,
        half_life: float = 2048,
    ) -> None:
        name, _ = parse_policy(policy)
        if unit not in ("experts", "bytes"):
            raise ConfigError(f"ExpertCache unit={unit!r}: expected 'experts' or 'bytes'")
        if num_layers < 1 or num_experts < 1:
            raise ConfigError(
                f"ExpertCache: num_layers={num_layers}, num_experts={num_experts} must be >= 1"
            )
        self.policy_name, self.per_layer, self.unit = policy, per_layer, unit
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        eb = (
            [int(expert_bytes)] * num_layers
            if isinstance(expert_bytes, (int, np.integer))
            else list(expert_bytes)
        )
        if len(eb) != num_layers:
            raise ConfigError(f"ExpertCache expert_bytes: {len(eb)} values for {num_layers} layers")
        self.expert_bytes = eb
        if unit == "bytes" and min(eb) <= 0:
            raise ConfigError("ExpertCache unit='bytes' needs expert_bytes > 0")
        n_groups = num_layers if per_layer else 1
        if layer_slots is not None:
            layer_slots = [int(x) for x in layer_slots]
            if not per_layer or unit != "experts" or len(layer_slots) != num_layers:
                raise ConfigError(
                    f"ExpertCache layer_slots: {len(layer_slots)} values; expected one expert count"
                    f" per layer ({num_layers}) with per_layer=True and unit='experts'"
                )
            bad = [x for x in layer_slots if not top_k <= x <= num_experts]
            if bad:
                raise OffloadError(
                    f"ExpertCache layer_slots {layer_slots}: each layer needs between top_k={top_k}"
                    f" and num_experts={num_experts} experts"
                )
            capacity = sum(layer_slots)
        if staging < 0 or floor < 0:
            raise ConfigError(f"ExpertCache staging={staging}, floor={floor}: must be >= 0")
        big = max(eb) if unit == "bytes" else 1
        if layer_slots is not None:
            limits = [x * big for x in layer_slots]
        elif unit == "bytes":
            limits = [int(capacity)] * n_groups
        else:
            limits = [int(capacity)] * n_groups
        self.capacity = int(capacity)
        slots = [lim // big for lim in limits]
        self.staging = int(staging)
        main = [s - self.staging for s in slots]
        need = top_k
        if min(main) < need:
            where = "per layer" if per_layer else "in total"
            extra = f" after {staging} staging slots" if staging else ""
            raise OffloadError(
                f"ExpertCache capacity {capacity} {unit} holds {min(main)} experts {where}{extra}, "
                f"fewer than top_k={top_k} experts one layer needs at once; raise the capacity to "
                f">= {top_k + self.staging} experts"
            )
        if per_layer:
            main = [min(m, num_experts) for m in main]
        if floor:
            if per_layer:
                raise ConfigError("ExpertCache floor: only for a global cache (per_layer=False)")
            if floor * num_layers > main[0]:
                raise OffloadError(
                    f"ExpertCache floor={floor} per layer x {num_layers} layers exceeds the global"
                    f" cache of {main[0]} experts"
                )
        self.floor = int(floor)
        self.layer_slots = list(main) if per_layer else None
        self.slots = min(main)
        self._limits = [m * big for m in main]
        self._stage_limits = [self.staging * big] * n_groups
        if name == "belady" and future is None:
            raise ConfigError(
                "ExpertCache policy='belady' needs the future access sequence (replay only)"
            )
        if name == "static" and static_keys is None:
            raise ConfigError(
                "ExpertCache policy='static' needs static_keys (see static_keys_from_counts)"
            )
        self._policies: list[Policy] = [
            make_policy(
                policy,
                main[g],
                num_layers=num_layers,
                num_experts=num_experts,
                top_k=top_k,
                future=future,
                lfru_privileged=lfru_privileged,
            )
            for g in range(n_groups)
        ]
        self.uses_hints = any(p.uses_hints for p in self._policies)
        self._data: dict[Key, Any] = {}
        self._group_keys: list[dict[Key, None]] = [dict() for _ in range(n_groups)]
        self._group_bytes = [0] * n_groups
        self._stage: list[OrderedDict[Key, Any]] = [OrderedDict() for _ in range(n_groups)]
        self._stage_bytes = [0] * n_groups
        self._layer_count = [0] * num_layers
        self._prefetched_unused: set[Key] = set()
        self._pinned: set[Key] = set()
        self._locked: set[Key] = set()
        self._now = 0
        self._lock = threading.RLock()
        self.counters = CacheCounters()
        self.bytes_preloaded = 0
        self.half_life = float(half_life)
        self._usage = Decayed(half_life)
        self.evict_listener: Any = None  # called with each evicted key (the simulator's link)
        if static_keys is not None and name == "static":
            for k in static_keys:
                k = (int(k[0]), int(k[1]))
                if self._pin_room(k):
                    self._pinned.add(k)

    # ------------------------------------------------------------------ helpers
    def _group(self, key: Key) -> int:
        return key[0] if self.per_layer else 0

    def _nbytes(self, key: Key) -> int:
        return self.expert_bytes[key[0]]

    def _cost(self, key: Key) -> int:
        return self._nbytes(key) if self.unit == "bytes" else 1

    def _used(self, g: int) -> int:
        return self._group_bytes[g] if self.unit == "bytes" else len(self._group_keys[g])

    def _limit(self, g: int = 0) -> int:
        return self._limits[g]

    def _pin_room(self, key: Key) -> bool:
        """Static pins may fill the group up to capacity minus top_k slack slots."""
        g = self._group(key)
        pinned_g = sum(self._cost(k) for k in self._pinned if self._group(k) == g)
        slack = self.top_k * (max(self.expert_bytes) if self.unit == "bytes" else 1)
        return pinned_g + self._cost(key) <= self._limit(g) - slack

    @property
    def pinned(self) -> set[Key]:
        """Keys that are never evicted (static policy)."""
        return set(self._pinned)

    def _staged(self, key: Key) -> bool:
        return key in self._stage[self._group(key)]

    # ------------------------------------------------------------------ queries
    def __contains__(self, key: Key) -> bool:
        with self._lock:
            return key in self._data or self._staged(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data) + sum(len(s) for s in self._stage)

    def resident(self, layer: int | None = None) -> list[Key]:
        """Resident keys, cache then staging buffer (of one layer if given)."""
        with self._lock:
            keys = list(self._data) + [k for s in self._stage for k in s]
            return [k for k in keys if layer is None or k[0] == layer]

    def staged(self) -> list[Key]:
        """Prefetched keys waiting in the staging buffer (oldest first)."""
        with self._lock:
            return [k for s in self._stage for k in s]

    def has_room(self, key: Key, prefetched: bool = False) -> bool:
        """True if inserting key now would take a free slot (no eviction): in the staging buffer
        for a prefetch when there is one, else in key's group of the cache."""
        key = (int(key[0]), int(key[1]))
        with self._lock:
            g = self._group(key)
            if prefetched and self._stage_limits[g] > 0:
                return self._stage_bytes_used(g) + self._cost(key) <= self._stage_limits[g]
            return self._used(g) + self._cost(key) <= self._limit(g)

    def peek(self, key: Key) -> Any:
        """Value if resident, without counting an access."""
        with self._lock:
            if key in self._data:
                return self._data[key]
            return self._stage[self._group(key)].get(key)

    @property
    def now(self) -> int:
        """Number of demand accesses served so far (Belady's clock)."""
        return self._now

    # ------------------------------------------------------------------ signals
    def at(self, step: int, layer: int) -> None:
        """The caller is at token step `step`, MoE layer `layer` (position-aware policies)."""
        with self._lock:
            for p in self._policies:
                p.at(step, layer)

    def hint(self, step: int, layer: int, experts: Sequence[int]) -> None:
        """A predictor ranks `experts` (best first) for (step, layer): predictor-aware eviction."""
        if not self.uses_hints:
            return
        with self._lock:
            g = layer if self.per_layer else 0
            if 0 <= g < len(self._policies):
                self._policies[g].hint(step, layer, experts)

    # ------------------------------------------------------------------ mutation
    def lock(self, keys: Iterable[Key]) -> None:
        """Protect keys from eviction (the experts a layer is computing with, needed together)."""
        with self._lock:
            self._locked = {(int(k[0]), int(k[1])) for k in keys}
            by_group: dict[int, list[Key]] = {}
            for k in sorted(self._locked):
                by_group.setdefault(self._group(k), []).append(k)
            for g, ks in by_group.items():
                self._policies[g].together(ks, self._now)

    def unlock(self) -> None:
        """Drop all eviction protection."""
        with self._lock:
            self._locked = set()

    def access(self, key: Key, rank: int = 0) -> tuple[bool, Any]:
        """One demand access: (hit, value or None); updates counters and the policy.

        rank: the expert's gate rank for this token (0 = the router's first choice). A hit in the
        staging buffer moves the expert into the cache (evicting per policy).
        """
        key = (int(key[0]), int(key[1]))
        with self._lock:
            g = self._group(key)
            staged = key in self._stage[g]
            hit = key in self._data or staged
            self._policies[g].touch(key, self._now, rank)
            self._usage.add(key, self._now)
            if staged:
                value = self._stage[g].pop(key)
                self._stage_bytes[g] -= self._nbytes(key)
                if not self._admit(key, value, g):
                    self._stage[g][key] = value  # no evictable slot: stays staged
                    self._stage_bytes[g] += self._nbytes(key)
            if hit:
                self.counters.hits += 1
                if key in self._prefetched_unused:
                    self._prefetched_unused.discard(key)
                    self.counters.prefetch_hits += 1
            else:
                self.counters.misses += 1
            self._now += 1
            return hit, self.peek(key)

    def insert(self, key: Key, value: Any = None, prefetched: bool = False) -> bool:
        """Make key resident (evicting per policy; a prefetch goes to the staging buffer if there
        is one); False if no room could be made (not kept). Counts the load's bytes either way."""
        key = (int(key[0]), int(key[1]))
        with self._lock:
            nb = self._nbytes(key)
            self.counters.bytes_loaded += nb
            if prefetched:
                self.counters.prefetch_loads += 1
                self.counters.bytes_prefetched += nb
            else:
                self.counters.demand_loads += 1
            g = self._group(key)
            if key in self._data:
                self._data[key] = value
                return True
            if key in self._stage[g]:
                self._stage[g][key] = value
                return True
            if prefetched and self._stage_limits[g] > 0:
                while self._stage_bytes_used(g) + self._cost(key) > self._stage_limits[g]:
                    old = next((k for k in self._stage[g] if k not in self._locked), None)
                    if old is None:
                        return False
                    self._stage[g].pop(old)
                    self._stage_bytes[g] -= self._nbytes(old)
                    self._dropped(old)
                self._stage[g][key] = value
                self._stage_bytes[g] += nb
                self._prefetched_unused.add(key)
                return True
            ok = self._admit(key, value, g)
            if ok and prefetched:
                self._prefetched_unused.add(key)
            return ok

    def _stage_bytes_used(self, g: int) -> int:
        return self._stage_bytes[g] if self.unit == "bytes" else len(self._stage[g])

    def _admit(self, key: Key, value: Any, g: int) -> bool:
        """Place key in group g's cache, evicting per policy (locks, pins and floors respected)."""
        pol = self._policies[g]
        while self._used(g) + self._cost(key) > self._limit(g):
            cand = [
                k
                for k in self._group_keys[g]
                if k not in self._locked
                and k not in self._pinned
                and (not self.floor or k[0] == key[0] or self._layer_count[k[0]] > self.floor)
            ]
            victim = pol.victim(cand, self._now - 1) if cand else None
            if victim is None:
                return False
            self._evict(victim)
        self._data[key] = value
        self._group_keys[g][key] = None
        self._group_bytes[g] += self._nbytes(key)
        self._layer_count[key[0]] += 1
        pol.inserted(key, self._now)
        return True

    def preload(self, key: Key, value: Any = None) -> bool:
        """Insert before the run (pinned static set, warm start) without counting a load."""
        ok = self.insert(key, value)
        with self._lock:
            nb = self._nbytes(key)
            self.counters.bytes_loaded -= nb
            self.counters.demand_loads -= 1
            self.bytes_preloaded += nb
        return ok

    def _dropped(self, key: Key) -> None:
        """Bookkeeping of a key leaving (cache or staging buffer)."""
        self.counters.evictions += 1
        if key in self._prefetched_unused:
            self._prefetched_unused.discard(key)
            self.counters.wasted_prefetches += 1
        if self.evict_listener is not None:
            self.evict_listener(key)

    def _evict(self, key: Key) -> None:
        g = self._group(key)
        if key in self._stage[g]:
            self._stage[g].pop(key)
            self._stage_bytes[g] -= self._nbytes(key)
            self._dropped(key)
            return
        self._data.pop(key, None)
        self._group_keys[g].pop(key, None)
        self._group_bytes[g] -= self._nbytes(key)
        self._layer_count[key[0]] -= 1
        self._policies[g].removed(key)
        self._dropped(key)

    def cancel_prefetch(self, key: Key) -> None:
        """Undo a prefetch reservation whose transfer never started (bytes never moved)."""
        with self._lock:
            if key not in self:
                return
            nb = self._nbytes(key)
            self.counters.bytes_loaded -= nb
            self.counters.bytes_prefetched -= nb
            self.counters.prefetch_loads -= 1
            self._prefetched_unused.discard(key)
            listener, self.evict_listener = self.evict_listener, None
            try:
                self._evict(key)
            finally:
                self.evict_listener = listener
            self.counters.evictions -= 1

    def remove(self, key: Key) -> None:
        """Drop a key (e.g. a cancelled prefetch reservation); counts as wasted if prefetched unused."""
        with self._lock:
            if key in self:
                self._evict(key)
                self.counters.evictions -= 1

    def finish(self) -> None:
        """End of run: prefetched experts never used count as wasted."""
        with self._lock:
            self.counters.wasted_prefetches += len(self._prefetched_unused)
            self._prefetched_unused.clear()

    # ------------------------------------------------------------------ warm starts
    def usage_counts(self) -> np.ndarray:
        """Half-life-decayed demand counts [L, E] at the current access clock."""
        with self._lock:
            out = np.zeros((self.num_layers, self.num_experts), dtype=np.float64)
            for key in list(self._usage.v):
                out[key[0], key[1]] = self._usage.get(key, self._now)
            return out

    def save_usage(self, path: str | Path) -> Path:
        """Write the decayed usage counts as JSON (atomic), for a later warm start."""
        from moelab._io import atomic_write_json

        path = Path(path)
        atomic_write_json(
            path,
            {
                "format": USAGE_FORMAT,
                "version": 1,
                "num_layers": self.num_layers,
                "num_experts": self.num_experts,
                "half_life": self.half_life,
                "accesses": self._now,
                "counts": self.usage_counts().round(6).tolist(),
            },
        )
        return path

    def warm_start(
        self,
        counts: np.ndarray,
        read: Callable[[int, int], Any] | None = None,
        fill: bool = True,
    ) -> list[Key]:
        """Seed the policies with usage counts [L, E] and (fill) preload the most used experts of
        each group up to its size; `read(layer, expert)` gives live values. Returns the keys."""
        counts = np.asarray(counts, dtype=np.float64)
        if counts.shape != (self.num_layers, self.num_experts):
            raise OffloadError(
                f"warm start counts of shape {counts.shape}; this cache is for"
                f" ({self.num_layers}, {self.num_experts}) layers x experts"
            )
        with self._lock:
            for g, p in enumerate(self._policies):
                d = {
                    (int(layer), int(e)): float(counts[layer, e])
                    for layer in range(self.num_layers)
                    if not self.per_layer or layer == g
                    for e in range(self.num_experts)
                    if counts[layer, e] > 0
                }
                p.seed(d, self._now)
            for (layer, e), v in np.ndenumerate(counts):
                if v > 0:
                    self._usage.add((int(layer), int(e)), self._now, float(v))
        keys: list[Key] = []
        if not fill:
            return keys
        for g in range(len(self._policies)):
            cols = [
                (float(counts[layer, e]), int(layer), int(e))
                for layer in range(self.num_layers)
                if not self.per_layer or layer == g
                for e in range(self.num_experts)
                if counts[layer, e] > 0
            ]
            cols.sort(key=lambda t: (-t[0], t[1], t[2]))
            for _, layer, e in cols:
                key = (layer, e)
                if self._used(g) + self._cost(key) > self._limit(g):
                    break
                if key not in self:
                    self.preload(key, read(layer, e) if read is not None else None)
                    keys.append(key)
        return keys

    def summary(self) -> dict[str, Any]:
        """Counters, capacity and policy as a dict."""
        d = self.counters.to_dict()
        d.update(
            policy=self.policy_name,
            per_layer=self.per_layer,
            capacity=self.capacity,
            unit=self.unit,
            slots=self.slots,
            layer_slots=self.layer_slots,
            floor=self.floor,
            staging=self.staging,
            resident=len(self),
        )
        return d


def load_usage(path: str | Path, num_layers: int | None = None, num_experts: int | None = None):
    """Decayed usage counts [L, E] saved by ExpertCache.save_usage (checked against L, E)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OffloadError(f"usage file {path}: cannot read JSON ({exc})") from None
    if not isinstance(d, dict) or d.get("format") != USAGE_FORMAT:
        raise OffloadError(f"usage file {path}: not a {USAGE_FORMAT} file (ExpertCache.save_usage)")
    counts = np.asarray(d.get("counts"), dtype=np.float64)
    want = (num_layers or d["num_layers"], num_experts or d["num_experts"])
    if counts.shape != tuple(want) or not np.isfinite(counts).all() or (counts < 0).any():
        raise OffloadError(
            f"usage file {path}: counts of shape {counts.shape} (finite, >= 0 expected) do not"
            f" match {want[0]} layers x {want[1]} experts"
        )
    return counts


def static_keys_from_counts(
    counts: np.ndarray, slots_per_group: int, per_layer: bool = True
) -> list[Key]:
    """Most frequent experts from usage counts [L, E]: top `slots_per_group` per layer or overall."""
    counts = np.asarray(counts)
    keys: list[Key] = []
    if per_layer:
        for layer in range(counts.shape[0]):
            order = np.argsort(-counts[layer], kind="stable")[:slots_per_group]
            keys += [(layer, int(e)) for e in order]
    else:
        flat = np.argsort(-counts.reshape(-1), kind="stable")[:slots_per_group]
        keys = [(int(i // counts.shape[1]), int(i % counts.shape[1])) for i in flat]
    return keys


def usage_counts(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Counts [L, E] of expert uses from expert_ids [N, L, k] (NO_EXPERT = -1 ignored)."""
    _, L, _ = expert_ids.shape
    out = np.zeros((L, num_experts), dtype=np.int64)
    for layer in range(L):
        ids = expert_ids[:, layer].reshape(-1)
        ids = ids[ids >= 0]
        out[layer] = np.bincount(ids.astype(np.int64), minlength=num_experts)[:num_experts]
    return out
