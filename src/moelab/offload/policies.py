"""Replacement policies of the ExpertCache, one instance per cache group (a layer or the whole cache).

Classic:
- "lru", "lfu" (counts kept across evictions, ties by recency), "lfru" (Bilal & Kang 2014,
  privileged LRU + unprivileged LFU partitions), "static" (pinned set, LRU slack; see cache.py),
  "belady" (Belady 1966 MIN: evict the expert whose next use is farthest; replay only, the bound;
  `belady:horizon=H` sees only the next H tokens, LRU beyond: how much foresight the bound needs).
Frequency with aging:
- "lfuda": Arlitt et al. 2000, "Evaluating content management techniques for Web proxy caches"
  (LFU with Dynamic Aging): key K = L + in-cache frequency, evict min K, the cache age L becomes
  the evicted K, so once-popular experts age out;
- "wlfu": windowed LFU, counts over the group's last `window` accesses (Karakostas & Serpanos
  2002, "Exploitation of different types of locality for Web caches");
- "decay-lfu": half-life-decayed counts, each use worth 2^(-age / half_life); an optional gate-rank
  weight counts a token's r-th choice `rank_weight**r` (the router's own confidence order).
Queues with ghosts:
- "arc": Megiddo & Modha 2003, "ARC: A Self-Tuning, Low Overhead Replacement Cache": recency list
  T1, frequency list T2 and their ghost lists B1/B2; a ghost hit in B1 raises the T1 target p,
  a ghost hit in B2 lowers it;
- "s3fifo": Yang et al. 2023, "FIFO queues are all you need for cache eviction" (S3-FIFO): a small
  FIFO S (10%) for new experts, a main FIFO M with reinsertion (2-bit counters) and a ghost FIFO;
  one-hit wonders leave from S into the ghost, an expert hit while in S moves to M, a ghost hit
  re-enters directly into M;
- "lirs": Jiang & Zhang 2002, "LIRS: An Efficient Low Inter-reference Recency Set Replacement
  Policy": experts with a short reuse distance (LIR, most of the cache) are kept; the rest (HIR,
  `hir_fraction` of the slots) pass through a FIFO queue Q and are evicted first; a recency stack
  S keeps ghost entries of evicted HIR experts, so one re-used while still in S becomes LIR and
  the least recent LIR expert is demoted to Q.
MoE-structured:
- "least-stale": after Hoang et al. 2026, SpecMD (arXiv:2602.03921): experts are visited layer by
  layer, so the one whose layer comes round again last (the current and just-passed layers of
  this pass) is evicted first; ties LRU. In a per-layer cache every key has the same distance, so
  it is LRU there;
- "predict": predictor-aware eviction, an estimate of Belady's next-use distance. For a resident
  expert of layer l' seen at (step, layer l) its next visit is delta = l' - l layer steps ahead
  (or L - l + l' in the next token); p1 = P(used at that visit) comes from the predictor's ranked
  hints for that visit (rank -> probability calibrated online on the hints' own outcomes) or,
  with no hint, from online transition counts (the same token's experts at layer l -> layer l',
  or the last visit's experts -> the next visit; `markov=0` turns them off); q = its half-life
  decayed per-visit use rate. The expected next use is delta + (1 - p1) * L / q; the largest is
  evicted.
  `coact=1` raises a hinted visit's p1 of expert e to p(top hint) * P(e | top hint in the same
  token-layer) (within-token co-activation, decayed counts). `steps=H` looks further than the
  next visit: p_j = P(used at the j-th visit after its layer's last one) from online j-step
  transition counts out of that visit's experts, and the expected next use becomes
  delta + (1 - p1)(L + (1 - p2)(L + ... (1 - pH) L / q)); steps=1 is the formula above.
- "adaptive": follow the leader over shadow caches of candidate policies (ACME, Ari et al. 2002):
  moelab's online choice over predict:steps=16, least-stale, decay-lfu, wlfu and s3fifo;
  `candidates=predict+s3fifo+...` changes the set (plain names).
"""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict, deque
from collections.abc import Sequence
from typing import Any

from moelab.errors import ConfigError

Key = tuple[int, int]  # (MoE layer, expert)


