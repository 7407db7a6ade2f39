"""Per-token cache of a trace store for `moelab explore`: one Parquet file sorted by token id.

Every view of the explorer starts from "the occurrences of token T" (with optional previous /
next token and domain filters). Scanning the shards for that is a full read per request, so
the explorer writes once, beside the store, a Parquet file holding the id columns needed by
the views, sorted by token id (row groups then cover narrow token-id ranges and DuckDB skips
all others from the row-group statistics):

  token_id, prev_id, next_id (-1 at a document boundary or gap), doc_id, position, domain,
  heldout (the document's split for predictor scores), e{l}_{j} (expert ids as on disk),
  t{l} (top-1 expert of layer l: the slot with the highest combine weight)

BOS rows are left out (as the analyses do); they still serve as the previous token of the
first real token. The file is rebuilt when the shards change (name, size, mtime), when the
held-out fraction or seed changes, or when this module's CACHE_VERSION changes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from moelab._io import atomic_write_json, atomic_write_with
from moelab.analysis._common import doc_split
from moelab.errors import TraceError
from moelab.trace.schema import TraceMeta
from moelab.trace.store import TraceStore

CACHE_VERSION = 1
ROWS_FILE = "rows.parquet"
KEY_FILE = "key.json"
ROW_GROUP = 65_536


@dataclass(frozen=True)
class CacheInfo:
    """Where the cache lives and what it was built from."""

    path: Path  # the Parquet file
    key: dict[str, Any]
    rebuilt: bool  # True when this call wrote it


def weight_sql(layer: int, slot: int) -> str:
    """SQL expression of the combine weight of (layer, slot) as a FLOAT.

    The one place that knows how weights are encoded on disk (float16 today; DuckDB reads
    Parquet FLOAT16 as FLOAT); a change of the shard encoding is an edit here only.
    """
    return f'CAST("w{int(layer)}_{int(slot)}" AS FLOAT)'


def top1_sql(layer: int, k: int) -> str:
    """SQL expression: the expert id of the highest-weight slot of `layer` (first slot on ties,
    as numpy argmax; a dropped slot has weight 0 and loses to any routed one)."""
    if k == 1:
        return f'"e{layer}_0"'
    parts = []
    for j in range(k - 1):
        cond = " AND ".join(
            f"{weight_sql(layer, j)} >= {weight_sql(layer, i)}" for i in range(j + 1, k)
        )
        parts.append(f'WHEN {cond} THEN "e{layer}_{j}"')
    return "CASE " + " ".join(parts) + f' ELSE "e{layer}_{k - 1}" END'


def expert_columns(meta: TraceMeta) -> list[str]:
    """Names of the expert-id columns e{l}_{j} (the whitelist SQL column names come from)."""
    return [f"e{li}_{j}" for li in range(meta.num_layers) for j in range(meta.top_k)]


def top1_columns(meta: TraceMeta) -> list[str]:
    """Names of the cached top-1 columns t{l}."""
    return [f"t{li}" for li in range(meta.num_layers)]


def _cache_key(store: TraceStore, holdout: float, seed: int) -> dict[str, Any]:
    shards = []
    for s in store.shards:
        st = s.stat()
        shards.append([s.name, int(st.st_size), int(st.st_mtime_ns)])
    return {
        "version": CACHE_VERSION,
        "holdout": float(holdout),
        "seed": int(seed),
        "shards": shards,
    }


def default_cache_dir(store_path: Path) -> Path:
    """STORE/cache/explore: the cache folder beside the shards."""
    return Path(store_path) / "cache" / "explore"


def build_cache(
    store: TraceStore,
    cache_dir: Path | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    threads: int | None = None,
    memory_limit: str | None = "2GB",
) -> CacheInfo:
    """Write (or reuse) the per-token cache of `store`; returns where it is and its key."""
    if not 0.0 < holdout < 1.0:
        raise TraceError(f"explore: holdout={holdout}; expected a fraction in (0, 1)")
    if not store.shards:
        raise TraceError(f"{store.path}: the trace has no shards; nothing to explore")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(store.path)
    key = _cache_key(store, holdout, seed)
    rows, key_file = cache_dir / ROWS_FILE, cache_dir / KEY_FILE
    if rows.is_file() and key_file.is_file():
        try:
            old = json.loads(key_file.read_text())
        except ValueError:
            old = None
        if old == key:
            return CacheInfo(rows, key, rebuilt=False)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = cache_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise TraceError(
            f"{cache_dir}: cannot write the explorer's cache there ({exc.strerror}); pass"
            " --cache DIR with a writable folder"
        ) from None
    import duckdb

    meta = store.meta
    con = duckdb.connect()
    try:
        if threads:
            con.execute(f"SET threads={int(threads)}")
        if memory_limit:
            con.execute(f"SET memory_limit='{_safe_size(memory_limit)}'")
        tmpdir = str(cache_dir / "duckdb-tmp").replace("'", "''")
        con.execute(f"SET temp_directory='{tmpdir}'")
        con.execute("SET preserve_insertion_order=false")
        files = "[" + ", ".join(_sql_str(str(s)) for s in store.shards) + "]"
        src = f"read_parquet({files})"
        docs = con.execute(f"SELECT DISTINCT doc_id FROM {src} ORDER BY doc_id").fetchnumpy()[
            "doc_id"
        ]
        docs = np.asarray(docs, dtype=np.int64)
        held = doc_split(docs, holdout, seed) if docs.size > 1 else np.zeros(docs.size, bool)
        con.register("held", pa.table({"doc_id": docs, "heldout": held}))
        ecols = expert_columns(meta)
        e_sel = ", ".join(f'"{c}"' for c in ecols)
        t_sel = ", ".join(f"{top1_sql(li, meta.top_k)} AS t{li}" for li in range(meta.num_layers))
        query = f"""
            WITH base AS (
              SELECT doc_id, position, token_id, domain, is_bos, {e_sel}, {t_sel},
                CASE WHEN lag(position) OVER w = position - 1 THEN lag(token_id) OVER w
                     ELSE -1 END AS prev_id,
                CASE WHEN lead(position) OVER w = position + 1 THEN lead(token_id) OVER w
                     ELSE -1 END AS next_id
              FROM {src}
              WINDOW w AS (PARTITION BY doc_id ORDER BY position))
            SELECT b.token_id, b.prev_id::INTEGER AS prev_id, b.next_id::INTEGER AS next_id,
                   b.doc_id, b.position, b.domain, h.heldout,
                   {", ".join(f"b.{c}" for c in ecols)},
                   {", ".join(f"b.t{li}" for li in range(meta.num_layers))}
            FROM base b JOIN held h USING (doc_id)
            WHERE NOT b.is_bos
            ORDER BY b.token_id, b.doc_id, b.position
        """

        def write(tmp: Path) -> None:
            con.execute(
                f"COPY ({query}) TO {_sql_str(str(tmp))}"
                f" (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {ROW_GROUP})"
            )

        atomic_write_with(rows, write)
    finally:
        con.close()
    atomic_write_json(key_file, key)
    try:
        os.rmdir(cache_dir / "duckdb-tmp")
    except OSError:
        pass
    return CacheInfo(rows, key, rebuilt=True)


def _sql_str(text: str) -> str:
    """A SQL string literal of a file path we chose (quotes doubled); never user query text."""
    return "'" + text.replace("'", "''") + "'"


def _safe_size(text: str) -> str:
    """A DuckDB memory size like '2GB' (digits + unit only)."""
    import re

    if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", text.strip()):
        raise TraceError(f"explore: memory limit {text!r}; expected a size like 2GB or 512MB")
    return text.strip()
