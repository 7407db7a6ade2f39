"""Predictors: exactness checks, n-gram backoff, no peeking at test rows or future information,
save/load round trips, the per-step API and the missing-hidden-states error."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from moelab.errors import ConfigError, PredictorError
from moelab.predict import (
    GateLookahead,
    Horizon,
    MarkovPredictor,
    NGramPredictor,
    Predictor,
    PreviousLayer,
    PreviousToken,
    StepContext,
    make_predictor,
    split_by_document,
)
from moelab.predict.base import source_rows
from moelab.trace.schema import Trace, TraceMeta

FAST = {"epochs": 2, "batch_size": 128}

# (registry name, horizon, options) covering every predictor class
CASES = [
    ("prior", Horizon(layers_ahead=1), {}),
    ("prev-layer", Horizon(layers_ahead=2), {}),
    ("prev-token", Horizon(tokens_ahead=1), {}),
    ("markov", Horizon(layers_ahead=1), {}),
    ("markov", Horizon(tokens_ahead=1), {}),
    ("ngram2", Horizon(layers_ahead=1), {}),
    ("ngram-set", Horizon(tokens_ahead=1), {}),
    ("gate-lookahead", Horizon(layers_ahead=1), {}),
    ("gate-lookahead-residual", Horizon(layers_ahead=2), {}),
    ("token-mlp", Horizon(layers_ahead=1), FAST),
    ("token-mlp-sets", Horizon(tokens_ahead=1), FAST),
    ("probe-linear", Horizon(layers_ahead=1), FAST),
    ("probe-mlp", Horizon(layers_ahead=2), {**FAST, "hidden": 16}),
    ("probe-shared", Horizon(layers_ahead=1), FAST),
    ("probe-linear", Horizon(layers_ahead=1), {**FAST, "wrap": True}),
    ("temporal-mlp", Horizon(tokens_ahead=1), {**FAST, "hidden": 16}),
]


def _case_id(case) -> str:
    name, horizon, opts = case
    return f"{name}-{horizon}{'-wrap' if opts.get('wrap') else ''}"


def _fit(name, horizon, opts, gates, train):
    return make_predictor(name, horizon, gates=gates, seed=0, **opts).fit(train)


def _topk_sets(scores, k):
    return np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :k], axis=1)


def test_horizon_validation_and_parse():
    assert Horizon.parse("d=2") == Horizon(layers_ahead=2)
    assert Horizon.parse("t+1") == Horizon(tokens_ahead=1)
    assert Horizon().kind == "identity" and str(Horizon(tokens_ahead=1)) == "t+1"
    with pytest.raises(ConfigError, match="at most one"):
        Horizon(layers_ahead=1, tokens_ahead=1)
    with pytest.raises(ConfigError, match="expected"):
        Horizon.parse("x3")
    with pytest.raises(ConfigError, match="does not support"):
        PreviousLayer(Horizon(tokens_ahead=1))


def test_gate_lookahead_d0_reproduces_routing_exactly(synth):
    trace, gates, _, _ = synth
    p = GateLookahead(Horizon(), gates=gates).fit(trace)
    for layer in range(trace.meta.num_layers):
        s = p.predict_scores(trace, layer)
        assert not np.isnan(s).any()
        assert np.array_equal(_topk_sets(s, 2), np.sort(trace.expert_ids[:, layer], axis=1))


def test_gate_lookahead_matches_manual_formula(synth):
    trace, gates, train, test = synth
    p = GateLookahead(Horizon(layers_ahead=2), gates=gates, point="residual").fit(train)
    s = p.predict_scores(test, 3)
    hi = np.full(test.num_tokens, -1)
    hi[test.hidden_rows] = np.arange(len(test.hidden_rows))
    want = gates.scores(3, gates.normalize(3, test.hidden["residual"][hi, 1]))
    np.testing.assert_allclose(s, want, rtol=1e-6)
    assert np.isnan(p.predict_scores(test, 1)).all()  # layer < d: no source


def test_missing_hidden_states_error(synth):
    trace, gates, train, test = synth
    bare = dataclasses.replace(test, hidden={}, hidden_rows=None)
    p = GateLookahead(Horizon(layers_ahead=1), gates=gates).fit(train)
    with pytest.raises(PredictorError, match="--hidden-layers all"):
        p.predict_scores(bare, 2)
    with pytest.raises(PredictorError, match="moelab trace"):
        make_predictor("probe-linear", Horizon(layers_ahead=1), **FAST).fit(
            dataclasses.replace(train, hidden={}, hidden_rows=None)
        )
    # a store that kept hidden states of some layers only holds NaN for the others
    part = dataclasses.replace(train, hidden={k: v.copy() for k, v in train.hidden.items()})
    part.hidden["router_input"][:, 1] = np.nan
    with pytest.raises(PredictorError, match=r"missing \(NaN\) for source MoE layers \[1\]"):
        make_predictor("probe-linear", Horizon(layers_ahead=1), **FAST).fit(part)
    g = GateLookahead(Horizon(layers_ahead=1), gates=gates).fit(part)
    assert (
        np.isnan(g.predict_scores(part, 2)).all() and not np.isnan(g.predict_scores(part, 3)).any()
    )
    with pytest.raises(PredictorError, match="no gates"):
        GateLookahead(Horizon(layers_ahead=1)).fit(train)


def test_copy_baselines_are_exact_copies(synth):
    _, _, train, test = synth
    p = PreviousLayer(Horizon(layers_ahead=1)).fit(train)
    s = p.predict_scores(test, 2)
    assert np.array_equal(_topk_sets(s, 2), np.sort(test.expert_ids[:, 1], axis=1))
    q = PreviousToken().fit(train)
    s = q.predict_scores(test, 0)
    src = source_rows(test, 1)
    assert np.isnan(s[src < 0]).all() and not np.isnan(s[src >= 0]).any()
    assert (src < 0).sum() == np.unique(test.doc_id).size  # first token of every document
    ok = src >= 0
    assert np.array_equal(_topk_sets(s[ok], 2), np.sort(test.expert_ids[src[ok], 0], axis=1))


def _tiny_trace(docs, experts, num_experts=4):
    """Trace with L=1, k=2 from token-id lists and per-token expert pairs."""
    tok = np.concatenate([np.array(d) for d in docs])
    doc = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    pos = np.concatenate([np.arange(len(d)) for d in docs]).astype(np.int32)
    ex = np.array([e for es in experts for e in es], np.int16)[:, None, :]
    meta = TraceMeta(num_layers=1, num_experts=num_experts, top_k=2, split="train")
    n = tok.size
    return Trace(
        meta, tok, doc, pos, np.zeros(n, np.int16), pos == 0, ex, np.full(ex.shape, 0.5, np.float32)
    )


def test_ngram_backoff():
    a, b = (0, 1), (2, 3)
    docs = [[5, 7]] * 2 + [[6, 7]] * 3 + [[8, 9]] * 3
    experts = [[b, a]] * 2 + [[b, b]] * 3 + [[a, b]] * 3
    train = _tiny_trace(docs, experts)
    test = _tiny_trace([[5, 7], [6, 7], [9, 7], [11, 11]], [[a, a]] * 4)
    h = Horizon(layers_ahead=0)
    p = NGramPredictor(h, n=2, min_count=2).fit(train)
    used, _ = p.lookup(test)
    # rows: (<s>,5),(5,7) | (<s>,6),(6,7) | (<s>,9),(9,7) | (<s>,11),(11,11); <s> = document start
    assert used.tolist() == [2, 2, 2, 2, 1, 1, 0, 0]
    top = _topk_sets(p.predict_scores(test, 0), 2)
    assert top[1].tolist() == [0, 1]  # bigram (5,7) -> {0,1}
    assert top[3].tolist() == [2, 3]  # bigram (6,7) -> {2,3}
    assert top[5].tolist() == [2, 3]  # unseen bigram (9,7) backs off to unigram 7 -> {2,3} (3 of 5)
    prior = p.tables["prior"][0]
    np.testing.assert_allclose(
        p.predict_scores(test, 0)[6], prior, rtol=1e-6
    )  # unseen token -> prior
    # the count threshold: bigram (5,7) seen twice is dropped at min_count=3 -> unigram answer
    p3 = NGramPredictor(h, n=2, min_count=3).fit(train)
    assert p3.lookup(test)[0].tolist()[:4] == [0, 1, 2, 2]
    assert _topk_sets(p3.predict_scores(test, 0), 2)[1].tolist() == [2, 3]
    assert p3.size()["contexts_per_order"] == {"order1": 4, "order2": 4}
    # temporal: the context ends at the previous token; (5) -> next token's set {0,1} (2 of 2)
    pt = NGramPredictor(Horizon(tokens_ahead=1), n=1, min_count=1).fit(train)
    s = pt.predict_scores(test, 0)
    assert np.isnan(s[0]).all() and _topk_sets(s[[1]], 2)[0].tolist() == [0, 1]
    assert _topk_sets(s[[3]], 2)[0].tolist() == [2, 3]  # after 6 came {2,3}


def test_markov_learns_deterministic_transitions():
    rng = np.random.default_rng(0)
    n = 400
    src = np.sort(np.stack([rng.choice(6, 2, replace=False) for _ in range(n)]), axis=1)
    tgt = (src + 1) % 6
    ex = np.stack([src, tgt], axis=1).astype(np.int16)
    meta = TraceMeta(num_layers=2, num_experts=6, top_k=2, split="train")
    tr = Trace(
        meta,
        np.zeros(n, np.int64),
        np.arange(n),
        np.zeros(n, np.int32),
        np.zeros(n, np.int16),
        np.ones(n, bool),
        ex,
        np.full(ex.shape, 0.5, np.float32),
    )
    p = MarkovPredictor(Horizon(layers_ahead=1)).fit(tr)
    assert np.array_equal(_topk_sets(p.predict_scores(tr, 1), 2), np.sort(tgt, axis=1))
    assert p.size()["contexts"] <= 15


@pytest.mark.parametrize("name,horizon,opts", CASES, ids=[_case_id(c) for c in CASES])
def test_round_trip_no_future_and_step(name, horizon, opts, synth, tmp_path):
    trace, gates, train, test = synth
    p = _fit(name, horizon, opts, gates, train)
    layers = p.target_layers()
    before = {layer: p.predict_scores(test, layer) for layer in layers}
    for layer in layers:
        assert before[layer].shape == (test.num_tokens, 8)
        ok = ~np.isnan(before[layer]).any(1)
        assert ok.sum() > test.num_tokens // 2
    # save/load: identical predictions
    p.save(tmp_path / "p")
    q = Predictor.load(tmp_path / "p")
    assert type(q) is type(p) and q.horizon == p.horizon
    for layer in layers:
        np.testing.assert_array_equal(q.predict_scores(test, layer), before[layer])
    # information not available at prediction time must not matter
    layer = layers[-1]
    fut = dataclasses.replace(
        test,
        expert_ids=test.expert_ids.copy(),
        token_id=test.token_id.copy(),
        hidden={k: v.copy() for k, v in test.hidden.items()},
    )
    rng = np.random.default_rng(5)
    if horizon.kind == "temporal":
        # scramble everything of the target row except what earlier rows reveal: make every
        # row's own experts/hidden garbage and check one row's prediction against the original
        # using a trace where only that row differs
        src = source_rows(test, horizon.tokens_ahead)
        rows = np.flatnonzero(src >= 0)[:20]
        for r in rows:
            one = dataclasses.replace(
                test, expert_ids=test.expert_ids.copy(), token_id=test.token_id.copy()
            )
            one.expert_ids[r] = rng.integers(0, 8, size=one.expert_ids[r].shape)
            one.token_id[r] = 0
            np.testing.assert_array_equal(p.predict_scores(one, layer)[r], before[layer][r])
    else:
        s = layer - horizon.layers_ahead
        fut.expert_ids[:, s + 1 :] = rng.integers(0, 8, size=fut.expert_ids[:, s + 1 :].shape)
        for v in fut.hidden.values():
            v[:, s + 1 :] = rng.normal(size=v[:, s + 1 :].shape)
        np.testing.assert_array_equal(p.predict_scores(fut, layer), before[layer])
    # per-step API gives the batch answer
    hi = np.full(test.num_tokens, -1)
    if test.hidden_rows is not None:
        hi[test.hidden_rows] = np.arange(len(test.hidden_rows))
    checked = 0
    for r in np.flatnonzero(~np.isnan(before[layer]).any(1))[:5]:
        end = r + 1 - horizon.tokens_ahead
        start = end - int(test.position[end - 1]) - 1
        ex = test.expert_ids[start:end].copy()
        if horizon.kind != "temporal":
            ex[-1, layer - horizon.layers_ahead + 1 :] = -1
        hid = {k: v[hi[end - 1]] for k, v in test.hidden.items()} if hi[end - 1] >= 0 else {}
        w = test.weights[start:end]
        resized, orig = [], torch.set_num_threads
        torch.set_num_threads = lambda n, _r=resized, _o=orig: _r.append(n) or _o(n)
        try:
            got = p.predict_step(StepContext(test.token_id[start:end], ex, layer, hid, w))
        finally:
            torch.set_num_threads = orig
        assert resized == []  # one live step never resizes torch's thread pool
        np.testing.assert_allclose(got, before[layer][r], rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked > 0
    c = p.cost(test)
    assert (
        c.params > 0 and c.bytes >= c.params and np.isfinite(c.us_per_token) and c.us_per_token > 0
    )


@pytest.mark.parametrize("name,horizon,opts", CASES[::2], ids=[_case_id(c) for c in CASES[::2]])
def test_fit_never_sees_test_rows(name, horizon, opts, synth):
    """Poison the test documents' routing in the source trace: fitted predictions are unchanged."""
    trace, gates, _, _ = synth
    fr = {"train": 0.7, "test": 0.3}
    clean = split_by_document(trace, fr, seed=0)
    poisoned_full = dataclasses.replace(
        trace, expert_ids=trace.expert_ids.copy(), token_id=trace.token_id.copy()
    )
    test_rows = np.isin(trace.doc_id, np.unique(clean["test"].doc_id))
    poisoned_full.expert_ids[test_rows] = 7 - poisoned_full.expert_ids[test_rows]
    poisoned_full.expert_ids[test_rows, :, 1] = 0
    poisoned_full.token_id[test_rows] = 3
    poisoned = split_by_document(poisoned_full, fr, seed=0)
    assert np.array_equal(poisoned["train"].expert_ids, clean["train"].expert_ids)
    a = _fit(name, horizon, opts, gates, clean["train"])
    b = _fit(name, horizon, opts, gates, poisoned["train"])
    for layer in a.target_layers():
        np.testing.assert_array_equal(
            a.predict_scores(clean["test"], layer), b.predict_scores(clean["test"], layer)
        )