class Policy:
    """Replacement policy over one group's resident keys.

    The cache calls touch() on each demand access (before insert on a miss), inserted()/removed()
    as keys come and go, victim() with the evictable keys, together() with the keys one
    token-layer needs at once (they are locked), at() with the position (step, layer), hint() with
    a predictor's ranked experts for a future (step, layer), and seed() with saved usage counts.
    """

    uses_hints = False

    def __init__(self, slots: int, num_layers: int = 1, num_experts: int = 1, top_k: int = 1):
        self.slots, self.num_layers, self.num_experts, self.top_k = (
            slots,
            num_layers,
            num_experts,
            top_k,
        )

    def touch(self, key: Key, now: int, rank: int = 0) -> None:
        """Record a demand access (hit or miss) at time `now` (rank: the token's gate rank)."""

    def inserted(self, key: Key, now: int) -> None:
        """A key became resident."""

    def removed(self, key: Key) -> None:
        """A key left the cache."""

    def together(self, keys: Sequence[Key], now: int) -> None:
        """The keys one token-layer needs at once."""

    def at(self, step: int, layer: int) -> None:
        """The cache is at token step `step`, MoE layer `layer`."""

    def hint(self, step: int, layer: int, experts: Sequence[int]) -> None:
        """A predictor ranks `experts` (best first) for (step, layer)."""

    def seed(self, counts: dict[Key, float], now: int) -> None:
        """Warm start: usage counts saved from an earlier run."""

    def victim(self, resident: Sequence[Key], now: int) -> Key | None:
        """Key to evict among `resident` (the evictable ones), or None."""
        raise NotImplementedError


class LRUPolicy(Policy):
    """Least recently used."""

    def __init__(self, slots: int, **kw: Any) -> None:
        super().__init__(slots, **kw)
        self.last: dict[Key, int] = {}
        self.tick = 0

    def _bump(self, key: Key) -> None:
        self.tick += 1
        self.last[key] = self.tick

    def touch(self, key: Key, now: int, rank: int = 0) -> None:
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

    def __init__(self, slots: int, **kw: Any) -> None:
        super().__init__(slots, **kw)
        self.count: dict[Key, float] = defaultdict(float)

    def touch(self, key: Key, now: int, rank: int = 0) -> None:
        self.count[key] += 1
        self._bump(key)

    def seed(self, counts: dict[Key, float], now: int) -> None:
        for k, v in counts.items():
            self.count[k] += v

    def victim(self, resident: Sequence[Key], now: int) -> Key | None:
        return min(resident, key=lambda k: (self.count[k], self.last.get(k, 0)), default=None)


class LFRUPolicy(LFUPolicy):
    """Privileged LRU partition + unprivileged LFU partition (Bilal & Kang 2014)."""

    def __init__(self, slots: int, privileged_fraction: float = 0.5, **kw: Any) -> None:
        super().__init__(slots, **kw)
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

    def touch(self, key: Key, now: int, rank: int = 0) -> None:
        super().touch(key, now, rank)
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
    """Belady's MIN: evict the key whose next demand access is farthest ahead (never used: first).

    horizon=H limits the foresight to the next H tokens (H * num_layers * top_k demand accesses,
    exact for single-token decode steps): keys not used within it are "far" alike and the least
    recently used of them goes first. A diagnostic of how much exact foresight Belady's lead
    needs, which no one-step predictor has; horizon=0 (default) sees the whole trace.
    """

    def __init__(
        self, slots: int, future: Sequence[Key] = (), horizon: float = 0, **kw: Any
    ) -> None:
        super().__init__(slots, **kw)
        if horizon < 0 or horizon != int(horizon):
            raise ConfigError(f"belady horizon={horizon}: expected a whole number of tokens >= 0")
        self.window = int(horizon) * self.num_layers * self.top_k
        self.uses: dict[Key, deque[int]] = defaultdict(deque)
        for i, k in enumerate(future):
            self.uses[(int(k[0]), int(k[1]))].append(i)
        self.last: dict[Key, int] = {}
        self.tick = 0

    def touch(self, key: Key, now: int, rank: int = 0) -> None:
        if self.window:  # recency only breaks ties beyond a horizon
            self.tick += 1
            self.last[key] = self.tick

    def next_use(self, key: Key, now: int) -> float:
        """Position of the next access of `key` at or after `now` (inf if none, or if beyond the
        horizon)."""
        q = self.uses.get(key)
        while q and q[0] < now:
            q.popleft()
        if not q or (self.window and q[0] >= now + self.window):
            return math.inf
        return q[0]

    def victim(self, resident: Sequence[Key], now: int) -> Key | None:
        # `now` is the position of the access being served; it has already been consumed.
        if not self.window:
            return max(resident, key=lambda k: (self.next_use(k, now + 1), -k[1]), default=None)
        return max(
            resident,
            key=lambda k: (self.next_use(k, now + 1), -self.last.get(k, 0), -k[1]),
            default=None,
        )


