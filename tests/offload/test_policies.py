"""Issue-17 cache policies on hand-made access sequences whose results are worked out by hand
(ARC ghost hits move p, S3-FIFO one-hit wonders leave from the small queue, LFUDA aging, ...),
plus staging, floors, uneven splits, warm starts and the percentage-of-span capacity fix."""

import json

import numpy as np
import pytest

from moelab.errors import ConfigError, OffloadError
from moelab.offload.cache import POLICIES, ExpertCache, load_usage, parse_capacity
from moelab.offload.choose import split_layers
from moelab.offload.policies import parse_policy


def replay(seq, capacity, policy, num_layers=1, per_layer=True, **kw):
    """Access each key (ints: layer 0) one token-layer at a time; insert on a miss."""
    keys = [(0, e) if isinstance(e, int) else e for e in seq]
    if policy == "belady":
        kw["future"] = keys
    cache = ExpertCache(capacity, policy, per_layer, num_layers=num_layers, num_experts=8, **kw)
    hits = []
    for k in keys:
        cache.lock([k])
        hit, _ = cache.access(k)
        hits.append(hit)
        if not hit:
            cache.insert(k)
        cache.unlock()
    return cache, hits


def keys_of(od):
    return [k[1] for k in od]


def test_arc_ghost_hits_move_p():
    cache, hits = replay([1, 2, 1, 3, 2], 2, "arc")
    pol = cache._policies[0]
    # 3 evicts 2 from T1 into B1; the ghost hit on 2 raises p to 1 and 2 enters T2, pushing the
    # LRU of T2 (1) into B2.
    assert hits == [False, False, True, False, False]
    assert pol.p == 1
    assert (keys_of(pol.t1), keys_of(pol.t2), keys_of(pol.b1), keys_of(pol.b2)) == (
        [3],
        [2],
        [],
        [1],
    )
    cache.lock([(0, 1)])
    assert cache.access((0, 1))[0] is False
    cache.insert((0, 1))  # ghost hit in B2 lowers p back to 0; T1's 3 goes to B1
    assert pol.p == 0
    assert (keys_of(pol.t1), keys_of(pol.t2), keys_of(pol.b1), keys_of(pol.b2)) == (
        [],
        [2, 1],
        [3],
        [],
    )


def test_s3fifo_one_hit_wonders_leave_from_small_queue():
    cache, hits = replay([1, 1, 2, 3, 4, 2], 3, "s3fifo")
    pol = cache._policies[0]
    assert pol.s_target == 1 and hits == [False, True, False, False, False, False]
    # 4: S's oldest (1) was hit, moves to M; 2 (never hit) leaves to the ghost. 2 again: S's
    # oldest (3) leaves to the ghost, 2 re-enters straight into M from the ghost.
    assert keys_of(pol.small) == [4] and keys_of(pol.main) == [1, 2]
    assert keys_of(pol.ghost) == [3]
    assert sorted(k[1] for k in cache.resident()) == [1, 2, 4]


def test_s3fifo_main_queue_reinsertion():
    cache, _ = replay([1, 1, 2, 2, 3, 1, 4, 5], 3, "s3fifo")
    pol = cache._policies[0]
    # 4: S=[1,2,3] is over its target of 1: 1 (hit twice) and 2 (hit once) move to M, the
    # never-hit 3 leaves to the ghost; 5: S=[4] at target, 4 leaves to the ghost. M keeps [1, 2].
    assert keys_of(pol.main) == [1, 2] and keys_of(pol.small) == [5]
    assert keys_of(pol.ghost) == [3, 4]


def test_lirs_promotes_ghosts_and_demotes_the_bottom_lir():
    cache, hits = replay([1, 2, 3, 1, 4, 3, 2, 5, 2], 3, "lirs")
    pol = cache._policies[0]
    # 3 slots: 2 LIR + 1 HIR. 1, 2 fill the LIR set, 3 is HIR; 4 evicts the HIR 3 (its entry
    # stays in S as a ghost); 3 again evicts 4, and being in S becomes LIR: the bottom LIR (2)
    # is demoted to Q. 2 hits as HIR (not in S: it goes on top of S); 5 evicts it; 2 again is a
    # ghost in S: it evicts 5, becomes LIR, demotes the bottom LIR 1, and pruning drops 4's ghost.
    assert pol.lir_target == 2
    assert hits == [False, False, False, True, False, False, True, False, False]
    assert sorted(k[1] for k in pol.lir) == [2, 3]
    assert keys_of(pol.queue) == [1] and keys_of(pol.stack) == [3, 5, 2]
    assert sorted(k[1] for k in cache.resident()) == [1, 2, 3]


