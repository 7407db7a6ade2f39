"""The registry of analyses `analyze` runs: one `Analysis` object per analysis, one file each.

An analysis has a name, what it needs (`needs`: "logits" = router logits recorded, "compare"
= an earlier checkpoint's trace, "projections" = not switched off, "sample" = runs on the
sample of documents rather than the whole store), and `run(ctx)`, which computes through
`ctx.src` (an in-memory Trace or a store on DuckDB or Spark: moelab.analysis.sources, so it
runs on either engine), records its numbers in `ctx.o.numbers` and its rows in
`ctx.summary`, and renders its figures and report section. numbers.json and report.html are
assembled from the registry in order. A new analysis is one module here that calls
`register(Analysis(...))`, listed in BUILTIN (or registered by user code before `analyze`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BUILTIN = (
    "usage",
    "entropy",
    "transitions",
    "coactivation",
    "repeat",
    "trajectories",
    "specialisation",
    "predictability",
    "saturation",
    "projections",
)


@dataclass
class Context:
    """Everything an analysis reads: the source, the output collector and the options."""

    src: Any  # TraceSource | StoreSource
    o: Any  # moelab.analysis.output.Out
    meta: Any
    seed: int = 0
    n: int = 1
    min_count: int = 10
    token_ids: list[int] | None = None
    context: list[int] | None = None
    decode: Callable[[int], str] | None = None
    text_doc: int | None = None
    max_points: int = 2000
    compare: Any = None
    summary: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_l(self) -> int:
        return int(self.meta.num_layers)

    @property
    def num_e(self) -> int:
        return int(self.meta.num_experts)

    @property
    def k(self) -> int:
        return int(self.meta.top_k)

    @property
    def layers_x(self) -> np.ndarray:
        return np.arange(self.num_l)

    def skip(self, name: str, exc: Exception) -> None:
        """Record that `name` could not run, and why."""
        self.o.numbers["skipped"][name] = str(exc)


@dataclass
class Analysis:
    """One analysis of the registry."""

    name: str
    needs: tuple[str, ...]
    run: Callable[[Context], None]
    per_layer: bool = False  # its progress bar counts layers (on a store)

    def applies(self, have: set[str]) -> bool:
        """True when everything in `needs` except "sample"/"logits" is available (a missing
        "logits" is reported as a skip with the reason, by the analysis itself)."""
        return all(x in have for x in self.needs if x not in ("sample", "logits"))


REGISTRY: dict[str, Analysis] = {}


def register(analysis: Analysis) -> Analysis:
    """Add (or replace) an analysis; returns it."""
    REGISTRY[analysis.name] = analysis
    return analysis


def analyses() -> list[Analysis]:
    """The registered analyses in order (the built-in ones first, imported on first use)."""
    first = [importlib.import_module(f"moelab.analysis.steps.{m}").ANALYSIS for m in BUILTIN]
    builtin = [a.name for a in first]
    return [REGISTRY[x] for x in builtin if x in REGISTRY] + [
        a for name, a in REGISTRY.items() if name not in builtin
    ]