def test_not_fitted_and_shape_mismatch(synth):
    _, gates, train, test = synth
    p = NGramPredictor(Horizon(layers_ahead=1))
    with pytest.raises(PredictorError, match="not fitted"):
        p.predict_scores(test, 1)
    p.fit(train)
    with pytest.raises(PredictorError, match="outside"):
        p.predict_scores(test, 9)
    other = dataclasses.replace(
        test, meta=dataclasses.replace(test.meta, num_experts=16), logits=None
    )
    with pytest.raises(PredictorError, match="E=16"):
        p.predict_scores(other, 1)
    with pytest.raises(PredictorError, match="not a saved predictor"):
        Predictor.load("/nonexistent/dir")


@pytest.mark.parametrize("high", [8, 10**7])
def test_lookup_sets_matches_dict(high):
    """Both paths of lookup_sets (integer keys; np.unique for huge ids) agree with a dict."""
    from moelab.predict.markov import lookup_sets

    rng = np.random.default_rng(0)
    vals = np.concatenate([[-1], rng.integers(0, high, 6)])
    table = np.unique(np.sort(rng.choice(vals, (40, 3)), 1), axis=0)
    query = np.sort(rng.choice(vals, (500, 3)), 1)
    ref = {tuple(r): i for i, r in enumerate(table.tolist())}
    want = [ref.get(tuple(r), -1) for r in query.tolist()]
    got = lookup_sets(table, query)
    assert got.tolist() == want and (got >= 0).any() and (got < 0).any()


