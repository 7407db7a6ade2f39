"""Tracing: hooks that record router decisions of any MoE model into a columnar TraceStore.

Public API (imported lazily so `moelab.trace.schema` stays light): TraceStore, TraceWriter,
trace_model, load_model, get_adapter, export_moe_infinity.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "TraceStore": "moelab.trace.store",
    "TraceWriter": "moelab.trace.store",
    "trace_model": "moelab.trace.api",
    "load_model": "moelab.trace.api",
    "get_adapter": "moelab.trace.adapters",
    "export_moe_infinity": "moelab.trace.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import public names on first use."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moelab.trace' has no attribute {name!r}")