def test_lirs_keeps_the_hot_set_through_a_scan():
    seq = [1, 2, 1, 2, 3, 4, 5, 6, 1, 2]
    _, lirs = replay(seq, 3, "lirs")
    _, lru = replay(seq, 3, "lru")
    assert lirs[-2:] == [True, True]  # one-time experts only pass through the HIR slot
    assert lru[-2:] == [False, False]
    with pytest.raises(ConfigError, match="hir_fraction"):
        ExpertCache(3, "lirs:hir_fraction=1", num_layers=1, num_experts=8)


def test_lfuda_ages_out_old_frequency():
    seq = [1, 1, 2, 3, 2, 3]
    cache, hits = replay(seq, 2, "lfuda")
    pol = cache._policies[0]
    # K = age + freq: 1 -> 2; 2 -> 1 is evicted by 3 (age 1, K3 = 2); 2 again evicts the older
    # of the K = 2 ties, 1 (age 2, K2 = 3); 3's hit gives K3 = 2 + 2.
    assert hits == [False, True, False, False, False, True]
    assert pol.age == 2 and pol.prio == {(0, 3): 4, (0, 2): 3}
    lfu, _ = replay(seq[:5], 2, "lfu")
    assert (0, 1) in lfu and (0, 3) not in lfu  # at the 5th access LFU keeps the once-popular 1
    assert (0, 1) not in cache


def test_windowed_and_decayed_lfu_forget():
    cache, hits = replay([1, 1, 1, 2, 3, 2], 2, "wlfu:window=4")
    # window [1,1,2,3] when 3 arrives: 2 (count 1) leaves; window [1,2,3,2] when 2 returns:
    # 1 and 3 both count 1, the older (1) leaves.
    assert hits == [False, True, True, False, False, False]
    assert sorted(k[1] for k in cache.resident()) == [2, 3]
    dec, _ = replay([1, 1, 2, 3], 2, "decay-lfu:half_life=1")
    # at t=3: count(1) = 2^-3 + 2^-2 = 0.375 < count(2) = 2^-1: 1 leaves (LFU would drop 2)
    assert sorted(k[1] for k in dec.resident()) == [2, 3]
    pol = dec._policies[0]
    assert pol.counts.get((0, 2), 3) == pytest.approx(0.5)
    r = ExpertCache(2, "decay-lfu:rank_weight=0.5", num_layers=1, num_experts=8, top_k=2)
    r.access((0, 1), rank=0)
    r.access((0, 2), rank=1)
    p = r._policies[0]
    assert p.counts.get((0, 1), 2) == pytest.approx(2 ** (-2 / 512))  # default half-life 512
    assert p.counts.get((0, 2), 2) == pytest.approx(0.5 * 2 ** (-1 / 512))


def test_least_stale_matches_belady_on_layer_cycle():
    tok = [(0, 1), (1, 2), (2, 3)]
    seq = tok * 3
    ls, ls_hits = replay(seq, 2, "least-stale", num_layers=3, per_layer=False)
    lru, lru_hits = replay(seq, 2, "lru", num_layers=3, per_layer=False)
    opt, opt_hits = replay(seq, 2, "belady", num_layers=3, per_layer=False)
    # at (2,3) LRU drops (0,1), needed next; Least-Stale drops (1,2), whose layer comes last
    assert sum(lru_hits) == 0
    assert ls_hits == [False, False, False, True, False, True, False, True, False]
    assert sum(ls_hits) == sum(opt_hits) == 3


def _two_visits(policy):
    c = ExpertCache(2, policy, num_layers=1, num_experts=4, top_k=1)
    for step, e in enumerate([0, 1]):
        c.at(step, 0)
        c.lock([(0, e)])
        if not c.access((0, e))[0]:
            c.insert((0, e))
        c.unlock()
    return c


def test_predict_policy_follows_hints_and_calibrates():
    c = _two_visits("predict:markov=0")
    pol = c._policies[0]
    f = 2 ** (-1 / 2048)  # one visit of decay
    q0, q1 = pol._q((0, 0)), pol._q((0, 1))
    assert q0 == pytest.approx((f + 0.25) / (1 + f + 1))  # smoothed towards k/E = 1/4
    assert q1 == pytest.approx((1 + 0.25) / (1 + f + 1))
    # no hint: next use 1 + (1 - q) / q layer steps: the slightly rarer (0, 0) leaves
    c.at(2, 0)
    c.lock([(0, 2)])
    c.access((0, 2))
    c.insert((0, 2))
    assert (0, 1) in c and (0, 0) not in c
    # the predictor names expert 0 for step 3: p1(0) = 0.5 (prior), p1(1) = 0.1 -> (0, 1) leaves
    c = _two_visits("predict:markov=0")
    pol = c._policies[0]
    c.at(2, 0)
    c.lock([(0, 2)])
    c.access((0, 2))
    c.hint(3, 0, [0])
    assert pol.expected_next_use((0, 0)) == pytest.approx(1 + 0.5 / pol._q((0, 0)))
    assert pol.expected_next_use((0, 1)) == pytest.approx(1 + 0.9 / pol._q((0, 1)))
    c.insert((0, 2))
    assert (0, 0) in c and (0, 1) not in c
    c.unlock()
    c.at(3, 0)  # step 3 uses expert 0: rank 0 was right once, 0.5/1 -> 1.5/2
    c.lock([(0, 0)])
    assert c.access((0, 0))[0]
    assert pol.rank_hit[0] / pol.rank_n[0] == pytest.approx(0.75)


