"""ProcessReader: expert reads in a helper process into shared-memory slots, equal to the store's
own reads; slots reused only once nothing holds them; stops, truncation and a dead helper
reported."""

import os
import signal

import pytest
import torch
from offload_models import tiny_model

from moelab.errors import ConfigError, OffloadError
from moelab.offload.cache import ExpertCache
from moelab.offload.live import OffloadedModel
from moelab.offload.prefetch import GateLookahead, Prefetcher
from moelab.offload.procreader import ProcessReader
from moelab.offload.quant import QuantWeight
from moelab.offload.store import ExpertStore, layer_file, supports_o_direct


def _equal(a, b):
    if isinstance(a, QuantWeight):
        return torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales) and a.shape == b.shape
    return torch.equal(a, b)


def _all(pr, wait=True):
    out = []
    while pr.outstanding:
        out += pr.poll(wait=wait)
    return out


def _tiers(d):
    return ["fadvise"] + (["direct"] if supports_o_direct(d) else [])


@pytest.mark.parametrize("precision", ["full", "int8", "int4"])
def test_reads_equal_the_stores_own(tmp_path, precision):
    d = ExpertStore.write(tiny_model(), tmp_path / precision, precision=precision)
    for tier in _tiers(tmp_path):
        st = ExpertStore(d, tier=tier)
        with ProcessReader(st, seg_slots=4) as pr:
            reqs = {pr.submit(layer, e, chunk=4096 * (e % 2)): (layer, e)
                    for layer in range(2) for e in range(8)}  # fmt: skip
            got = _all(pr)
            assert sorted(c.req for c in got) == sorted(reqs)
            for c in got:
                assert (c.layer, c.expert) == reqs[c.req] and not c.aborted and c.error is None
                ref = st.read(c.layer, c.expert)
                assert set(c.value) == set(ref)
                assert all(_equal(c.value[n], ref[n]) for n in ref), (tier, c.layer, c.expert)
            assert pr.reads == 16 and pr.slots() == 16  # all 16 held at once: 4 segments
        assert st.stats()["reads"] == 32  # 16 in the helper + 16 by read(), all counted
        st.close()


def test_slots_reused_only_when_released(model_and_store):
    m, _, d = model_and_store
    st = ExpertStore(d, tier="fadvise")
    with ProcessReader(st, seg_slots=2) as pr:
        pr.submit(0, 3)
        (held,) = _all(pr)
        for i in range(20):  # each value dropped at once: its slot comes back
            pr.submit(1, i % 8)
            (c,) = _all(pr)
            assert c.value["down_proj"].equal(m.blocks[1].ffn.experts.down_proj[i % 8])
            del c
        assert pr.slots() == 2  # one held, one recycled
        assert held.value["down_proj"].equal(m.blocks[0].ffn.experts.down_proj[3])  # untouched
        assert pr.spare_bytes() == pr.slot_bytes
        del held
        assert pr.spare_bytes() == 2 * pr.slot_bytes


def test_abort_before_start_and_bad_chunk(model_and_store):
    _, _, d = model_and_store
    st = ExpertStore(d, tier="fadvise")
    with ProcessReader(st) as pr:
        os.kill(pr._proc.pid, signal.SIGSTOP)  # the helper cannot start the reads yet
        try:
            a, b = pr.submit(0, 1), pr.submit(0, 2)
            pr.abort(a)
        finally:
            os.kill(pr._proc.pid, signal.SIGCONT)
        got = {c.req: c for c in _all(pr)}
        assert got[a].aborted and got[a].value is None
        assert not got[b].aborted and got[b].value is not None
        assert st.stats()["aborted"] == 1 and st.stats()["reads"] == 1
        with pytest.raises(ConfigError, match="chunk"):
            pr.submit(0, 1, chunk=-1)


def test_truncated_file_and_dead_helper_reported(model_and_store):
    _, _, d = model_and_store
    st = ExpertStore(d, tier="fadvise")
    with ProcessReader(st) as pr:
        os.truncate(d / layer_file(1), 4096)  # after opening: the helper's read comes up short
        pr.submit(1, 7)
        (c,) = _all(pr)
        assert c.value is None and isinstance(c.error, OffloadError)
        assert "short read" in str(c.error)
        pr._proc.kill()
        pr._proc.wait()
        with pytest.raises(OffloadError, match="reader process exited"):
            pr.submit(0, 0)


def test_only_file_tiers(model_and_store):
    _, _, d = model_and_store
    st = ExpertStore(d, tier="ram")
    with pytest.raises(ConfigError, match="no process reader"):
        ProcessReader(st)
    cache = ExpertCache(2, "lru", num_layers=2, num_experts=8, expert_bytes=1, top_k=2)
    with pytest.raises(ConfigError, match="loader='process'"):
        Prefetcher(st, cache, loader="process")
    with pytest.raises(ConfigError, match="loader="):
        Prefetcher(st, cache, loader="fork")
    with Prefetcher(st, cache) as pf:
        assert pf.loader == "thread"  # auto: the thread where no process reader exists


@pytest.mark.parametrize("loader", ["thread", "process"])
def test_live_decode_identical_with_either_loader(model_and_store, loader):
    m, ref, d = model_and_store
    x = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    want = ref.generate(x, 10)
    st = ExpertStore(d, tier="fadvise")
    cache = ExpertCache(2, "lru", num_layers=2, num_experts=8,
                        expert_bytes=st.expert_nbytes(0), top_k=2)  # fmt: skip
    pf = Prefetcher(st, cache, GateLookahead(), loader=loader)
    with OffloadedModel(m, st, cache, pf) as om:
        got = om.generate(x, 10)
        logits = m(got).logits
        s = om.stats()
    pf.close()
    assert pf.loader == loader
    assert torch.equal(got, want) and torch.equal(logits, ref(want).logits)
    assert s["prefetch"]["loaded"] > 0
    assert s["store"]["reads"] == s["prefetch"]["loaded"] + cache.counters.demand_loads
