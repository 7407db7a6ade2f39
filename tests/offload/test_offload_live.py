"""Live offloaded generation: greedy output identical to the all-resident model (exact mode)."""

import copy

import pytest
import torch
from offload_models import tiny_model

from moelab.errors import ConfigError, OffloadError
from moelab.offload.cache import ExpertCache
from moelab.offload.live import OffloadedModel
from moelab.offload.prefetch import (
    AdaptiveLookahead,
    Combined,
    GateLookahead,
    Prefetcher,
    PreviousToken,
)
from moelab.offload.store import ExpertStore


def wrap(m, d, capacity=2, predictor=None, policy="lru", keep=True, tier="fadvise"):
    st = ExpertStore(d, tier=tier)
    cache = ExpertCache(
        capacity, policy, num_layers=2, num_experts=8, expert_bytes=st.expert_nbytes(0), top_k=2
    )
    pf = Prefetcher(st, cache, predictor) if predictor is not None else None
    return OffloadedModel(m, st, cache, pf, keep=keep)


PREDICTORS = {
    "none": lambda: None,
    "gate": lambda: GateLookahead(),
    "prev": lambda: PreviousToken(),
    "gate+prev": lambda: Combined([GateLookahead(), PreviousToken()]),
    "adaptive": lambda: AdaptiveLookahead(),
}


@pytest.mark.parametrize("pred", list(PREDICTORS))
def test_exact_greedy_equality(model_and_store, pred):
    m, ref, d = model_and_store
    x = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(1))
    want = ref.generate(x, 12)
    with wrap(m, d, predictor=PREDICTORS[pred]()) as om:
        got = om.generate(x, 12)
        s = om.stats()
    assert torch.equal(got, want)
    for ph, tokens in (("prefill", 7), ("decode", 11)):
        p = s[ph]
        assert p["tokens"] == tokens
        assert p["needed"] == p["timely"] + p["late"] + p["misses"] > 0
    assert s["decode"]["steps"] == 11 and s["prefill"]["steps"] == 1
    if pred != "none":
        assert s["prefetch"]["requested"] > 0


def test_logits_bitwise_equal_and_no_cache_baseline(model_and_store):
    m, ref, d = model_and_store
    x = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(x).logits
    with wrap(m, d, keep=False) as om:
        with torch.no_grad():
            got = om.model(x).logits
        assert torch.equal(got, want)
        assert len(om.cache) == 0  # on-demand: nothing kept after a layer
        assert om.stats()["prefill"]["timely"] == 0


def test_full_capacity_is_all_timely_after_warmup(model_and_store):
    m, ref, d = model_and_store
    x = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(3))
    with wrap(m, d, capacity=8) as om:
        om.generate(x, 2)
        om.reset_stats()
        out = om.generate(x, 5)
        s = om.stats()
    assert torch.equal(out, ref.generate(x, 5))
    assert s["prefill"]["timely_hit_rate"] == 1.0 and s["decode"]["timely_hit_rate"] == 1.0
    assert s["cache"]["bytes_loaded"] == 0 and s["store"]["tier"] == "fadvise"


def test_recorded_routing_matches_reference(model_and_store):
    m, ref, d = model_and_store
    x = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(4))
    with wrap(m, d) as om:
        out = om.generate(x, 4)
        rec = om.recorded_expert_ids()
    with torch.no_grad():
        r = ref(out[:, :-1]).routing
    want = torch.stack([r[i].expert_ids for i in (0, 1)], 1).numpy()
    assert rec.shape == (8, 2, 2) and (rec == want).all()


def test_errors(model_and_store, tmp_path):
    m, _, d = model_and_store
    other = tiny_model(seed=5)
    with pytest.raises(OffloadError, match="router weights differ"):
        wrap(other, d)
    st = ExpertStore(d, tier="ram")
    cache = ExpertCache(2, "lru", num_layers=3, num_experts=8, top_k=2)
    with pytest.raises(OffloadError, match="3 layers"):
        OffloadedModel(m, st, cache)


