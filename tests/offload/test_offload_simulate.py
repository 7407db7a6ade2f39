"""Replay simulator: analytic timelines, agreement with the cache alone, Belady bound, plots."""

import dataclasses

import numpy as np
import pytest

from moelab.errors import ConfigError
from moelab.offload.cache import ExpertCache
from moelab.offload.simulate import (
    PRESETS,
    Hardware,
    demand_sequence,
    get_hardware,
    hit_rate_curves,
    oracle_plan,
    plan_from_scores,
    plot_curves,
    simulate,
)


def hw(bw=1e6, lat=0.0, compute=1e-3):
    return Hardware("t", bandwidth=bw, latency=lat, layer_compute=compute, expert_bytes=10_000)


def markov_trace(n=300, L=3, E=8, k=2, stay=0.6, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, L, k), dtype=np.int16)
    prev = np.stack([rng.choice(E, k, replace=False) for _ in range(L)])
    for i in range(n):
        for layer in range(L):
            if rng.random() >= stay:
                prev[layer] = rng.choice(E, k, replace=False)
            ids[i, layer] = prev[layer]
    return ids


def test_all_miss_timeline_is_analytic():
    ids = np.array([[[0]], [[1]], [[0]], [[1]]], dtype=np.int16)  # L=1, k=1, alternating
    r = simulate(ids, 4, 1, "lru", hw(bw=1e6, lat=1e-3, compute=2e-3))
    # each token: 1 ms latency + 10 kB at 1 MB/s = 11 ms load, then 2 ms compute
    assert r.misses == 4 and r.timely == 0
    assert r.stall_seconds == pytest.approx(4 * 0.011)
    assert r.tokens_per_s == pytest.approx(1 / 0.013)
    assert r.bytes_loaded == 40_000


def test_prefetch_overlaps_compute():
    # layer 0 always uses expert 0 (resident after the first token); layer 1 alternates 1, 2.
    ids = np.array([[[0], [1 + (i % 2)]] for i in range(10)], dtype=np.int16)
    fast = hw(bw=2e7, compute=1e-3)  # 0.5 ms per load < 1 ms compute
    none = simulate(ids, 4, 1, "lru", fast)
    pre = simulate(ids, 4, 1, "lru", fast, oracle_plan(ids, 1))
    assert none.misses == 1 + 10 and none.timely == 9
    # only token 0's layer-0 cold miss; layer 1 is always prefetched during layer 0's compute
    assert pre.misses == 1 and pre.timely == 19 and pre.late == 0
    assert pre.cache["prefetch_hits"] == 10 and pre.cache["wasted_prefetches"] == 0
    assert pre.tokens_per_s > none.tokens_per_s
    slow = hw(bw=5e6, compute=1e-3)  # 2 ms per load > 1 ms compute: late hits, partial stall
    late = simulate(ids, 4, 1, "lru", slow, oracle_plan(ids, 1))
    assert (late.misses, late.late, late.timely) == (1, 10, 9)
    assert late.stall_seconds == pytest.approx(0.002 + 10 * 0.001)


def test_without_prefetch_matches_plain_cache_replay():
    ids = markov_trace()
    steps = [np.array([i]) for i in range(ids.shape[0])]
    seq = demand_sequence(ids, steps)
    for pol in ("lru", "lfu", "lfru", "belady"):
        c = ExpertCache(
            3, pol, num_layers=3, num_experts=8, top_k=2, future=seq if pol == "belady" else None
        )
        hits = 0
        for rows in steps:
            for layer in range(3):
                keys = [(layer, int(e)) for e in sorted(set(ids[rows[0], layer].tolist()))]
                c.lock(keys)
                for key in keys:
                    h, _ = c.access(key)
                    hits += h
                    if not h:
                        c.insert(key)
                c.unlock()
        r = simulate(ids, 8, 3, pol, hw())
        assert r.timely == hits and r.needed == len(seq), pol


