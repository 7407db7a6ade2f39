"""ExpertCache: which experts are resident in fast memory, with replacement policies and counters.

Policies (one instance per cache group: each MoE layer when `per_layer=True`, else one global):
- "lru":    evict the least recently used expert;
- "lfu":    evict the least frequently used expert (access counts kept across evictions,
            "perfect LFU"; ties broken by recency), as in activation-aware offloaders;
- "lfru":   Bilal & Kang 2014, "Time aware least recent used (TLRU) cache management policy in
            ICN" (LFRU variant): a privileged LRU partition (new and re-used experts) and an
            unprivileged LFU partition receiving the privileged partition's LRU victims;
            eviction takes the unprivileged partition's least frequent expert;
- "static": a fixed set of most frequently used experts (from a trace) pinned for the whole run,
            as static offloaders do; the remaining slack slots are managed LRU;
- "belady": Belady 1966, "A study of replacement algorithms for a virtual-storage computer"
            (MIN/OPT): evict the expert whose next use lies farthest in the future; needs the
            future access sequence, so it is for replay only (the upper bound).

The same object serves the replay simulator (values None) and live generation (values are the
expert's weight tensors). Shared experts are never offloaded (they stay in the model), so they are
always resident and not counted here.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict, defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from moelab.errors import ConfigError, OffloadError

Key = tuple[int, int]  # (MoE layer, expert)
POLICIES = ("lru", "lfu", "lfru", "static", "belady")


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


# --------------------------------------------------------------------------- policies
class Policy:
    """Replacement policy over one group's resident keys."""

    def __init__(self, slots: int) -> None:
        self.slots = slots

    def touch(self, key: Key, now: int) -> None:
        """Record a demand access (hit or miss) at time `now`."""

    def inserted(self, key: Key, now: int) -> None:
        """A key became resident."""

    def removed(self, key: Key) -> None:
        """A key left the cache."""

    def victim(self, resident: Sequence[Key], now: int) -> Key | None:
        """Key to evict among `resident` (the evictable ones), or None."""
        raise NotImplementedError


class LRUPolicy(Policy):
    """Least recently used."""

    def __init__(self, slots: int) -> None:
        super().__init__(slots)
        self.last: dict[Key, int] = {}
        self.tick = 0

    def _bump(self, key: Key) -> None:
        self.tick += 1
        self.last[key] = self.tick

    def touch(self, key: Key, now: int) -> None:
        self._bump(key)

    def inserted(self, key: Key, now: int) -> None:
        if key not in self.last:
            self._bump(key)

    def removed(self, key: Key) -> None:
        self.last.pop(key, None)

    def victim(self, resident: Sequence[Key], now: int) -> Key | None:
        return min(resident, key=lambda k: self.last.get(k, 0), default=None)


class LFUPolicy(LRUPolicy):
    """Least frequently used (counts persist across evictions), ties by least recent."""

    def __init__(self, slots: int) -> None:
        super().__init__(slots)
        self.count: dict[Key, int] = defaultdict(int)

    def touch(self, key: Key, now: int) -> None:
        self.count[key] += 1
        self._bump(key)

    def victim(self, resident: Sequence[Key], now: int) -> Key | None:
        return min(resident, key=lambda k: (self.count[k], self.last.get(k, 0)), default=None)


class LFRUPolicy(LFUPolicy):
    """Privileged LRU partition + unprivileged LFU partition (Bilal & Kang 2014)."""

    def __init__(self, slots: int, privileged_fraction: float = 0.5) -> None:
        super().__init__(slots)
        self.priv_slots = max(1, int(math.ceil(privileged_fraction * slots))) if slots > 1 else 1
        self.priv: OrderedDict[Key, None] = OrderedDict()
        self.unpriv: set[Key] = set()

    def _promote(self, key: Key) -> None:
        self.unpriv.discard(key)
        self.priv[key] = None
        self.priv.move_to_end(key)
        while len(self.priv) > self.priv_slots:
            old, _ = self.priv.popitem(last=False)
            self.unpriv.add(old)

    def touch(self, key: Key, now: int) -> None:
        super().touch(key, now)
        if key in self.priv or key in self.unpriv:
            self._promote(key)

    def inserted(self, key: Key, now: int) -> None:
        super().inserted(key, now)
        self._promote(key)

    def removed(self, key: Key) -> None:
        super().removed(key)
        self.priv.pop(key, None)
        self.unpriv.discard(key)

    def victim(self, resident: Sequence[Key], now: int) -> Key | None:
        res = set(resident)
        un = [k for k in self.unpriv if k in res]
        if un:
            return min(un, key=lambda k: (self.count[k], self.last.get(k, 0)))
        pr = [k for k in self.priv if k in res]  # OrderedDict order: least recent first
        return pr[0] if pr else None


