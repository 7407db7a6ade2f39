"""ExpertStore: byte-identical round trip on every tier, honest slow tier, clear errors."""

import os
import time

import pytest
import torch
from offload_models import tiny_model

from moelab.errors import ConfigError, OffloadError
from moelab.offload.sites import find_expert_sites
from moelab.offload.store import ExpertStore, layer_file, supports_o_direct


@pytest.mark.parametrize("tier", ["auto", "fadvise", "ram", "direct"])
def test_round_trip_byte_identical(model_and_store, tier):
    m, _, d = model_and_store
    if tier == "direct" and not supports_o_direct(d):
        pytest.skip("filesystem without O_DIRECT")
    with ExpertStore(d, tier=tier) as st:
        assert st.tier in ("direct", "fadvise", "ram")
        sites = find_expert_sites(m)
        for s in sites:
            for e in range(s.num_experts):
                got = st.read(s.layer, e)
                want = s.experts.expert_params(e)
                for name in ("gate_up_proj", "down_proj"):
                    assert got[name].shape == want[name].shape
                    assert got[name].dtype == want[name].dtype
                    assert (
                        got[name]
                        .contiguous()
                        .view(torch.uint8)
                        .equal(want[name].contiguous().view(torch.uint8))
                    )
        stats = st.stats()
        assert stats["reads"] == 16 and stats["bytes"] == 16 * st.expert_nbytes(0)
        assert st.expert_nbytes(0) == sites[0].experts.expert_nbytes()


def test_expert_tensors_contiguous_in_file(model_and_store):
    _, _, d = model_and_store
    st = ExpertStore(d, tier="ram")
    ranges = st._ranges[0]
    for a, b in zip(ranges, ranges[1:], strict=False):
        assert a.end == b.start  # expert e's tensors, then expert e+1's
    assert ranges[0].nbytes == 4 * (128 * 32 + 32 * 64)


def test_throttle_tier_is_slow(model_and_store):
    _, _, d = model_and_store
    bw = 2e6  # bytes/s
    st = ExpertStore(d, tier="throttle", bandwidth=bw, latency=0.002)
    nb = st.expert_nbytes(0)
    t0 = time.perf_counter()
    for e in range(4):
        st.read(0, e)
    dt = time.perf_counter() - t0
    assert dt >= 4 * (0.002 + nb / bw) * 0.95
    assert st.stats()["bytes_per_s"] < bw
    with pytest.raises(ConfigError, match="bandwidth"):
        ExpertStore(d, tier="throttle")


def test_missing_and_truncated_files(model_and_store):
    _, _, d = model_and_store
    f = d / layer_file(1)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(OffloadError, match="truncated"):
        ExpertStore(d)
    os.remove(f)
    with pytest.raises(OffloadError, match="missing"):
        ExpertStore(d)
    with pytest.raises(OffloadError, match="manifest.json"):
        ExpertStore(d / "nowhere")


@pytest.mark.parametrize("tier", ["fadvise", "ram", "direct"])
def test_recycled_buffers_never_overwrite_held_experts(model_and_store, tier):
    """Reads recycle buffers of dropped results only: every expert still held keeps its bytes."""
    m, _, d = model_and_store
    if tier == "direct" and not supports_o_direct(d):
        pytest.skip("filesystem without O_DIRECT")
    sites = find_expert_sites(m)
    want = {(s.layer, e): s.experts.expert_params(e) for s in sites for e in range(s.num_experts)}
    with ExpertStore(d, tier=tier) as st:
        held = {}
        for rnd in range(3):
            for key in want:
                w = st.read(*key)
                if (key[1] + rnd) % 3 == 0:
                    held[key] = w  # kept like a cache entry; the others are dropped at once
        for key, w in held.items():
            for name in ("gate_up_proj", "down_proj"):
                assert torch.equal(w[name], want[key][name])
        s = st.stats()
        assert s["buffers_reused"] > 0
        assert s["buffers_reused"] + s["buffers_allocated"] == s["reads"]
        assert (
            s["spare_buffer_bytes"]
            <= 2 * max(st.expert_nbytes(i) for i in range(len(sites))) + 8192
        )


def test_read_out_of_range(model_and_store):
    _, _, d = model_and_store
    st = ExpertStore(d, tier="ram")
    with pytest.raises(OffloadError, match="expert 8 out of range"):
        st.read(0, 8)
    with pytest.raises(OffloadError, match="layer 5"):
        st.read(5, 0)


def test_model_store_mismatch(model_and_store):
    m, _, d = model_and_store
    st = ExpertStore(d, tier="ram")
    st.check_model(find_expert_sites(m))  # matches
    with pytest.raises(OffloadError, match="4 experts"):
        st.check_model(find_expert_sites(tiny_model(experts=4)))
    with pytest.raises(OffloadError, match="MoE layers"):
        st.check_model(find_expert_sites(tiny_model(layers=3)))
    with pytest.raises(OffloadError, match="router weights differ"):
        st.check_model(find_expert_sites(tiny_model(seed=1)))


def test_shared_experts_stay_resident(tmp_path):
    m = tiny_model(shared=1)
    d = ExpertStore.write(m, tmp_path / "s")
    st = ExpertStore(d, tier="ram")
    assert st.num_experts == [8, 8]  # routed only; the shared expert is not in the store
    assert all(b.ffn.shared_experts is not None for b in m.blocks)


@pytest.mark.parametrize("tier", ["fadvise", "ram", "direct", "throttle"])
def test_chunked_read_is_identical_and_abortable(model_and_store, tier):
    _, _, d = model_and_store
    if tier == "direct" and not supports_o_direct(d):
        pytest.skip("filesystem without O_DIRECT")
    kw = {"bandwidth": 1e8} if tier == "throttle" else {}
    with ExpertStore(d, tier=tier, **kw) as st:
        nb = st.expert_nbytes(0)
        assert nb > 4096 * 2  # several 4 kB pieces
        whole = st.read(1, 3)
        asked = []
        part = st.read(1, 3, chunk=4096, abort=lambda: asked.append(1) and False)
        r = st._ranges[1][3]
        span = -(-r.end // 4096) * 4096 - r.start // 4096 * 4096 if st.tier == "direct" else nb
        assert len(asked) == -(-span // 4096) - 1  # asked after every piece but the last
        for name in ("gate_up_proj", "down_proj"):
            assert part[name].view(torch.uint8).equal(whole[name].view(torch.uint8))
        calls = []
        assert st.read(1, 4, chunk=4096, abort=lambda: calls.append(1) or len(calls) >= 2) is None
        assert len(calls) == 2  # stopped after the second piece
        s = st.stats()
        assert s["reads"] == 2 and s["aborted"] == 1 and s["bytes"] == 2 * nb
        with pytest.raises(ConfigError, match="chunk"):
            st.read(0, 0, chunk=-1)