def _wrap_trace(n_docs=40, doc_len=30, L=3, E=8, k=2, D=16, seed=0):
    """Routing where the NEXT token's layer-0 experts are the top-k of a fixed map of this
    token's last-layer router input (what a wrapping probe must learn) and other layers route
    from their own input."""
    rng = np.random.default_rng(seed)
    n = n_docs * doc_len
    h = rng.normal(size=(n, L, D)).astype(np.float32)
    w = rng.normal(size=(L, D, E))
    ids = np.argsort(-np.einsum("nld,lde->nle", h, w), -1)[..., :k].astype(np.int16)
    w_next = rng.normal(size=(D, E))
    nxt = np.argsort(-(h[:, L - 1] @ w_next), -1)[:, :k].astype(np.int16)
    pos = np.arange(n) % doc_len
    ids[1:, 0][pos[1:] > 0] = nxt[:-1][pos[1:] > 0]  # token i's layer 0 from token i-1
    return Trace(
        meta=TraceMeta(num_layers=L, num_experts=E, top_k=k),
        token_id=rng.integers(0, 50, n).astype(np.int64), doc_id=np.arange(n) // doc_len,
        position=pos.astype(np.int32), domain=np.zeros(n, np.int16), is_bos=pos == 0,
        expert_ids=ids, weights=np.full(ids.shape, 0.5, np.float32),
        hidden={"router_input": h}, hidden_rows=np.arange(n),
    )  # fmt: skip


