"""Every reader the README names reads a trace store with values (schema version 2, float32
weights and logits); stores written in version 1 (float16) still load and resume."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moelab.errors import TraceError
from moelab.trace.schema import SCHEMA_VERSION, TraceMeta
from moelab.trace.store import TraceStore, TraceWriter, arrow_schema

L, K, E, N = 2, 2, 8, 300


def rows(seed: int = 0, n: int = N) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((n, L, E)), axis=-1)[..., :K].astype(np.int16)
    return {
        "doc_id": np.repeat(np.arange(n // 100), 100).astype(np.int64),
        "position": np.tile(np.arange(100), n // 100).astype(np.int32),
        "token_id": rng.integers(0, 50, n),
        "domain": np.zeros(n, np.int16),
        "is_bos": np.tile(np.arange(100) == 0, n // 100),
        "expert_ids": ids,
        "weights": rng.random((n, L, K)).astype(np.float32),
        "logits": rng.normal(size=(n, L, E)).astype(np.float32),
    }


def write(path, r, meta=None):
    meta = meta or TraceMeta(num_layers=L, num_experts=E, top_k=K, model="t")
    w = TraceWriter(path, meta, shard_tokens=120, logits=True)
    w.append(**r)
    w.close()
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    r = rows()
    return write(tmp_path_factory.mktemp("readers") / "s", r), r


def test_schema_v2_is_float32(store):
    path, r = store
    assert SCHEMA_VERSION == 2
    assert json.loads((path / "meta.json").read_text())["schema_version"] == 2
    sch = pq.read_schema(str(sorted((path / "shards").glob("*.parquet"))[0]))
    assert sch.field("w0_0").type == pa.float32()
    assert sch.field("logits1").type.value_type == pa.float32()
    tr = TraceStore.open(path).load()
    np.testing.assert_array_equal(tr.weights, r["weights"])  # float32 round trip is exact
    np.testing.assert_array_equal(tr.logits, r["logits"])


def test_pyarrow_pandas_polars_duckdb_read_values(store):
    path, r = store
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    want_w = r["weights"][:, 1, 0]
    want_lg = r["logits"][:, 0, :]
    tab = ds.dataset(str(path / "shards"), format="parquet").to_table(
        columns=["doc_id", "position", "w1_0", "logits0"]
    )
    tab = tab.sort_by([("doc_id", "ascending"), ("position", "ascending")])
    np.testing.assert_array_equal(tab["w1_0"].to_numpy(), want_w)
    np.testing.assert_array_equal(np.stack(tab["logits0"].to_pylist()), want_lg)
    df = pd.read_parquet(path / "shards").sort_values(["doc_id", "position"])
    np.testing.assert_array_equal(df["w1_0"].to_numpy(), want_w)
    np.testing.assert_array_equal(np.stack(df["logits0"].to_numpy()), want_lg)
    pdf = pl.read_parquet(str(path / "shards" / "*.parquet")).sort(["doc_id", "position"])
    np.testing.assert_array_equal(pdf["w1_0"].to_numpy(), want_w)
    np.testing.assert_array_equal(np.stack(pdf["logits0"].to_list()), want_lg)
    got = duckdb.sql(
        f"SELECT w1_0, logits0 FROM read_parquet('{path}/shards/*.parquet') ORDER BY doc_id, position"
    ).fetchall()
    np.testing.assert_array_equal(np.array([g[0] for g in got], np.float32), want_w)
    np.testing.assert_array_equal(np.array([g[1] for g in got], np.float32), want_lg)


def test_spark_reads_values(store):
    path, r = store
    from moelab.analysis.engines import spark_session

    spark = spark_session("local[1]")
    df = spark.read.parquet(str(path / "shards")).orderBy("doc_id", "position")
    got = df.select("e0_1", "w1_0", "logits0").collect()
    np.testing.assert_array_equal(np.array([g[1] for g in got], np.float32), r["weights"][:, 1, 0])
    np.testing.assert_array_equal(np.array([g[2] for g in got], np.float32), r["logits"][:, 0, :])
    np.testing.assert_array_equal(np.array([g[0] for g in got]), r["expert_ids"][:, 0, 1])


def write_v1(path, r):
    """A store exactly as the schema-1 writer wrote it: float16 weight and logit columns."""
    meta = TraceMeta(num_layers=L, num_experts=E, top_k=K, model="t", schema_version=1)
    meta.extra.update({"logits": True, "hidden_points": [], "hidden_layers": [], "world_size": 1})
    (path / "shards").mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps(meta.to_dict()))
    cols = {c: r[c] for c in ("doc_id", "position", "token_id", "domain", "is_bos")}
    arrays = [pa.array(np.asarray(v)) for v in cols.values()]
    arrays[2] = pa.array(cols["token_id"].astype(np.int32))
    arrays += [
        pa.array(r["expert_ids"][:, li, j].astype(np.uint8)) for li in range(L) for j in range(K)
    ]
    arrays += [
        pa.array(r["weights"][:, li, j].astype(np.float16)) for li in range(L) for j in range(K)
    ]
    for li in range(L):
        flat = pa.array(r["logits"][:, li, :].astype(np.float16).reshape(-1))
        arrays.append(pa.FixedSizeListArray.from_arrays(flat, E))
    sch = pa.schema([pa.field(f.name, f.type, nullable=False) for f in arrow_schema(meta, True)])
    assert sch.field("w0_0").type == pa.float16()
    pq.write_table(
        pa.Table.from_arrays(arrays, schema=sch), str(path / "shards/part-r000-000000.parquet")
    )
    (path / "done-r000.json").write_text(json.dumps({"rank": 0, "rows": N, "shards": 1}))
    return path


def test_v1_float16_store_still_loads(tmp_path):
    r = rows(1)
    path = write_v1(tmp_path / "old", r)
    tr = TraceStore.open(path).load()
    np.testing.assert_array_equal(tr.weights, r["weights"].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(tr.logits, r["logits"].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(tr.expert_ids, r["expert_ids"])
    # resuming a v1 store keeps writing float16 (one encoding per store)
    (path / "done-r000.json").unlink()
    meta = TraceMeta(num_layers=L, num_experts=E, top_k=K, model="t")
    w = TraceWriter(path, meta, shard_tokens=120, logits=True)
    assert w.meta.schema_version == 1
    more = rows(2)
    more["doc_id"] = more["doc_id"] + 10
    w.append(**more)
    w.close()
    tr2 = TraceStore.open(path).load()
    assert tr2.num_tokens == 2 * N
    np.testing.assert_array_equal(
        tr2.weights[N:], more["weights"].astype(np.float16).astype(np.float32)
    )


def test_newer_schema_refused(tmp_path):
    path = write(tmp_path / "s", rows())
    m = json.loads((path / "meta.json").read_text())
    m["schema_version"] = SCHEMA_VERSION + 1
    (path / "meta.json").write_text(json.dumps(m))
    with pytest.raises(TraceError, match="schema_version 3"):
        TraceStore.open(path)
