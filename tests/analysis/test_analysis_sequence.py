"""Consecutive-token repeat rate and trajectories: known answers and chance levels."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from moelab.analysis import repeat, trajectories
from moelab.analysis._common import all_sets
from moelab.errors import AnalysisError


def test_repeat_identical_tokens_and_doc_boundaries(build):
    # two docs of 3 tokens; within a doc every token repeats the same set; docs differ
    ids = np.array([[[0, 1]]] * 3 + [[[2, 3]]] * 3)
    tr = build(ids, 8, doc_id=[0, 0, 0, 1, 1, 1])
    r = repeat.repeat_rate(tr)
    assert r.n_pairs == 4  # the doc boundary is not a pair
    assert r.same_top1[0] == 1.0 and r.any_overlap[0] == 1.0 and r.mean_overlap[0] == 2.0
    tr2 = build(ids, 8, doc_id=[0, 0, 0, 1, 1, 1], is_bos=[True, False, False, True, False, False])
    assert repeat.repeat_rate(tr2).n_pairs == 2  # pairs touching BOS are skipped


def test_repeat_chance_formulas(uniform_trace):
    r = repeat.repeat_rate(uniform_trace)
    assert r.chance_top1 == pytest.approx(1 / 8)
    assert r.chance_any == pytest.approx(1 - comb(6, 2) / comb(8, 2))
    assert r.chance_mean == pytest.approx(4 / 8)
    np.testing.assert_allclose(r.same_top1, r.chance_top1, atol=0.01)
    np.testing.assert_allclose(r.any_overlap, r.chance_any, atol=0.015)
    np.testing.assert_allclose(r.mean_overlap, r.chance_mean, atol=0.015)
    np.testing.assert_allclose(r.load_any, r.chance_any, atol=0.01)
    np.testing.assert_allclose(r.shuffled_any, r.chance_any, atol=0.015)


def test_load_weighted_any_overlap_exact(build):
    sets = all_sets(6, 2)  # every set once -> q uniform -> exactly the uniform chance
    tr = build(sets[:, None, :], 6)
    r = repeat.repeat_rate(tr)
    assert r.load_any[0] == pytest.approx(1 - comb(4, 2) / comb(6, 2))
    assert r.load_mean[0] == pytest.approx(6 * (2 / 6) ** 2)


def test_repeat_needs_pairs(build):
    with pytest.raises(AnalysisError, match="consecutive"):
        repeat.repeat_rate(build(np.array([[[0]], [[1]]]), 4, doc_id=[0, 1]))


def test_trajectories_known_paths(build):
    ids = np.array([[[0], [1], [2]]] * 6 + [[[3], [3], [3]]] * 2)
    tr = build(ids, 4)
    t = trajectories.trajectories(tr, "top1")
    assert t.depths.tolist() == [1, 2, 3] and t.distinct.tolist() == [2, 2, 2]
    h = -(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25))
    np.testing.assert_allclose(t.entropy_bits, h)
    assert t.top_paths[0] == ((0, 1, 2), 6) and t.top_paths[1] == ((3, 3, 3), 2)
    same = build(np.zeros((10, 3, 1)), 4)
    s = trajectories.trajectories(same, "top1")
    assert s.distinct.tolist() == [1, 1, 1] and np.all(s.entropy_bits == 0)


def test_trajectories_uniform_and_chaining(uniform_trace, build):
    t = trajectories.trajectories(uniform_trace, "set")
    n = t.n_tokens
    np.testing.assert_allclose(t.distinct, t.distinct_chance, rtol=0.02)
    assert t.distinct[0] == 28 and t.entropy_bits[0] == pytest.approx(np.log2(28), abs=0.01)
    # chained routing: all layers copy layer 0 -> path entropy stays at one layer's entropy
    ids = uniform_trace.expert_ids[:, :1, :]
    chained = build(np.repeat(ids, 4, axis=1), 8)
    c = trajectories.trajectories(chained, "set")
    np.testing.assert_allclose(c.entropy_bits, c.entropy_bits[0])
    assert c.entropy_shuffled[-1] > c.entropy_bits[-1] + 5 and c.distinct[-1] == 28
    assert c.distinct_shuffled[-1] > 0.9 * n


def test_flow_and_token_grid(build):
    ids = np.array([[[0], [1]], [[0], [1]], [[2], [3]]])
    tr = build(ids, 4, doc_id=[0, 0, 1])
    f = trajectories.top1_flow(tr)
    assert f[0][0, 1] == 2 and f[0][2, 3] == 1 and f[0].sum() == 3
    rows, grid = trajectories.token_grid(tr, doc=1)
    assert rows.tolist() == [2] and grid.tolist() == [[2, 3]]
    with pytest.raises(AnalysisError, match="document id 7"):
        trajectories.token_grid(tr, doc=7)