class LFUDAPolicy(LRUPolicy):
    """LFU with dynamic aging (Arlitt et al. 2000): K = age + in-cache frequency."""

    def __init__(self, slots: int, **kw: Any) -> None:
        super().__init__(slots, **kw)
        self.age = 0.0
        self.freq: dict[Key, float] = {}
        self.prio: dict[Key, float] = {}
        self.saved: dict[Key, float] = {}

    def touch(self, key: Key, now: int, rank: int = 0) -> None:
        super().touch(key, now, rank)
        if key in self.prio:
            self.freq[key] += 1
            self.prio[key] = self.age + self.freq[key]

    def inserted(self, key: Key, now: int) -> None:
        super().inserted(key, now)
        if key not in self.prio:
            self.freq[key] = 1.0 + self.saved.pop(key, 0.0)
            self.prio[key] = self.age + self.freq[key]

    def removed(self, key: Key) -> None:
        super().removed(key)
        self.freq.pop(key, None)
        self.prio.pop(key, None)

    def seed(self, counts: dict[Key, float], now: int) -> None:
        self.saved.update(counts)

    def victim(self, resident: Sequence[Key], now: int) -> Key | None:
        v = min(
            resident, key=lambda k: (self.prio.get(k, self.age), self.last.get(k, 0)), default=None
        )
        if v is not None:
            self.age = self.prio.get(v, self.age)
        return v


class WindowLFUPolicy(LRUPolicy):
    """Counts over the group's last `window` demand accesses; ties LRU."""

    def __init__(self, slots: int, window: int = 256, **kw: Any) -> None:
        super().__init__(slots, **kw)
        if window < 1:
            raise ConfigError(f"wlfu window={window}: must be >= 1 accesses")
        self.window = int(window)
        self.recent: deque[Key] = deque()
        self.count: dict[Key, float] = defaultdict(float)

    def touch(self, key: Key, now: int, rank: int = 0) -> None:
        super().touch(key, now, rank)
        self.recent.append(key)
        self.count[key] += 1
        if len(self.recent) > self.window:
            old = self.recent.popleft()
            self.count[old] -= 1

    def seed(self, counts: dict[Key, float], now: int) -> None:
        pass  # a window of past accesses is not in saved counts; starts empty

    def victim(self, resident: Sequence[Key], now: int) -> Key | None:
        return min(resident, key=lambda k: (self.count[k], self.last.get(k, 0)), default=None)


class Decayed:
    """Counts that halve every `half_life` time units (stored lazily as value at time t)."""

    def __init__(self, half_life: float) -> None:
        if not half_life > 0:
            raise ConfigError(f"half_life={half_life}: must be > 0 accesses")
        self.rate = math.log(2) / float(half_life)
        self.v: dict[Any, tuple[float, float]] = {}

    def get(self, key: Any, now: float) -> float:
        """Value at time `now`."""
        return _decayed(self.v.get(key), now, self.rate)

    def add(self, key: Any, now: float, w: float = 1.0) -> None:
        """Add w at time `now`."""
        self.v[key] = (_decayed(self.v.get(key), now, self.rate) + w, now)


def _decayed(entry: tuple[float, float] | None, now: float, rate: float) -> float:
    """A Decayed entry (value, time stored) read at time `now` (0 for none)."""
    if entry is None:
        return 0.0
    v, t = entry
    return v * math.exp(-rate * (now - t)) if now > t else v


class DecayLFUPolicy(LRUPolicy):
    """Half-life-decayed frequency (a token's r-th gate choice weighs rank_weight**r); ties LRU."""

    def __init__(
        self, slots: int, half_life: float = 512, rank_weight: float = 1.0, **kw: Any
    ) -> None:
        super().__init__(slots, **kw)
        self.counts = Decayed(half_life)
        self.rank_weight = float(rank_weight)

    def touch(self, key: Key, now: int, rank: int = 0) -> None:
        super().touch(key, now, rank)
        self.counts.add(key, now, self.rank_weight**rank)

    def seed(self, counts: dict[Key, float], now: int) -> None:
        for k, v in counts.items():
            self.counts.add(k, now, v)

    def victim(self, resident: Sequence[Key], now: int) -> Key | None:
        return min(
            resident, key=lambda k: (self.counts.get(k, now), self.last.get(k, 0)), default=None
        )


