"""Fixtures for analysis tests: hand-built traces with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from analysis_sets import random_sets

from moelab.trace.schema import Trace, TraceMeta


def make_trace(
    expert_ids: np.ndarray,
    num_experts: int,
    token_id: np.ndarray | None = None,
    doc_id: np.ndarray | None = None,
    domain: np.ndarray | None = None,
    is_bos: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    logits: np.ndarray | None = None,
    domains: list[str] | None = None,
) -> Trace:
    """A Trace from expert ids [N, L, k]; other columns default to one document, no BOS."""
    ids = np.asarray(expert_ids, dtype=np.int16)
    n, num_l, k = ids.shape
    doc = np.zeros(n, np.int64) if doc_id is None else np.asarray(doc_id, np.int64)
    pos = np.zeros(n, np.int32)
    for d in np.unique(doc):
        sel = np.flatnonzero(doc == d)
        pos[sel] = np.arange(sel.size)
    if weights is None:
        w = np.where(ids >= 0, np.linspace(1.0, 0.5, k)[None, None, :], 0.0).astype(np.float32)
        weights = w / np.maximum(w.sum(-1, keepdims=True), 1e-9)
    meta = TraceMeta(num_layers=num_l, num_experts=num_experts, top_k=k, domains=domains or [])
    return Trace(
        meta=meta,
        token_id=np.zeros(n, np.int64) if token_id is None else np.asarray(token_id, np.int64),
        doc_id=doc,
        position=pos,
        domain=np.zeros(n, np.int16) if domain is None else np.asarray(domain, np.int16),
        is_bos=np.zeros(n, bool) if is_bos is None else np.asarray(is_bos, bool),
        expert_ids=ids,
        weights=np.asarray(weights, np.float32),
        logits=logits,
    )


@pytest.fixture
def build():
    """Factory for hand-built traces."""
    return make_trace


@pytest.fixture
def uniform_trace() -> Trace:
    """40k tokens, 4 layers, top-2 of 8, uniform random routing, 40 documents, random tokens."""
    rng = np.random.default_rng(123)
    n = 40_000
    ids = random_sets(rng, n, 4, 8, 2)
    return make_trace(
        ids,
        8,
        token_id=rng.integers(0, 50, n),
        doc_id=np.arange(n) // 1000,
        domain=(np.arange(n) // 1000) % 2,
        logits=np.zeros((n, 4, 8), np.float32),
    )
