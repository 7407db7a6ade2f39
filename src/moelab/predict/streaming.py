"""Fit predictors on a trace store without loading it: count-based predictors by streaming
over the shards, neural ones on a stated, seeded sample of training documents.

The count-based predictors (frequency prior, previous-layer / previous-token copies, Markov,
n-gram) are functions of count tables that add up over documents, so they are fitted from
chunks of whole documents read shard by shard (one chunk in memory at a time; a document
that runs over a shard boundary is carried to the next shard of its rank) and give exactly
the tables `Predictor.fit` gives on the loaded train split (tests/predict/test_predict_streaming.py).
The train split is the one `split_by_document` draws (same documents for the same seed).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moelab.errors import PredictorError
from moelab.predict.base import Predictor, multi_hot
from moelab.predict.baselines import PRIOR_SMOOTH, FrequencyPrior
from moelab.predict.markov import MarkovPredictor, _sorted_sets
from moelab.predict.ngram import NGramPredictor
from moelab.trace.schema import Trace, TraceMeta
from moelab.trace.store import SHARD_RE, TraceStore


def train_documents(docs: np.ndarray, holdout: float, seed: int) -> np.ndarray:
    """The documents split_by_document puts in "train" for {"train": 1-h, "test": h}."""
    docs = np.unique(docs)
    rng = np.random.default_rng(seed)
    order = docs[rng.permutation(docs.size)]
    bounds = np.round(np.cumsum([0.0, 1 - holdout, holdout]) * docs.size).astype(int)
    return np.sort(order[bounds[0] : bounds[1]])


def store_documents(store: TraceStore) -> np.ndarray:
    """Sorted distinct document ids of a store (reads only the doc_id column)."""
    ids = [
        np.unique(pq.read_table(str(s), columns=["doc_id"])["doc_id"].to_numpy())
        for s in store.shards
    ]
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)


def iter_documents(
    store: TraceStore, docs: np.ndarray | None = None, chunk_tokens: int = 262_144
) -> Iterator[Trace]:
    """Traces of whole documents (only `docs` if given), about chunk_tokens rows each."""
    from moelab.analysis.sources import table_to_trace

    want = None if docs is None else pa.array(np.asarray(docs, dtype=np.int64))
    by_rank: dict[int, list[Path]] = {}
    for s in store.shards:
        by_rank.setdefault(int(SHARD_RE.match(s.name).group(1)), []).append(s)  # type: ignore[union-attr]
    m = store.meta
    cols = ["doc_id", "position", "token_id", "domain", "is_bos"]
    cols += [f"{c}{li}_{j}" for c in "ew" for li in range(m.num_layers) for j in range(m.top_k)]
    pending: list[pa.Table] = []
    rows = 0
    for shards in by_rank.values():
        carry: pa.Table | None = None
        for s in shards:
            t = pq.read_table(str(s), columns=cols)
            if want is not None:
                import pyarrow.compute as pc

                t = t.filter(pc.is_in(t["doc_id"], value_set=want))
            if carry is not None:
                t = pa.concat_tables([carry, t])
                carry = None
            if t.num_rows == 0:
                continue
            doc = t["doc_id"].to_numpy()
            last = int(np.searchsorted(doc, doc[-1]))  # rows of the last (maybe unfinished) doc
            if doc[0] != doc[-1]:
                carry = t.slice(last)
                t = t.slice(0, last)
            else:
                carry, t = t, t.slice(0, 0)
            if t.num_rows:
                pending.append(t)
                rows += t.num_rows
            if rows >= chunk_tokens:
                yield table_to_trace(pa.concat_tables(pending), store.meta, logits=False)
                pending, rows = [], 0
        if carry is not None and carry.num_rows:
            pending.append(carry)
            rows += carry.num_rows
    if pending:
        yield table_to_trace(pa.concat_tables(pending), store.meta, logits=False)


def _begin(p: Predictor, meta: TraceMeta, n_train: int, info: dict[str, Any]) -> None:
    if p.horizon.layers_ahead >= meta.num_layers:
        raise PredictorError(
            f"{type(p).__name__}: horizon {p.horizon} needs more than {meta.num_layers} MoE layers"
        )
    p.num_layers, p.num_experts, p.top_k = meta.num_layers, meta.num_experts, meta.top_k
    p.fit_info = {"train_split": meta.split or "train", "train_tokens": n_train, **info}
    if meta.model_fingerprint:
        p.fit_info["model"] = meta.model
        p.fit_info["model_fingerprint"] = meta.model_fingerprint


def _prior(counts: np.ndarray) -> np.ndarray:
    c = counts + PRIOR_SMOOTH
    return (c / c.sum(1, keepdims=True)).astype(np.float32)


def _prior_counts(tr: Trace) -> np.ndarray:
    e = tr.meta.num_experts
    out = np.zeros((tr.meta.num_layers, e), np.float64)
    for layer in range(tr.meta.num_layers):
        ids = tr.expert_ids[:, layer, :].astype(np.int64).ravel()
        out[layer] = np.bincount(ids[ids >= 0], minlength=e)[:e]
    return out


def _merge_rows(keys: np.ndarray, vals: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sum rows of `vals` with equal keys (keys [n] or [n, c]); keys come back sorted."""
    if keys.ndim == 1:
        uk, inv = np.unique(keys, return_inverse=True)
    else:
        uk, inv = np.unique(keys, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    out = []
    for v in vals:
        acc = np.zeros((uk.shape[0], *v.shape[1:]), v.dtype)
        np.add.at(acc, inv, v)
        out.append(acc)
    return uk, out


def fit_store(
    p: Predictor,
    store: TraceStore,
    holdout: float = 0.2,
    seed: int = 0,
    chunk_tokens: int = 262_144,
    sample_tokens: int = 200_000,
) -> Predictor:
    """Fit `p` on the train documents of `store` (split as split_by_document): streaming for
    the count-based predictors, a seeded sample of `sample_tokens` train tokens (whole
    documents) for the others; fit_info says which and how many tokens."""
    meta = replace(store.meta, split="train")
    docs = train_documents(store_documents(store), holdout, seed)
    if docs.size == 0:
        raise PredictorError(f"{store.path}: no train documents (holdout={holdout})")
    info = {"streamed": True, "holdout": holdout, "split_seed": seed}
    if isinstance(p, MarkovPredictor):
        return _fit_markov(p, store, meta, docs, chunk_tokens, info)
    if isinstance(p, NGramPredictor):
        return _fit_ngram(p, store, meta, docs, chunk_tokens, info)
    if isinstance(p, FrequencyPrior):  # prior, prev-layer, prev-token
        counts, n, last = None, 0, None
        for tr in iter_documents(store, docs, chunk_tokens):
            c = _prior_counts(tr)
            counts = c if counts is None else counts + c
            n += tr.num_tokens
            last = tr
        _begin(p, meta, n, info)
        p.prior = _prior(counts)
        p.fitted = True
        p._cost_sample = last.select(np.arange(min(last.num_tokens, 1024)))
        return p
    # neural and other predictors: a seeded sample of whole train documents
    rng = np.random.default_rng(seed)
    chosen, total = [], 0
    lengths = _doc_lengths(store)
    for d in rng.permutation(docs):
        if total >= sample_tokens:
            break
        chosen.append(int(d))
        total += int(lengths.get(int(d), 0))
    parts = list(iter_documents(store, np.sort(np.array(chosen)), chunk_tokens=10**12))
    train = parts[0]
    train.meta = meta
    p.fit(train)
    p.fit_info.update(
        {
            "streamed": False,
            "sample_tokens": train.num_tokens,
            "sample_documents": len(chosen),
            "sample_seed": seed,
            "of_train_documents": int(docs.size),
            "holdout": holdout,
        }
    )
    return p


def _doc_lengths(store: TraceStore) -> dict[int, int]:
    out: dict[int, int] = {}
    for s in store.shards:
        d, c = np.unique(
            pq.read_table(str(s), columns=["doc_id"])["doc_id"].to_numpy(), return_counts=True
        )
        for a, b in zip(d.tolist(), c.tolist(), strict=True):
            out[a] = out.get(a, 0) + b
    return out


def _fit_markov(
    p: MarkovPredictor,
    store: TraceStore,
    meta: TraceMeta,
    docs: np.ndarray,
    chunk_tokens: int,
    info: dict[str, Any],
) -> MarkovPredictor:
    e, k = meta.num_experts, meta.top_k
    _begin(p, meta, 0, info)
    prior_c = np.zeros((meta.num_layers, e))
    acc: dict[int, dict[str, np.ndarray]] = {}
    n, last = 0, None
    for tr in iter_documents(store, docs, chunk_tokens):
        n += tr.num_tokens
        last = tr
        prior_c += _prior_counts(tr)
        for layer in p.target_layers():
            s_ids, t_ids, ok = p._pairs(tr, layer)
            s_ids, t_ids = s_ids[ok], t_ids[ok]
            src_hot, tgt_hot = multi_hot(s_ids, e), multi_hot(t_ids, e)
            sets = _sorted_sets(s_ids)
            a = acc.setdefault(
                layer,
                {
                    "pair": np.zeros((e, e), np.float64),
                    "pair_n": np.zeros(e, np.float64),
                    "sets": np.zeros((0, k), np.int64),
                    "counts": np.zeros((0, e), np.float64),
                    "n": np.zeros(0, np.int64),
                },
            )
            a["pair"] += src_hot.astype(np.float64).T @ tgt_hot
            a["pair_n"] += src_hot.sum(0)
            keys = np.concatenate([a["sets"], sets])
            vals = [
                np.concatenate([a["counts"], tgt_hot.astype(np.float64)]),
                np.concatenate([a["n"], np.ones(sets.shape[0], np.int64)]),
            ]
            a["sets"], (a["counts"], a["n"]) = _merge_rows(keys, vals)
    p.fit_info["train_tokens"] = n
    p.tables = {"prior": _prior(prior_c)}
    for layer, a in acc.items():
        keep = a["n"] >= p.min_count
        p.tables[f"sets.{layer}"] = a["sets"][keep].astype(np.int16)
        p.tables[f"counts.{layer}"] = a["counts"][keep].astype(np.float32)
        p.tables[f"n.{layer}"] = a["n"][keep].astype(np.float32)
        p.tables[f"pair.{layer}"] = a["pair"].astype(np.float32)
        p.tables[f"pair_n.{layer}"] = a["pair_n"].astype(np.float32)
    p.fitted = True
    p._cost_sample = last.select(np.arange(min(last.num_tokens, 1024)))
    return p


def _fit_ngram(
    p: NGramPredictor,
    store: TraceStore,
    meta: TraceMeta,
    docs: np.ndarray,
    chunk_tokens: int,
    info: dict[str, Any],
) -> NGramPredictor:
    from moelab.errors import ConfigError

    e, num_l, k = meta.num_experts, meta.num_layers, meta.top_k
    _begin(p, meta, 0, info)
    p._lookup_cache = None
    vmax = -1
    for tr in iter_documents(store, docs, chunk_tokens):  # pass 1: the vocabulary size
        vmax = max(vmax, int(tr.token_id.max()))
    p.vocab = vmax + 1
    if (p.vocab + 2) ** p.n >= 2**63:
        raise ConfigError(
            f"NGramPredictor: n={p.n} with vocabulary {p.vocab} overflows 64-bit context keys;"
            " use a smaller n"
        )
    prior_c = np.zeros((num_l, e))
    acc = {o: None for o in range(1, p.n + 1)}
    sets_acc: dict[int, list] = {o: [] for o in range(1, p.n + 1)}
    n_rows, last = 0, None
    for tr in iter_documents(store, docs, chunk_tokens):  # pass 2: the counts
        n_rows += tr.num_tokens
        last = tr
        prior_c += _prior_counts(tr)
        tgt = tr.expert_ids.astype(np.int64)
        for order in range(1, p.n + 1):
            key, ok = p._keys(tr, order)
            key, t = key[ok], tgt[ok]
            uk, inv = np.unique(key, return_inverse=True)
            inv = inv.reshape(-1)
            cnt = np.bincount(inv, minlength=uk.size).astype(np.int64)
            counts = np.zeros((uk.size, num_l, e), np.int64)
            for j in range(k):
                valid = t[:, :, j] >= 0
                rr = np.repeat(inv[:, None], num_l, 1)[valid]
                ll = np.broadcast_to(np.arange(num_l), valid.shape)[valid]
                np.add.at(counts, (rr, ll, t[:, :, j][valid]), 1)
            if acc[order] is not None:
                pk, (pc, pn) = acc[order]
                uk, (counts, cnt) = _merge_rows(
                    np.concatenate([pk, uk]),
                    [np.concatenate([pc, counts]), np.concatenate([pn, cnt])],
                )
            acc[order] = (uk, (counts, cnt))
            if p.mode == "set":  # (context, layer, sorted set) counts for the modes
                srt = np.sort(t, axis=2)
                for layer in range(num_l):
                    keys = np.column_stack([key, np.full(key.size, layer), srt[:, layer]])
                    u, c = np.unique(keys, axis=0, return_counts=True)
                    sets_acc[order].append((u, c))
                if len(sets_acc[order]) > 1:
                    u = np.concatenate([x[0] for x in sets_acc[order]])
                    c = np.concatenate([x[1] for x in sets_acc[order]])
                    uu, (cc,) = _merge_rows(u, [c])
                    sets_acc[order] = [(uu, cc)]
    p.fit_info["train_tokens"] = n_rows
    p.tables = {"prior": _prior(prior_c)}
    for order in range(1, p.n + 1):
        uk, (counts, cnt) = acc[order]
        keep = cnt >= p.min_count
        p.tables[f"keys.{order}"] = uk[keep]
        p.tables[f"n.{order}"] = cnt[keep].astype(np.int32)
        p.tables[f"counts.{order}"] = counts[keep].astype(np.int32)
        if p.mode == "set":
            p.tables[f"sets.{order}"] = _set_modes(sets_acc[order][0], uk[keep], num_l, k)
    p.fitted = True
    p._cost_sample = last.select(np.arange(min(last.num_tokens, 1024)))
    return p


def _set_modes(
    table: tuple[np.ndarray, np.ndarray], keys: np.ndarray, num_l: int, k: int
) -> np.ndarray:
    """[len(keys), L, k] most frequent sorted set per (context, layer); ties: the smallest set
    (as NGramPredictor._mode_sets, whose set ids are in sorted order)."""
    u, c = table
    out = np.full((keys.size, num_l, k), -1, np.int16)
    pos = np.searchsorted(keys, u[:, 0])
    ok = (pos < keys.size) & (keys[np.minimum(pos, keys.size - 1)] == u[:, 0])
    u, c, pos = u[ok], c[ok], pos[ok]
    sets = u[:, 2:]
    order = np.lexsort((*sets.T[::-1], -c, u[:, 1], pos))
    first = np.ones(order.size, bool)
    g = np.column_stack([pos, u[:, 1]])[order]
    first[1:] = np.any(g[1:] != g[:-1], axis=1)
    best = order[first]
    out[pos[best], u[best, 1]] = sets[best]
    return out
