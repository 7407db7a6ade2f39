"""Prefetcher: loads in the background, bounded queue, budget, cancellation of stale requests."""

import time

import pytest

from moelab.errors import ConfigError
from moelab.offload.cache import ExpertCache
from moelab.offload.prefetch import Prefetcher
from moelab.offload.store import ExpertStore

# (store tier, prefetch loader): the thread on a simulated tier, the helper process on a file tier
LOADER_TIERS = [("ram", "thread"), ("fadvise", "process")]


def make(d, tier="ram", loader="thread", capacity=4, **kw):
    st = ExpertStore(d, tier=tier)
    cache = ExpertCache(
        capacity, "lru", num_layers=2, num_experts=8, expert_bytes=st.expert_nbytes(0), top_k=2
    )
    pf = Prefetcher(st, cache, loader=loader, **kw)
    assert pf.loader == loader
    return st, cache, pf


@pytest.fixture(params=LOADER_TIERS, ids=[t[1] for t in LOADER_TIERS])
def loader_tier(request):
    return dict(zip(("tier", "loader"), request.param, strict=True))


def test_background_load_then_prefetch_hit(model_and_store, loader_tier):
    m, _, d = model_and_store
    st, cache, pf = make(d, **loader_tier)
    with pf:
        assert pf.request(1, [3, 5]) == 2
        pf.drain()
        assert (1, 3) in cache and (1, 5) in cache
        value, kind, stall = pf.fetch((1, 3))
        assert kind == "resident" and stall == 0.0
        assert value["down_proj"].equal(m.blocks[1].ffn.experts.down_proj[3])
        assert pf.request(1, [3]) == 0 and pf.stats.skipped_resident == 1
    c = cache.counters
    assert (c.prefetch_loads, c.prefetch_hits, c.hits, c.misses) == (2, 1, 1, 0)
    assert st.stats()["reads"] == 2


def test_cancel_stale_requests(model_and_store, loader_tier):
    _, _, d = model_and_store
    st, cache, pf = make(d, start=False, **loader_tier)
    with pf:
        pf.begin_step(3)
        pf.request(0, [1, 2])  # target (3, 0)
        pf.request(1, [4], target_step=3)  # (3, 1)
        pf.request(0, [6], target_step=4)  # next token
        assert pf.queued == [(0, 1), (0, 2), (1, 4), (0, 6)]
        assert pf.cancel_stale(3, 0) == 2
        assert pf.queued == [(1, 4), (0, 6)]
        assert pf.cancel_stale(3, 1) == 1
        pf.resume()
        pf.drain()
    assert st.stats()["reads"] == 1 and (0, 6) in cache and (0, 1) not in cache
    assert pf.stats.cancelled == 3 and pf.stats.loaded == 1


def test_demand_takes_over_queued_request(model_and_store, loader_tier):
    _, _, d = model_and_store
    st, cache, pf = make(d, start=False, **loader_tier)
    with pf:
        pf.request(0, [2])
        _, kind, _ = pf.fetch((0, 2))
        assert kind == "miss" and pf.queued == []
        pf.resume()
        pf.drain()
    assert st.stats()["reads"] == 1  # loaded once, by the demand path
    assert cache.counters.demand_loads == 1 and cache.counters.prefetch_loads == 0


def test_budget_and_bounded_queue(model_and_store, loader_tier):
    _, _, d = model_and_store
    _, _, pf = make(d, start=False, budget=3, max_queue=2, **loader_tier)
    with pf:
        pf.begin_step(0)
        assert pf.request(0, [0, 1, 2, 3]) == 2  # queue holds 2
        assert pf.stats.dropped_full == 2
        pf.cancel_all()
        assert pf.request(1, [0, 1]) == 1  # budget 3 per step, 2 used
        assert pf.stats.dropped_budget == 1
        pf.begin_step(1)
        pf.cancel_all()
        assert pf.request(1, [5, 6]) == 2
    with pytest.raises(ConfigError):
        make(d, max_queue=0)


def test_wasted_prefetch_counted(model_and_store, loader_tier):
    _, _, d = model_and_store
    _, cache, pf = make(d, capacity=2, **loader_tier)
    with pf:
        pf.request(0, [1, 2])
        pf.drain()
        pf.fetch((0, 3))  # evicts one unused prefetched expert
        pf.fetch((0, 4))
    cache.finish()
    assert cache.counters.wasted_prefetches == 2 and cache.counters.prefetch_hits == 0


def _slow(d, **kw):
    """A throttle-tier store where one expert takes ~0.25 s, read by the prefetcher in 4 kB
    pieces (6 per expert)."""
    st = ExpertStore(d, tier="throttle", bandwidth=1e5)
    cache = ExpertCache(
        4, "lru", num_layers=2, num_experts=8, expert_bytes=st.expert_nbytes(0), top_k=2
    )
    return st, cache, Prefetcher(st, cache, chunk_bytes=4096, **kw)


def _wait_in_flight(pf, key, timeout=5.0):
    t_end = time.perf_counter() + timeout
    while not pf.in_flight(key):
        assert time.perf_counter() < t_end, f"{key} never started"
        time.sleep(0.002)


