"""DuckDB usage and transition counts over Parquet shards equal the in-memory numpy counts."""

from __future__ import annotations

import numpy as np
import pytest

from moelab.analysis import sql, transitions, usage
from moelab.analysis.synthetic import synthetic_trace
from moelab.errors import AnalysisError, TraceError
from moelab.trace.schema import NO_EXPERT
from moelab.trace.store import TraceStore, write_trace


def write_store(path, tr, shard_tokens=700):
    """Write a Trace as a TraceStore directory (meta.json + Parquet shards)."""
    write_trace(tr, path, shard_tokens=shard_tokens, logits=False, chunk_tokens=500)
    return path


@pytest.fixture
def stored(tmp_path):
    tr = synthetic_trace(3000, 3, 8, 2, doc_len=100, logits=False, seed=1)
    tr.expert_ids[5, 1, 1] = NO_EXPERT  # a dropped slot must be skipped
    tr.weights[5, 1, 1] = 0.0
    return tr, write_store(tmp_path / "store", tr)


def test_usage_sql_equals_numpy(stored):
    tr, path = stored
    got = sql.usage_counts_sql(path)
    want = usage.usage(tr, "slots").counts
    np.testing.assert_array_equal(got, want)
    assert got.sum() == 2 * 3 * int((~tr.is_bos).sum()) - 1
    loaded = TraceStore.open(path).load()
    np.testing.assert_array_equal(loaded.expert_ids, tr.expert_ids)


def test_transition_sql_equals_numpy(stored):
    tr, path = stored
    got = sql.transition_counts_sql(path, n=1)
    assert got.shape == (2, 8, 8)
    for layer in range(2):
        np.testing.assert_array_equal(
            got[layer], transitions.expert_transitions(tr, layer, 1).counts
        )
    two = sql.transition_counts_sql(path, n=2, layers=[0])
    np.testing.assert_array_equal(two[0], transitions.expert_transitions(tr, 0, 2).counts)


def test_sql_errors(tmp_path, stored):
    with pytest.raises(TraceError, match="meta.json"):
        sql.usage_counts_sql(tmp_path / "nothing")
    with pytest.raises(AnalysisError, match="n=3"):
        sql.transition_counts_sql(stored[1], n=3)