def test_belady_upper_bound_and_curves(tmp_path):
    ids = markov_trace(n=150, seed=1)
    plan = oracle_plan(ids, 1)
    curves = hit_rate_curves(
        ids, 8, [2, 3, 4, 6], ["lru", "lfu", "lfru", "static", "belady"], plan, hw(bw=1e9)
    )
    for i in range(4):
        best = curves["belady"][i]["hit_rate"]
        for pol in ("lru", "lfu", "lfru"):
            assert curves[pol][i]["hit_rate"] <= best + 1e-9
    assert [r["capacity"] for r in curves["static"]] == [3, 4, 6]
    lru = [r["hit_rate"] for r in curves["lru"]]
    assert lru == sorted(lru)  # more cache, more hits
    png = plot_curves(curves, 8, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_from_scores_horizons():
    class Meta:
        top_k = 1

    class T:
        meta = Meta()
        num_tokens = 3
        doc_id = np.array([0, 0, 1])

    s = np.array([[0.1, 0.9], [0.8, 0.2], [np.nan, np.nan]], dtype=np.float32)
    sp = plan_from_scores(T(), {1: s}, layers_ahead=1)
    assert sp == {(0, 0): [(0, 1, [1])], (1, 0): [(1, 1, [0])]}
    tp = plan_from_scores(T(), {0: s}, tokens_ahead=1)
    assert tp == {(0, 0): [(1, 0, [0])]}  # row 0 has no source, row 2 is another document


def test_plan_from_scores_wrap_issues_after_the_previous_rows_last_layer():
    """A wrapping d=1 probe's layer-0 targets are issued after layer L-1 of the previous row
    of the same document; without wrap they have no source."""

    class Meta:
        top_k, num_layers = 1, 2

    class T:
        meta = Meta()
        num_tokens = 3
        doc_id = np.array([0, 0, 1])

        def prev_row(self):
            return np.array([-1, 0, -1])

    s = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], dtype=np.float32)
    assert plan_from_scores(T(), {0: s}, layers_ahead=1) == {}
    wp = plan_from_scores(T(), {0: s, 1: s}, layers_ahead=1, wrap=True)
    # row 1's layer 0 after row 0's layer 1; rows 0 and 2 start documents
    assert wp == {(0, 1): [(1, 0, [0])], (0, 0): [(0, 1, [1])], (1, 0): [(1, 1, [0])],
                  (2, 0): [(2, 1, [1])]}  # fmt: skip


def test_presets_and_budget():
    assert PRESETS["pcie4-mixtral"].expert_bytes == 3 * 4096 * 14336 * 2
    assert get_hardware("nvme-ram", layer_compute=1.0).layer_compute == 1.0
    with pytest.raises(Exception, match="hardware preset"):
        get_hardware("tpu")
    ids = markov_trace(n=50)
    r = simulate(ids, 8, 2, "lru", hw(bw=1e9), oracle_plan(ids, 1), budget=1)
    assert r.dropped_budget > 0


def test_simulate_trace_wrapper():
    from moelab.offload.simulate import simulate_trace
    from moelab.trace.schema import Trace, TraceMeta

    ids = markov_trace(n=40)
    n = ids.shape[0]
    tr = Trace(
        meta=TraceMeta(num_layers=3, num_experts=8, top_k=2),
        token_id=np.zeros(n, np.int64),
        doc_id=np.zeros(n, np.int64),
        position=np.arange(n, dtype=np.int32),
        domain=np.zeros(n, np.int16),
        is_bos=np.arange(n) == 0,
        expert_ids=ids,
        weights=np.full(ids.shape, 0.5, np.float32),
    )
    a = simulate_trace(tr, "25%", "lru", hardware=hw())
    b = simulate(ids, 8, 2, "lru", hw())
    assert a.to_dict() == b.to_dict()


def _wrong_guess_trace():
    """One token, L=2, k=1: layer 0 uses expert 0, layer 1 expert 1; the plan guesses expert 3
    for layer 1 while layer 0 computes. 8 ms per 8 MiB expert, 1 ms per layer."""
    ids = np.array([[[0], [1]]], dtype=np.int16)
    nb = 8 << 20
    h = Hardware("t", bandwidth=nb / 8e-3, latency=0.0, layer_compute=1e-3, expert_bytes=nb)
    plan = {(0, 0): [(0, 1, [3])]}
    return ids, h, plan


def test_wrong_prefetch_in_transfer_is_stopped_at_a_chunk_boundary():
    ids, h, plan = _wrong_guess_trace()
    # demand (0,0) 0-8 ms; the guess (1,3) starts at 8 ms. Layer 1 starts at 9 ms without
    # needing it: in 2 MiB pieces (2 ms each) it stops at 10 ms, and the demand load of (1,1)
    # runs 10-18 ms: stalls 8 + 9 ms, 19 ms in all
    r = simulate(ids, 4, 1, "lru", h, plan, chunk_bytes=2 << 20)
    assert r.aborted == 1 and r.misses == 2
    assert r.stall_seconds == pytest.approx(0.017) and r.seconds == pytest.approx(0.019)
    assert r.cache["prefetch_loads"] == 0 and r.bytes_loaded == 2 * (8 << 20)
    # whole reads cannot stop: the demand load waits for the wrong one (16-24 ms)
    w = simulate(ids, 4, 1, "lru", h, plan, chunk_bytes=0)
    assert w.aborted == 0
    assert w.stall_seconds == pytest.approx(0.023) and w.seconds == pytest.approx(0.025)
    # each piece beyond the first costs chunk_overhead: 4 pieces, +0.5 ms each -> the stopped
    # read's pieces are 2.375 ms, it stops at 10.375 ms
    slow = Hardware("t", h.bandwidth, 0.0, 1e-3, expert_bytes=h.expert_bytes, chunk_overhead=5e-4)
    s = simulate(ids, 4, 1, "lru", slow, plan, chunk_bytes=2 << 20)
    assert s.stall_seconds == pytest.approx(0.008 + 0.009375)


