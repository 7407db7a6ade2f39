"""Usage heatmap, balance and routing entropy on traces with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from moelab.analysis import usage
from moelab.errors import AnalysisError


def test_usage_counts_and_both_normalisations(build):
    # 4 tokens, 1 layer, top-2 of 4: expert 0 in every token, 1 twice, 2 once, 3 once
    ids = np.array([[[0, 1]], [[0, 1]], [[0, 2]], [[3, 0]]])
    tr = build(ids, 4)
    s = usage.usage(tr, "slots")
    np.testing.assert_allclose(s.counts[0], [4, 2, 1, 1])
    np.testing.assert_allclose(s.share[0], [0.5, 0.25, 0.125, 0.125])
    assert s.chance == pytest.approx(0.25)
    t = usage.usage(tr, "tokens")
    np.testing.assert_allclose(t.share[0], [1.0, 0.5, 0.25, 0.25])
    assert t.share[0].sum() == pytest.approx(2.0) and t.chance == pytest.approx(0.5)


def test_weighted_usage_and_bos_and_no_expert_masked(build):
    ids = np.array([[[0, 1]], [[2, -1]], [[3, 3]]])
    w = np.array([[[0.75, 0.25]], [[1.0, 0.0]], [[0.5, 0.5]]], np.float32)
    tr = build(ids, 4, weights=w, is_bos=[False, False, True])
    s = usage.usage(tr, "slots", weighted=True)
    np.testing.assert_allclose(s.counts[0], [0.75, 0.25, 1.0, 0.0])
    np.testing.assert_allclose(s.share[0], [0.375, 0.125, 0.5, 0.0])
    c = usage.usage(tr, "slots")
    np.testing.assert_allclose(c.counts[0], [1, 1, 1, 0])  # NO_EXPERT slot and BOS row skipped


def test_token_and_context_selection(build):
    # doc: "I can X can" -> ids 5 6 7 6 ; "can" after "I" routes to 0, the other "can" to 3
    ids = np.array([[[1]], [[0]], [[2]], [[3]]])
    tr = build(ids, 4, token_id=[5, 6, 7, 6])
    u = usage.usage(tr, "tokens", token_id=6)
    np.testing.assert_allclose(u.share[0], [0.5, 0, 0, 0.5])
    assert u.n_tokens == 2 and u.baseline is not None
    uc = usage.usage(tr, "tokens", token_id=6, prev_ids=[5])
    np.testing.assert_allclose(uc.share[0], [1, 0, 0, 0])
    assert uc.n_tokens == 1 and "after [5]" in uc.selection


def test_absent_token_and_min_count_errors(build):
    tr = build(np.array([[[1]], [[0]]]), 4, token_id=[5, 6])
    with pytest.raises(AnalysisError, match="token id 99 does not occur"):
        usage.usage(tr, token_id=99)
    with pytest.raises(AnalysisError, match="never follows"):
        usage.usage(tr, token_id=6, prev_ids=[7])
    with pytest.raises(AnalysisError, match="min_count=10"):
        usage.usage(tr, token_id=6, min_count=10)


def test_empty_trace_error(build):
    tr = build(np.zeros((0, 2, 2)), 4)
    with pytest.raises(AnalysisError, match="empty"):
        usage.usage(tr)
    with pytest.raises(AnalysisError, match="empty"):
        usage.balance(tr)


def test_balance_extremes_and_gini_reference():
    even = usage.balance_metrics(np.full((1, 8), 1 / 8))
    assert even["norm_entropy"][0] == pytest.approx(1.0)
    assert even["gini"][0] == pytest.approx(0.0, abs=1e-12)
    assert even["cv"][0] == pytest.approx(0.0) and even["max_over_mean"][0] == pytest.approx(1.0)
    one = usage.balance_metrics(np.eye(8)[:1])
    assert one["norm_entropy"][0] == pytest.approx(0.0)
    assert one["dead"][0] == 7 and one["max_over_mean"][0] == pytest.approx(8.0)
    x = np.array([[0.1, 0.2, 0.3, 0.4]])
    ref = np.abs(x[0][:, None] - x[0][None, :]).sum() / (
        2 * 4 * 4 * x.mean()
    )  # mean abs difference
    assert usage.balance_metrics(x)["gini"][0] == pytest.approx(ref)
    assert usage.balance_metrics(x)["cv"][0] == pytest.approx(x.std() / x.mean())


def test_uniform_routing_balance_at_chance(uniform_trace):
    b = usage.balance(uniform_trace)
    assert np.all(b.norm_entropy > 0.999) and np.all(b.cv < 0.03) and np.all(b.dead == 0)
    # observed matches the finite-sample uniform baseline within tolerance
    np.testing.assert_allclose(b.cv, b.baseline["cv"], atol=0.03)
    u = usage.usage(uniform_trace, "tokens")
    np.testing.assert_allclose(u.share, 2 / 8, atol=0.01)


def test_routing_entropy_needs_logits_and_values(build):
    ids = np.array([[[0]], [[1]]])
    with pytest.raises(AnalysisError, match="logits"):
        usage.routing_entropy(build(ids, 4))
    lg = np.zeros((2, 1, 4), np.float32)
    lg[1, 0] = [100, 0, 0, 0]  # token 1 is certain
    r = usage.routing_entropy(build(ids, 4, logits=lg))
    assert r.mean_norm_entropy[0] == pytest.approx(0.5, abs=1e-6)
    assert r.mean_top1_prob[0] == pytest.approx((0.25 + 1.0) / 2, abs=1e-6)