def test_predict_policy_online_transitions():
    c = ExpertCache(2, "predict", num_layers=1, num_experts=4, top_k=1)
    for step, e in enumerate([0, 1, 0, 1]):
        c.at(step, 0)
        c.lock([(0, e)])
        c.unlock()
    pol = c._policies[0]
    f = 2 ** (-1 / 2048)
    # last visit used 1; seen once: 1 -> 0 (at visit 3, one visit ago)
    assert pol._markov((0, 0), 0.2) == pytest.approx((f + 0.2) / (f + 1))
    assert pol._markov((0, 1), 0.2) == pytest.approx(0.2 / (f + 1))


def test_predict_coactivation_raises_partner():
    c = ExpertCache(3, "predict:coact=1", num_layers=1, num_experts=8, top_k=2)
    pol = c._policies[0]
    for step in range(4):
        c.at(step, 0)
        c.lock([(0, 1), (0, 2)])
        c.unlock()
    c.hint(4, 0, [1])
    p_top = pol.rank_hit[0] / pol.rank_n[0]
    p_rest = pol.rank_hit[8] / pol.rank_n[8]
    assert pol._p1((0, 2), (4, 0), 0.1) == pytest.approx(p_top)  # always with 1: P(2 | 1) = 1
    assert pol._p1((0, 5), (4, 0), 0.1) == pytest.approx(p_rest)


def test_staging_buffer_keeps_wrong_guesses_out():
    c = ExpertCache(3, "lru", num_layers=1, num_experts=8, top_k=2, staging=1)
    assert c.slots == 2
    for e in (0, 1):
        c.insert((0, e))
    assert c.insert((0, 2), prefetched=True)
    assert c.staged() == [(0, 2)] and (0, 0) in c and (0, 1) in c
    c.insert((0, 3), prefetched=True)  # replaces the unused guess, cache untouched
    assert c.staged() == [(0, 3)] and c.counters.wasted_prefetches == 1
    c.lock([(0, 3), (0, 1)])
    assert c.access((0, 3))[0] and c.counters.prefetch_hits == 1
    # used: it enters the cache, evicting the LRU unlocked (0, 0)
    assert c.staged() == [] and (0, 3) in c.resident() and (0, 0) not in c
    assert len(c) == 2
    with pytest.raises(OffloadError, match="after 1 staging slots"):
        ExpertCache(2, "lru", num_layers=1, num_experts=8, top_k=2, staging=1)


def test_global_floor_and_uneven_layer_slots():
    seq = [(1, 0), (1, 1), (0, 0), (0, 1), (0, 2)]
    plain, _ = replay(seq, 4, "lru", num_layers=2, per_layer=False)
    floored, _ = replay(seq, 4, "lru", num_layers=2, per_layer=False, floor=2)
    assert (1, 0) not in plain and (0, 0) in plain
    assert (1, 0) in floored and (0, 0) not in floored  # layer 1 keeps its 2
    with pytest.raises(OffloadError, match="floor=3"):
        ExpertCache(4, "lru", False, num_layers=2, num_experts=8, floor=3)
    c = ExpertCache(0, "lru", num_layers=2, num_experts=8, top_k=1, layer_slots=[1, 3])
    assert c.layer_slots == [1, 3] and c.capacity == 4
    for e in range(4):
        c.insert((0, e))
        c.insert((1, e))
    assert len(c.resident(0)) == 1 and len(c.resident(1)) == 3
    with pytest.raises(OffloadError, match="between top_k=2"):
        ExpertCache(0, "lru", num_layers=2, num_experts=8, top_k=2, layer_slots=[1, 3])


def test_split_layers_gives_a_cycling_layer_its_working_set():
    n = 40
    ids = np.zeros((n, 2, 1), dtype=np.int16)
    ids[:, 0, 0] = 0  # layer 0: always expert 0
    ids[:, 1, 0] = np.arange(n) % 4  # layer 1 cycles over 4 experts: useless below 4 slots
    assert split_layers(ids, 4, 5, floor=1) == [1, 4]
    assert split_layers(ids, 4, 2, floor=1) == [1, 1]
    with pytest.raises(OffloadError, match="cannot give 2 layers"):
        split_layers(ids, 4, 9, floor=1)