def test_right_prefetch_in_transfer_is_kept():
    ids, h, _ = _wrong_guess_trace()
    plan = {(0, 0): [(0, 1, [1])]}  # the right guess, still in transfer at 9 ms: a late hit
    r = simulate(ids, 4, 1, "lru", h, plan, chunk_bytes=2 << 20)
    assert r.aborted == 0 and (r.misses, r.late) == (1, 1)
    assert r.stall_seconds == pytest.approx(0.008 + 0.007)  # waits 9 -> 16 ms
    with pytest.raises(ConfigError, match="chunk_bytes"):
        simulate(ids, 4, 1, "lru", h, plan, chunk_bytes=-1)


def test_later_prediction_for_the_same_layer_supersedes_an_earlier_one():
    """A two-layer guess (layer 2's expert 5, asked after layer 0) is corrected after layer 1
    by a one-layer guess (expert 2): the wrong read stops at its chunk boundary and the right
    one takes the link at once. 8 ms per expert, 1 ms per layer, 2 MiB pieces."""
    ids = np.array([[[0], [1], [2]]], dtype=np.int16)
    nb = 8 << 20
    h = Hardware("t", bandwidth=nb / 8e-3, latency=0.0, layer_compute=1e-3, expert_bytes=nb)
    plan = {(0, 0): [(0, 2, [5])], (0, 1): [(0, 2, [2])]}
    kw = dict(warm=[(1, 1)], chunk_bytes=2 << 20)
    # demand (0,0) 0-8 ms; the guess (2,5) starts at 8; layer 1 (resident) at 9 corrects it:
    # it stops at 10 and (2,2) runs 10-18 -> layer 2 (from 10 ms) waits 8 ms: 8 + 8 stalled
    r = simulate(ids, 8, 4, "lru", h, plan, revise=True, **kw)
    assert (r.misses, r.timely, r.late, r.aborted) == (1, 1, 1, 1)
    assert r.stall_seconds == pytest.approx(0.016) and r.seconds == pytest.approx(0.019)
    assert r.bytes_loaded == 2 * nb
    # without: (2,5) keeps the link to its target layer (stopped at 12 ms), (2,2) is loaded on
    # demand 12-20: 8 + 10 stalled
    n = simulate(ids, 8, 4, "lru", h, plan, revise=False, **kw)
    assert (n.misses, n.timely, n.late, n.aborted) == (2, 1, 0, 1)
    assert n.stall_seconds == pytest.approx(0.018) and n.seconds == pytest.approx(0.021)
    # a prediction issued at the same point never supersedes its sibling
    both = {(0, 0): [(0, 2, [5]), (0, 2, [2])]}
    s = simulate(ids, 8, 4, "lru", h, both, revise=True, **kw)
    assert s.to_dict() == simulate(ids, 8, 4, "lru", h, both, revise=False, **kw).to_dict()


def test_prefetch_reads_beside_compute_take_prefetch_slowdown_times_longer():
    """A prefetch runs beside the decode's compute (hw.prefetch_slowdown x a demand read); a
    demand load runs alone, at the link's own speed."""
    ids, h, _ = _wrong_guess_trace()
    plan = {(0, 0): [(0, 1, [1])]}  # the right guess, issued at 8 ms when the demand load ends
    slow = dataclasses.replace(h, prefetch_slowdown=1.5)
    r = simulate(ids, 4, 1, "lru", slow, plan, chunk_bytes=2 << 20)
    # demand (0,0) 0-8 ms as before; the prefetch takes 12 ms (8-20 ms): waits 9 -> 20 ms
    assert (r.misses, r.late) == (1, 1)
    assert r.stall_seconds == pytest.approx(0.008 + 0.011) and r.seconds == pytest.approx(0.021)
    # no plan: two demand loads, untouched by the slowdown
    d = simulate(ids, 4, 1, "lru", slow, None)
    assert d.stall_seconds == pytest.approx(0.016) and d.misses == 2


def test_stopped_prefetch_pays_its_share_of_the_background_cost():
    ids, h, plan = _wrong_guess_trace()
    # the stopped read ran 2 of its 8 ms (8-10 ms): a quarter of background_overhead
    bg = Hardware("t", h.bandwidth, 0.0, 1e-3, expert_bytes=h.expert_bytes,
                  background_overhead=4e-4)  # fmt: skip
    r = simulate(ids, 4, 1, "lru", bg, plan, chunk_bytes=2 << 20)
    base = simulate(ids, 4, 1, "lru", h, plan, chunk_bytes=2 << 20)
    assert r.aborted == base.aborted == 1
    # charged at 9 ms, when layer 1 starts; the demand load still waits for the link (10 ms),
    # so the 0.1 ms of foreground work comes out of the stall, not on top of it
    assert base.stall_seconds - r.stall_seconds == pytest.approx(1e-4)
    assert r.seconds == pytest.approx(base.seconds)
