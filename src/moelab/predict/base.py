"""Predictor interface: Horizon, PredictorCost, the Predictor base class, save/load and splits.

A predictor scores the experts a token will use before the router decides (DESIGN.md §4).
Two horizons (as in expert-prefetching work, e.g. Eliseev & Mazur 2023, "Fast Inference of
Mixture-of-Experts Language Models with Offloading", and Hwang et al. 2024, "Pre-gated MoE"):

* spatial, ``Horizon(layers_ahead=d)``: the same token, target MoE layer ``l``, predicted from
  what is known once MoE layer ``s = l - d`` has routed: the token ids up to and including the
  current one, the current token's routing at layers ``<= s``, its hidden state at layer ``s``
  and everything about earlier tokens. Target layers ``l < d`` have no source: unavailable.
* temporal, ``Horizon(tokens_ahead=t)``: the same layer, the token ``t`` positions later,
  predicted from what is known when the source token (``t`` positions earlier in the same
  document) has finished its forward pass: ids and routing of the source token and earlier.
  The target token's own id is NOT used. Rows without a source token in the document are
  unavailable.
* ``Horizon()`` (both zero): the d = 0 sanity check (information of the target layer itself).

`Predictor.predict_scores(trace, layer)` returns [N, E] float32 scores; rows whose source is
unavailable are NaN (explicitly marked) and evaluation excludes them. `available()` gives the
mask. `predict_step(StepContext)` is the per-step API used live during generation.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from safetensors.numpy import load_file, save_file

from moelab._io import atomic_write_json, atomic_write_with
from moelab.errors import ConfigError, PredictorError, TraceError
from moelab.trace.schema import NO_EXPERT, Trace, TraceMeta, check_same_model

FORMAT_VERSION = 1
STATE_FILE = "predictor.json"
TENSOR_FILE = "tensors.safetensors"


@dataclass(frozen=True)
class Horizon:
    """How far ahead a prediction is made: `layers_ahead` (spatial) or `tokens_ahead` (temporal)."""

    layers_ahead: int = 0
    tokens_ahead: int = 0

    def __post_init__(self) -> None:
        for name in ("layers_ahead", "tokens_ahead"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 0:
                raise ConfigError(f"Horizon.{name}={v!r}: expected an int >= 0")
        if self.layers_ahead and self.tokens_ahead:
            raise ConfigError(
                f"Horizon(layers_ahead={self.layers_ahead}, tokens_ahead={self.tokens_ahead}):"
                " at most one of the two may be nonzero"
            )

    @property
    def kind(self) -> str:
        """'spatial', 'temporal' or 'identity' (d = 0)."""
        if self.tokens_ahead:
            return "temporal"
        return "spatial" if self.layers_ahead else "identity"

    def __str__(self) -> str:
        return f"t+{self.tokens_ahead}" if self.tokens_ahead else f"d={self.layers_ahead}"

    def to_dict(self) -> dict[str, int]:
        """JSON form."""
        return {"layers_ahead": int(self.layers_ahead), "tokens_ahead": int(self.tokens_ahead)}

    @classmethod
    def parse(cls, text: str) -> Horizon:
        """Parse 'd=2', 'd2', 't+1' or 't1' (CLI form)."""
        s = text.strip().lower().replace("=", "").replace("+", "")
        try:
            if s.startswith("d"):
                return cls(layers_ahead=int(s[1:]))
            if s.startswith("t"):
                return cls(tokens_ahead=int(s[1:]))
        except ValueError:
            pass
        raise ConfigError(f"horizon {text!r}: expected 'd=<layers ahead>' or 't+<tokens ahead>'")


@dataclass
class PredictorCost:
    """Size and speed of a predictor: parameters, bytes of state, µs per token on this machine.

    `us_per_token` is the amortised batch time to score every available target layer for one
    token; `us_per_step` the latency of one `predict_step` call (one layer, one token).
    """

    params: int
    bytes: int
    us_per_token: float = float("nan")
    us_per_step: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "params": int(self.params),
            "bytes": int(self.bytes),
            "us_per_token": float(self.us_per_token),
            "us_per_step": float(self.us_per_step),
            **self.extra,
        }


@dataclass
class StepContext:
    """What is known live when one prediction is made during generation.

    token_ids [t]: ids of the document so far, ending at the current token (spatial) or at the
    source token (temporal). experts [t, L, k]: their routing (NO_EXPERT where not yet known;
    for the current token, layers after the source layer). hidden: point -> [L, D] hidden
    states of the last token (rows of layers not yet computed are ignored). layer: target layer.
    weights [t, L, k]: routing weights of `experts` (None = uniform 1/k; the copy baselines
    order the copied set by weight).
    """

    token_ids: np.ndarray
    experts: np.ndarray
    layer: int
    hidden: dict[str, np.ndarray] = field(default_factory=dict)
    weights: np.ndarray | None = None


_REGISTRY: dict[str, type[Predictor]] = {}


def source_rows(trace: Trace, tokens_ahead: int) -> np.ndarray:
    """[N] row of the token `tokens_ahead` positions earlier in the same document, or -1."""
    prev = trace.prev_row()
    src = np.arange(trace.num_tokens)
    for _ in range(tokens_ahead):
        src = np.where(src >= 0, prev[np.maximum(src, 0)], -1)
    return src


def hidden_index(trace: Trace) -> np.ndarray:
    """[N] position of each row in the hidden side store, or -1 where no hidden state was kept."""
    out = np.full(trace.num_tokens, -1, dtype=np.int64)
    if trace.hidden and trace.hidden_rows is not None:
        out[np.asarray(trace.hidden_rows, dtype=np.int64)] = np.arange(len(trace.hidden_rows))
    return out


def true_sets(trace: Trace, layer: int) -> np.ndarray:
    """[N, k] expert ids of `layer` with NO_EXPERT for unused slots (int64)."""
    return trace.expert_ids[:, layer, :].astype(np.int64)


def multi_hot(ids: np.ndarray, num_experts: int, weights: np.ndarray | None = None) -> np.ndarray:
    """[n, k] ids (NO_EXPERT ignored) -> [n, E] float32 indicator (or summed weights)."""
    n = ids.shape[0]
    out = np.zeros((n, num_experts), dtype=np.float32)
    valid = ids != NO_EXPERT
    r = np.repeat(np.arange(n), ids.shape[1]).reshape(ids.shape)
    vals = np.ones(ids.shape, np.float32) if weights is None else weights.astype(np.float32)
    np.add.at(out, (r[valid], ids[valid]), vals[valid])
    return out


class Predictor(ABC):
    """Base class: sklearn-style `fit(train) -> self`, `predict_scores(trace, layer) -> [N, E]`.

    Subclasses implement `_fit`, `_predict` (scores for all rows; rows outside `available` are
    overwritten with NaN by the base class), `_get_state`/`_set_state` for save/load, and may
    narrow `available` (e.g. to rows with hidden states). `context_tokens` bounds the history
    `predict_step` passes on.
    """

    name: ClassVar[str] = "predictor"
    horizon_kinds: ClassVar[tuple[str, ...]] = ("spatial", "temporal", "identity")
    context_tokens: int = 1

    def __init__(self, horizon: Horizon, seed: int = 0) -> None:
        if not isinstance(horizon, Horizon):
            raise ConfigError(f"{type(self).__name__}: horizon must be a Horizon, got {horizon!r}")
        if horizon.kind not in self.horizon_kinds:
            raise ConfigError(
                f"{type(self).__name__} does not support horizon {horizon} ({horizon.kind});"
                f" supported: {', '.join(self.horizon_kinds)}"
            )
        self.horizon = horizon
        self.seed = int(seed)
        self.num_layers = 0
        self.num_experts = 0
        self.top_k = 0
        self.fitted = False
        self.fit_info: dict[str, Any] = {}
        self._cost_sample: Trace | None = None

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        _REGISTRY[cls.__name__] = cls

    # ------------------------------------------------------------------ identity
    @property
    def label(self) -> str:
        """Short display name including the horizon, e.g. 'ngram(n=2) d=1'."""
        return f"{self.describe()} {self.horizon}"

    def describe(self) -> str:
        """Name with the key hyper-parameters."""
        return self.name

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (besides horizon and seed) for save/load."""
        return {}

    # ------------------------------------------------------------------ fitting
    def fit(self, train: Trace) -> Predictor:
        """Learn from the train split only; returns self."""
        if not isinstance(train, Trace):
            raise PredictorError(
                f"{type(self).__name__}.fit: expected a Trace, got {type(train).__name__}"
            )
        if train.num_tokens == 0:
            raise PredictorError(f"{type(self).__name__}.fit: the train trace is empty")
        m = train.meta
        if self.horizon.layers_ahead >= m.num_layers:
            raise PredictorError(
                f"{type(self).__name__}: horizon {self.horizon} needs more than {m.num_layers} MoE layers"
            )
        self.num_layers, self.num_experts, self.top_k = m.num_layers, m.num_experts, m.top_k
        self.fit_info = {"train_split": m.split or "train", "train_tokens": train.num_tokens}
        if m.model_fingerprint:  # evaluation refuses traces of another model
            self.fit_info["model"] = m.model
            self.fit_info["model_fingerprint"] = m.model_fingerprint
        self._fit(train)
        self.fitted = True
        self._cost_sample = train.select(np.arange(min(train.num_tokens, 1024)))
        return self

    @abstractmethod
    def _fit(self, train: Trace) -> None:
        """Subclass learning step (may be a validation-only step for fixed rules)."""

    # ------------------------------------------------------------------ prediction
    def target_layers(self) -> list[int]:
        """Target layers that have a source under this horizon."""
        return list(range(self.horizon.layers_ahead, self.num_layers))

    def available(self, trace: Trace, layer: int) -> np.ndarray:
        """[N] bool: rows whose source information exists for target `layer` under the horizon."""
        self._check(trace, layer)
        n = trace.num_tokens
        if self.horizon.kind == "temporal":
            return source_rows(trace, self.horizon.tokens_ahead) >= 0
        return np.full(n, layer >= self.horizon.layers_ahead, dtype=bool)

    def predict_scores(self, trace: Trace, layer: int) -> np.ndarray:
        """[N, E] float32 scores for the experts of target `layer`; NaN rows = no source."""
        self._check(trace, layer)
        avail = self.available(trace, layer)
        out = np.full((trace.num_tokens, self.num_experts), np.nan, dtype=np.float32)
        if avail.any():
            s = np.asarray(self._predict(trace, layer, avail), dtype=np.float32)
            if s.shape != out.shape:
                raise PredictorError(
                    f"{type(self).__name__}._predict returned {s.shape}, expected {out.shape}"
                )
            out[avail] = s[avail]
        return out

    @abstractmethod
    def _predict(self, trace: Trace, layer: int, avail: np.ndarray) -> np.ndarray:
        """[N, E] scores; only rows where `avail` is true are used."""

    def predict_step(self, ctx: StepContext) -> np.ndarray:
        """Live API: [E] scores for one token at target `ctx.layer` from what is known now.

        Spatial: the target is the last token of `ctx.token_ids`. Temporal: the target is the
        token `tokens_ahead` after the last one (its id is not known and not used).
        """
        if not self.fitted:
            raise PredictorError(f"{self.label}: predict_step before fit() or load()")
        ids = np.asarray(ctx.token_ids, dtype=np.int64)
        ex = np.asarray(ctx.experts)
        t = ids.shape[0]
        if t == 0 or ex.shape != (t, self.num_layers, self.top_k):
            raise PredictorError(
                f"StepContext: token_ids has {t} entries and experts shape {ex.shape};"
                f" expected t >= 1 and [t, {self.num_layers}, {self.top_k}]"
            )
        keep = min(t, max(self.context_tokens, 1) + self.horizon.tokens_ahead)
        ids, ex = ids[t - keep :], ex[t - keep :].astype(np.int16)
        if ctx.weights is not None:
            w = np.asarray(ctx.weights, dtype=np.float32)[t - keep :]
        else:
            w = np.where(ex != NO_EXPERT, 1.0 / self.top_k, 0.0).astype(np.float32)
        extra = self.horizon.tokens_ahead
        if extra:
            ids = np.concatenate([ids, np.zeros(extra, np.int64)])
            ex = np.concatenate([ex, np.full((extra, *ex.shape[1:]), NO_EXPERT, np.int16)])
            w = np.concatenate([w, np.zeros((extra, *w.shape[1:]), np.float32)])
        n = ids.shape[0]
        hidden, hrows = {}, None
        if ctx.hidden:
            hidden = {k: np.asarray(v, dtype=np.float32)[None] for k, v in ctx.hidden.items()}
            hrows = np.array([keep - 1], dtype=np.int64)
        meta = replace(self._meta(), split="live")
        tr = Trace(
            meta=meta,
            token_id=ids,
            doc_id=np.zeros(n, np.int64),
            position=np.arange(n, dtype=np.int32),
            domain=np.zeros(n, np.int16),
            is_bos=np.zeros(n, bool),
            expert_ids=ex,
            weights=w,
            hidden=hidden,
            hidden_rows=hrows,
        )
        return self.predict_scores(tr, ctx.layer)[-1]

    def _meta(self) -> TraceMeta:
        return TraceMeta(num_layers=self.num_layers, num_experts=self.num_experts, top_k=self.top_k)

    def _check(self, trace: Trace, layer: int) -> None:
        if not self.fitted:
            raise PredictorError(
                f"{self.label}: not fitted (call fit(train) or Predictor.load(path))"
            )
        m = trace.meta
        if (m.num_layers, m.num_experts, m.top_k) != (
            self.num_layers,
            self.num_experts,
            self.top_k,
        ):
            raise PredictorError(
                f"{self.label}: trace has L={m.num_layers}, E={m.num_experts}, k={m.top_k};"
                f" the predictor was fitted on L={self.num_layers}, E={self.num_experts}, k={self.top_k}"
            )
        if not 0 <= layer < self.num_layers:
            raise PredictorError(f"{self.label}: layer={layer} outside 0..{self.num_layers - 1}")
        self.check_model(trace)

    def check_model(
        self,
        trace: Trace | TraceMeta,
        what: str = "the trace it is asked to score",
        name: str | None = None,
    ) -> None:
        """PredictorError if `trace` comes from another model than the one this was fitted on."""
        meta = trace.meta if isinstance(trace, Trace) else trace
        try:
            check_same_model(
                self.fit_info.get("model_fingerprint"),
                str(self.fit_info.get("model", "")),
                f"predictor {name or self.label} was fitted on a trace that",
                meta.model_fingerprint,
                meta.model,
                what,
            )
        except TraceError as exc:
            raise PredictorError(str(exc)) from None

    # ------------------------------------------------------------------ cost
    def clear_cache(self) -> None:
        """Forget per-input caches (timings then include the work done once per token)."""
        for name in ("_cache", "_lookup_cache"):
            if hasattr(self, name):
                setattr(self, name, None)

    def cost(self, trace: Trace | None = None, repeats: int = 3, steps: int = 20) -> PredictorCost:
        """Parameters, bytes and measured µs per token (batch) and per step on this machine."""
        _, tensors = self._get_state()
        params = int(sum(int(np.asarray(t).size) for t in tensors.values()))
        nbytes = int(sum(int(np.asarray(t).nbytes) for t in tensors.values()))
        sample = trace if trace is not None else self._cost_sample
        us_tok = us_step = float("nan")
        if sample is not None and self.fitted:
            layers = self.target_layers()
            times = []
            for _ in range(max(repeats, 1)):
                self.clear_cache()
                t0 = time.perf_counter()
                for layer in layers:
                    self.predict_scores(sample, layer)
                times.append(time.perf_counter() - t0)
            us_tok = float(np.median(times)) * 1e6 / max(sample.num_tokens, 1)
            us_step = self._step_latency(sample, layers, steps)
        return PredictorCost(params=params, bytes=nbytes, us_per_token=us_tok, us_per_step=us_step)

    def _step_latency(self, sample: Trace, layers: list[int], steps: int) -> float:
        hi = hidden_index(sample)
        rows = np.flatnonzero(
            self.available(sample, layers[-1]) & (hi >= 0 if sample.hidden else True)
        )
        rows = rows[rows >= self.context_tokens][:steps]
        if rows.size == 0 or not layers:
            return float("nan")
        times = []
        for r in rows:
            lo = max(0, r - self.context_tokens - self.horizon.tokens_ahead + 1)
            end = r + 1 - self.horizon.tokens_ahead
            ex = sample.expert_ids[lo:end].copy()
            if self.horizon.kind != "temporal":
                ex[-1, layers[-1] - self.horizon.layers_ahead + 1 :] = NO_EXPERT
            hid = {}
            if sample.hidden and hi[end - 1] >= 0:
                hid = {k: v[hi[end - 1]] for k, v in sample.hidden.items()}
            ctx = StepContext(sample.token_id[lo:end], ex, layers[-1], hid, sample.weights[lo:end])
            t0 = time.perf_counter()
            self.predict_step(ctx)
            times.append(time.perf_counter() - t0)
        return float(np.median(times)) * 1e6

    # ------------------------------------------------------------------ persistence
    @abstractmethod
    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able state, tensors) of the fitted predictor."""

    @abstractmethod
    def _set_state(self, state: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        """Restore what `_get_state` returned."""

    def save(self, path: str | Path) -> Path:
        """Write `path/tensors.safetensors` then `path/predictor.json` (each atomically)."""
        if not self.fitted:
            raise PredictorError(f"{self.label}: cannot save an unfitted predictor")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state, tensors = self._get_state()
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        atomic_write_with(path / TENSOR_FILE, lambda tmp: save_file(tensors, str(tmp)))
        doc = {
            "format_version": FORMAT_VERSION,
            "class": type(self).__name__,
            "horizon": self.horizon.to_dict(),
            "seed": self.seed,
            "config": self.config(),
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "fit_info": self.fit_info,
            "state": state,
        }
        atomic_write_json(path / STATE_FILE, doc)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Predictor:
        """Read a predictor saved by `save` (any subclass; the class is recorded in the JSON)."""
        path = Path(path)
        js, ts = path / STATE_FILE, path / TENSOR_FILE
        if not js.exists() or not ts.exists():
            raise PredictorError(
                f"{path}: not a saved predictor (expected {STATE_FILE} and {TENSOR_FILE})"
            )
        try:
            doc = json.loads(js.read_text())
            klass = _REGISTRY[doc["class"]]
            tensors = load_file(str(ts))
        except (KeyError, ValueError, OSError) as exc:
            raise PredictorError(f"{path}: unreadable predictor files ({exc!r})") from exc
        if cls is not Predictor and not issubclass(klass, cls):
            raise PredictorError(f"{path}: holds a {klass.__name__}, not a {cls.__name__}")
        obj = klass(horizon=Horizon(**doc["horizon"]), seed=doc["seed"], **doc["config"])
        obj.num_layers, obj.num_experts, obj.top_k = (
            doc["num_layers"],
            doc["num_experts"],
            doc["top_k"],
        )
        obj.fit_info = doc.get("fit_info", {})
        obj._set_state(doc["state"], tensors)
        obj.fitted = True
        return obj


def split_by_document(trace: Trace, fractions: dict[str, float], seed: int = 0) -> dict[str, Trace]:
    """Split rows by whole documents into named parts (fractions of documents, seeded)."""
    if (
        not fractions
        or any(f < 0 for f in fractions.values())
        or abs(sum(fractions.values()) - 1) > 1e-6
    ):
        raise ConfigError(f"split fractions {fractions}: expected non-negative values summing to 1")
    docs = np.unique(trace.doc_id)
    if docs.size < len([f for f in fractions.values() if f > 0]):
        raise PredictorError(
            f"cannot split {docs.size} document(s) into {list(fractions)}: need one document per part"
        )
    rng = np.random.default_rng(seed)
    order = docs[rng.permutation(docs.size)]
    bounds = np.round(np.cumsum([0.0, *fractions.values()]) * docs.size).astype(int)
    out: dict[str, Trace] = {}
    for i, name in enumerate(fractions):
        chosen = order[bounds[i] : bounds[i + 1]]
        part = trace.select(np.isin(trace.doc_id, chosen))
        part.meta = replace(trace.meta, split=name)
        out[name] = part
    return out