def test_warm_start_round_trip(tmp_path):
    c, _ = replay([1, 1, 1, 2, 3, 3], 2, "lfu", half_life=4)
    path = c.save_usage(tmp_path / "usage.json")
    d = json.loads(path.read_text())
    assert d["format"] == "moelab-expert-usage" and d["accesses"] == 6
    counts = load_usage(path, 1, 8)
    # expert 1 used at t = 0, 1, 2; read at t = 6 with half-life 4
    assert counts[0, 1] == pytest.approx(sum(2 ** (-(6 - t) / 4) for t in (0, 1, 2)), rel=1e-5)
    warm = ExpertCache(2, "lfu", num_layers=1, num_experts=8)
    keys = warm.warm_start(counts)
    assert sorted(keys) == [(0, 1), (0, 3)]  # the two most used, preloaded without a load
    assert warm.counters.bytes_loaded == 0 and warm.access((0, 3))[0]
    assert warm._policies[0].count[(0, 1)] == pytest.approx(counts[0, 1])
    with pytest.raises(OffloadError, match="do not match 2 layers"):
        load_usage(path, 2, 8)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(OffloadError, match="not a moelab-expert-usage"):
        load_usage(tmp_path / "bad.json")


def test_percentage_of_a_global_cache_is_of_all_experts():
    assert parse_capacity("25%", 4, 8, 2, per_layer=False) == 8  # of 32, not of 8
    assert parse_capacity("10%", 4, 8, 2, per_layer=False) == 3
    assert parse_capacity("25%", 4, 8, 2, per_layer=True) == 2
    with pytest.raises(ConfigError, match="only 32"):
        parse_capacity("40", 4, 8, 2, per_layer=False)


def test_policy_specs():
    assert parse_policy("wlfu:window=16") == ("wlfu", {"window": 16.0})
    for bad in ("fifo", "wlfu:window", "wlfu:window=x", ""):
        with pytest.raises(ConfigError, match="cache policy"):
            parse_policy(bad)
    with pytest.raises(ConfigError, match="unexpected keyword"):
        ExpertCache(2, "arc:window=3", num_layers=1, num_experts=8)
    assert {"lfuda", "arc", "s3fifo", "lirs", "least-stale", "wlfu", "decay-lfu"} <= set(POLICIES)


def test_adaptive_follows_the_leading_shadow_cache():
    cache, hits = replay([1, 1, 1, 2, 3, 2, 3, 2, 3, 2], 2, "adaptive:candidates=lfu+lru")
    pol = cache._policies[0]
    # t=5: LFU (first, tied) leads: the real cache drops 2 as the LFU shadow did; t=6: the LRU
    # shadow hits 2 where LFU misses, so LRU leads and the real cache drops 1 to match it.
    assert hits == [False, True, True, False, False, False, True, True, True, True]
    assert pol.leader_name == "lru"
    assert sorted(cache.resident()) == sorted(pol.shadows[1].resident()) == [(0, 2), (0, 3)]
    # LFU: hits at t=2, 3 and t=10 (by t=9 every count is 3 and the recency tie drops 1)
    assert [s.counters.hits for s in pol.shadows] == [3, 7]
    with pytest.raises(ConfigError, match="candidates"):
        parse_policy("adaptive:candidates=lru+belady")


def test_predict_steps_estimates_reuse_two_visits_ahead():
    # Period-2 routing 0, 1, 0, 1, ... ending on 1. Expert 0 comes at the next visit (1 layer
    # step); expert 1 two visits ahead (2). With one-step transitions alone, 1's next use is a
    # geometric guess from its use rate 1/2 (1 + 2 = 3 steps); two-step counts (steps=2) get 2.
    from moelab.offload.policies import make_policy

    est = {}
    for spec in ("predict", "predict:steps=2", "predict:steps=4"):
        p = make_policy(spec, 2, num_layers=1, num_experts=8, top_k=1)
        for i in range(200):
            p.together([(0, i % 2)], i)
        est[spec] = [p.expected_next_use((0, e)) for e in (0, 1, 2)]
    assert est["predict"][:2] == pytest.approx([1.0, 3.0], abs=0.02)
    for spec in ("predict:steps=2", "predict:steps=4"):
        assert est[spec][:2] == pytest.approx([1.0, 2.0], abs=0.02)
        assert est[spec][2] > 100  # never used: far
    with pytest.raises(ConfigError, match="steps"):
        make_policy("predict:steps=0", 2, num_layers=1, num_experts=8, top_k=1)