class ARCPolicy(Policy):
    """Adaptive Replacement Cache (Megiddo & Modha 2003) with ghost lists B1, B2 and target p."""

    def __init__(self, slots: int, **kw: Any) -> None:
        super().__init__(slots, **kw)
        self.c = slots
        self.p = 0.0
        self.t1: OrderedDict[Key, None] = OrderedDict()  # least recent first
        self.t2: OrderedDict[Key, None] = OrderedDict()
        self.b1: OrderedDict[Key, None] = OrderedDict()
        self.b2: OrderedDict[Key, None] = OrderedDict()
        self._incoming: tuple[Key, str | None] | None = None

    def touch(self, key: Key, now: int, rank: int = 0) -> None:
        if key in self.t1:
            del self.t1[key]
            self.t2[key] = None
        elif key in self.t2:
            self.t2.move_to_end(key)
        elif key in self.b1:
            self.p = min(self.c, self.p + max(len(self.b2) / len(self.b1), 1.0))
            del self.b1[key]
            self._incoming = (key, "b1")
        elif key in self.b2:
            self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1.0))
            del self.b2[key]
            self._incoming = (key, "b2")
        else:
            self._incoming = (key, None)

    def inserted(self, key: Key, now: int) -> None:
        if key in self.t1 or key in self.t2:
            return
        ghost = self._incoming[1] if self._incoming and self._incoming[0] == key else None
        self._incoming = None
        self.b1.pop(key, None)
        self.b2.pop(key, None)
        (self.t2 if ghost else self.t1)[key] = None

    def removed(self, key: Key) -> None:
        if key in self.t1:
            del self.t1[key]
            self.b1[key] = None
        elif key in self.t2:
            del self.t2[key]
            self.b2[key] = None
        while len(self.t1) + len(self.b1) > self.c and self.b1:
            self.b1.popitem(last=False)
        while len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) > 2 * self.c:
            (self.b2 if self.b2 else self.b1).popitem(last=False)

    def victim(self, resident: Sequence[Key], now: int) -> Key | None:
        res = set(resident)
        e1 = [k for k in self.t1 if k in res]
        e2 = [k for k in self.t2 if k in res]
        in_b2 = bool(self._incoming and self._incoming[1] == "b2")
        n1 = len(self.t1)
        if e1 and (n1 > self.p or (in_b2 and n1 == self.p) or not e2):
            return e1[0]
        if e2:
            return e2[0]
        return next(iter(resident), None)


class S3FIFOPolicy(Policy):
    """S3-FIFO (Yang et al. 2023): small FIFO, main FIFO with reinsertion, ghost FIFO."""

    def __init__(
        self, slots: int, small_fraction: float = 0.1, move_threshold: int = 1, **kw: Any
    ) -> None:
        super().__init__(slots, **kw)
        if not 0 < small_fraction < 1:
            raise ConfigError(f"s3fifo small_fraction={small_fraction}: must be in (0, 1)")
        self.s_target = max(1, int(round(small_fraction * slots)))
        self.g_size = max(1, slots - self.s_target)
        self.threshold = int(move_threshold)
        self.small: OrderedDict[Key, None] = OrderedDict()  # oldest first
        self.main: OrderedDict[Key, None] = OrderedDict()
        self.ghost: OrderedDict[Key, None] = OrderedDict()
        self.freq: dict[Key, int] = {}

    def touch(self, key: Key, now: int, rank: int = 0) -> None:
        if key in self.freq:
            self.freq[key] = min(3, self.freq[key] + 1)

    def inserted(self, key: Key, now: int) -> None:
        if key in self.freq:
            return
        self.freq[key] = 0
        if key in self.ghost:
            del self.ghost[key]
            self.main[key] = None
        else:
            self.small[key] = None

    def removed(self, key: Key) -> None:
        self.freq.pop(key, None)
        if key in self.small:
            del self.small[key]
            self.ghost[key] = None
            while len(self.ghost) > self.g_size:
                self.ghost.popitem(last=False)
        self.main.pop(key, None)

    def victim(self, resident: Sequence[Key], now: int) -> Key | None:
        res = set(resident)
        for _ in range(4 * (len(self.small) + len(self.main)) + 4):
            s_ev = next((k for k in self.small if k in res), None)
            m_ev = next((k for k in self.main if k in res), None)
            if s_ev is not None and (len(self.small) >= self.s_target or m_ev is None):
                if self.freq.get(s_ev, 0) >= self.threshold:
                    del self.small[s_ev]
                    self.main[s_ev] = None
                    self.freq[s_ev] = 0
                    continue
                return s_ev
            if m_ev is None:
                break
            if self.freq.get(m_ev, 0) > 0:
                self.freq[m_ev] -= 1
                self.main.move_to_end(m_ev)
                continue
            return m_ev
        return next(iter(resident), None)