def test_hf_mixtral_exact(tmp_path):
    tf = pytest.importorskip("transformers")
    cfg = tf.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    m = tf.MixtralForCausalLM(cfg).eval()
    ref = copy.deepcopy(m)
    d = ExpertStore.write(m, tmp_path / "mx")
    st = ExpertStore(d, tier="fadvise")
    cache = ExpertCache(
        2, "lru", num_layers=2, num_experts=4, expert_bytes=st.expert_nbytes(0), top_k=2
    )
    x = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    want = ref.generate(x, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with OffloadedModel(m, st, cache, Prefetcher(st, cache, GateLookahead())) as om:
        got = om.generate(x, 6)
        s = om.stats()
    assert torch.equal(got, want)
    assert s["decode"]["tokens"] == 5 and s["decode"]["needed"] > 0


def _trace_of(om, tokens):
    import numpy as np

    from moelab.trace.schema import Trace, TraceMeta

    ids = om.recorded_expert_ids().astype(np.int16)
    n = ids.shape[0]
    return Trace(
        meta=TraceMeta(num_layers=2, num_experts=8, top_k=2),
        token_id=np.asarray(tokens[:n], dtype=np.int64),
        doc_id=np.zeros(n, np.int64),
        position=np.arange(n, dtype=np.int32),
        domain=np.zeros(n, np.int16),
        is_bos=np.arange(n) == 0,
        expert_ids=ids,
        weights=np.full(ids.shape, 0.5, np.float32),
    )


@pytest.mark.parametrize("which", ["prev-layer", "prev-token"])
def test_fitted_predictor_live(model_and_store, which):
    from moelab.offload.prefetch import TracePredictorLive
    from moelab.predict import PreviousLayer
    from moelab.predict import PreviousToken as PrevTokenPredictor

    m, ref, d = model_and_store
    x = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(5))
    train_model = copy.deepcopy(ref)
    with wrap(train_model, d) as om:  # record a routing trace to fit on
        out = om.generate(x, 10)
        tr = _trace_of(om, out[0].tolist())
    pred = (PreviousLayer() if which == "prev-layer" else PrevTokenPredictor()).fit(tr)
    live = TracePredictorLive(pred)
    st = ExpertStore(d, tier="fadvise")
    cache = ExpertCache(
        2, "lru", num_layers=2, num_experts=8, expert_bytes=st.expert_nbytes(0), top_k=2
    )
    pf = Prefetcher(st, cache, live)
    pf.log = []
    with OffloadedModel(m, st, cache, pf) as om2:
        got = om2.generate(x, 10)
        rec = om2.recorded_expert_ids()
    pf.close()
    assert torch.equal(got, ref.generate(x, 10))
    assert pf.log and pf.stats.requested > 0
    for step, layer, t_step, t_layer, experts in pf.log:
        row = 5 + step  # the step's last row (prompt of 6 tokens, then one row per step)
        if which == "prev-layer":
            assert (t_step, t_layer) == (step, layer + 1)
            assert set(experts) == set(rec[row, layer].tolist())  # copies the source layer's set
        else:
            assert (t_step, t_layer) == (step + 1, layer)
            assert set(experts) == set(rec[row, layer].tolist())  # copies this token's set


def test_adaptive_falls_back_to_reuse_when_gate_is_wrong(model_and_store):
    from moelab.offload.sites import find_expert_sites

    m, _, _ = model_and_store
    pred = AdaptiveLookahead(decay=0.5)
    pred.bind(find_expert_sites(m))
    x = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    w = find_expert_sites(m)[1].router_weight()
    gate_top = set(torch.topk(x @ w.t(), 2).indices[0].tolist())
    other = [e for e in range(8) if e not in gate_top][:2]
    pred.on_layer(0, 0, x.repeat(3, 1), torch.tensor([[0, 1]] * 3))  # prefill
    pred.on_layer(0, 1, x.repeat(3, 1), torch.tensor([other] * 3))
    for step in range(1, 8):  # layer 1 keeps using `other`, never the gate's choice
        preds = pred.on_layer(step, 0, x, torch.tensor([[0, 1]]))
        pred.on_layer(step, 1, x, torch.tensor([other]))
    assert pred.p_gate < 0.01 and pred.p_prev > 0.99
    assert preds == [(7, 1, preds[0][2])] and set(preds[0][2]) == set(other)


def test_generate_offloaded_interleaved_repeats(tmp_path):
    from moelab.offload.live import generate_offloaded

    x = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    rep = generate_offloaded(
        tiny_model, x, 5, resident=2, prefetch="gate", store_dir=tmp_path / "s", repeats=3
    )
    ratios = rep["speed_vs_all_resident_repeats"]
    assert rep["repeats"] == 3 and len(ratios) == 3 and all(r > 0 for r in ratios)
    assert min(ratios) <= rep["speed_vs_all_resident"] <= max(ratios)
    assert rep["identical_to_all_resident"] is True
    assert rep["decode"]["tokens"] == 4  # counters are one run's, not summed over repeats
    with pytest.raises(OffloadError, match="repeats=0"):
        generate_offloaded(tiny_model, x, 5, store_dir=tmp_path / "s", repeats=0)


