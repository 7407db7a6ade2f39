"""Expert predictors behind one interface, scored on held-out data (DESIGN.md §3 predict/).

Families: baselines (frequency prior, previous layer, previous token, Markov set transitions),
gate lookahead (Eliseev & Mazur 2023), n-gram token statistics (Jiang et al. 2024, Sec. 5) and
small neural predictors (token-context MLP, hidden-state probes, temporal MLP). `make_predictor`
builds any of them by name; `default_suite` lists what `moelab predict compare` runs.

Batch use (evaluation)::

    store = TraceStore.open(path)
    p = make_predictor("gate-lookahead", Horizon(layers_ahead=1), gates=store.gates()).fit(train)
    scores = p.predict_scores(test, layer)        # [N, E]; NaN rows = no source (excluded)
    result = evaluate(p, test, split_name="test")  # records the split; held-out vs in-sample

Live use (offloading, one token at a time)::

    ctx = StepContext(token_ids=ids_so_far, experts=routing_so_far,   # [t], [t, L, k]
                      layer=target_layer, hidden={"router_input": h_last}, weights=w_so_far)
    scores = p.predict_step(ctx)                   # [E] for the current (spatial) or next
                                                   # (temporal) token at `target_layer`

`predict_step` builds a small Trace of the last `context_tokens` rows and reuses the batch
path, so live and batch predictions are identical (tested); its latency (`cost().us_per_step`,
~0.1-0.6 ms here) is Python overhead, not model compute.
"""

from __future__ import annotations

from typing import Any

from moelab.errors import ConfigError
from moelab.predict.base import Horizon, Predictor, PredictorCost, StepContext, split_by_document
from moelab.predict.baselines import FrequencyPrior, PreviousLayer, PreviousToken
from moelab.predict.evaluate import CompareResult, TokenBuckets, compare, evaluate, report_section
from moelab.predict.gate_lookahead import GateLookahead
from moelab.predict.markov import MarkovPredictor
from moelab.predict.neural import HiddenProbe, TemporalMLP, TokenContextMLP
from moelab.predict.ngram import NGramPredictor
from moelab.trace.gates import GateSet

# name -> (class, fixed keyword arguments)
PREDICTORS: dict[str, tuple[type[Predictor], dict[str, Any]]] = {
    "prior": (FrequencyPrior, {}),
    "prev-layer": (PreviousLayer, {}),
    "prev-token": (PreviousToken, {}),
    "markov": (MarkovPredictor, {}),
    "ngram": (NGramPredictor, {}),
    "ngram1": (NGramPredictor, {"n": 1}),
    "ngram2": (NGramPredictor, {"n": 2}),
    "ngram3": (NGramPredictor, {"n": 3}),
    "ngram-set": (NGramPredictor, {"mode": "set"}),
    "gate-lookahead": (GateLookahead, {"point": "router_input"}),
    "gate-lookahead-residual": (GateLookahead, {"point": "residual"}),
    "token-mlp": (TokenContextMLP, {"mode": "multilabel"}),
    "token-mlp-sets": (TokenContextMLP, {"mode": "sets"}),
    "probe-linear": (HiddenProbe, {"hidden": 0}),
    "probe-mlp": (HiddenProbe, {"hidden": 64}),
    "probe-shared": (HiddenProbe, {"hidden": 0, "shared": True}),
    "probe-residual": (HiddenProbe, {"hidden": 64, "point": "residual"}),
    "temporal-mlp": (TemporalMLP, {}),
}


def make_predictor(
    name: str, horizon: Horizon, *, gates: GateSet | None = None, seed: int = 0, **options: Any
) -> Predictor:
    """Build a predictor by registry name (options override the registry's fixed arguments)."""
    if name not in PREDICTORS:
        raise ConfigError(f"predictor {name!r}: expected one of {', '.join(PREDICTORS)}")
    cls, fixed = PREDICTORS[name]
    kw = {**fixed, **options}
    if cls is GateLookahead:
        kw["gates"] = gates
    try:
        return cls(horizon=horizon, seed=seed, **kw)
    except TypeError as exc:
        raise ConfigError(f"predictor {name!r}: bad option ({exc})") from exc


def default_suite(
    horizon: Horizon, *, has_hidden: bool, has_gates: bool, points: tuple[str, ...] = ()
) -> list[str]:
    """Predictor names `compare` runs for a horizon, given what the trace holds."""
    if horizon.kind == "temporal":
        return [
            "prior",
            "prev-token",
            "markov",
            "ngram1",
            "ngram2",
            "ngram3",
            "token-mlp",
            "temporal-mlp",
        ]
    names = ["prior", "prev-layer", "markov", "ngram1", "ngram2", "ngram3", "token-mlp"]
    if has_gates and has_hidden:
        names.append("gate-lookahead")
        if "residual" in points:
            names.append("gate-lookahead-residual")
    if has_hidden:
        names += ["probe-linear", "probe-mlp"]
    return names


__all__ = [
    "Horizon",
    "Predictor",
    "PredictorCost",
    "StepContext",
    "split_by_document",
    "FrequencyPrior",
    "PreviousLayer",
    "PreviousToken",
    "MarkovPredictor",
    "NGramPredictor",
    "GateLookahead",
    "TokenContextMLP",
    "HiddenProbe",
    "TemporalMLP",
    "evaluate",
    "compare",
    "CompareResult",
    "TokenBuckets",
    "report_section",
    "make_predictor",
    "default_suite",
    "PREDICTORS",
]
