"""ExpertCache policies on hand-made access sequences with known hit counts."""

import pytest

from moelab.errors import ConfigError, OffloadError
from moelab.offload.cache import ExpertCache, parse_capacity, static_keys_from_counts, usage_counts

TEXTBOOK = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]  # Silberschatz et al.


def replay(seq, capacity, policy, layer=0, **kw):
    keys = [(layer, e) for e in seq] if isinstance(seq[0], int) else seq
    if policy.split(":")[0] == "belady":
        kw["future"] = keys
    cache = ExpertCache(capacity, policy, num_layers=kw.pop("num_layers", 1), num_experts=8, **kw)
    hits = []
    for k in keys:
        hit, _ = cache.access(k)
        hits.append(hit)
        if not hit:
            cache.insert(k)
    return cache, hits


def test_textbook_lru_and_belady():
    lru, _ = replay(TEXTBOOK, 3, "lru")
    opt, _ = replay(TEXTBOOK, 3, "belady")
    assert (lru.counters.misses, lru.counters.hits) == (12, 8)  # 12 page faults
    assert (opt.counters.misses, opt.counters.hits) == (9, 11)  # OPT: 9 page faults


def test_belady_horizon_hand_sequence():
    # Capacity 2. At the miss on 3, full Belady evicts 2 (1 returns sooner); seeing only the next
    # access (4), both look far and LRU evicts 1; seeing two accesses (4, 1) keeps 1 again.
    seq = [1, 2, 3, 4, 1, 2]
    _, full = replay(seq, 2, "belady")
    _, one = replay(seq, 2, "belady:horizon=1")
    _, two = replay(seq, 2, "belady:horizon=2")
    assert full == two == [False, False, False, False, True, False]
    assert one == [False] * 6
    with pytest.raises(ConfigError, match="horizon"):
        replay(seq, 2, "belady:horizon=1.5")


def test_lru_vs_lfu_hand_sequence():
    seq = [1, 1, 1, 2, 3, 2, 3, 2]
    _, lru = replay(seq, 2, "lru")
    _, lfu = replay(seq, 2, "lfu")
    assert lru == [False, True, True, False, False, True, True, True]
    # LFU keeps expert 1 (3 uses) and thrashes 2/3 in the other slot.
    assert lfu == [False, True, True, False, False, False, False, False]


def test_lfru_hand_sequence():
    cache, hits = replay([1, 1, 1, 2, 3, 2, 3, 2], 2, "lfru")
    assert hits == [False, True, True, False, False, True, True, True]
    pol = cache._policies[0]
    assert pol.priv_slots == 1 and list(pol.priv) == [(0, 2)] and pol.unpriv == {(0, 3)}


def test_belady_never_worse_than_others():
    seq = [(0, e) for e in [1, 2, 3, 1, 4, 2, 5, 1, 2, 3, 4, 5, 1, 6, 2, 1]]
    opt = replay(seq, 3, "belady")[0].counters.hits
    for pol in ("lru", "lfu", "lfru"):
        assert replay(seq, 3, pol)[0].counters.hits <= opt


def test_static_pins_most_frequent():
    counts = usage_counts(__import__("numpy").array([[[0, 1]], [[0, 2]], [[0, 1]], [[3, 0]]]), 4)
    assert counts.tolist() == [[4, 2, 1, 1]]
    keys = static_keys_from_counts(counts, 1)
    assert keys == [(0, 0)]
    cache = ExpertCache(3, "static", num_layers=1, num_experts=4, top_k=2, static_keys=keys)
    cache.preload((0, 0))
    assert cache.pinned == {(0, 0)} and cache.counters.bytes_loaded == 0
    for e in [1, 2, 3, 1, 2, 3]:  # only 2 slack slots: 0 stays pinned
        hit, _ = cache.access((0, e))
        if not hit:
            cache.insert((0, e))
    assert (0, 0) in cache and cache.access((0, 0))[0]


def test_per_layer_vs_global_and_bytes():
    seq = [(0, 1), (1, 1), (0, 2), (1, 2), (0, 1), (1, 1)]
    per, _ = replay(seq, 2, "lru", num_layers=2)
    glob, _ = replay(seq, 3, "lru", num_layers=2, per_layer=False)
    assert per.counters.hits == 2 and glob.counters.hits == 0
    c = ExpertCache(250, "lru", num_layers=1, num_experts=8, expert_bytes=100, unit="bytes")
    assert c.slots == 2
    for e in range(3):
        c.insert((0, e))
    assert len(c) == 2 and c.counters.bytes_loaded == 300 and c.counters.evictions == 1


def test_prefetch_counters_and_locking():
    c = ExpertCache(2, "lru", num_layers=1, num_experts=8, expert_bytes=10, top_k=2)
    c.insert((0, 1), prefetched=True)
    c.insert((0, 2), prefetched=True)
    assert c.access((0, 1))[0]
    c.lock([(0, 1)])
    c.insert((0, 3))  # evicts the unused prefetched 2, not the locked 1
    assert (0, 1) in c and (0, 2) not in c
    k = c.counters
    assert (k.prefetch_hits, k.wasted_prefetches, k.prefetch_loads, k.bytes_prefetched) == (
        1,
        1,
        2,
        20,
    )
    c.lock([(0, 1), (0, 3)])
    assert c.insert((0, 4)) is False  # no evictable slot: not kept
    assert (0, 4) not in c


def test_capacity_errors():
    with pytest.raises(OffloadError, match="fewer than top_k=2"):
        ExpertCache(1, "lru", num_layers=2, num_experts=8, top_k=2)
    with pytest.raises(ConfigError, match="belady"):
        ExpertCache(2, "belady", num_layers=1, num_experts=8)
    with pytest.raises(ConfigError, match="policy"):
        ExpertCache(2, "fifo", num_layers=1, num_experts=8)
    assert parse_capacity("25%", 4, 8) == 2 and parse_capacity(0.5, 4, 8) == 4
    assert parse_capacity("3", 4, 8) == 3
    with pytest.raises(ConfigError):
        parse_capacity("lots", 4, 8)
