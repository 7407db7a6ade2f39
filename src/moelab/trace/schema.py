"""In-memory trace types shared by tracing, analysis, predictors and offloading (DESIGN.md §4).

A Trace holds N token rows in document order (rows of one document are consecutive and sorted
by position), and per MoE layer l in 0..L-1 (index into the model's MoE layers, not its
transformer layers; `meta.layer_indices[l]` gives the transformer layer) the top-k choices.
Unused slots (expert-choice) hold NO_EXPERT and weight 0; a capacity-dropped slot keeps the
expert the router chose, weight 0, and `dropped` True (stores with meta.extra["dropped"]).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from moelab.errors import TraceError

SCHEMA_VERSION = 2  # 2: weights/logits float32 (1: float16, still read; docs/trace_schema.md)
NO_EXPERT = -1  # value in int arrays; stored on disk as the max of the unsigned dtype


@dataclass
class TraceMeta:
    """What produced a trace; written as meta.json beside the shards."""

    num_layers: int  # number of MoE layers L
    num_experts: int  # E
    top_k: int  # k slots recorded per token and layer
    layer_indices: list[int] = field(default_factory=list)  # transformer layer of each MoE layer
    model: str = ""  # path or name
    family: str = ""  # adapter family, e.g. "moelab", "mixtral"
    tokenizer: str = ""
    corpus: str = ""
    split: str = ""
    domains: list[str] = field(default_factory=list)  # domain code -> name
    score_fn: str = "softmax"  # how logits become probabilities ("softmax" | "sigmoid")
    d_model: int = 0
    schema_version: int = SCHEMA_VERSION
    moelab_version: str = ""
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return asdict(self)

    @property
    def model_fingerprint(self) -> str | None:
        """Hash of the traced model's router weights (meta.extra["run"]), None if not recorded."""
        run = self.extra.get("run") or {}
        fp = run.get("model_fingerprint") if isinstance(run, dict) else None
        return str(fp) if fp else None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TraceMeta:
        """Inverse of to_dict; ignores no key silently (unknown keys go to extra)."""
        known = set(cls.__dataclass_fields__)
        extra = dict(d.get("extra", {}))
        extra.update({k: v for k, v in d.items() if k not in known})
        return cls(**{k: v for k, v in d.items() if k in known and k != "extra"}, extra=extra)


def check_same_model(
    a_fp: str | None, a_model: str, a_what: str, b_fp: str | None, b_model: str, b_what: str
) -> None:
    """Raise TraceError when two traces (or a predictor and a trace) come from different models.

    Compares router fingerprints; skipped when either side has none (synthetic traces).
    """
    if a_fp and b_fp and a_fp != b_fp:
        raise TraceError(
            f"{a_what} comes from model {a_model or '?'} (router fingerprint {a_fp}) but"
            f" {b_what} comes from model {b_model or '?'} (router fingerprint {b_fp}): routing"
            " of one model does not predict another's experts, the scores would be"
            " chance-level. Use traces of the same model (the same checkpoint and --dtype; a"
            " trace in another dtype has another fingerprint), or fit again on a trace of"
            f" {b_model or 'the second model'}"
        )