class LIRSPolicy(Policy):
    """LIRS (Jiang & Zhang 2002): LIR set by inter-reference recency, HIR queue Q, ghost stack S."""

    def __init__(self, slots: int, hir_fraction: float = 0.1, ghosts: float = 2.0, **kw: Any):
        super().__init__(slots, **kw)
        if not 0 < hir_fraction < 1:
            raise ConfigError(f"lirs hir_fraction={hir_fraction}: must be in (0, 1)")
        if ghosts < 0:
            raise ConfigError(f"lirs ghosts={ghosts}: must be >= 0 (x slots)")
        hir = max(1, int(round(hir_fraction * slots)))
        self.lir_target = max(1, slots - hir)
        self.max_ghosts = int(round(ghosts * slots))
        self.stack: OrderedDict[Key, None] = OrderedDict()  # S, bottom (least recent) first
        self.queue: OrderedDict[Key, None] = OrderedDict()  # Q: resident HIR, front first
        self.lir: set[Key] = set()
        self._miss: tuple[Key, bool] | None = None  # (key, was in S) between touch and insert

    def _prune(self) -> None:
        """Pop HIR entries off the bottom of S until an LIR expert is there (LIRS invariant)."""
        while self.stack:
            k = next(iter(self.stack))
            if k in self.lir:
                return
            del self.stack[k]

    def _demote_bottom(self) -> None:
        """The least recent LIR expert becomes resident HIR at the end of Q."""
        self._prune()
        if not self.stack:
            return
        k = next(iter(self.stack))
        del self.stack[k]
        self.lir.discard(k)
        self.queue[k] = None
        self._prune()

    def _trim_ghosts(self) -> None:
        """Drop the oldest non-resident entries of S beyond max_ghosts."""
        ghosts = [k for k in self.stack if k not in self.lir and k not in self.queue]
        for k in ghosts[: max(0, len(ghosts) - self.max_ghosts)]:
            del self.stack[k]
        self._prune()

    def touch(self, key: Key, now: int, rank: int = 0) -> None:
        self._miss = None
        if key in self.lir:
            self.stack[key] = None
            self.stack.move_to_end(key)
            self._prune()
        elif key in self.queue:
            if key in self.stack:  # short reuse distance: promote, demote the bottom LIR
                self.stack.move_to_end(key)
                del self.queue[key]
                self.lir.add(key)
                self._demote_bottom()
            else:
                self.stack[key] = None
                self.queue.move_to_end(key)
        else:  # a miss: the cache evicts (victim) and then inserts
            self._miss = (key, key in self.stack)
            self.stack[key] = None
            self.stack.move_to_end(key)

    def inserted(self, key: Key, now: int) -> None:
        if key in self.lir or key in self.queue:
            return
        miss, self._miss = self._miss, None
        if miss is None or miss[0] != key:  # a prefetch nobody asked for yet: resident HIR
            self.queue[key] = None
            return
        if len(self.lir) < self.lir_target:
            self.lir.add(key)
        elif miss[1]:  # a ghost in S: its reuse distance beat the bottom LIR's recency
            self.lir.add(key)
            self._demote_bottom()
        else:
            self.queue[key] = None
        self._trim_ghosts()

    def removed(self, key: Key) -> None:
        if key in self.queue:
            del self.queue[key]  # its S entry, if any, stays as a ghost
        elif key in self.lir:  # forced out (no HIR was evictable): forget it
            self.lir.discard(key)
            self.stack.pop(key, None)
            self._prune()

    def victim(self, resident: Sequence[Key], now: int) -> Key | None:
        res = set(resident)
        k = next((k for k in self.queue if k in res), None)
        if k is None:  # every resident HIR expert is locked: the least recent LIR one
            k = next((k for k in self.stack if k in self.lir and k in res), None)
        return k if k is not None else next(iter(resident), None)


def _distance(key_layer: int, layer: int, num_layers: int) -> int:
    """Layer steps from MoE layer `layer` (being served) to the next visit of `key_layer`."""
    return key_layer - layer if key_layer > layer else num_layers - layer + key_layer


class LeastStalePolicy(LRUPolicy):
    """Evict the expert whose layer comes round again last (SpecMD's Least-Stale); ties LRU."""

    def __init__(self, slots: int, **kw: Any) -> None:
        super().__init__(slots, **kw)
        self.layer = 0

    def touch(self, key: Key, now: int, rank: int = 0) -> None:
        super().touch(key, now, rank)
        self.layer = key[0]

    def at(self, step: int, layer: int) -> None:
        self.layer = layer

    def victim(self, resident: Sequence[Key], now: int) -> Key | None:
        L = self.num_layers
        return max(
            resident,
            key=lambda k: (_distance(k[0], self.layer, L), -self.last.get(k, 0)),
            default=None,
        )


