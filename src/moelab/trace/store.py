"""TraceStore: a directory of Parquet shards + meta.json (+ gates.safetensors, hidden side store).

Layout (docs/CONTRACTS.md "On-disk trace format", docs/trace_schema.md):
  meta.json                                   TraceMeta.to_dict()
  gates.safetensors                           GateSet (optional)
  documents.parquet                           doc_id -> name, domain, num_tokens (optional)
  shards/part-r{rank:03d}-{index:06d}.parquet token rows, one column per (layer, slot)
  hidden/part-r{rank:03d}-{index:06d}.safetensors  sampled hidden states of that shard's rows
  done-r{rank:03d}.json                       written when a rank finished its share

Shards are committed atomically (temp + rename, hidden file before its Parquet shard), so a
killed run leaves only complete shards; TraceWriter resumes after the last one. Readers never
need moelab: any Parquet reader sees the columns documented in docs/trace_schema.md.

`TraceStore.open` checks the cheap invariants (shards numbered 0..n-1 per rank, schema, row
and shard counts against the done markers, total rows against meta.json, hidden files present)
and refuses a damaged store; `verify_store` (`moelab trace-verify`) also reads every row. A
store whose last shards were lost is repaired by rerunning the same `moelab trace` command:
TraceWriter sees fewer rows than the done marker, drops the marker and retraces what is missing.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moelab._io import atomic_write_json, atomic_write_with
from moelab.errors import TraceError
from moelab.trace.gates import GateSet
from moelab.trace.schema import NO_EXPERT, SCHEMA_VERSION, Trace, TraceMeta

BASE_COLUMNS = ("doc_id", "position", "token_id", "domain", "is_bos")
BASE_TYPES = {
    "doc_id": pa.int64(),
    "position": pa.int32(),
    "token_id": pa.int32(),
    "domain": pa.int16(),
    "is_bos": pa.bool_(),
}
SHARD_RE = re.compile(r"^part-r(\d{3})-(\d{6})\.parquet$")
DONE_RE = re.compile(r"^done-r(\d{3})\.json$")
HIDDEN_POINTS = ("router_input", "residual")


def id_dtype(num_experts: int) -> np.dtype:
    """Unsigned dtype used on disk for expert ids (uint8 if E <= 255 else uint16)."""
    return np.dtype(np.uint8) if num_experts <= 255 else np.dtype(np.uint16)


def shard_name(rank: int, index: int, ext: str = "parquet") -> str:
    """File name of shard `index` written by process `rank`."""
    return f"part-r{rank:03d}-{index:06d}.{ext}"


def routing_columns(meta: TraceMeta, logits: bool) -> list[str]:
    """Names of the per-layer columns in shard order."""
    cols = [f"e{li}_{j}" for li in range(meta.num_layers) for j in range(meta.top_k)]
    cols += [f"w{li}_{j}" for li in range(meta.num_layers) for j in range(meta.top_k)]
    if logits:
        cols += [f"logits{li}" for li in range(meta.num_layers)]
    if has_dropped(meta):
        cols += [f"d{li}_{j}" for li in range(meta.num_layers) for j in range(meta.top_k)]
    return cols


def has_dropped(meta: TraceMeta) -> bool:
    """True if the store has per-slot capacity-drop flags `d{l}_{j}` (meta.extra["dropped"])."""
    return bool(meta.extra.get("dropped", False))


def float_type(meta: TraceMeta) -> pa.DataType:
    """Arrow type of the weight and logit columns: float32 from schema version 2 on; float16
    in version-1 stores (still read; Spark 4 cannot read Parquet FLOAT16, docs/trace_schema.md)."""
    return pa.float16() if int(meta.schema_version) < 2 else pa.float32()


def encode_floats(meta: TraceMeta, values: np.ndarray, width: int | None = None) -> pa.Array:
    """The one place weights/logits become a column: a [n] array -> float column, or with
    `width` (E) a [n, E] array -> fixed_size_list<float>[E]; type from float_type(meta)."""
    dt = float_type(meta).to_pandas_dtype()
    a = np.ascontiguousarray(np.asarray(values, dtype=dt))
    if width is None:
        return pa.array(a)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), width)


def decode_floats(col: pa.Array | pa.ChunkedArray, width: int | None = None) -> np.ndarray:
    """Inverse of encode_floats for either stored type: [n] or [n, width] numpy (as stored)."""
    if width is None:
        return col.to_numpy()
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.flatten().to_numpy().reshape(-1, width)


def arrow_schema(meta: TraceMeta, logits: bool) -> pa.Schema:
    """The exact Arrow schema of every shard of a store with this meta."""
    idt = pa.uint8() if meta.num_experts <= 255 else pa.uint16()
    ft = float_type(meta)
    fields = [pa.field(c, BASE_TYPES[c], nullable=False) for c in BASE_COLUMNS]
    fields += [
        pa.field(f"e{li}_{j}", idt, nullable=False)
        for li in range(meta.num_layers)
        for j in range(meta.top_k)
    ]
    fields += [
        pa.field(f"w{li}_{j}", ft, nullable=False)
        for li in range(meta.num_layers)
        for j in range(meta.top_k)
    ]
    if logits:
        fields += [
            pa.field(f"logits{li}", pa.list_(ft, meta.num_experts), nullable=False)
            for li in range(meta.num_layers)
        ]
    if has_dropped(meta):
        fields += [
            pa.field(f"d{li}_{j}", pa.bool_(), nullable=False)
            for li in range(meta.num_layers)
            for j in range(meta.top_k)
        ]
    return pa.schema(fields)


def build_table(meta: TraceMeta, rows: dict[str, np.ndarray], logits: bool) -> pa.Table:
    """Turn a dict of row arrays (base columns, expert_ids [n,L,k], weights, logits) into a table."""
    n = int(rows["doc_id"].shape[0])
    dt = id_dtype(meta.num_experts)
    ids = np.asarray(rows["expert_ids"])
    if ids.shape != (n, meta.num_layers, meta.top_k):
        raise TraceError(
            f"expert_ids: expected shape {(n, meta.num_layers, meta.top_k)}, got {ids.shape}"
        )
    if ids.size and (ids.max() >= meta.num_experts or ids.min() < NO_EXPERT):
        raise TraceError(
            f"expert_ids: values must be in [0, {meta.num_experts}) or NO_EXPERT={NO_EXPERT}, "
            f"got range [{ids.min()}, {ids.max()}]"
        )
    disk_ids = np.where(ids == NO_EXPERT, np.iinfo(dt).max, ids).astype(dt)
    w = np.asarray(rows["weights"])
    arrays: list[pa.Array] = []
    for c in BASE_COLUMNS:
        arrays.append(
            pa.array(np.ascontiguousarray(rows[c], dtype=BASE_TYPES[c].to_pandas_dtype()))
        )
    for li in range(meta.num_layers):
        for j in range(meta.top_k):
            arrays.append(pa.array(np.ascontiguousarray(disk_ids[:, li, j])))
    for li in range(meta.num_layers):
        for j in range(meta.top_k):
            arrays.append(encode_floats(meta, w[:, li, j]))
    if logits:
        lg = rows.get("logits")
        if lg is None:
            raise TraceError("this store records logits but append() got logits=None")
        lg = np.asarray(lg)
        for li in range(meta.num_layers):
            arrays.append(encode_floats(meta, lg[:, li, :], meta.num_experts))
    if has_dropped(meta):
        dr = rows.get("dropped")
        if dr is None:
            dr = np.zeros((n, meta.num_layers, meta.top_k), bool)
        dr = np.asarray(dr, dtype=bool)
        if dr.shape != (n, meta.num_layers, meta.top_k):
            raise TraceError(f"dropped: expected shape {(n, meta.num_layers, meta.top_k)}")
        for li in range(meta.num_layers):
            for j in range(meta.top_k):
                arrays.append(pa.array(np.ascontiguousarray(dr[:, li, j])))
    return pa.Table.from_arrays(arrays, schema=arrow_schema(meta, logits))


def done_name(rank: int) -> str:
    """File name of the marker rank `rank` writes when it finished its share."""
    return f"done-r{rank:03d}.json"


def shard_indices(path: Path) -> dict[int, list[int]]:
    """rank -> sorted shard indices present under path/shards."""
    out: dict[int, list[int]] = {}
    d = path / "shards"
    if d.is_dir():
        for f in d.iterdir():
            m = SHARD_RE.match(f.name)
            if m:
                out.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    return {r: sorted(v) for r, v in sorted(out.items())}


def read_done(path: Path, rank: int) -> dict[str, Any] | None:
    """The done marker of `rank` ({"rank", "rows", "shards"}) or None; TraceError if unreadable."""
    f = path / done_name(rank)
    if not f.exists():
        return None
    try:
        doc = json.loads(f.read_text())
        return {"rows": int(doc["rows"]), "shards": int(doc["shards"]), "rank": int(doc["rank"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise TraceError(
            f"{f}: unreadable done marker ({exc!r}); delete it and rerun the same `moelab trace`"
            " command (it checks the shards and finishes the store)"
        ) from None


def retrace_hint(path: Path, rank: int, first_bad: int, present: list[int]) -> str:
    """What to do when rank `rank` lost shard `first_bad` (and maybe more)."""
    later = [i for i in present if i > first_bad]
    if not later:
        return (
            "rerun the same `moelab trace` command: it retraces exactly the missing rows"
            f" (`moelab trace-verify {path}` lists every problem)"
        )
    names = ", ".join(shard_name(rank, i) for i in later[:3]) + (" ..." if len(later) > 3 else "")
    return (
        f"delete the {len(later)} shard(s) of rank {rank} after the gap in {path / 'shards'}"
        f" ({names}), their hidden/ files if any, and {path / done_name(rank)}; then rerun the"
        f" same `moelab trace` command: it retraces from shard {shard_name(rank, first_bad)} on"
    )


# Fields of meta that must agree between a store and a run that resumes it.
RESUME_KEYS = ("num_layers", "num_experts", "top_k", "layer_indices", "family", "corpus", "split")


class TraceWriter:
    """Append token rows; cut Parquet shards atomically; resume after the last complete shard.

    Memory holds at most one shard (shard_tokens rows plus the last appended batch).
    `run_config` (meta.extra["run"]) must match on resume, so a store never mixes two runs.
    """

    def __init__(
        self,
        path: str | Path,
        meta: TraceMeta,
        shard_tokens: int = 65536,
        rank: int = 0,
        world_size: int = 1,
        logits: bool = True,
        hidden_points: Sequence[str] = (),
        hidden_layers: Sequence[int] | None = None,
        compression: str = "zstd",
    ) -> None:
        if shard_tokens < 1:
            raise TraceError(f"TraceWriter: shard_tokens={shard_tokens} must be >= 1")
        for p in hidden_points:
            if p not in HIDDEN_POINTS:
                raise TraceError(
                    f"TraceWriter: hidden point {p!r} unknown; expected {HIDDEN_POINTS}"
                )
        self.path = Path(path)
        self.meta = meta
        self.shard_tokens = shard_tokens
        self.rank, self.world_size = rank, world_size
        self.logits = logits
        self.hidden_points = tuple(hidden_points)
        self.hidden_layers = (
            list(range(meta.num_layers))
            if hidden_layers is None
            else [int(x) for x in hidden_layers]
        )
        self.compression = compression
        meta.extra.setdefault("logits", logits)
        meta.extra.setdefault("hidden_points", list(self.hidden_points))
        meta.extra.setdefault("hidden_layers", self.hidden_layers if self.hidden_points else [])
        meta.extra["world_size"] = world_size
        (self.path / "shards").mkdir(parents=True, exist_ok=True)
        if self.hidden_points:
            (self.path / "hidden").mkdir(parents=True, exist_ok=True)
        self._check_or_write_meta()
        self.next_index, self.rows_done, self.last_key = self._scan_existing()
        self._buf: list[dict[str, np.ndarray]] = []
        self._buf_rows = 0
        self._hbuf: list[dict[str, np.ndarray]] = []
        self.closed = False

    # -- setup -------------------------------------------------------------------------------
    def _check_or_write_meta(self) -> None:
        mpath = self.path / "meta.json"
        if mpath.exists():
            try:
                old = TraceMeta.from_dict(json.loads(mpath.read_text()))
            except Exception as exc:  # noqa: BLE001 - re-raised with the file named
                raise TraceError(f"{mpath}: unreadable meta.json ({exc})") from exc
            for key in RESUME_KEYS:
                a, b = getattr(old, key), getattr(self.meta, key)
                if a != b:
                    raise TraceError(
                        f"{mpath}: existing trace has {key}={a!r} but this run has {key}={b!r}; "
                        "resume with the same model and options or choose a new --out directory"
                    )
            # a store keeps the encoding it was started with (a v1 store resumes in float16)
            self.meta.schema_version = int(old.schema_version)
            old_run, new_run = old.extra.get("run", {}), self.meta.extra.get("run", {})
            pairs = [
                (k, old.extra.get(k), self.meta.extra.get(k))
                for k in ("logits", "hidden_points", "hidden_layers", "world_size")
            ]
            pairs += [
                (k, old_run.get(k), new_run.get(k)) for k in sorted(set(old_run) | set(new_run))
            ]
            for key, a, b in pairs:
                if a != b:
                    raise TraceError(
                        f"{mpath}: existing trace has {key}={a!r} but this run has {key}={b!r}; "
                        "resume with the same options or choose a new --out directory"
                    )
        elif self.rank == 0:
            atomic_write_json(mpath, self.meta.to_dict())

    def _scan_existing(self) -> tuple[int, int, tuple[int, int] | None]:
        shard_dir = self.path / "shards"
        for tmp in shard_dir.glob(f".part-r{self.rank:03d}-*.tmp"):
            tmp.unlink()  # left by a killed run before its atomic rename
        if self.hidden_points:
            for tmp in (self.path / "hidden").glob(f".part-r{self.rank:03d}-*.tmp"):
                tmp.unlink()
        indices = []
        for f in shard_dir.iterdir():
            m = SHARD_RE.match(f.name)
            if m and int(m.group(1)) == self.rank:
                indices.append(int(m.group(2)))
        indices.sort()
        if indices != list(range(len(indices))):
            gap = next(i for i in range(len(indices) + 1) if i not in indices)
            raise TraceError(
                f"{shard_dir}: shard {shard_name(self.rank, gap)} of rank {self.rank} is missing"
                f" (found {len(indices)} shards numbered {indices[:6]}...); "
                + retrace_hint(self.path, self.rank, gap, indices)
            )
        want = arrow_schema(self.meta, self.logits)
        rows, last = 0, None
        for i in indices:
            f = shard_dir / shard_name(self.rank, i)
            pf = open_shard(f)
            if not pf.schema_arrow.equals(want):
                raise TraceError(
                    f"{f}: schema differs from this run's (expected {want.names[:8]}...)"
                )
            rows += pf.metadata.num_rows
            if i == indices[-1] and pf.metadata.num_rows:
                t = pf.read(columns=["doc_id", "position"])
                last = (int(t["doc_id"][-1].as_py()), int(t["position"][-1].as_py()))
        self.repair_note: str | None = None
        done = read_done(self.path, self.rank)
        if done is not None and (done["rows"], done["shards"]) != (rows, len(indices)):
            marker = self.path / done_name(self.rank)
            if rows < done["rows"] and len(indices) < done["shards"]:
                # trailing shards were lost: forget the marker, the run resumes after them
                self.repair_note = (
                    f"{self.path}: rank {self.rank} had finished with {done['rows']} rows in"
                    f" {done['shards']} shards but only {rows} rows in {len(indices)} shards are"
                    f" left; retracing the missing {done['rows'] - rows} rows"
                )
                marker.unlink()
            else:
                raise TraceError(
                    f"{marker}: rank {self.rank} finished with {done['rows']} rows in"
                    f" {done['shards']} shards but {shard_dir} holds {rows} rows in"
                    f" {len(indices)} shards; the store was modified outside moelab: delete"
                    f" {self.path} and trace again"
                )
        return len(indices), rows, last

    # -- writing -----------------------------------------------------------------------------
    def append(
        self,
        doc_id: np.ndarray,
        position: np.ndarray,
        token_id: np.ndarray,
        domain: np.ndarray,
        is_bos: np.ndarray,
        expert_ids: np.ndarray,
        weights: np.ndarray,
        logits: np.ndarray | None = None,
        hidden: dict[str, np.ndarray] | None = None,
        hidden_rows: np.ndarray | None = None,
        dropped: np.ndarray | None = None,
    ) -> None:
        """Add n rows (hidden: point -> [m, Lh, D] for batch-local row indices hidden_rows [m])."""
        if self.closed:
            raise TraceError(f"{self.path}: append() after close()")
        n = int(np.asarray(doc_id).shape[0])
        rows = {
            "doc_id": np.asarray(doc_id),
            "position": np.asarray(position),
            "token_id": np.asarray(token_id),
            "domain": np.asarray(domain),
            "is_bos": np.asarray(is_bos),
            "expert_ids": np.asarray(expert_ids),
            "weights": np.asarray(weights),
            "logits": None if logits is None else np.asarray(logits),
            "dropped": None if dropped is None else np.asarray(dropped, dtype=bool),
        }
        if rows["dropped"] is not None and not has_dropped(self.meta):
            raise TraceError("append: dropped flags given but meta.extra['dropped'] is not set")
        for k in BASE_COLUMNS:
            if rows[k].shape != (n,):
                raise TraceError(f"append: {k} has shape {rows[k].shape}, expected ({n},)")
        if self.hidden_points and hidden:
            hr = np.asarray(hidden_rows, dtype=np.int64)
            h = {"rows": hr + self.rows_done + self._buf_rows}
            for p in self.hidden_points:
                h[p] = np.asarray(hidden[p], dtype=np.float16)
            h["doc_id"] = rows["doc_id"][hr].astype(np.int64)
            h["position"] = rows["position"][hr].astype(np.int64)
            self._hbuf.append(h)
        self._buf.append(rows)
        self._buf_rows += n
        if self._buf_rows >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        """Write buffered rows as the next shard (hidden file first, Parquet shard last)."""
        if not self._buf_rows:
            return
        cat = {
            k: np.concatenate([b[k] for b in self._buf])
            for k in self._buf[0]
            if self._buf[0][k] is not None
        }
        table = build_table(self.meta, cat, self.logits)
        name = shard_name(self.rank, self.next_index)
        if self.hidden_points:
            self._write_hidden(shard_name(self.rank, self.next_index, "safetensors"))
        comp = self.compression

        def write(tmp: Path) -> None:
            pq.write_table(table, str(tmp), compression=comp)

        atomic_write_with(self.path / "shards" / name, write)
        self.next_index += 1
        self.rows_done += self._buf_rows
        self.last_key = (int(cat["doc_id"][-1]), int(cat["position"][-1]))
        self._buf, self._buf_rows, self._hbuf = [], 0, []

    def _write_hidden(self, name: str) -> None:
        from safetensors.numpy import save_file

        d = 0 if not self._hbuf else self._hbuf[0][self.hidden_points[0]].shape[-1]
        d = d or self.meta.d_model
        lh = len(self.hidden_layers)
        out: dict[str, np.ndarray] = {}
        for k in ("rows", "doc_id", "position"):
            out[k] = (
                np.concatenate([h[k] for h in self._hbuf]) if self._hbuf else np.zeros(0, np.int64)
            )
        for p in self.hidden_points:
            out[p] = (
                np.concatenate([h[p] for h in self._hbuf])
                if self._hbuf
                else np.zeros((0, lh, d), np.float16)
            )
        out["layers"] = np.asarray(self.hidden_layers, dtype=np.int64)
        out = {k: np.ascontiguousarray(v) for k, v in out.items()}
        atomic_write_with(
            self.path / "hidden" / name,
            lambda tmp: save_file(out, str(tmp), metadata={"rank": str(self.rank)}),
        )

    def close(self, done: bool = True) -> None:
        """Flush the last shard; mark this rank complete when done=True."""
        if self.closed:
            return
        self.flush()
        if done:
            atomic_write_json(
                self.path / done_name(self.rank),
                {"rank": self.rank, "rows": self.rows_done, "shards": self.next_index},
            )
        self.closed = True

    @property
    def is_done(self) -> bool:
        """True when this rank already finished in a previous run."""
        return (self.path / done_name(self.rank)).exists()


def write_trace(
    trace: Trace,
    path: str | Path,
    shard_tokens: int = 65536,
    logits: bool | None = None,
    chunk_tokens: int = 65536,
) -> TraceStore:
    """Write an in-memory Trace as a store (chunked appends, so shards can split documents) and
    open it. logits=None keeps them when the trace has them; hidden states are not written."""
    if chunk_tokens < 1:
        raise TraceError(f"write_trace: chunk_tokens={chunk_tokens} must be >= 1")
    keep = trace.logits is not None if logits is None else bool(logits)
    if keep and trace.logits is None:
        raise TraceError(f"write_trace {path}: logits=True but the trace has no logits")
    meta = trace.meta
    if trace.dropped is not None and not meta.extra.get("dropped"):
        meta = dataclasses.replace(meta, extra={**meta.extra, "dropped": True})
    w = TraceWriter(path, meta, shard_tokens=shard_tokens, logits=keep)
    for a in range(0, trace.num_tokens, chunk_tokens):
        sl = slice(a, a + chunk_tokens)
        w.append(
            trace.doc_id[sl], trace.position[sl], trace.token_id[sl], trace.domain[sl],
            trace.is_bos[sl], trace.expert_ids[sl], trace.weights[sl],
            trace.logits[sl] if keep else None,
            dropped=None if trace.dropped is None else trace.dropped[sl],
        )  # fmt: skip
    w.close()
    return TraceStore.open(path)


def open_shard(path: Path) -> pq.ParquetFile:
    """Open a Parquet shard or raise TraceError naming it (truncated or not Parquet)."""
    try:
        return pq.ParquetFile(str(path), memory_map=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise TraceError(
            f"{path}: corrupt or truncated Parquet shard ({exc}); delete it and rerun the same "
            "`moelab trace` command to regenerate it"
        ) from exc


class TraceStore:
    """Read a trace directory: meta, numpy arrays, DuckDB view, gates, hidden side store."""

    def __init__(
        self,
        path: Path,
        meta: TraceMeta,
        shards: list[Path],
        files: list[pq.ParquetFile] | None = None,
    ) -> None:
        self.path = path
        self.meta = meta
        self.shards = shards
        self._files = files if files is not None else [open_shard(s) for s in shards]
        self._con: Any = None
        want_logits = bool(meta.extra.get("logits", False))
        want = arrow_schema(meta, want_logits)
        for s, pf in zip(shards, self._files, strict=True):
            if not pf.schema_arrow.equals(want):
                raise TraceError(
                    f"{s}: columns do not match {path / 'meta.json'} "
                    f"(expected {len(want)} columns for L={meta.num_layers}, k={meta.top_k}, "
                    f"logits={want_logits}; found {len(pf.schema_arrow)})"
                )

    @classmethod
    def open(cls, path: str | Path) -> TraceStore:
        """Open a store directory; TraceError if it is missing, empty, malformed or damaged.

        Checks the cheap invariants (shard numbering, schema, done markers, totals, hidden
        files); `verify_store` reads every row as well.
        """
        path = Path(path)
        meta = read_meta(path)
        shards = sorted(
            p for p in (path / "shards").glob("part-r*.parquet") if SHARD_RE.match(p.name)
        )
        files = [open_shard(s) for s in shards]
        store = cls(path, meta, shards, files)
        problems = store.check()
        if problems:
            more = (
                f" ({len(problems) - 1} more problem(s): run `moelab trace-verify {path}`)"
                if len(problems) > 1
                else ""
            )
            raise TraceError(problems[0] + more)
        return store

    def check(self) -> list[str]:
        """Problems with the cheap invariants (numbering, done markers, totals, hidden files)."""
        problems: list[str] = []
        path, meta = self.path, self.meta
        world = int(meta.extra.get("world_size", 1) or 1)
        present = shard_indices(path)
        rows_of = {s: pf.metadata.num_rows for s, pf in zip(self.shards, self._files, strict=True)}
        marker_ranks = {
            int(m.group(1)) for f in path.iterdir() if (m := DONE_RE.match(f.name)) is not None
        }
        total, all_done = 0, True
        for r in sorted(set(present) | marker_ranks | set(range(world))):
            idx = present.get(r, [])
            if r >= world:
                problems.append(
                    f"{path}: files of rank {r} found but meta.json says world_size={world};"
                    " the store mixes runs: delete it and trace again"
                )
                continue
            if idx != list(range(len(idx))):
                gap = next(i for i in range(len(idx) + 1) if i not in idx)
                problems.append(
                    f"{path / 'shards' / shard_name(r, gap)}: missing (rank {r} has"
                    f" {len(idx)} shards numbered up to {idx[-1]}); "
                    + retrace_hint(path, r, gap, idx)
                )
                all_done = False
                continue
            rows = sum(rows_of[path / "shards" / shard_name(r, i)] for i in idx)
            total += rows
            try:
                done = read_done(path, r)
            except TraceError as exc:
                problems.append(str(exc))
                all_done = False
                continue
            if done is None:
                all_done = False
                continue
            if (done["rows"], done["shards"]) != (rows, len(idx)):
                lost = done["shards"] > len(idx) and done["rows"] > rows
                problems.append(
                    f"{path / done_name(r)}: rank {r} finished with {done['rows']} rows in"
                    f" {done['shards']} shards, but {path / 'shards'} holds {rows} rows in"
                    f" {len(idx)} shards"
                    + (
                        f" (shard {shard_name(r, len(idx))} and later are missing); "
                        + retrace_hint(path, r, len(idx), idx)
                        if lost
                        else "; the store was modified outside moelab: delete it and trace again"
                    )
                )
        want_total = (meta.extra.get("run") or {}).get("total_tokens")
        if all_done and not problems and want_total is not None and total != int(want_total):
            problems.append(
                f"{path}: every rank finished but the shards hold {total} rows; meta.json"
                f" (run.total_tokens) says {want_total}: delete the store and trace again"
            )
        if self.has_hidden:
            for s, f in zip(self.shards, self.hidden_files(), strict=True):
                if not f.exists():
                    m = SHARD_RE.match(s.name)
                    r, i = int(m.group(1)), int(m.group(2))  # type: ignore[union-attr]
                    problems.append(
                        f"{f}: hidden side-store file missing for shard {s.name}; delete"
                        f" {s} and " + retrace_hint(path, r, i, present.get(r, []))
                    )
        return problems

    @property
    def complete(self) -> bool:
        """True when every rank of the run wrote its done marker."""
        world = int(self.meta.extra.get("world_size", 1) or 1)
        return all(self.rank_done(r) for r in range(world))

    # -- sizes -------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """Total rows over all shards."""
        return sum(pf.metadata.num_rows for pf in self._files)

    @property
    def has_logits(self) -> bool:
        """True if the shards hold full router logits."""
        return bool(self.meta.extra.get("logits", False))

    @property
    def has_hidden(self) -> bool:
        """True if a hidden side store was written."""
        return bool(self.meta.extra.get("hidden_points")) and (self.path / "hidden").exists()

    def nbytes(self) -> int:
        """Bytes of the Parquet shards on disk (compressed)."""
        return sum(s.stat().st_size for s in self.shards)

    # -- loading -----------------------------------------------------------------------------
    def _row_order(self) -> np.ndarray | None:
        """Permutation putting rows of several ranks in document order (None if already)."""
        ranks = {int(SHARD_RE.match(s.name).group(1)) for s in self.shards}  # type: ignore[union-attr]
        if len(ranks) <= 1:
            return None
        doc = np.concatenate(
            [pf.read(columns=["doc_id"])["doc_id"].to_numpy() for pf in self._files]
        )
        if np.all(doc[1:] >= doc[:-1]):
            return None
        return np.argsort(doc, kind="stable")

    def load(
        self,
        columns: Sequence[str] | None = None,
        layers: Sequence[int] | None = None,
        float_dtype: Any = np.float32,
        hidden: bool = True,
    ) -> Trace:
        """Read all shards into a Trace (rows in document order).

        columns: subset of {"logits", "weights", "hidden"} to read besides ids and base columns
        (None = everything present). Arrays are filled shard by shard into preallocated
        buffers, so peak memory is the result plus one shard.
        """
        m = self.meta
        want = set(columns) if columns is not None else {"logits", "weights", "hidden"}
        if layers is not None:
            raise TraceError(
                "TraceStore.load(layers=...) is not supported; use .sql() or expert_counts()"
            )
        n = self.num_tokens
        L, k, E = m.num_layers, m.top_k, m.num_experts
        base = {
            "doc_id": np.empty(n, np.int64),
            "position": np.empty(n, np.int32),
            "token_id": np.empty(n, np.int64),
            "domain": np.empty(n, np.int16),
            "is_bos": np.empty(n, bool),
        }
        ids = np.empty((n, L, k), np.int16)
        w = np.zeros((n, L, k), float_dtype)
        drop = np.zeros((n, L, k), bool) if has_dropped(m) else None
        lg = np.empty((n, L, E), float_dtype) if ("logits" in want and self.has_logits) else None
        sentinel = np.iinfo(id_dtype(E)).max
        off = 0
        for pf in self._files:
            cols = list(BASE_COLUMNS) + [f"e{li}_{j}" for li in range(L) for j in range(k)]
            if "weights" in want:
                cols += [f"w{li}_{j}" for li in range(L) for j in range(k)]
            if lg is not None:
                cols += [f"logits{li}" for li in range(L)]
            if drop is not None:
                cols += [f"d{li}_{j}" for li in range(L) for j in range(k)]
            t = pf.read(columns=cols)
            r = t.num_rows
            for c in BASE_COLUMNS:
                base[c][off : off + r] = t[c].to_numpy()
            for li in range(L):
                for j in range(k):
                    e = t[f"e{li}_{j}"].to_numpy().astype(np.int16)
                    ids[off : off + r, li, j] = np.where(e == sentinel, NO_EXPERT, e)
                    if "weights" in want:
                        w[off : off + r, li, j] = decode_floats(t[f"w{li}_{j}"])
                    if drop is not None:
                        drop[off : off + r, li, j] = t[f"d{li}_{j}"].to_numpy(zero_copy_only=False)
                if lg is not None:
                    lg[off : off + r, li, :] = decode_floats(t[f"logits{li}"], E)
            off += r
        order = self._row_order()
        hid, hrows = ({}, None)
        if "hidden" in want and hidden and self.has_hidden:
            hid, hrows = self._load_hidden(n, order)
        if order is not None:
            base = {k2: v[order] for k2, v in base.items()}
            ids, w = ids[order], w[order]
            lg = None if lg is None else lg[order]
            drop = None if drop is None else drop[order]
        return Trace(
            meta=m,
            expert_ids=ids,
            weights=w,
            logits=lg,
            dropped=drop,
            hidden=hid,
            hidden_rows=hrows,
            **base,
        )

    def hidden_files(self) -> list[Path]:
        """Hidden side-store files in shard order."""
        return [
            self.path / "hidden" / s.name.replace(".parquet", ".safetensors") for s in self.shards
        ]

    def read_hidden(self, point: str = "router_input") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(doc_id [M], position [M], states [M, Lh, D] float16) of one point, compact layers.

        The recorded layers are meta.extra["hidden_layers"] (all MoE layers by default).
        """
        from safetensors.numpy import load_file

        if not self.has_hidden:
            raise TraceError(f"{self.path}: no hidden side store (retrace with --hidden-rate > 0)")
        if point not in self.meta.extra.get("hidden_points", []):
            raise TraceError(
                f"{self.path}: hidden point {point!r} not recorded; have {self.meta.extra.get('hidden_points')}"
            )
        docs, poss, hs = [], [], []
        for f in self.hidden_files():
            if not f.exists():
                raise TraceError(f"{f}: hidden side-store file missing for its shard")
            try:
                t = load_file(str(f))
            except Exception as exc:  # noqa: BLE001
                raise TraceError(f"{f}: corrupt hidden side-store file ({exc})") from exc
            docs.append(t["doc_id"])
            poss.append(t["position"])
            hs.append(t[point])
        return np.concatenate(docs), np.concatenate(poss), np.concatenate(hs)

    def _load_hidden(
        self, n: int, order: np.ndarray | None
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Hidden states expanded to [M, L, D] (NaN for layers not recorded) + trace row ids."""
        from safetensors.numpy import load_file

        points = self.meta.extra.get("hidden_points", [])
        rows_all, per_point = [], {p: [] for p in points}
        offset = 0
        layers = None
        rank_rows: dict[int, int] = {}
        for s, f, pf in zip(self.shards, self.hidden_files(), self._files, strict=True):
            if not f.exists():
                raise TraceError(f"{f}: hidden side-store file missing for shard {s.name}")
            try:
                t = load_file(str(f))
            except Exception as exc:  # noqa: BLE001
                raise TraceError(f"{f}: corrupt hidden side-store file ({exc})") from exc
            # rows on disk count within the rank's own stream; its shards are consecutive
            rank = int(SHARD_RE.match(s.name).group(1))  # type: ignore[union-attr]
            local = t["rows"] - rank_rows.get(rank, 0)
            rank_rows[rank] = rank_rows.get(rank, 0) + pf.metadata.num_rows
            if local.size and (local.min() < 0 or local.max() >= pf.metadata.num_rows):
                raise TraceError(f"{f}: hidden row ids fall outside shard {s.name}")
            rows_all.append(local + offset)
            for pt in points:
                per_point[pt].append(t[pt])
            layers = t["layers"]
            offset += pf.metadata.num_rows
        rows = np.concatenate(rows_all) if rows_all else np.zeros(0, np.int64)
        if order is not None:
            inv = np.empty_like(order)
            inv[order] = np.arange(order.shape[0])
            rows = inv[rows]
        srt = np.argsort(rows, kind="stable")
        rows = rows[srt]
        out = {}
        L = self.meta.num_layers
        for pt in points:
            h = (
                np.concatenate(per_point[pt])[srt]
                if per_point[pt]
                else np.zeros((0, 0, 0), np.float16)
            )
            if layers is not None and len(layers) != L and h.size:
                full = np.full((h.shape[0], L, h.shape[2]), np.nan, np.float16)
                full[:, layers] = h
                h = full
            out[pt] = h
        return out, rows

    # -- queries -----------------------------------------------------------------------------
    def expert_counts(self) -> np.ndarray:
        """[L, E] int64 number of (token, slot) assignments per expert, reading only id columns."""
        L, k, E = self.meta.num_layers, self.meta.top_k, self.meta.num_experts
        out = np.zeros((L, E + 1), np.int64)
        sentinel = np.iinfo(id_dtype(E)).max
        for pf in self._files:
            t = pf.read(columns=[f"e{li}_{j}" for li in range(L) for j in range(k)])
            for li in range(L):
                for j in range(k):
                    e = t[f"e{li}_{j}"].to_numpy()
                    c = np.bincount(e, minlength=sentinel + 1)
                    out[li, :E] += c[:E]
        return out[:, :E]

    def sql(self, query: str) -> Any:
        """Run DuckDB SQL with a view named `trace` over all shards (streams; larger than RAM ok)."""
        import duckdb

        if self._con is None:
            self._con = duckdb.connect()
            if self.shards:
                files = ", ".join("'" + str(s).replace("'", "''") + "'" for s in self.shards)
                self._con.execute(f"create view trace as select * from read_parquet([{files}])")
            else:
                cols = ", ".join(f'NULL::INTEGER as "{c}"' for c in BASE_COLUMNS)
                self._con.execute(f"create view trace as select {cols} where false")
        try:
            return self._con.sql(query)
        except Exception as exc:  # noqa: BLE001
            raise TraceError(f"{self.path}: DuckDB query failed: {exc}") from exc

    def gates(self) -> GateSet:
        """The routers saved with the trace (gates.safetensors)."""
        p = self.path / "gates.safetensors"
        if not p.exists():
            raise TraceError(
                f"{p}: not found; this trace has no gates (its adapter could not export routers). "
                "Retrace with `moelab trace --model PATH ...` using a model whose adapter exports gates"
            )
        return GateSet.load(p)

    def documents(self) -> pa.Table | None:
        """documents.parquet (doc_id, name, domain, num_tokens) if written."""
        p = self.path / "documents.parquet"
        return pq.read_table(str(p)) if p.exists() else None

    def rank_done(self, rank: int) -> bool:
        """True when process `rank` finished its share."""
        return (self.path / done_name(rank)).exists()


def rows_on_disk(path: str | Path) -> int:
    """Rows in the readable shards of a (possibly damaged) store, 0 if there is none."""
    n = 0
    for f in (Path(path) / "shards").glob("part-r*.parquet"):
        if SHARD_RE.match(f.name):
            try:
                n += pq.ParquetFile(str(f)).metadata.num_rows
            except Exception:  # noqa: BLE001, S112 - a damaged shard counts as no rows here
                continue
    return n


def read_meta(path: Path) -> TraceMeta:
    """meta.json of a store; TraceError if the folder or the file is missing or unreadable."""
    if not path.exists():
        raise TraceError(f"{path}: trace directory does not exist (create it with `moelab trace`)")
    mpath = path / "meta.json"
    if not mpath.exists():
        raise TraceError(f"{mpath}: not found; {path} is not a moelab trace store")
    try:
        meta = TraceMeta.from_dict(json.loads(mpath.read_text()))
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise TraceError(f"{mpath}: unreadable meta.json ({exc})") from exc
    if not 1 <= int(meta.schema_version) <= SCHEMA_VERSION:
        raise TraceError(
            f"{mpath}: schema_version {meta.schema_version} is not one this moelab reads"
            f" (1..{SCHEMA_VERSION}); upgrade moelab to read a store written by a newer one"
        )
    return meta


@dataclass
class VerifyReport:
    """What `verify_store` found: problems (empty = healthy) and a summary of the store."""

    path: Path
    problems: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def verify_store(path: str | Path) -> VerifyReport:
    """Full check of a store: the cheap invariants of `open`, then every row of every shard
    (readable, ids in range, finite weights/logits, rows in document order per rank), the
    per-document counts of documents.parquet and the hidden side store."""
    path = Path(path)
    rep = VerifyReport(path)
    try:
        meta = read_meta(path)
    except TraceError as exc:
        rep.problems.append(str(exc))
        return rep
    shards = sorted(p for p in (path / "shards").glob("part-r*.parquet") if SHARD_RE.match(p.name))
    files: list[pq.ParquetFile] = []
    good: list[Path] = []
    for s in shards:
        try:
            files.append(open_shard(s))
            good.append(s)
        except TraceError as exc:
            rep.problems.append(str(exc))
    store = TraceStore.__new__(TraceStore)
    store.path, store.meta, store.shards, store._files, store._con = path, meta, good, files, None
    want = arrow_schema(meta, store.has_logits)
    L, k, E = meta.num_layers, meta.top_k, meta.num_experts
    sentinel = np.iinfo(id_dtype(E)).max
    last_key: dict[int, tuple[int, int]] = {}
    per_doc: dict[int, int] = {}
    for s, pf in zip(good, files, strict=True):
        if not pf.schema_arrow.equals(want):
            rep.problems.append(
                f"{s}: columns do not match {path / 'meta.json'} (expected {len(want)} columns"
                f" for L={L}, k={k}, logits={store.has_logits}; found {len(pf.schema_arrow)})"
            )
            continue
        try:
            t = pf.read()
        except Exception as exc:  # noqa: BLE001 - reported with the file named
            rep.problems.append(
                f"{s}: corrupt data ({exc}); " + "delete it and rerun the same `moelab trace`"
            )
            continue
        rank = int(SHARD_RE.match(s.name).group(1))  # type: ignore[union-attr]
        doc = t["doc_id"].to_numpy()
        pos = t["position"].to_numpy().astype(np.int64)
        if doc.size:
            key = np.stack([doc, pos], 1)
            prev = last_key.get(rank)
            if prev is not None:
                key = np.concatenate([np.array([prev]), key])
            bad = (key[1:, 0] < key[:-1, 0]) | (
                (key[1:, 0] == key[:-1, 0]) & (key[1:, 1] <= key[:-1, 1])
            )
            if bad.any():
                rep.problems.append(
                    f"{s}: rows are not in (doc_id, position) order within rank {rank} (first at"
                    f" row {int(np.flatnonzero(bad)[0])}); the store mixes runs or was edited"
                )
            last_key[rank] = (int(doc[-1]), int(pos[-1]))
            ud, uc = np.unique(doc, return_counts=True)
            for d_, c_ in zip(ud.tolist(), uc.tolist(), strict=True):
                per_doc[d_] = per_doc.get(d_, 0) + c_
        for li in range(L):
            for j in range(k):
                e = t[f"e{li}_{j}"].to_numpy()
                if ((e >= E) & (e != sentinel)).any():
                    rep.problems.append(
                        f"{s}: column e{li}_{j} holds expert ids >= E={E}; the shard is corrupt"
                    )
                w = t[f"w{li}_{j}"].to_numpy()
                if not np.isfinite(w).all():
                    rep.problems.append(
                        f"{s}: column w{li}_{j} holds {int((~np.isfinite(w)).sum())} non-finite"
                        " weights (NaN/Inf)"
                    )
            if store.has_logits:
                lg = t[f"logits{li}"].combine_chunks().flatten().to_numpy()
                if not np.isfinite(lg).all():
                    rep.problems.append(
                        f"{s}: column logits{li} holds {int((~np.isfinite(lg)).sum())}"
                        " non-finite router logits (NaN/Inf)"
                    )
    if len(good) == len(shards):
        rep.problems.extend(store.check())
    docs = path / "documents.parquet"
    if docs.exists() and store.complete and not rep.problems:
        try:
            dt = pq.read_table(str(docs))
            want_docs = dict(
                zip(dt["doc_id"].to_pylist(), dt["num_tokens"].to_pylist(), strict=True)
            )
        except Exception as exc:  # noqa: BLE001
            rep.problems.append(f"{docs}: unreadable ({exc})")
        else:
            wrong = [d for d in set(want_docs) | set(per_doc) if want_docs.get(d) != per_doc.get(d)]
            if wrong:
                d0 = sorted(wrong)[0]
                rep.problems.append(
                    f"{path}: {len(wrong)} document(s) hold another number of rows than"
                    f" {docs.name} says (e.g. doc_id {d0}: {per_doc.get(d0, 0)} rows,"
                    f" expected {want_docs.get(d0, 0)}): delete the store and trace again"
                )
    if store.has_hidden and not rep.problems:
        try:
            store._load_hidden(store.num_tokens, None)
        except TraceError as exc:
            rep.problems.append(str(exc))
    rep.summary = {
        "tokens": int(sum(pf.metadata.num_rows for pf in files)),
        "shards": len(shards),
        "documents": len(per_doc),
        "ranks": int(meta.extra.get("world_size", 1) or 1),
        "complete": store.complete,
        "layers x experts x k": f"{L} x {E} x {k}",
        "logits": store.has_logits,
        "hidden": ", ".join(meta.extra.get("hidden_points", [])) or "no",
        "model": meta.model,
        "model fingerprint": meta.model_fingerprint or "-",
    }
    if not store.complete and not rep.problems:
        unfinished = [r for r in range(rep.summary["ranks"]) if not store.rank_done(r)]
        rep.problems.append(
            f"{path}: rank(s) {unfinished} have not finished (no {done_name(unfinished[0])});"
            " rerun the same `moelab trace` command to finish the store"
        )
    return rep
