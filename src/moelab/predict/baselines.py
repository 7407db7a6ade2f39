"""Baseline expert predictors: per-layer frequency prior, previous layer, previous token.

The previous-layer and previous-token rules are the reference points of expert-prefetching
work (consecutive layers / consecutive tokens share experts more often than chance; e.g.
Eliseev & Mazur 2023, "Fast Inference of MoE Language Models with Offloading", Sec. 3.1).
Each copies the source's top-k set (ranked by its routing weight) and breaks the remaining
ranking (budgets m > k) with the train split's frequency prior.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moelab.predict.base import Horizon, Predictor, multi_hot, source_rows
from moelab.trace.schema import Trace

PRIOR_SMOOTH = 1.0  # add-one smoothing of expert counts


def expert_prior(train: Trace) -> np.ndarray:
    """[L, E] float32 smoothed share of routed slots that went to each expert, per layer."""
    n, num_layers, _ = train.expert_ids.shape
    e = train.meta.num_experts
    out = np.zeros((num_layers, e), dtype=np.float64)
    for layer in range(num_layers):
        ids = train.expert_ids[:, layer, :].astype(np.int64).ravel()
        ids = ids[ids >= 0]
        out[layer] = np.bincount(ids, minlength=e)[:e] + PRIOR_SMOOTH
    return (out / out.sum(1, keepdims=True)).astype(np.float32)


class FrequencyPrior(Predictor):
    """Score = how often the train split routed to each expert at the target layer."""

    name = "prior"
    context_tokens = 1

    def __init__(self, horizon: Horizon | None = None, seed: int = 0) -> None:
        super().__init__(horizon or Horizon(layers_ahead=1), seed)
        self.prior = np.zeros((0, 0), np.float32)

    def _fit(self, train: Trace) -> None:
        self.prior = expert_prior(train)

    def _predict(self, trace: Trace, layer: int, avail: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.prior[layer], (trace.num_tokens, self.num_experts))

    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, {"prior": self.prior}

    def _set_state(self, state: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        self.prior = tensors["prior"]


class _CopyBaseline(FrequencyPrior):
    """Shared scoring: source set (weight-ordered, >= 1) + prior (< 1) for the rest."""

    def _copy(self, ids: np.ndarray, weights: np.ndarray, layer: int, ok: np.ndarray) -> np.ndarray:
        w = np.where(ids >= 0, weights, 0.0)
        hot = multi_hot(np.where(ok[:, None], ids, -1), self.num_experts, 1.0 + 0.5 * w)
        return hot + 0.5 * self.prior[layer][None, :]


class PreviousLayer(_CopyBaseline):
    """Spatial: predict layer l's experts = the experts the same token used at layer l - d."""

    name = "prev-layer"
    horizon_kinds = ("spatial",)

    def _predict(self, trace: Trace, layer: int, avail: np.ndarray) -> np.ndarray:
        src = layer - self.horizon.layers_ahead
        return self._copy(trace.expert_ids[:, src], trace.weights[:, src], layer, avail)


class PreviousToken(_CopyBaseline):
    """Temporal: predict token t's experts at layer l = the experts token t-1 used at layer l."""

    name = "prev-token"
    horizon_kinds = ("temporal",)
    context_tokens = 1

    def __init__(self, horizon: Horizon | None = None, seed: int = 0) -> None:
        super().__init__(horizon or Horizon(tokens_ahead=1), seed)

    def _predict(self, trace: Trace, layer: int, avail: np.ndarray) -> np.ndarray:
        src = np.maximum(source_rows(trace, self.horizon.tokens_ahead), 0)
        return self._copy(trace.expert_ids[src, layer], trace.weights[src, layer], layer, avail)