def test_wrong_prefetch_in_transfer_stops_when_its_layer_starts(model_and_store):
    _, _, d = model_and_store
    st, cache, pf = _slow(d)
    with pf:
        pf.begin_step(0)
        pf.request(1, [5], target_step=0)  # a guess for (step 0, layer 1)
        _wait_in_flight(pf, (1, 5))
        t0 = time.perf_counter()
        pf.cancel_stale(0, 0, needed=[(0, 2)])  # layer 0 starts: the guess is not stale yet
        assert pf.in_flight((1, 5))
        pf.cancel_stale(0, 1, needed=[(1, 2)])  # layer 1 starts without needing expert 5
        pf.drain()
        stopped = time.perf_counter() - t0
    full = st.expert_nbytes(0) / 1e5
    assert stopped < full / 2  # stopped after a 4 kB piece (~0.04 s), not the whole read
    assert pf.stats.aborted == 1 and pf.stats.loaded == 0
    assert (1, 5) not in cache and cache.counters.prefetch_loads == 0
    assert st.stats()["aborted"] == 1 and st.stats()["reads"] == 0


def test_needed_prefetch_in_transfer_is_kept_and_aborted_one_reloads(model_and_store):
    m, _, d = model_and_store
    st, cache, pf = _slow(d)
    with pf:
        pf.begin_step(0)
        pf.request(1, [5, 6], target_step=0)
        _wait_in_flight(pf, (1, 5))
        pf.cancel_stale(0, 1, needed=[(1, 5)])  # expert 5 is needed: keep reading it
        value, kind, _ = pf.fetch((1, 5))
        assert kind == "late"
        assert value["down_proj"].equal(m.blocks[1].ffn.experts.down_proj[5])
        # expert 6 was queued for (0, 1), so the same layer start cancelled it before it began
        assert pf.stats.cancelled == 1 and (1, 6) not in cache
        pf.request(0, [7], target_step=1)
        _wait_in_flight(pf, (0, 7))
        pf.begin_step(1)
        pf.cancel_stale(1, 0, needed=[(0, 1)])  # stop it, then want it after all
        misses = cache.counters.misses
        value, kind, _ = pf.fetch((0, 7))
        assert kind == "miss" and value["down_proj"].equal(m.blocks[0].ffn.experts.down_proj[7])
        assert cache.counters.misses == misses + 1  # counted as the miss it is
    assert pf.stats.aborted == 1 and (0, 7) in cache
    with pytest.raises(ConfigError, match="chunk_bytes"):
        Prefetcher(st, cache, chunk_bytes=-1)


class _Scripted:
    """A live predictor that returns fixed predictions per (step, layer)."""

    name = "scripted"

    def __init__(self, out):
        self.out = out

    def bind(self, sites):
        pass

    def on_layer(self, step, layer, x, expert_ids):
        return self.out.get((step, layer), [])


def test_later_prediction_for_a_layer_drops_the_earlier_guesses_it_does_not_name(
    model_and_store, loader_tier
):
    """A guess for (step 1, layer 1) made at (0, 0) is revised by the one made at (1, 0): the
    expert only the earlier one named is dropped, the one both name stays queued, and the
    other target's request from (0, 0) is untouched."""
    _, _, d = model_and_store
    st, cache, pf = make(d, start=False, **loader_tier)
    pf.predictor = _Scripted({(0, 0): [(1, 1, [4, 5]), (1, 0, [6])], (1, 0): [(1, 1, [5, 7])]})
    with pf:
        pf.on_layer(0, 0, None, None)  # guesses for step 1: layer 1 [4, 5], layer 0 [6]
        assert pf.queued == [(1, 4), (1, 5), (0, 6)]
        pf.on_layer(1, 0, None, None)  # the better guess for (1, 1): 5 and 7
        assert pf.queued == [(1, 5), (0, 6), (1, 7)]
        assert pf.stats.revised == 1 and pf.stats.cancelled == 0
        pf.resume()
        pf.drain()
    assert (1, 4) not in cache and all(k in cache for k in [(1, 5), (0, 6), (1, 7)])
    assert st.stats()["reads"] == 3


def test_later_prediction_stops_an_earlier_guess_in_transfer(model_and_store):
    _, _, d = model_and_store
    st, cache, pf = _slow(d)
    pf.predictor = _Scripted({(0, 0): [(1, 1, [5])], (0, 1): [(1, 1, [6])]})
    with pf:
        pf.on_layer(0, 0, None, None)
        _wait_in_flight(pf, (1, 5))
        t0 = time.perf_counter()
        pf.on_layer(0, 1, None, None)  # supersedes the read in transfer: stopped
        pf.drain()
        took = time.perf_counter() - t0
    full = st.expert_nbytes(0) / 1e5
    assert took < 1.5 * full  # expert 6's read, not 5's remainder first
    assert pf.stats.revised == 1 and pf.stats.aborted == 1 and pf.stats.loaded == 1
    assert (1, 5) not in cache and (1, 6) in cache