@dataclass
class Trace:
    """N token rows with per-layer routing; numpy arrays (possibly memory-mapped).

    token_id [N] int64, doc_id [N] int64, position [N] int32, domain [N] int16 (code into
    meta.domains), is_bos [N] bool, split: one name for the whole trace (meta.split),
    expert_ids [N, L, k] int16 (NO_EXPERT = -1 for unused slots), weights [N, L, k] float32,
    logits [N, L, E] float32 or None.
    hidden: optional side store: point name ("router_input" | "residual") -> array [M, L, D]
    for the sampled rows `hidden_rows` [M] (row indices into this trace).
    """

    meta: TraceMeta
    token_id: np.ndarray
    doc_id: np.ndarray
    position: np.ndarray
    domain: np.ndarray
    is_bos: np.ndarray
    expert_ids: np.ndarray
    weights: np.ndarray
    logits: np.ndarray | None = None
    hidden: dict[str, np.ndarray] = field(default_factory=dict)
    hidden_rows: np.ndarray | None = None
    dropped: np.ndarray | None = None  # [N, L, k] bool over-capacity flags (if recorded)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_tokens(self) -> int:
        """N."""
        return int(self.token_id.shape[0])

    def computed_expert_ids(self) -> np.ndarray:
        """[N, L, k] experts that actually ran: capacity-dropped slots (which keep the router's
        choice in expert_ids) become NO_EXPERT; what an offloaded model has to load."""
        if self.dropped is None:
            return self.expert_ids
        return np.where(self.dropped, np.asarray(NO_EXPERT, self.expert_ids.dtype), self.expert_ids)

    def validate(self) -> None:
        """Check shapes agree with each other and with meta; raise TraceError naming the field."""
        n, m = self.num_tokens, self.meta
        for name in ("doc_id", "position", "domain", "is_bos"):
            a = getattr(self, name)
            if a.shape != (n,):
                raise TraceError(f"Trace.{name}: expected shape ({n},), got {a.shape}")
        want = (n, m.num_layers, m.top_k)
        for name in ("expert_ids", "weights", "dropped"):
            a = getattr(self, name)
            if a is None and name == "dropped":
                continue
            if a.shape != want:
                raise TraceError(f"Trace.{name}: expected shape {want} (N, L, k), got {a.shape}")
        if self.logits is not None and self.logits.shape != (n, m.num_layers, m.num_experts):
            raise TraceError(
                f"Trace.logits: expected shape {(n, m.num_layers, m.num_experts)}, got {self.logits.shape}"
            )
        if self.hidden:
            if self.hidden_rows is None:
                raise TraceError("Trace.hidden given without hidden_rows")
            for point, h in self.hidden.items():
                if (
                    h.ndim != 3
                    or h.shape[0] != self.hidden_rows.shape[0]
                    or h.shape[1] != m.num_layers
                ):
                    raise TraceError(
                        f"Trace.hidden[{point!r}]: expected [M={self.hidden_rows.shape[0]}, L={m.num_layers}, D],"
                        f" got {h.shape}"
                    )

    def prev_row(self) -> np.ndarray:
        """[N] index of the previous token of the same document, or -1 at a document start."""
        prev = np.arange(self.num_tokens) - 1
        ok = np.zeros(self.num_tokens, dtype=bool)
        ok[1:] = (self.doc_id[1:] == self.doc_id[:-1]) & (
            self.position[1:] == self.position[:-1] + 1
        )
        return np.where(ok, prev, -1)

    def select(self, rows: np.ndarray) -> Trace:
        """A new Trace of the given rows (bool mask or indices); hidden rows are re-indexed."""
        idx = np.flatnonzero(rows) if rows.dtype == bool else np.asarray(rows)
        hidden, hrows = {}, None
        if self.hidden and self.hidden_rows is not None:
            pos = {int(r): i for i, r in enumerate(self.hidden_rows)}
            keep = [(j, pos[int(r)]) for j, r in enumerate(idx) if int(r) in pos]
            hrows = np.array([j for j, _ in keep], dtype=np.int64)
            src = np.array([i for _, i in keep], dtype=np.int64)
            hidden = {k: v[src] for k, v in self.hidden.items()}
        return Trace(
            meta=self.meta,
            token_id=self.token_id[idx],
            doc_id=self.doc_id[idx],
            position=self.position[idx],
            domain=self.domain[idx],
            is_bos=self.is_bos[idx],
            expert_ids=self.expert_ids[idx],
            weights=self.weights[idx],
            logits=None if self.logits is None else self.logits[idx],
            dropped=None if self.dropped is None else self.dropped[idx],
            hidden=hidden,
            hidden_rows=hrows if hidden else None,
        )