def test_default_resident_share_works_on_a_four_expert_top2_model(tmp_path):
    """25% of 4 experts is 1 < k = 2: the resident share is raised to k, not an error."""
    from moelab.offload.live import generate_offloaded

    x = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(4))
    rep = generate_offloaded(
        lambda: tiny_model(experts=4), x, 4, resident="25%", store_dir=tmp_path / "s"
    )
    assert rep["identical_to_all_resident"] is True
    assert rep["cache"]["capacity"] == 2  # k experts per layer


def test_probe_live_path_equals_the_generic_step():
    """TracePredictorLive asks a router-input probe through live_scores; it must name the same
    experts as the generic StepContext path (and live_scores equal predict_step)."""
    import numpy as np

    from moelab.offload.prefetch import TracePredictorLive
    from moelab.predict import Horizon, StepContext, make_predictor
    from moelab.trace.schema import Trace, TraceMeta

    rng = np.random.default_rng(0)
    n, L, E, k, D = 300, 3, 8, 2, 16
    h = rng.normal(size=(n, L, D)).astype(np.float32)
    w = rng.normal(size=(L, D, E))
    ids = np.argsort(-np.einsum("nld,lde->nle", h, w), -1)[..., :k].astype(np.int16)
    tr = Trace(
        meta=TraceMeta(num_layers=L, num_experts=E, top_k=k),
        token_id=rng.integers(0, 50, n).astype(np.int64), doc_id=np.arange(n) // 50,
        position=(np.arange(n) % 50).astype(np.int32), domain=np.zeros(n, np.int16),
        is_bos=np.arange(n) % 50 == 0, expert_ids=ids, weights=np.full(ids.shape, 0.5, np.float32),
        hidden={"router_input": h}, hidden_rows=np.arange(n),
    )  # fmt: skip
    p = make_predictor("probe-linear", Horizon(layers_ahead=1), epochs=3, batch_size=64).fit(tr)
    fast, slow = TracePredictorLive(p), TracePredictorLive(p)
    assert fast._direct
    slow._direct = False

    class Site:
        top_k, num_experts = k, E

    for live in (fast, slow):
        live.bind([Site()] * L)
    for t in range(6):
        toks = list(range(t + 1))
        fast.set_tokens(toks), slow.set_tokens(toks)
        for layer in range(L):
            x = torch.from_numpy(h[t : t + 1, layer])
            e = torch.from_numpy(ids[t : t + 1, layer].astype(np.int64))
            a, b = fast.on_layer(t, layer, x, e), slow.on_layer(t, layer, x, e)
            assert a == b and (layer == L - 1) == (a == [])
            if a:
                ctx = StepContext(np.asarray(toks), np.full((t + 1, L, k), -1, np.int16),
                                  layer + 1, {"router_input": h[t]})  # fmt: skip
                np.testing.assert_allclose(p.live_scores(layer + 1, h[t, layer]),
                                           p.predict_step(ctx), rtol=1e-6)  # fmt: skip


def _router_probe_trace(seed: int, n: int = 240, L: int = 3, E: int = 8, k: int = 2, D: int = 16):
    """A trace whose routing is a fixed linear map of its router inputs (so a linear probe can
    learn it): (trace, router inputs [n, L, D], expert ids [n, L, k])."""
    import numpy as np

    from moelab.trace.schema import Trace, TraceMeta

    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, L, D)).astype(np.float32)
    ids = np.argsort(-np.einsum("nld,lde->nle", h, rng.normal(size=(L, D, E))), -1)[..., :k]
    tr = Trace(
        meta=TraceMeta(num_layers=L, num_experts=E, top_k=k),
        token_id=rng.integers(0, 50, n).astype(np.int64), doc_id=np.arange(n) // 40,
        position=(np.arange(n) % 40).astype(np.int32), domain=np.zeros(n, np.int16),
        is_bos=np.arange(n) % 40 == 0, expert_ids=ids.astype(np.int16),
        weights=np.full(ids.shape, 0.5, np.float32), hidden={"router_input": h},
        hidden_rows=np.arange(n),
    )  # fmt: skip
    return tr, h, ids


def test_wrapping_probe_live_asks_for_the_next_tokens_first_layer():
    """After the last layer, a wrapping router-input probe names layer 0 of the next step
    (live_scores' top k); earlier layers still name this step's next layer."""
    import numpy as np

    from moelab.offload.prefetch import TracePredictorLive
    from moelab.predict import Horizon, make_predictor

    tr, h, ids = _router_probe_trace(seed=1)
    L, E, k = tr.meta.num_layers, tr.meta.num_experts, tr.meta.top_k
    p = make_predictor("probe-linear", Horizon(layers_ahead=1), wrap=True, epochs=3).fit(tr)
    live = TracePredictorLive(p)
    assert live._direct and live._wrap

    class Site:
        top_k, num_experts = k, E

    live.bind([Site()] * L)
    live.set_tokens([1, 2, 3])
    x = torch.from_numpy(h[5:6, L - 1])
    out = live.on_layer(2, L - 1, x, torch.from_numpy(ids[5:6, L - 1].astype(np.int64)))
    want = np.argsort(-p.live_scores(0, h[5, L - 1]), kind="stable")[:k].tolist()
    assert out == [(3, 0, want)]
    mid = live.on_layer(2, 0, torch.from_numpy(h[5:6, 0]), torch.zeros(1, k, dtype=torch.long))
    assert [(a, b) for a, b, _ in mid] == [(2, 1)]


