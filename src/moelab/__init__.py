"""moelab: Mixture-of-Experts layers, models, routing traces, analyses, predictors and offloading.

Everything the CLI does is one import away (imported lazily, so `import moelab` stays fast)::

    from moelab import load_corpus, train_model, trace_model, TraceStore, analyze
    from moelab import make_predictor, Horizon, compare_predictors, simulate_offload, run_demo

Subpackages hold the rest: layers, models, data, train, trace, analysis, predict, offload,
report, moefy, demo.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    # layers
    "MoEConfig": ("moelab.layers.config", "MoEConfig"),
    "MoEBlock": ("moelab.layers.moe", "MoEBlock"),
    "RoutingResult": ("moelab.layers.types", "RoutingResult"),
    "build_router": ("moelab.layers.routing", "build_router"),
    # models
    "MoETransformer": ("moelab.models.transformer", "MoETransformer"),
    "MoETransformerConfig": ("moelab.models.config", "MoETransformerConfig"),
    "dense_baseline": ("moelab.models.config", "dense_baseline"),
    "export_hf": ("moelab.models.export", "export_hf"),
    "calculate": ("moelab.models.calc", "calculate"),
    "get_preset": ("moelab.models.calc", "get_preset"),
    # data
    "Document": ("moelab.data.corpora", "Document"),
    "list_corpora": ("moelab.data.corpora", "list_corpora"),
    "load_corpus": ("moelab.data.corpora", "load_corpus"),
    "split_documents": ("moelab.data.splits", "split_documents"),
    "train_tokenizer": ("moelab.data.tokenizer", "train_tokenizer"),
    "load_tokenizer": ("moelab.data.tokenizer", "load_tokenizer"),
    "prepare_data": ("moelab.data.prepare", "prepare_data"),
    # train  (`moelab train` / `moelab compare`)
    "TrainConfig": ("moelab.train.config", "TrainConfig"),
    "load_train_config": ("moelab.train.config", "load_train_config"),
    "train_model": ("moelab.train.loop", "train"),
    "compare_models": ("moelab.train.compare", "compare"),
    # trace  (`moelab trace`)
    "trace_model": ("moelab.trace.api", "trace_model"),
    "TraceStore": ("moelab.trace.store", "TraceStore"),
    "TraceWriter": ("moelab.trace.store", "TraceWriter"),
    "Trace": ("moelab.trace.schema", "Trace"),
    "get_adapter": ("moelab.trace.adapters", "get_adapter"),
    # analysis  (`moelab analyze`)
    "analyze": ("moelab.analysis.run", "analyze"),
    # predict  (`moelab predict ...`)
    "Horizon": ("moelab.predict.base", "Horizon"),
    "make_predictor": ("moelab.predict", "make_predictor"),
    "evaluate_predictor": ("moelab.predict.evaluate", "evaluate"),
    "compare_predictors": ("moelab.predict.evaluate", "compare"),
    # offload  (`moelab offload simulate`, `moelab generate`)
    "ExpertStore": ("moelab.offload.store", "ExpertStore"),
    "ExpertCache": ("moelab.offload.cache", "ExpertCache"),
    "Prefetcher": ("moelab.offload.prefetch", "Prefetcher"),
    "OffloadedModel": ("moelab.offload.live", "OffloadedModel"),
    "generate_offloaded": ("moelab.offload.live", "generate_offloaded"),
    "simulate_offload": ("moelab.offload.simulate", "simulate_trace"),
    # moefy  (`moelab moefy`, `moelab upcycle`)
    "moefy_model": ("moelab.moefy.api", "moefy"),
    "upcycle_model": ("moelab.moefy.api", "upcycle"),
    # report and demo
    "Report": ("moelab.report", "Report"),
    "run_demo": ("moelab.demo.pipeline", "run_demo"),
    "DemoConfig": ("moelab.demo.pipeline", "DemoConfig"),
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    """Import a public name on first use."""
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'moelab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