class PredictivePolicy(LRUPolicy):
    """Predictor-aware eviction: evict the largest estimated next-use distance (see module doc)."""

    uses_hints = True

    def __init__(
        self,
        slots: int,
        half_life: float = 2048,
        coact: int = 0,
        markov: int = 1,
        steps: int = 1,
        **kw: Any,
    ) -> None:
        super().__init__(slots, **kw)
        if steps < 1 or steps != int(steps):
            raise ConfigError(f"predict steps={steps}: expected a whole number of visits >= 1")
        self.steps = int(steps)
        # the sets of each layer's last `steps` visits, [-1] the last one
        self.history: dict[int, deque[set[int]]] = defaultdict(lambda: deque(maxlen=self.steps))
        self.uses = Decayed(half_life)  # per key, in visits of its layer
        self.visits = Decayed(half_life)  # per layer
        self.trans = Decayed(half_life)  # (j, layer, a, b): b at the j-th visit after a's
        self.trans_n = Decayed(half_life)  # (j, layer, a)
        self.cross = Decayed(half_life)  # (l, l2, a, b): same token, b at l2 when a at l < l2
        self.cross_n = Decayed(half_life)  # (l, l2, a)
        self.co = Decayed(half_life)  # (layer, a, b) within-token co-use
        self.coact, self.markov = bool(coact), bool(markov)
        self.step, self.layer = 0, 0
        self._explicit = False
        self.last_set: dict[int, set[int]] = {}
        self.set_step: dict[int, int] = {}
        self.visit_no: dict[int, int] = defaultdict(int)
        self.hints: dict[tuple[int, int], dict[int, int]] = {}
        # online calibration of hint ranks per horizon (layer steps between the hint and its
        # target): hits / shown per rank, the last slot is "not listed"
        self._calib: dict[int, tuple[list[float], list[float]]] = {}
        self.hint_h: dict[tuple[int, int], int] = {}
        self.issued: dict[tuple[int, int], list[tuple[int, dict[int, int]]]] = {}

    def calibration(self, h: int) -> tuple[list[float], list[float]]:
        """(hits, shown) per rank for hints issued h layer steps ahead (created with a prior)."""
        if h not in self._calib:
            E = max(self.num_experts, 1)
            hit, n = [0.5] * (E + 1), [1.0] * (E + 1)
            hit[E] = 0.1
            self._calib[h] = (hit, n)
        return self._calib[h]

    @property
    def rank_hit(self) -> list[float]:
        """Hits per rank of the nearest horizon's hints (1 layer step ahead)."""
        return self.calibration(1)[0]

    @property
    def rank_n(self) -> list[float]:
        """Shown per rank of the nearest horizon's hints."""
        return self.calibration(1)[1]

    def at(self, step: int, layer: int) -> None:
        self.step, self.layer, self._explicit = step, layer, True

    def hint(self, step: int, layer: int, experts: Sequence[int]) -> None:
        """A newer hint for the same visit replaces an older one (it is issued closer to it)."""
        h = max(1, (step - self.step) * self.num_layers + (layer - self.layer))
        target = (step, layer)
        ranks: dict[int, int] = {}
        for e in experts:
            ranks.setdefault(int(e), len(ranks))
        self.issued.setdefault(target, []).append((h, ranks))  # every horizon is calibrated
        if target in self.hints and self.hint_h.get(target, h) < h:
            return  # predict with the nearer horizon's ranking
        self.hints[target] = ranks
        self.hint_h[target] = h

    def seed(self, counts: dict[Key, float], now: int) -> None:
        per_layer: dict[int, float] = defaultdict(float)
        for k, v in counts.items():
            self.uses.add(k, 0, v)
            per_layer[k[0]] += v
        for layer, v in per_layer.items():
            self.visits.add(layer, 0, v / max(self.top_k, 1))

    def together(self, keys: Sequence[Key], now: int) -> None:
        if not keys:
            return
        layer = keys[0][0]
        if not self._explicit:  # infer the position from the layer order
            if layer <= self.layer and self.visit_no[layer] > 0:
                self.step += 1
            self.layer = layer
        self.visit_no[layer] += 1
        t = self.visit_no[layer]
        es = {k[1] for k in keys}
        self.visits.add(layer, t)
        for e in es:
            self.uses.add((layer, e), t)
        past = self.history[layer]
        for j in range(1 if self.markov else 2, min(self.steps, len(past)) + 1):
            for a in past[-j]:  # the set j visits before this one
                self.trans_n.add((j, layer, a), t)
                for b in es:
                    self.trans.add((j, layer, a, b), t)
        past.append(es)
        if self.markov:
            for src, src_set in self.last_set.items():
                if src < layer and self.set_step.get(src) == self.step:
                    for a in src_set:
                        self.cross_n.add((src, layer, a), t)
                        for b in es:
                            self.cross.add((src, layer, a, b), t)
        self.last_set[layer] = es
        self.set_step[layer] = self.step
        if self.coact and len(es) > 1:
            for a in es:
                for b in es:
                    if a != b:
                        self.co.add((layer, a, b), t)
        self.hints.pop((self.step, layer), None)
        self.hint_h.pop((self.step, layer), None)
        for hz, h in self.issued.pop((self.step, layer), []):
            hit, n = self.calibration(hz)
            E = len(hit) - 1
            for e, r in h.items():
                n[r] += 1
                hit[r] += e in es
            rest = E - len(h)
            if rest > 0:
                n[E] += 1
                hit[E] += len(es - set(h)) / rest
        for key in [k for k in self.issued if k < (self.step, layer)]:
            del self.issued[key]
            self.hints.pop(key, None)
            self.hint_h.pop(key, None)

    def _q(self, key: Key) -> float:
        """Per-visit use probability from the decayed use frequency (smoothed towards k/E by one
        pseudo-visit): the estimate for visits beyond the next."""
        layer = key[0]
        t = self.visit_no[layer]
        prior = min(1.0, max(self.top_k, 1) / max(self.num_experts, 1))
        v = self.visits.get(layer, t)
        return min(max((self.uses.get(key, t) + prior) / (v + 1.0), 1e-3), 1.0)

    def _markov(self, key: Key, q: float) -> float:
        """P(used at its next visit) from the routing already seen: the same token's experts at
        the current layer (for a later layer) or the last visit's experts (for the next token),
        through online transition counts smoothed towards q by one pseudo-count."""
        layer, e = key
        t = self.visit_no[layer]
        if layer > self.layer and self.set_step.get(self.layer) == self.step:
            src = self.last_set.get(self.layer, ())
            ps = [
                (self.cross.get((self.layer, layer, a, e), t) + q)
                / (self.cross_n.get((self.layer, layer, a), t) + 1.0)
                for a in src
            ]
            return min(max(sum(ps) / len(ps), 1e-3), 1.0) if ps else q
        return self._after(key, (1,), q)[0]

    def _p1(self, key: Key, target: tuple[int, int], q: float) -> float:
        """P(used at the visit `target`): the calibrated hint if a predictor ranked that visit,
        else the online transition estimate (or q)."""
        h = self.hints.get(target)
        if h is None:
            return self._markov(key, q) if self.markov else q
        hit, n_ = self.calibration(self.hint_h.get(target, 1))
        E = len(hit) - 1
        r = h.get(key[1], E)
        p = hit[r] / n_[r]
        if self.coact and h:
            top = min(h, key=h.get)
            t = self.visit_no[key[0]]
            n = self.uses.get((key[0], top), t)
            if n > 0 and top != key[1]:
                co = self.co.get((key[0], top, key[1]), t) / n
                p = max(p, hit[0] / n_[0] * co)
        return p

    def _after(self, key: Key, js: Sequence[int], q: float) -> list[float]:
        """P(used at the j-th visit after its layer's last one), for each j in js, from online
        j-step transition counts out of that visit's experts, smoothed towards q by one
        pseudo-count (the counts read straight from the Decayed maps: the victim's hot loop)."""
        layer, e = key
        srcs = tuple(self.last_set.get(layer, ()))
        if not srcs:
            return [q] * len(js)
        tv, nv, rate = self.trans.v, self.trans_n.v, self.trans.rate
        t = self.visit_no[layer]
        out = []
        for j in js:
            acc = 0
            for a in srcs:
                acc += (_decayed(tv.get((j, layer, a, e)), t, rate) + q) / (
                    _decayed(nv.get((j, layer, a)), t, rate) + 1.0
                )
            out.append(min(max(acc / len(srcs), 1e-3), 1.0))
        return out

    def expected_next_use(self, key: Key) -> float:
        """Estimated layer steps until `key` is used again: delta + (1 - p1) * L / q, or with
        steps=H, delta + (1 - p1)(L + (1 - p2)(L + ... (1 - pH) L / q)) (p_j: j-step counts)."""
        L = self.num_layers
        d = _distance(key[0], self.layer, L)
        target = (self.step, key[0]) if key[0] > self.layer else (self.step + 1, key[0])
        q = self._q(key)
        tail = L / q
        for p in self._after(key, range(self.steps, 1, -1), q):
            tail = L + (1.0 - p) * tail
        return d + (1.0 - self._p1(key, target, q)) * tail

    def victim(self, resident: Sequence[Key], now: int) -> Key | None:
        return max(
            resident,
            key=lambda k: (self.expected_next_use(k), -self.last.get(k, 0)),
            default=None,
        )