class BeladyPolicy(Policy):
    """Belady's MIN: evict the key whose next demand access is farthest ahead (never used: first)."""

    def __init__(self, slots: int, future: Sequence[Key]) -> None:
        super().__init__(slots)
        self.uses: dict[Key, deque[int]] = defaultdict(deque)
        for i, k in enumerate(future):
            self.uses[(int(k[0]), int(k[1]))].append(i)

    def next_use(self, key: Key, now: int) -> float:
        """Position of the next access of `key` at or after `now` (inf if none)."""
        q = self.uses.get(key)
        while q and q[0] < now:
            q.popleft()
        return q[0] if q else math.inf

    def victim(self, resident: Sequence[Key], now: int) -> Key | None:
        # `now` is the position of the access being served; it has already been consumed.
        return max(resident, key=lambda k: (self.next_use(k, now + 1), -k[1]), default=None)


# --------------------------------------------------------------------------- the cache
def parse_capacity(
    spec: str | int | float, num_layers: int, num_experts: int, top_k: int = 1
) -> int:
    """'25%' / 0.25 -> experts per layer (rounded, then raised to at least `top_k`, the fewest
    experts that hold one token's choices in a layer); an explicit count must be >= top_k."""
    if isinstance(spec, str):
        s = spec.strip()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", s)
        if m:
            frac = float(m.group(1)) / 100.0
        elif re.fullmatch(r"\d+", s):
            return _check_count(int(s), spec, num_experts, top_k)
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
        return _check_count(int(spec), spec, num_experts, top_k)
    if not 0 < frac <= 1:
        raise ConfigError(f"capacity {spec!r}: fraction must be in (0, 1]")
    return min(num_experts, max(1, top_k, int(round(frac * num_experts))))


def _check_count(n: int, spec: object, num_experts: int, top_k: int) -> int:
    """An explicit expert count: at least top_k (one token's experts of a layer)."""
    if n < max(1, top_k):
        raise ConfigError(
            f"capacity {spec!r}: {n} experts per layer cannot hold one token's top_k={top_k}"
            f" experts; give a count >= {max(1, top_k)} (of {num_experts}) or a percentage"
            " (percentages are raised to top_k)"
        )
    return n


