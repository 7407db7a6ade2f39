"""Export a trace to MoE-Infinity's expert activation matrix (EAM) collection (`.npy`).

MoE-Infinity (Xue et al. 2024, "MoE-Infinity: Offloading-Efficient MoE Model Serving",
`moe_infinity/memory/expert_tracer.py`) keeps one matrix per sequence, `matrix[layer, expert]`
= number of the sequence's tokens routed to that expert at that layer (`update_entry` adds the
counts of the top-k ids), and loads a collection with `np.load(path, allow_pickle=False)` as an
array [num_sequences, num_layers, num_experts]. Its `num_layers` is the model's transformer
layer count for decoder-only models (dense layers stay zero) and the number of sparse encoder
+ decoder layers for Switch Transformers. We write one matrix per document (sequence), float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moelab._io import atomic_write_with
from moelab.errors import TraceError
from moelab.trace.schema import NO_EXPERT
from moelab.trace.store import TraceStore


def expert_activation_matrix(
    store: TraceStore, layer_axis: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(eam [D, L', E] float32, doc_ids [D]) with per-document expert counts.

    layer_axis: "model" (L' = transformer layers, MoE layers at meta.layer_indices) or "moe"
    (L' = MoE layers); default "moe" for Switch Transformers, "model" otherwise (as MoE-Infinity).
    """
    m = store.meta
    if layer_axis is None:
        layer_axis = "moe" if m.family == "switch_transformers" else "model"
    if layer_axis not in ("model", "moe"):
        raise TraceError(f"layer_axis={layer_axis!r}: expected 'model' or 'moe'")
    tr = store.load(columns=[], hidden=False)
    docs, inv = np.unique(tr.doc_id, return_inverse=True)
    if layer_axis == "model":
        rows_of_layer = np.asarray(
            m.layer_indices if m.layer_indices else range(m.num_layers), np.int64
        )
        n_layers = int(
            m.extra.get("num_hidden_layers", 0)
            or (rows_of_layer.max() + 1 if rows_of_layer.size else 0)
        )
    else:
        rows_of_layer = np.arange(m.num_layers, dtype=np.int64)
        n_layers = m.num_layers
    E = m.num_experts
    ids = tr.expert_ids.astype(np.int64)  # [N, L, k]
    valid = ids != NO_EXPERT
    flat = (inv[:, None, None] * n_layers + rows_of_layer[None, :, None]) * E + ids
    counts = np.bincount(flat[valid], minlength=len(docs) * n_layers * E)
    return counts.reshape(len(docs), n_layers, E).astype(np.float32), docs


def export_moe_infinity(
    store: TraceStore | str | Path, out: str | Path, layer_axis: str | None = None
) -> Path:
    """Write the EAM collection as `.npy` (and `<out>.doc_ids.npy` with the row -> doc_id map)."""
    if not isinstance(store, TraceStore):
        store = TraceStore.open(store)
    eam, docs = expert_activation_matrix(store, layer_axis)
    out = Path(out)
    if out.suffix != ".npy":
        out = out.with_suffix(".npy")
    ids_path = out.with_name(out.stem + ".doc_ids.npy")
    for path, arr in ((out, eam), (ids_path, docs)):
        atomic_write_with(path, lambda tmp, a=arr: _save_npy(tmp, a))
    return out


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
