"""The issue-17 policies in live offloaded generation: same ExpertCache, exact greedy output,
predictor hints reaching predictor-aware eviction, staged prefetches, warm starts."""

import pytest
import torch

from moelab.offload.cache import ExpertCache
from moelab.offload.live import OffloadedModel
from moelab.offload.prefetch import GateLookahead, Prefetcher
from moelab.offload.store import ExpertStore


@pytest.mark.parametrize(
    ("policy", "capacity", "per_layer", "staging"),
    [
        ("predict", 3, True, 0),
        ("arc", 2, True, 0),
        ("s3fifo", 6, False, 0),
        ("lfuda", 3, True, 1),
        ("lirs", 5, False, 1),
    ],
)
def test_live_generation_is_exact(model_and_store, policy, capacity, per_layer, staging):
    m, ref, d = model_and_store
    x = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    want = ref.generate(x, 10)
    st = ExpertStore(d, tier="ram")
    cache = ExpertCache(
        capacity, policy, per_layer, num_layers=2, num_experts=8,
        expert_bytes=st.expert_nbytes(0), top_k=2, staging=staging,
    )  # fmt: skip
    pf = Prefetcher(st, cache, GateLookahead())
    with OffloadedModel(m, st, cache, pf) as om:
        got = om.generate(x, 10)
        s = om.stats()
    pf.close()
    st.close()
    assert torch.equal(got, want)
    c = s["cache"]
    assert c["hits"] + c["misses"] == s["prefill"]["needed"] + s["decode"]["needed"]
    assert c["resident"] <= (capacity * (2 if per_layer else 1))
    if policy == "predict":
        pol = cache._policies[1]
        shown = sum(pol.calibration(1)[1]) - len(pol.calibration(1)[1])  # minus the priors
        assert shown > 0  # the gate lookahead's predictions were scored against real routing


def test_live_warm_start_preloads(model_and_store, tmp_path):
    m, ref, d = model_and_store
    x = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(4))
    st = ExpertStore(d, tier="ram")
    first = ExpertCache(2, "decay-lfu", num_layers=2, num_experts=8, top_k=2,
                        expert_bytes=st.expert_nbytes(0))  # fmt: skip
    with OffloadedModel(m, st, first) as om:
        om.generate(x, 6)
    path = first.save_usage(tmp_path / "usage.json")
    from moelab.offload.cache import load_usage

    counts = load_usage(path, 2, 8)
    warm = ExpertCache(2, "decay-lfu", num_layers=2, num_experts=8, top_k=2,
                       expert_bytes=st.expert_nbytes(0))  # fmt: skip
    keys = warm.warm_start(counts, read=st.read)
    assert len(keys) == 4 and warm.counters.bytes_loaded == 0
    for layer in range(2):
        best = sorted(range(8), key=lambda e: -counts[layer, e])[:2]
        assert {e for (lay, e) in keys if lay == layer} == set(best)
        assert all(isinstance(warm.peek((layer, e)), dict) for e in best)
    st.close()