def test_wrapping_probe_names_the_next_tokens_first_layer(tmp_path):
    """wrap=True: target layer 0 of token i comes from token i-1's last-layer input (NaN at a
    document start), is learned on held-out documents, ignores token i's own information, and
    survives save/load; the plain probe has no layer-0 target."""
    tr = _wrap_trace()
    parts = split_by_document(tr, {"train": 0.75, "test": 0.25}, seed=0)
    train, test = parts["train"], parts["test"]
    opts = {"epochs": 40, "batch_size": 64, "lr": 1e-2, "patience": 5}
    p = make_predictor("probe-linear", Horizon(layers_ahead=1), wrap=True, **opts).fit(train)
    plain = make_predictor("probe-linear", Horizon(layers_ahead=1), **opts).fit(train)
    assert p.target_layers() == [0, 1, 2] and plain.target_layers() == [1, 2]
    assert p.describe() == "probe(linear,per-layer,wrap)"
    s0 = p.predict_scores(test, 0)
    start = test.prev_row() < 0
    assert np.isnan(s0[start]).all() and np.isfinite(s0[~start]).all()
    # the score of row i is the map of row i-1's last-layer input
    i = int(np.flatnonzero(~start)[3])
    np.testing.assert_allclose(
        s0[i], p.live_scores(0, test.hidden["router_input"][i - 1, 2]), rtol=1e-5, atol=1e-6
    )
    # held-out recall of the next token's layer 0: far above chance (k/E = 0.25)
    top = np.argsort(-s0[~start], 1)[:, :2]
    truth = test.expert_ids[~start, 0]
    recall = np.mean([len(set(a) & set(b)) / 2 for a, b in zip(top, truth, strict=True)])
    assert recall > 0.8, recall
    # token i's own routing and hidden states do not enter its layer-0 prediction
    fut = dataclasses.replace(
        test,
        expert_ids=test.expert_ids.copy(),
        hidden={"router_input": test.hidden["router_input"].copy()},
    )
    fut.expert_ids[i] = 7 - fut.expert_ids[i]
    fut.hidden["router_input"][i] = 0.0
    np.testing.assert_array_equal(p.predict_scores(fut, 0)[i], s0[i])
    with pytest.raises(PredictorError, match="no source layer"):
        plain.live_scores(0, test.hidden["router_input"][0, 2])
    p.save(tmp_path / "w")
    q = Predictor.load(tmp_path / "w")
    assert q.wrap and q.target_layers() == [0, 1, 2]
    np.testing.assert_array_equal(q.predict_scores(test, 0), s0)
    with pytest.raises(ConfigError, match="wrap"):
        make_predictor("probe-linear", Horizon(), wrap=True)
    with pytest.raises(ConfigError, match="wrap"):
        make_predictor("probe-linear", Horizon(layers_ahead=1), wrap="yes")