def test_probe_live_names_nothing_from_a_non_finite_router_input():
    """A NaN router input gives NaN logits: the live probe names no expert rather than a
    ranking of NaNs (which torch.topk would order first)."""

    from moelab.offload.prefetch import TracePredictorLive
    from moelab.predict import Horizon, make_predictor

    tr, h, _ = _router_probe_trace(seed=3)
    L, E, k = tr.meta.num_layers, tr.meta.num_experts, tr.meta.top_k
    p = make_predictor("probe-linear", Horizon(layers_ahead=1), epochs=2).fit(tr)

    class Site:
        top_k, num_experts = k, E

    live = TracePredictorLive(p)
    live.bind([Site()] * L)
    live.set_tokens([1])
    x = torch.from_numpy(h[0:1, 0].copy())
    assert len(live.on_layer(0, 0, x, torch.zeros(1, k))[0][2]) == k
    x[0, 3] = float("nan")
    assert live.on_layer(0, 0, x, torch.zeros(1, k)) == []


def test_probe_live_with_min_score_names_only_likely_experts(tmp_path):
    """`min_score` keeps the top-k experts scored at least that (none: no prediction); the
    spec DIR:min=P builds it, and a P that is no number is refused."""
    import numpy as np

    from moelab.offload.prefetch import TracePredictorLive, make_live_predictor
    from moelab.predict import Horizon, make_predictor

    tr, h, _ = _router_probe_trace(seed=2)
    L, E, k = tr.meta.num_layers, tr.meta.num_experts, tr.meta.top_k
    p = make_predictor("probe-linear", Horizon(layers_ahead=1), epochs=3).fit(tr)

    class Site:
        top_k, num_experts = k, E

    named = {0.0: 0, 0.5: 0, 1.0: 0}
    for i in range(40):
        s = p.live_scores(1, h[i, 0])
        top = np.argsort(-s, kind="stable")[:k]
        for level in named:
            live = TracePredictorLive(p, min_score=level)
            live.bind([Site()] * L)
            live.set_tokens([1])
            out = live.on_layer(0, 0, torch.from_numpy(h[i : i + 1, 0]), torch.zeros(1, k))
            want = [int(e) for e in top if s[e] >= level]
            assert out == ([(0, 1, want)] if want else [])
            named[level] += len(want)
    assert named[0.0] == 40 * k and 0 < named[0.5] < 40 * k and named[1.0] == 0
    p.save(tmp_path / "probe")
    live = make_live_predictor(f"{tmp_path / 'probe'}:min=0.6")
    assert live.min_score == 0.6 and live.name.endswith(":min=0.6")
    with pytest.raises(ConfigError, match="DIR:min=P"):
        make_live_predictor(f"{tmp_path / 'probe'}:min=high")
    with pytest.raises(ConfigError, match="min_score=1.5"):
        TracePredictorLive(p, min_score=1.5)


def test_revised_two_layer_guesses_keep_the_output_exact(tmp_path):
    """On a 3-layer model the gate's two-layer guess for layer 2 (asked after layer 0) is
    revised by its one-layer guess (after layer 1) wherever they differ: a teacher-forced
    decode of random tokens through the offloaded model gives bitwise the all-resident
    log-probabilities, and the revisions are counted."""
    import numpy as np

    from moelab.offload.measure import teacher_forced

    m = tiny_model(seed=3, layers=3)
    ref = copy.deepcopy(m)
    d = tmp_path / "store"
    ExpertStore.write(m, d)
    toks = np.random.default_rng(4).integers(0, 97, 40)
    want = teacher_forced(ref, toks)
    st = ExpertStore(d, tier="throttle", bandwidth=5e6)  # ~5 ms an expert: guesses wait queued
    cache = ExpertCache(2, "lru", num_layers=3, num_experts=8,
                        expert_bytes=st.expert_nbytes(0), top_k=2)  # fmt: skip
    pf = Prefetcher(st, cache, GateLookahead((1, 2)), chunk_bytes=4096)
    with OffloadedModel(m, st, cache, pf) as om:
        got = teacher_forced(m, toks, om)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert pf.stats.revised > 0 and pf.stats.loaded > 0
