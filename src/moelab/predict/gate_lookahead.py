"""Gate lookahead: apply MoE layer l+d's router to layer l's hidden state (no model needed).

Eliseev & Mazur 2023 ("Fast Inference of Mixture-of-Experts Language Models with Offloading",
Sec. 3.2) guess the next layer's experts by applying the next layer's gate to the current
layer's hidden state; Hwang et al. 2024 ("Pre-gated MoE") train such pre-gates. Here the gates
are the model's own routers saved with the trace (`gates.safetensors`, `moelab.trace.gates`):

    scores_{l+d}(x) = softmax(W_{l+d} x_l + b_{l+d})  (+ selection bias; sigmoid for DeepSeek)

with x_l the router input of layer l ("router_input"), or, for the residual-stream variant,
x = RMSNorm_{l+d}(r_l) with r_l the residual stream at layer l ("residual"). With d = 0 and the
router input this reproduces the recorded routing exactly. Only rows with stored hidden states
are available.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moelab.errors import ConfigError, PredictorError
from moelab.predict.base import Horizon, Predictor, hidden_index
from moelab.trace.gates import GateSet
from moelab.trace.schema import Trace

HIDDEN_POINTS = ("router_input", "residual")


def require_hidden(trace: Trace, point: str, who: str) -> None:
    """Raise PredictorError telling how to retrace if `trace` lacks hidden states at `point`."""
    if point not in HIDDEN_POINTS:
        raise ConfigError(f"{who}: point={point!r}, expected one of {HIDDEN_POINTS}")
    if not trace.hidden or point not in trace.hidden or trace.hidden_rows is None:
        have = sorted(trace.hidden) if trace.hidden else "none"
        raise PredictorError(
            f"{who} needs hidden states {point!r} in the trace, but it has {have}. Retrace with"
            " hidden states recorded, e.g. `moelab trace --model <model> --out <dir>"
            " --hidden-layers all --hidden-rate 0.1 --hidden-points router_input,residual`"
            " (the side store keeps the router input and residual stream of every MoE layer"
            " for the sampled rows)."
        )


class GateLookahead(Predictor):
    """Scores of layer l+d's router applied to layer l's router input (or normalised residual)."""

    name = "gate-lookahead"
    horizon_kinds = ("spatial", "identity")
    context_tokens = 1

    def __init__(
        self,
        horizon: Horizon | None = None,
        seed: int = 0,
        gates: GateSet | None = None,
        point: str = "router_input",
    ) -> None:
        super().__init__(horizon or Horizon(layers_ahead=1), seed)
        if point not in HIDDEN_POINTS:
            raise ConfigError(f"GateLookahead: point={point!r}, expected one of {HIDDEN_POINTS}")
        self.gates = gates
        self.point = point

    def describe(self) -> str:
        return "gate-lookahead" + ("(residual)" if self.point == "residual" else "")

    def config(self) -> dict[str, Any]:
        return {"point": self.point}

    def _fit(self, train: Trace) -> None:
        if self.gates is None:
            raise PredictorError(
                "GateLookahead: no gates given; pass gates=TraceStore.open(path).gates() (the routers"
                " saved with the trace as gates.safetensors)"
            )
        if self.gates.num_layers != self.num_layers:
            raise PredictorError(
                f"GateLookahead: GateSet has {self.gates.num_layers} layers, the trace {self.num_layers}"
            )
        if self.gates.weights[0].shape[0] != self.num_experts:
            raise PredictorError(
                f"GateLookahead: gate weights have {self.gates.weights[0].shape[0]} experts, trace E={self.num_experts}"
            )
        if self.point == "residual" and self.gates.norm_weight[0] is None:
            self.fit_info["note"] = (
                "GateSet has no norm weights: residual variant uses a plain RMSNorm"
            )

    def available(self, trace: Trace, layer: int) -> np.ndarray:
        base = super().available(trace, layer)
        require_hidden(trace, self.point, self.describe())
        return base & (hidden_index(trace) >= 0)

    def _predict(self, trace: Trace, layer: int, avail: np.ndarray) -> np.ndarray:
        assert self.gates is not None
        hi = hidden_index(trace)
        rows = np.flatnonzero(avail)
        src = layer - self.horizon.layers_ahead
        x = trace.hidden[self.point][hi[rows], src]
        if x.shape[-1] != self.gates.weights[layer].shape[1]:
            raise PredictorError(
                f"GateLookahead: hidden size {x.shape[-1]} != gate input size {self.gates.weights[layer].shape[1]}"
            )
        if self.point == "residual":
            x = self.gates.normalize(layer, x)
        out = np.zeros((trace.num_tokens, self.num_experts), np.float32)
        out[rows] = self.gates.scores(layer, x)
        return out

    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self.gates is None:
            return {}, {}
        g = self.gates
        tensors: dict[str, np.ndarray] = {}
        for i, w in enumerate(g.weights):
            tensors[f"layer.{i}.weight"] = np.asarray(w, np.float32)
            for nm, lst in (
                ("bias", g.biases),
                ("selection_bias", g.selection_bias),
                ("norm_weight", g.norm_weight),
            ):
                if lst[i] is not None:
                    tensors[f"layer.{i}.{nm}"] = np.asarray(lst[i], np.float32)
        return {"score_fn": g.score_fn, "norm_eps": g.norm_eps, "top_k": g.top_k}, tensors

    def _set_state(self, state: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        n = self.num_layers
        self.gates = GateSet(
            weights=[tensors[f"layer.{i}.weight"] for i in range(n)],
            biases=[tensors.get(f"layer.{i}.bias") for i in range(n)],
            selection_bias=[tensors.get(f"layer.{i}.selection_bias") for i in range(n)],
            norm_weight=[tensors.get(f"layer.{i}.norm_weight") for i in range(n)],
            score_fn=state["score_fn"],
            norm_eps=float(state["norm_eps"]),
            top_k=int(state["top_k"]),
        )
