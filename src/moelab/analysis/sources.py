"""Where `analyze` gets its numbers: an in-memory Trace, or a trace store through an engine.

Both sources answer the same calls (usage, balance, transitions, ..., and `sample()`, the
trace the sample-based analyses run on), so `analyze` and every analysis in its registry run
unchanged on either. `StoreSource` computes the count-based analyses out of core
(moelab.analysis.outofcore) and draws, for trajectories, projections, the token grid and
saturation, a seeded sample of whole documents stratified by domain (its size is reported in
numbers.json["sample"]).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from moelab.analysis import (
    coactivation,
    outofcore,
    predictability,
    repeat,
    specialization,
    transitions,
    usage,
)
from moelab.analysis.engines import Engine
from moelab.errors import AnalysisError
from moelab.trace.schema import NO_EXPERT, Trace, TraceMeta
from moelab.trace.store import BASE_COLUMNS, decode_floats, id_dtype


class TraceSource:
    """The in-memory path: every call is the moelab.analysis function on the whole Trace."""

    kind = "memory"

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.meta: TraceMeta = trace.meta
        self.tick: Callable[[], None] = lambda: None
        self.sample_info: dict[str, Any] | None = None

    @property
    def num_tokens(self) -> int:
        """Rows of the trace."""
        return self.trace.num_tokens

    @property
    def has_logits(self) -> bool:
        """True if router logits were recorded."""
        return self.trace.logits is not None

    def doc_range(self) -> tuple[int, int]:
        """(min, max) document id."""
        return int(self.trace.doc_id.min()), int(self.trace.doc_id.max())

    def has_doc(self, doc: int) -> bool:
        """True if document `doc` is in the trace."""
        return bool((self.trace.doc_id == doc).any())

    def sample(self, text_doc: int | None = None) -> Trace:
        """The trace for sample-based analyses (here: all of it)."""
        return self.trace

    def usage(self, normalize: str, **kw: Any) -> usage.UsageResult:
        return usage.usage(self.trace, normalize, **kw)

    def balance(self, seed: int) -> usage.BalanceResult:
        return usage.balance(self.trace, seed=seed)

    def routing_entropy(self) -> usage.RoutingEntropyResult:
        return usage.routing_entropy(self.trace)

    def transition_summary(self, n: int, seed: int) -> transitions.TransitionSummary:
        return transitions.transition_summary(self.trace, n=n, seed=seed)

    def expert_transitions(self, layer: int, n: int, seed: int) -> transitions.TransitionMatrix:
        return transitions.expert_transitions(self.trace, layer, n, seed=seed)

    def set_transitions(self, layer: int, n: int, seed: int) -> transitions.TransitionMatrix:
        return transitions.set_transitions(self.trace, layer, n, seed=seed)

    def coactivation(self, layer: int, seed: int) -> coactivation.Coactivation:
        return coactivation.coactivation(self.trace, layer, seed=seed)

    def repeat_rate(self, seed: int) -> repeat.RepeatResult:
        return repeat.repeat_rate(self.trace, seed=seed)

    def by_domain(self, seed: int) -> specialization.GroupShares:
        return specialization.by_domain(self.trace, seed=seed)

    def by_vocab(self, target: str, min_count: int, seed: int) -> specialization.VocabShares:
        return specialization.by_vocab(self.trace, target, min_count=min_count, seed=seed)

    def by_token_class(self, decode: Callable[[int], str], seed: int) -> Any:
        return specialization.by_token_class(self.trace, decode, seed=seed)

    def predictability(self, min_count: int, seed: int) -> predictability.PredictabilityResult:
        return predictability.predictability(self.trace, min_count=min_count, seed=seed)

    def spread(self, min_count: int, seed: int) -> predictability.SpreadResult:
        return predictability.spread_token_vs_position(self.trace, min_count=min_count, seed=seed)

    def close(self) -> None:
        """Nothing to release."""


class StoreSource:
    """The out-of-core path over a trace store, on a DuckDB or Spark engine."""

    kind = "store"

    def __init__(self, eng: Engine, sample_tokens: int = 200_000, seed: int = 0) -> None:
        if sample_tokens < 1:
            raise AnalysisError(f"sample_tokens={sample_tokens}: expected >= 1")
        self.eng = eng
        self.sc = outofcore.StoreCounts(eng)
        self.meta: TraceMeta = eng.meta
        self.sample_tokens = int(sample_tokens)
        self.seed = seed
        self.tick: Callable[[], None] = lambda: None
        self._sample: Trace | None = None
        self.sample_info: dict[str, Any] | None = None
        self._doc_table: dict[str, np.ndarray] | None = None

    @property
    def num_tokens(self) -> int:
        """Rows of the store."""
        return self.sc.n_tokens_all()

    @property
    def has_logits(self) -> bool:
        """True if router logits were recorded."""
        return bool(self.meta.extra.get("logits", False))

    def _docs(self) -> dict[str, np.ndarray]:
        if self._doc_table is None:
            r = self.eng.query(
                "SELECT doc_id AS d, MIN(domain) AS dom, COUNT(*) AS n FROM trace GROUP BY doc_id"
            )
            order = np.argsort(r["d"])
            self._doc_table = {k: v[order].astype(np.int64) for k, v in r.items()}
        return self._doc_table

    def doc_range(self) -> tuple[int, int]:
        """(min, max) document id."""
        d = self._docs()["d"]
        return int(d.min()), int(d.max())

    def has_doc(self, doc: int) -> bool:
        """True if document `doc` is in the store."""
        d = self._docs()["d"]
        return bool(d.size) and bool(d[np.searchsorted(d, doc) % d.size] == doc)

    def sample_docs(self, text_doc: int | None = None) -> np.ndarray:
        """Seeded sample of whole documents, round-robin over domains (each domain's documents
        in a seeded random order) until sample_tokens rows; `text_doc` always included."""
        t = self._docs()
        rng = np.random.default_rng(self.seed)
        queues = []
        for dom in np.unique(t["dom"]):
            idx = np.flatnonzero(t["dom"] == dom)
            queues.append(list(rng.permutation(idx)))
        chosen, total = [], 0
        if text_doc is not None:
            i = int(np.searchsorted(t["d"], text_doc))
            chosen.append(i)
            total += int(t["n"][i])
        while total < self.sample_tokens and any(queues):
            for q in queues:
                if q and total < self.sample_tokens:
                    i = int(q.pop())
                    if i not in chosen:
                        chosen.append(i)
                        total += int(t["n"][i])
        return np.sort(t["d"][np.array(chosen, dtype=np.int64)])

    def sample(self, text_doc: int | None = None) -> Trace:
        """The sampled documents loaded as a Trace (memoised)."""
        if self._sample is None:
            docs = self.sample_docs(text_doc)
            self._sample = load_docs(self.eng.shards, self.meta, docs)
            self.sample_info = {
                "tokens": self._sample.num_tokens,
                "documents": int(docs.size),
                "of_tokens": self.num_tokens,
                "of_documents": int(self._docs()["d"].size),
                "seed": self.seed,
                "how": "whole documents, seeded round-robin over domains",
            }
        return self._sample

    def usage(self, normalize: str, **kw: Any) -> usage.UsageResult:
        return outofcore.usage(self.sc, normalize, **kw)

    def balance(self, seed: int) -> usage.BalanceResult:
        return outofcore.balance(self.sc, seed=seed)

    def routing_entropy(self) -> usage.RoutingEntropyResult:
        return outofcore.routing_entropy(self.eng)

    def transition_summary(self, n: int, seed: int) -> transitions.TransitionSummary:
        return outofcore.transition_summary(self.sc, n=n, seed=seed, progress=self.tick)

    def expert_transitions(self, layer: int, n: int, seed: int) -> transitions.TransitionMatrix:
        return outofcore.expert_transitions(self.sc, layer, n, seed=seed)

    def set_transitions(self, layer: int, n: int, seed: int) -> transitions.TransitionMatrix:
        return outofcore.set_transitions(self.sc, layer, n, seed=seed)

    def coactivation(self, layer: int, seed: int) -> coactivation.Coactivation:
        return outofcore.coactivation(self.sc, layer, seed=seed)

    def repeat_rate(self, seed: int) -> repeat.RepeatResult:
        return outofcore.repeat_rate(self.sc, seed=seed, progress=self.tick)

    def by_domain(self, seed: int) -> specialization.GroupShares:
        return outofcore.by_domain(self.sc, seed=seed)

    def _input_tables(self) -> outofcore.C.CompactTables:
        if not hasattr(self, "_inp"):
            self._inp = outofcore._key_tables(self.sc, "g", "token_id", progress=self.tick)
        return self._inp

    def by_vocab(self, target: str, min_count: int, seed: int) -> specialization.VocabShares:
        tabs = self._input_tables() if target == "input" else None
        return outofcore.by_vocab(self.sc, target, min_count=min_count, seed=seed, tables=tabs)

    def by_token_class(self, decode: Callable[[int], str], seed: int) -> Any:
        return outofcore.by_token_class(self.sc, decode, seed=seed, tables=self._input_tables())

    def predictability(self, min_count: int, seed: int) -> predictability.PredictabilityResult:
        return outofcore.predictability(
            self.sc, min_count=min_count, seed=seed, progress=self.tick, tables=self._input_tables()
        )

    def spread(self, min_count: int, seed: int) -> predictability.SpreadResult:
        return outofcore.spread_token_vs_position(
            self.sc, min_count=min_count, seed=seed, tables=self._input_tables()
        )

    def close(self) -> None:
        """Release the tables and the engine."""
        if hasattr(self, "_inp"):
            del self._inp
        self.eng.close()


def load_docs(shards: list[Path], meta: TraceMeta, doc_ids: np.ndarray) -> Trace:
    """The rows of the given documents, read shard by shard with a doc_id filter, as a Trace in
    (doc_id, position) order (weights and logits as float32)."""
    L, k = meta.num_layers, meta.top_k
    logits = bool(meta.extra.get("logits", False))
    cols = list(BASE_COLUMNS) + [f"e{li}_{j}" for li in range(L) for j in range(k)]
    cols += [f"w{li}_{j}" for li in range(L) for j in range(k)]
    if logits:
        cols += [f"logits{li}" for li in range(L)]
    want = [int(d) for d in np.asarray(doc_ids)]
    parts = []
    for s in shards:
        t = pq.read_table(str(s), columns=cols, filters=[("doc_id", "in", want)])
        if t.num_rows:
            parts.append(t)
    if not parts:
        raise AnalysisError("sample: none of the sampled documents has rows in the shards")
    import pyarrow as pa

    return table_to_trace(pa.concat_tables(parts), meta)


def table_to_trace(t: Any, meta: TraceMeta, logits: bool | None = None) -> Trace:
    """Shard rows (an Arrow table with the store's columns) as a Trace in (doc_id, position)
    order, weights and logits as float32 (logits=False skips them)."""
    L, k, E = meta.num_layers, meta.top_k, meta.num_experts
    if logits is None:
        logits = bool(meta.extra.get("logits", False)) and "logits0" in t.column_names
    doc = t["doc_id"].to_numpy()
    pos = t["position"].to_numpy()
    order = np.lexsort((pos, doc))
    n = t.num_rows
    sentinel = np.iinfo(id_dtype(E)).max
    ids = np.empty((n, L, k), np.int16)
    w = np.empty((n, L, k), np.float32)
    lg = np.empty((n, L, E), np.float32) if logits else None
    for li in range(L):
        for j in range(k):
            e = t[f"e{li}_{j}"].to_numpy().astype(np.int16)
            ids[:, li, j] = np.where(e == sentinel, NO_EXPERT, e)
            w[:, li, j] = decode_floats(t[f"w{li}_{j}"])
        if lg is not None:
            lg[:, li, :] = decode_floats(t[f"logits{li}"], E)
    base = {
        "doc_id": doc.astype(np.int64),
        "position": pos.astype(np.int32),
        "token_id": t["token_id"].to_numpy().astype(np.int64),
        "domain": t["domain"].to_numpy().astype(np.int16),
        "is_bos": t["is_bos"].to_numpy(zero_copy_only=False).astype(bool),
    }
    return Trace(
        meta=meta,
        expert_ids=ids[order],
        weights=w[order],
        logits=None if lg is None else lg[order],
        **{k2: v[order] for k2, v in base.items()},
    )