class AdaptivePolicy(LRUPolicy):
    """Follow the leader over shadow caches: each candidate policy runs its own cache of the same
    size on the same demand accesses (and prefetch insertions); the real cache evicts what the
    candidate with the best half-life-decayed hit count would: first keys that candidate's cache
    does not hold (LRU among them), else that candidate's own victim. An online choice in the
    spirit of ACME (Ari et al. 2002, "ACME: adaptive caching using multiple experts")."""

    uses_hints = True
    CANDIDATES = ("predict:steps=16", "least-stale", "decay-lfu", "wlfu", "s3fifo")

    def __init__(self, slots: int, half_life: float = 512, candidates: str = "", **kw: Any):
        super().__init__(slots, **kw)
        from moelab.offload.cache import ExpertCache  # cache.py imports this module

        self.names = [c for c in str(candidates).split("+") if c] or list(self.CANDIDATES)
        self.shadows = [
            ExpertCache(
                slots,
                name,
                False,
                num_layers=self.num_layers,
                num_experts=self.num_experts,
                top_k=self.top_k,
            )  # fmt: skip
            for name in self.names
        ]
        self.score = Decayed(half_life)
        self.t = 0
        self.leader = 0

    def at(self, step: int, layer: int) -> None:
        for c in self.shadows:
            c.at(step, layer)

    def hint(self, step: int, layer: int, experts: Sequence[int]) -> None:
        for c in self.shadows:
            c.hint(step, layer, experts)

    def seed(self, counts: dict[Key, float], now: int) -> None:
        for c in self.shadows:
            for p in c._policies:
                p.seed(counts, now)

    def together(self, keys: Sequence[Key], now: int) -> None:
        self.t += 1
        for i, c in enumerate(self.shadows):
            c.lock(keys)
            for key in keys:
                hit, _ = c.access(key)
                if hit:
                    self.score.add(i, self.t)
                else:
                    c.insert(key)
            c.unlock()
        self.leader = max(range(len(self.shadows)), key=lambda i: self.score.get(i, self.t))

    def inserted(self, key: Key, now: int) -> None:
        super().inserted(key, now)
        for c in self.shadows:  # a prefetch (demand keys are already in every shadow)
            if key not in c:
                c.insert(key, prefetched=True)

    @property
    def leader_name(self) -> str:
        """The candidate currently followed."""
        return self.names[self.leader]

    def victim(self, resident: Sequence[Key], now: int) -> Key | None:
        if not resident:
            return None
        lead = self.shadows[self.leader]
        absent = [k for k in resident if k not in lead]
        if absent:
            return min(absent, key=lambda k: self.last.get(k, 0))
        v = lead._policies[0].victim(list(resident), now)
        return v if v is not None else resident[0]