class ExpertCache:
    """Resident experts with a replacement policy; thread-safe; counts hits, misses and loads.

    capacity: experts per layer (per_layer=True) or in total, or bytes if unit="bytes".
    num_layers/num_experts/expert_bytes describe the model (expert_bytes: int or one per layer).
    top_k: experts a layer needs at once; capacity below it raises OffloadError.
    static_keys: pinned experts for policy "static"; future: demand sequence for "belady".
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
    ) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"ExpertCache policy={policy!r}: expected one of {POLICIES}")
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
        if unit == "bytes":
            if min(eb) <= 0:
                raise ConfigError("ExpertCache unit='bytes' needs expert_bytes > 0")
            slots = int(capacity // max(eb))
        else:
            slots = int(capacity)
        self.capacity = int(capacity)
        group_need = top_k if per_layer else top_k
        if slots < group_need:
            where = "per layer" if per_layer else "in total"
            raise OffloadError(
                f"ExpertCache capacity {capacity} {unit} holds {slots} experts {where}, fewer than "
                f"top_k={top_k} experts one layer needs at once; raise the capacity to >= {top_k} experts"
            )
        if per_layer and slots > num_experts:
            slots = num_experts
        self.slots = slots
        n_groups = num_layers if per_layer else 1
        if policy == "belady" and future is None:
            raise ConfigError(
                "ExpertCache policy='belady' needs the future access sequence (replay only)"
            )
        if policy == "static" and static_keys is None:
            raise ConfigError(
                "ExpertCache policy='static' needs static_keys (see static_keys_from_counts)"
            )
        self._policies: list[Policy] = []
        for _ in range(n_groups):
            if policy == "lru" or policy == "static":
                p: Policy = LRUPolicy(slots)
            elif policy == "lfu":
                p = LFUPolicy(slots)
            elif policy == "lfru":
                p = LFRUPolicy(slots, lfru_privileged)
            else:
                p = BeladyPolicy(slots, future or [])
            self._policies.append(p)
        self._data: dict[Key, Any] = {}
        self._group_keys: list[dict[Key, None]] = [dict() for _ in range(n_groups)]
        self._group_bytes = [0] * n_groups
        self._prefetched_unused: set[Key] = set()
        self._pinned: set[Key] = set()
        self._locked: set[Key] = set()
        self._now = 0
        self._lock = threading.RLock()
        self.counters = CacheCounters()
        self.bytes_preloaded = 0
        self.evict_listener: Any = None  # called with each evicted key (the simulator's link)
        if static_keys is not None and policy == "static":
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

    def _limit(self) -> int:
        return self.capacity if self.unit == "bytes" else self.slots

    def _pin_room(self, key: Key) -> bool:
        """Static pins may fill the group up to capacity minus top_k slack slots."""
        g = self._group(key)
        pinned_g = sum(self._cost(k) for k in self._pinned if self._group(k) == g)
        slack = self.top_k * (max(self.expert_bytes) if self.unit == "bytes" else 1)
        return pinned_g + self._cost(key) <= self._limit() - slack

    @property
    def pinned(self) -> set[Key]:
        """Keys that are never evicted (static policy)."""
        return set(self._pinned)

    # ------------------------------------------------------------------ queries
    def __contains__(self, key: Key) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def resident(self, layer: int | None = None) -> list[Key]:
        """Resident keys (of one layer if given)."""
        with self._lock:
            return [k for k in self._data if layer is None or k[0] == layer]

    def peek(self, key: Key) -> Any:
        """Value if resident, without counting an access."""
        with self._lock:
            return self._data.get(key)

    @property
    def now(self) -> int:
        """Number of demand accesses served so far (Belady's clock)."""
        return self._now

    # ------------------------------------------------------------------ mutation
    def lock(self, keys: Iterable[Key]) -> None:
        """Protect keys from eviction (the experts a layer is computing with)."""
        with self._lock:
            self._locked = set(keys)

    def unlock(self) -> None:
        """Drop all eviction protection."""
        with self._lock:
            self._locked = set()

    def access(self, key: Key) -> tuple[bool, Any]:
        """One demand access: (hit, value or None); updates counters and the policy."""
        key = (int(key[0]), int(key[1]))
        with self._lock:
            hit = key in self._data
            self._policies[self._group(key)].touch(key, self._now)
            if hit:
                self.counters.hits += 1
                if key in self._prefetched_unused:
                    self._prefetched_unused.discard(key)
                    self.counters.prefetch_hits += 1
            else:
                self.counters.misses += 1
            self._now += 1
            return hit, self._data.get(key)

    def insert(self, key: Key, value: Any = None, prefetched: bool = False) -> bool:
        """Make key resident (evicting per policy); False if no room could be made (not kept).

        Counts the load's bytes either way (the data was moved to be used).
        """
        key = (int(key[0]), int(key[1]))
        with self._lock:
            nb = self._nbytes(key)
            self.counters.bytes_loaded += nb
            if prefetched:
                self.counters.prefetch_loads += 1
                self.counters.bytes_prefetched += nb
            else:
                self.counters.demand_loads += 1
            if key in self._data:
                self._data[key] = value
                return True
            g = self._group(key)
            pol = self._policies[g]
            while self._used(g) + self._cost(key) > self._limit():
                cand = [
                    k
                    for k in self._group_keys[g]
                    if k not in self._locked and k not in self._pinned
                ]
                victim = pol.victim(cand, self._now - 1) if cand else None
                if victim is None:
                    if prefetched:
                        return False
                    return False
                self._evict(victim)
            self._data[key] = value
            self._group_keys[g][key] = None
            self._group_bytes[g] += nb
            pol.inserted(key, self._now)
            if prefetched:
                self._prefetched_unused.add(key)
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

    def _evict(self, key: Key) -> None:
        g = self._group(key)
        self._data.pop(key, None)
        self._group_keys[g].pop(key, None)
        self._group_bytes[g] -= self._nbytes(key)
        self._policies[g].removed(key)
        self.counters.evictions += 1
        if key in self._prefetched_unused:
            self._prefetched_unused.discard(key)
            self.counters.wasted_prefetches += 1
        if self.evict_listener is not None:
            self.evict_listener(key)

    def cancel_prefetch(self, key: Key) -> None:
        """Undo a prefetch reservation whose transfer never started (bytes never moved)."""
        with self._lock:
            if key not in self._data:
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
            if key in self._data:
                self._evict(key)
                self.counters.evictions -= 1

    def finish(self) -> None:
        """End of run: prefetched experts never used count as wasted."""
        with self._lock:
            self.counters.wasted_prefetches += len(self._prefetched_unused)
            self._prefetched_unused.clear()

    def summary(self) -> dict[str, Any]:
        """Counters, capacity and policy as a dict."""
        d = self.counters.to_dict()
        d.update(
            policy=self.policy_name,
            per_layer=self.per_layer,
            capacity=self.capacity,
            unit=self.unit,
            slots=self.slots,
            resident=len(self),
        )
        return d


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
