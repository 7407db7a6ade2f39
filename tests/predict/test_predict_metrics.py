"""Metrics on hand-made cases with known values."""

from __future__ import annotations

import numpy as np
import pytest

from moelab.errors import InputError
from moelab.predict.metrics import default_budgets, ranks, score_rows


def test_hand_made_values():
    # E = 4, k = 2; predicted order per row from the scores.
    scores = np.array(
        [
            [0.9, 0.8, 0.1, 0.0],  # top2 {0,1}, true {0,1}: 2 hits, exact, top1 in set
            [0.9, 0.1, 0.8, 0.0],  # top2 {0,2}, true {1,2}: 1 hit, top1 (0) not in set
            [0.0, 0.1, 0.2, 0.9],  # top2 {3,2}, true {0,1}: 0 hits; top3 {3,2,1} -> 1 hit
        ]
    )
    true = np.array([[0, 1], [2, 1], [1, 0]])
    m = score_rows(scores, true, budgets=[3, 4])
    assert m["rows"] == 3
    assert m["recall@k"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["precision@k"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["exact_set"] == pytest.approx(1 / 3)
    assert m["top1_in_true"] == pytest.approx(1 / 3)
    assert (m["hits=0"], m["hits=1"], m["hits=2"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    # top-3: row0 2/2, row1 {0,2,1} 2/2, row2 {3,2,1} 1/2
    assert m["recall@3"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["recall@4"] == pytest.approx(1.0)


def test_no_expert_slots_and_empty_rows():
    scores = np.array([[0.5, 0.4, 0.3], [0.1, 0.2, 0.3], [1.0, 0.0, 0.0]])
    true = np.array([[1, -1], [2, 0], [-1, -1]])  # row 0 has one expert (a drop), row 2 none
    m = score_rows(scores, true, budgets=[])
    assert m["rows"] == 2  # the empty row is skipped
    # row 0: top2 {0,1} contains 1 -> recall 1/1, precision 1/2; exact: top1 {0} != {1}
    # row 1: top2 {2,1} contains 2 -> recall 1/2, precision 1/2; exact False
    assert m["recall@k"] == pytest.approx(0.75)
    assert m["precision@k"] == pytest.approx(0.5)
    assert m["exact_set"] == 0.0
    assert m["top1_in_true"] == pytest.approx(0.5)


def test_ties_break_to_lower_index_and_ranks():
    r = ranks(np.array([[0.2, 0.5, 0.5, 0.1]]))
    assert r.tolist() == [[2, 0, 1, 3]]
    m = score_rows(np.zeros((1, 4)), np.array([[0, 1]]))
    assert m["exact_set"] == 1.0


def test_bad_input():
    with pytest.raises(InputError, match="NaN"):
        score_rows(np.array([[np.nan, 1.0]]), np.array([[0]]))
    with pytest.raises(InputError, match="0..1"):
        score_rows(np.array([[0.0, 1.0]]), np.array([[2]]))
    assert default_budgets(2, 8) == [3, 4, 6, 8]
    assert default_budgets(2, 2) == []