@pytest.mark.parametrize("name", ["probe-linear", "probe-shared", "probe-mlp"])
def test_live_scores_equal_the_torch_map(name, synth):
    """live_scores' numpy product (linear probes) equals the torch map it replaces, and
    live_logits is that map before the sigmoid (the live prefetch path ranks logits)."""
    _, gates, train, test = synth
    p = make_predictor(
        name, Horizon(layers_ahead=1), **FAST, **({"hidden": 8} if name == "probe-mlp" else {})
    ).fit(train)
    h = test.hidden["router_input"]
    for layer in p.target_layers():
        src = layer - 1
        for r in range(3):
            np.testing.assert_allclose(
                p.live_scores(layer, h[r, src]), p._group_scores(h[r : r + 1, src], src)[0],
                rtol=1e-5, atol=1e-7,
            )  # fmt: skip
            want = p.model.forward_group(torch.from_numpy(h[r : r + 1, src]).float(), src)
            logits = p.live_logits(layer, h[r, src])
            assert logits.dtype == np.float32 and logits.shape == (p.num_experts,)
            np.testing.assert_allclose(logits, want.detach().numpy()[0], rtol=1e-5, atol=1e-6)
        # the live path's torch map: the same logits for a batch of router inputs, also from
        # a bf16 input (converted), and a wrong width refused
        x = torch.from_numpy(h[:4, src]).float()
        t = p.live_logits_torch(layer, x)
        assert t.dtype == torch.float32 and t.shape == (4, p.num_experts)
        want = p.model.forward_group(x, src).detach()
        torch.testing.assert_close(t, want, rtol=1e-5, atol=1e-6)
        t16 = p.live_logits_torch(layer, x.bfloat16())
        want16 = p.model.forward_group(x.bfloat16().float(), src).detach()
        torch.testing.assert_close(t16, want16, rtol=1e-5, atol=1e-6)
        with pytest.raises(PredictorError, match="expected \\[n, "):
            p.live_logits_torch(layer, x[:, :-1])
        with pytest.raises(PredictorError, match="outside"):
            p.live_logits_torch(p.num_layers, x)
    assert (p._linear_maps() is None) == (name == "probe-mlp")
