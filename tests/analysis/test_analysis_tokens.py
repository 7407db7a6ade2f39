"""Specialisation, predictability, saturation and projections with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from analysis_sets import random_sets

from moelab.analysis import predictability, projections, saturation, specialization
from moelab.analysis._common import set_index
from moelab.errors import AnalysisError


def test_domain_shares_exact(build):
    ids = np.array([[[0, 1]]] * 4 + [[[2, 3]]] * 2 + [[[0, 3]]] * 2)
    tr = build(ids, 4, domain=[0] * 4 + [1] * 4, domains=["code", "prose"])
    g = specialization.by_domain(tr)
    assert g.names == ["code", "prose"] and g.counts.tolist() == [4, 4]
    np.testing.assert_allclose(g.share[0, 0], [1, 1, 0, 0])
    np.testing.assert_allclose(g.share[1, 0], [0.5, 0, 0.5, 1])
    np.testing.assert_allclose(g.overall[0], [0.75, 0.5, 0.25, 0.5])
    assert g.chance == 0.5 and g.specialization[0] > 0


def test_vocab_min_count_filter_and_next_token(build):
    tok = np.array([7] * 10 + [8] * 9 + [9] * 12)
    ids = np.zeros((tok.size, 1, 1), np.int16)
    ids[tok == 9] = 2
    tr = build(ids, 4, token_id=tok)
    v = specialization.by_vocab(tr, "input", min_count=10)
    assert v.token_ids.tolist() == [7, 9] and v.n_dropped == 1  # 8 occurs 9 times < 10
    np.testing.assert_allclose(v.view.share[1, 0], [0, 0, 1, 0])
    with pytest.raises(AnalysisError, match="min_count=50"):
        specialization.by_vocab(tr, min_count=50)
    nxt = specialization.by_vocab(tr, "next", min_count=1)
    # row before a 9 is the last 8 (expert 0) or another 9 (expert 2)
    i9 = nxt.token_ids.tolist().index(9)
    assert nxt.view.counts[i9] == 12
    np.testing.assert_allclose(nxt.view.share[i9, 0, 2], 11 / 12)
    tt = specialization.top_tokens(v, 0, top=1, decode=lambda i: f"<{i}>")
    assert tt[2][0][:2] == (9, "<9>") and tt[2][0][2] == pytest.approx(1.0)


def test_vocab_shuffle_baseline_detects_no_structure(uniform_trace):
    v = specialization.by_vocab(uniform_trace, min_count=10)
    np.testing.assert_allclose(v.view.specialization, v.view.specialization_shuffled, rtol=0.15)


@pytest.mark.parametrize(
    "text,cls",
    [
        (" ", "whitespace"),
        ("\n\t", "whitespace"),
        (" ,", "punctuation"),
        ("()", "punctuation"),
        (" 2024", "digits"),
        ("foo_bar", "identifier"),
        ("camelCase", "identifier"),
        (" def", "identifier"),
        (" the", "letters"),
        ("Über", "letters"),
        ("a1", "other"),
        ("", "other"),
    ],
)
def test_token_class(text, cls):
    assert specialization.token_class(text) == cls


def test_by_token_class(build):
    strings = {0: " the", 1: ",", 2: " 42"}
    ids = np.array([[[0]], [[1]], [[1]], [[2]]])
    tr = build(ids, 4, token_id=[0, 1, 1, 2])
    g = specialization.by_token_class(tr, strings.__getitem__)
    assert g.names == ["punctuation", "digits", "letters"]
    np.testing.assert_allclose(g.share[0, 0], [0, 1, 0, 0])
    np.testing.assert_allclose(g.share[2, 0], [1, 0, 0, 0])
    with pytest.raises(AnalysisError, match="tokenizer"):
        specialization.make_decoder(None)


def _token_determined(build, n=6000, docs=30, seed=0):
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, 40, n)
    table = random_sets(rng, 40, 2, 8, 2)
    return build(table[tok], 8, token_id=tok, doc_id=np.arange(n) // (n // docs)), tok


def test_predictability_token_determined(build):
    tr, _ = _token_determined(build)
    p = predictability.predictability(tr, seed=0)
    np.testing.assert_allclose(p.acc_token, 1.0)
    np.testing.assert_allclose(p.recall_token, 1.0)
    np.testing.assert_allclose(p.cond_entropy, 0.0, atol=1e-9)
    assert np.all(p.acc_token_shuffled < 0.2) and np.all(p.acc_majority < 0.2)
    assert p.chance == pytest.approx(1 / 28) and p.n_train + p.n_test == tr.num_tokens


def test_predictability_needs_previous_token(build):
    rng = np.random.default_rng(1)
    n = 8000
    tok = rng.integers(0, 10, n)
    prev = np.roll(tok, 1)
    e = (tok + 3 * prev) % 8  # the set depends on (prev, cur), not on cur alone
    ids = np.stack([e, (e + 1) % 8], 1)[:, None, :]
    doc = np.arange(n) // 400
    tr = build(ids, 8, token_id=tok, doc_id=doc)
    p = predictability.predictability(tr, seed=0)
    assert p.acc_bigram[0] > 0.9 and p.acc_token[0] < 0.4
    with pytest.raises(AnalysisError, match="2 documents"):
        predictability.predictability(build(ids[:50], 8, token_id=tok[:50]))


def test_uniform_predictability_at_chance(uniform_trace):
    p = predictability.predictability(uniform_trace, seed=0)
    np.testing.assert_allclose(p.acc_token, 1 / 28, atol=0.02)
    np.testing.assert_allclose(p.acc_token, p.acc_token_shuffled, atol=0.02)
    assert np.all(p.cond_entropy < p.set_entropy)  # plug-in bias...
    np.testing.assert_allclose(
        p.cond_entropy, p.cond_entropy_shuffled, atol=0.05
    )  # ...equals shuffled


def test_spread_token_vs_position(build):
    tr, _ = _token_determined(build)
    s = predictability.spread_token_vs_position(tr, min_count=10)
    np.testing.assert_allclose(s.consistency_token, 1.0)
    np.testing.assert_allclose(s.norm_cond_entropy_token, 0.0, atol=1e-9)
    assert np.all(s.consistency_position < 0.5) and np.all(s.consistency_shuffled < 0.5)


def test_saturation_identical_disjoint_and_uniform(build, uniform_trace):
    ids = np.array([[[0, 1]], [[2, 3]]])
    a = build(ids, 8)
    r = saturation.router_saturation(a, a)
    assert r.ks == [1, 2] and r.saturation[1][0] == 1.0 and r.saturation[2][0] == 1.0
    b = build(ids + 4, 8)
    assert saturation.router_saturation(a, b).saturation[2][0] == 0.0
    half = build(np.array([[[0, 5]], [[3, 2]]]), 8)  # top-1 differs in token 2; overlaps 1 and 2
    h = saturation.router_saturation(half, a)
    assert h.saturation[1][0] == 0.5 and h.saturation[2][0] == 0.75
    rng = np.random.default_rng(5)
    other = build(
        random_sets(rng, uniform_trace.num_tokens, 4, 8, 2),
        8,
        token_id=uniform_trace.token_id,
        doc_id=uniform_trace.doc_id,
    )
    u = saturation.router_saturation(other, uniform_trace)
    np.testing.assert_allclose(u.saturation[2], 2 / 8, atol=0.01)
    np.testing.assert_allclose(u.saturation[1], 1 / 8, atol=0.01)
    with pytest.raises(AnalysisError, match="same tokens"):
        saturation.router_saturation(a, build(np.zeros((3, 1, 2)) + [0, 1], 8))
    with pytest.raises(AnalysisError, match="no logits"):
        saturation.router_saturation(a, a, ks=[4])


def test_projections_separate_clusters(build):
    rng = np.random.default_rng(0)
    n = 300
    lab = np.arange(n) % 2
    lg = rng.normal(0, 0.3, (n, 2, 4)).astype(np.float32)
    lg[lab == 0, :, 0] += 4
    lg[lab == 1, :, 3] += 4
    ids = np.argsort(-lg, -1)[..., :2]
    tr = build(ids, 4, logits=lg)
    p = projections.projections(
        tr, lab, ["a", "b"], methods=("pca", "tsne"), max_points=120, tsne_iter=250
    )
    assert p.coords["pca"].shape == (120, 2) and p.coords["tsne"].shape == (120, 2)
    assert p.knn_accuracy["pca"] > 0.95 and p.knn_accuracy["full"] > 0.95
    assert p.silhouette["pca"] > 0.5 and abs(p.knn_shuffled["pca"] - 0.5) < 0.15
    assert p.chance == pytest.approx(0.5, abs=0.05)
    with pytest.raises(AnalysisError, match="logits"):
        projections.projections(build(ids, 4), lab, ["a", "b"])


def test_set_index_matches_members_for_predictions(build):
    tr, tok = _token_determined(build, n=2000, docs=10)
    y = set_index(tr.expert_ids[:, 0, :], 8)
    assert np.unique(y).size <= 40
