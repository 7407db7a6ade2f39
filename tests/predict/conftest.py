"""Shared tiny synthetic traces for the predictor tests."""

from __future__ import annotations

import pytest

from moelab.predict.base import split_by_document
from moelab.predict.synthetic import make_synthetic_trace


@pytest.fixture(scope="session")
def synth():
    """(full trace, gates, train, test) of a small synthetic routing trace."""
    trace, gates = make_synthetic_trace(
        num_docs=30, doc_len=32, num_layers=4, num_experts=8, top_k=2, d_model=16, vocab=60, seed=1
    )
    parts = split_by_document(trace, {"train": 0.7, "test": 0.3}, seed=0)
    return trace, gates, parts["train"], parts["test"]
