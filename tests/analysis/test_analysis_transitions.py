"""Layer transitions, co-activation, set indexing: hand-built traces with known answers."""

from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np
import pytest
from analysis_sets import random_sets

from moelab.analysis import coactivation, transitions
from moelab.analysis._common import all_sets, set_index, set_members
from moelab.errors import AnalysisError


def test_set_index_is_order_free_bijection():
    combos = np.array(list(combinations(range(8), 3)))
    idx = set_index(combos, 8)
    assert sorted(idx.tolist()) == list(range(comb(8, 3)))
    np.testing.assert_array_equal(set_index(combos[:, ::-1], 8), idx)  # order-free
    for i in (0, 17, 55):
        assert set_members(i, 8, 3) == tuple(all_sets(8, 3)[i])
    assert set_index(np.array([[1, -1], [2, 2]]), 8).tolist() == [-1, -1]


def test_copy_layer_gives_nmi_one_and_identity(build):
    rng = np.random.default_rng(0)
    ids = random_sets(rng, 5000, 1, 8, 2)
    tr = build(
        np.concatenate([ids, ids[:, :, ::-1]], axis=1), 8
    )  # layer 1 = layer 0, slots swapped
    s = transitions.transition_summary(tr)
    assert s.nmi_set[0] == pytest.approx(1.0) and s.nmi_top1[0] < 1.0  # swapped slots change top-1
    st = transitions.set_transitions(tr, 0)
    used = st.counts.sum(1) > 0
    np.testing.assert_allclose(st.conditional[np.ix_(used, used)], np.eye(int(used.sum())))
    assert s.nmi_set_shuffled[0] < 0.05  # plug-in bias ~ (S-1)^2 / (2N H) = 0.022
    top1 = build(np.concatenate([ids[:, :, :1], ids[:, :, :1]], axis=1), 8)  # k=1 copy
    e = transitions.expert_transitions(top1, 0)
    np.testing.assert_allclose(e.conditional, np.eye(8))
    s1 = transitions.transition_summary(top1)
    assert s1.nmi_top1[0] == pytest.approx(1.0) and s1.top1_predictability[0] == pytest.approx(1.0)


def test_expert_transitions_count_all_k_by_k_pairs(build):
    ids = np.array([[[0, 1], [2, 3]], [[1, 0], [3, 2]], [[4, 5], [6, 7]]])
    tr = build(ids, 8)
    e = transitions.expert_transitions(tr, 0)
    assert e.counts.sum() == 3 * 2 * 2
    expect = np.zeros((8, 8))
    for a, b in ((0, 2), (0, 3), (1, 2), (1, 3)):
        expect[a, b] = 2
    for a, b in ((4, 6), (4, 7), (5, 6), (5, 7)):
        expect[a, b] = 1
    np.testing.assert_array_equal(e.counts, expect)
    st = transitions.set_transitions(tr, 0)
    assert st.counts.sum() == 3  # one order-free set pair per token
    a, b = set_index(np.array([[0, 1]]), 8)[0], set_index(np.array([[2, 3]]), 8)[0]
    assert st.counts[a, b] == 2 and st.counts.shape == (28, 28)


def test_uniform_routing_transitions_at_chance(uniform_trace):
    s = transitions.transition_summary(uniform_trace)
    assert np.all(s.nmi_set < 0.01) and np.all(s.nmi_top1 < 0.01)
    np.testing.assert_allclose(s.top1_predictability, s.top1_chance, atol=0.02)
    e = transitions.expert_transitions(uniform_trace, 1)
    np.testing.assert_allclose(e.lift, 1.0, atol=0.12)
    np.testing.assert_allclose(e.npmi, 0.0, atol=0.03)
    np.testing.assert_allclose(e.conditional, 1 / 8, atol=0.02)  # rows = slot share at l+n = 1/E
    assert np.abs(e.baseline_lift - 1).max() < 0.12


def test_transition_errors(build):
    tr = build(np.zeros((3, 2, 1)), 4)
    with pytest.raises(AnalysisError, match="outside"):
        transitions.expert_transitions(tr, 1)
    with pytest.raises(AnalysisError, match="out of range"):
        transitions.expert_transitions(tr, 5)
    with pytest.raises(AnalysisError, match="empty"):
        transitions.transition_summary(build(np.zeros((0, 2, 1)), 4))


def test_coactivation_all_pairs_and_chance(build, uniform_trace):
    tr = build(np.array([[[0, 1, 2]], [[2, 1, 3]]]), 4)
    c = coactivation.coactivation(tr, 0)
    expect = np.zeros((4, 4))
    for a, b in ((0, 1), (0, 2), (1, 2), (1, 2), (2, 3), (1, 3)):
        expect[a, b] += 1
        expect[b, a] += 1
    np.testing.assert_array_equal(c.counts, expect)
    assert c.conditional[1, 2] == pytest.approx(1.0) and c.conditional[0, 3] == 0.0
    assert c.joint[1, 2] == pytest.approx(1.0)
    u = coactivation.coactivation(uniform_trace, 0)
    off = ~np.eye(8, dtype=bool)
    np.testing.assert_allclose(u.conditional[off], u.chance_conditional, atol=0.02)
    np.testing.assert_allclose(u.joint[off], u.chance_joint, atol=0.005)
    np.testing.assert_allclose(u.baseline_conditional[off], u.chance_conditional, atol=0.02)
    with pytest.raises(AnalysisError, match="top_k >= 2"):
        coactivation.coactivation(build(np.zeros((3, 1, 1)), 4), 0)
