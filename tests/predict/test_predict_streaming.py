"""Count-based predictors fitted by streaming over a store's shards equal the ones fitted on
the loaded train split (same tables); others are fitted on a stated, seeded sample."""

from __future__ import annotations

import numpy as np
import pytest

from moelab.analysis.synthetic import synthetic_trace
from moelab.predict import Horizon, make_predictor
from moelab.predict.base import split_by_document
from moelab.predict.streaming import fit_store, iter_documents, train_documents
from moelab.trace.schema import NO_EXPERT
from moelab.trace.store import write_trace


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tr = synthetic_trace(2400, 3, 8, 2, vocab=40, doc_len=70, logits=False, seed=2)
    tr.expert_ids[10, 1, 1] = NO_EXPERT
    tr.weights[10, 1, 1] = 0.0
    path = tmp_path_factory.mktemp("stream") / "s"
    return write_trace(tr, path, shard_tokens=300, logits=False)  # documents span shards


def test_chunks_are_whole_documents(store):
    full = store.load()
    seen = []
    for ch in iter_documents(store, chunk_tokens=500):
        seen.append(np.unique(ch.doc_id))
        for d in np.unique(ch.doc_id):
            assert (ch.doc_id == d).sum() == (full.doc_id == d).sum()
    np.testing.assert_array_equal(np.concatenate(seen), np.unique(full.doc_id))


@pytest.mark.parametrize(
    ("name", "horizon"),
    [
        ("prior", "d=1"),
        ("prev-token", "t+1"),
        ("markov", "d=1"),
        ("markov", "t+1"),
        ("ngram2", "d=1"),
        ("ngram-set", "t+1"),
        ("ngram3", "d=2"),
    ],
)
def test_streamed_tables_equal_in_memory_fit(store, name, horizon):
    full = store.load()
    train = split_by_document(full, {"train": 0.8, "test": 0.2}, seed=3)["train"]
    np.testing.assert_array_equal(
        np.unique(train.doc_id), train_documents(np.unique(full.doc_id), 0.2, 3)
    )
    a = make_predictor(name, Horizon.parse(horizon), seed=0).fit(train)
    b = fit_store(make_predictor(name, Horizon.parse(horizon), seed=0), store, 0.2, 3, 400)
    assert b.fit_info["streamed"] and b.fit_info["train_tokens"] == train.num_tokens
    sa, ta = a._get_state()
    sb, tb = b._get_state()
    assert sa == sb and set(ta) == set(tb)
    for key in ta:
        np.testing.assert_array_equal(ta[key], tb[key], err_msg=key)
    test = split_by_document(full, {"train": 0.8, "test": 0.2}, seed=3)["test"]
    np.testing.assert_array_equal(a.predict_scores(test, 2), b.predict_scores(test, 2))


def test_neural_predictor_on_a_stated_sample(store):
    p = fit_store(
        make_predictor("token-mlp", Horizon(layers_ahead=1), seed=0, epochs=1),
        store,
        holdout=0.2,
        seed=1,
        sample_tokens=500,
    )
    info = p.fit_info
    assert not info["streamed"] and info["sample_tokens"] >= 500 and info["sample_seed"] == 1
    assert info["sample_documents"] < info["of_train_documents"]
    assert p.fitted