POLICY_REGISTRY: dict[str, type[Policy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "lfru": LFRUPolicy,
    "static": LRUPolicy,  # pins are the cache's; the slack is LRU
    "belady": BeladyPolicy,
    "lfuda": LFUDAPolicy,
    "wlfu": WindowLFUPolicy,
    "decay-lfu": DecayLFUPolicy,
    "arc": ARCPolicy,
    "s3fifo": S3FIFOPolicy,
    "lirs": LIRSPolicy,
    "least-stale": LeastStalePolicy,
    "predict": PredictivePolicy,
    "adaptive": AdaptivePolicy,
}
REPLAY_ONLY = ("belady",)


_NOT_CANDIDATES = ("adaptive", "belady", "static")


def parse_policy(spec: str) -> tuple[str, dict[str, Any]]:
    """'decay-lfu:half_life=256:rank_weight=0.5' -> ('decay-lfu', {...}); checks the name."""
    parts = [p for p in str(spec).strip().split(":") if p]
    if not parts or parts[0] not in POLICY_REGISTRY:
        raise ConfigError(
            f"cache policy {spec!r}: expected one of {', '.join(POLICY_REGISTRY)} (parameters as"
            " name:key=value, e.g. wlfu:window=128)"
        )
    opts: dict[str, Any] = {}
    for p in parts[1:]:
        k, eq, v = p.partition("=")
        if not eq:
            raise ConfigError(f"cache policy {spec!r}: parameter {p!r} is not key=number")
        if k.strip() == "candidates":  # adaptive: policy names joined by '+'
            bad = [c for c in v.split("+") if c not in POLICY_REGISTRY or c in _NOT_CANDIDATES]
            if bad or not v:
                raise ConfigError(
                    f"cache policy {spec!r}: candidates {v!r} must be runnable policy names"
                    " joined by '+' (not adaptive, belady or static)"
                )
            opts["candidates"] = v
            continue
        try:
            opts[k.strip()] = float(v)
        except ValueError:
            raise ConfigError(f"cache policy {spec!r}: parameter {p!r} is not key=number") from None
    return parts[0], opts


def make_policy(spec: str, slots: int, **ctx: Any) -> Policy:
    """Instantiate a policy from its spec for one cache group (ctx: num_layers, future, ...)."""
    name, opts = parse_policy(spec)
    cls = POLICY_REGISTRY[name]
    if "window" in opts:
        opts["window"] = int(opts["window"])
    if "move_threshold" in opts:
        opts["move_threshold"] = int(opts["move_threshold"])
    if "coact" in opts:
        opts["coact"] = int(opts["coact"])
    if "steps" in opts and opts["steps"] == int(opts["steps"]):
        opts["steps"] = int(opts["steps"])
    future = ctx.pop("future", None)
    priv = ctx.pop("lfru_privileged", 0.5)
    if name == "belady":
        opts["future"] = future or []
    if name == "lfru":
        opts.setdefault("privileged_fraction", priv)
    try:
        return cls(slots, **opts, **ctx)
    except TypeError as exc:
        raise ConfigError(f"cache policy {spec!r}: {exc}") from None
