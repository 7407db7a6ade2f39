"""DuckDB versions of usage and layer-transition counts, run by SQL straight over the Parquet
shards of a TraceStore directory (docs/CONTRACTS.md, "On-disk trace format"), so traces larger
than RAM are counted out of core in one streaming scan.

One scan computes a DuckDB histogram() aggregate per slot column (usage) or per (slot at l,
slot at l+n) code over all k x k slot pairs (transitions); histograms are 2-4x faster here than
unnesting the slots and grouping. BOS rows and NO_EXPERT slots (stored as the unsigned maximum,
255 or 65535) are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from moelab.errors import AnalysisError, TraceError


def _open(path: str | Path) -> tuple[dict[str, Any], str]:
    root = Path(path)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise TraceError(
            f"{root}: no meta.json; expected a TraceStore directory (meta.json + shards/)"
        )
    meta = json.loads(meta_path.read_text())
    shards = sorted((root / "shards").glob("*.parquet"))
    if not shards:
        raise TraceError(f"{root}/shards: no Parquet shards; the trace is empty or was not closed")
    glob = str(root / "shards" / "*.parquet").replace("'", "''")
    return meta, f"read_parquet('{glob}')"


def _connect(memory_limit: str | None, threads: int | None) -> Any:
    import duckdb

    con = duckdb.connect()
    if memory_limit:
        con.execute(f"SET memory_limit='{memory_limit}'")
    if threads:
        con.execute(f"SET threads={int(threads)}")
    con.execute("SET preserve_insertion_order=false")
    return con


def _no_expert(num_experts: int) -> int:
    return 255 if num_experts <= 255 else 65535


def _histograms(
    path: str | Path, exprs: list[str], memory_limit: str | None, threads: int | None
) -> tuple:
    """One streaming scan computing DuckDB histogram() of every expression over non-BOS rows."""
    _, src = _open(path)
    q = "SELECT " + ", ".join(f"histogram({x})" for x in exprs) + f" FROM {src} WHERE NOT is_bos"
    con = _connect(memory_limit, threads)
    try:
        row = con.execute(q).fetchone()
    finally:
        con.close()
    return tuple({} if h is None else h for h in row)


def usage_counts_sql(
    path: str | Path, memory_limit: str | None = None, threads: int | None = None
) -> np.ndarray:
    """[L, E] slot counts per layer and expert over all non-BOS rows, by DuckDB (one scan)."""
    meta, _ = _open(path)
    num_l, num_e, k = int(meta["num_layers"]), int(meta["num_experts"]), int(meta["top_k"])
    cols = [(layer, f"e{layer}_{j}") for layer in range(num_l) for j in range(k)]
    hists = _histograms(path, [c for _, c in cols], memory_limit, threads)
    no = _no_expert(num_e)
    out = np.zeros((num_l, num_e), dtype=np.int64)
    for (layer, _), h in zip(cols, hists, strict=True):
        for e, c in h.items():
            if e != no:
                out[layer, int(e)] += int(c)
    return out


def transition_counts_sql(
    path: str | Path,
    n: int = 1,
    layers: list[int] | None = None,
    memory_limit: str | None = None,
    threads: int | None = None,
    batch_layers: int = 8,
) -> np.ndarray:
    """[len(layers), E, E] counts of (expert at l, expert at l+n) over all k x k slot pairs, by
    DuckDB (one scan; default layers 0..L-n-1)."""
    meta, _ = _open(path)
    num_l, num_e, k = int(meta["num_layers"]), int(meta["num_experts"]), int(meta["top_k"])
    if n < 1 or n >= num_l:
        raise AnalysisError(f"transition counts: n={n}; expected 1 <= n < num_layers={num_l}")
    layers = list(range(num_l - n)) if layers is None else [int(v) for v in layers]
    for layer in layers:
        if not 0 <= layer < num_l - n:
            raise AnalysisError(f"transition counts: layer {layer}+{n} outside 0..{num_l - 1}")
    base = 65536
    exprs, where = [], []
    for pos, layer in enumerate(layers):
        for i in range(k):
            for j in range(k):
                exprs.append(f"e{layer}_{i}::INTEGER * {base} + e{layer + n}_{j}::INTEGER")
                where.append(pos)
    # scan in batches of `batch_layers` layers: one histogram state per expression per thread
    # must fit in memory_limit (histograms cannot spill); each scan reads only its columns
    per = batch_layers * k * k
    hists: tuple = ()
    for start in range(0, len(exprs), per):
        hists += _histograms(path, exprs[start : start + per], memory_limit, threads)
    no = _no_expert(num_e)
    out = np.zeros((len(layers), num_e, num_e), dtype=np.int64)
    for pos, h in zip(where, hists, strict=True):
        for code, c in h.items():
            a, b = divmod(int(code), base)
            if a != no and b != no:
                out[pos, a, b] += int(c)
    return out
