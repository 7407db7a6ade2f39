"""TraceStore/TraceWriter: round trip, resume after a kill, errors, foreign readers, export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trace_tiny as tiny
from trace_testutil import make_docs

from moelab.errors import ModelError, TraceError
from moelab.trace.adapters import get_adapter
from moelab.trace.api import hidden_sample, load_model, trace_model
from moelab.trace.export import expert_activation_matrix, export_moe_infinity
from moelab.trace.schema import NO_EXPERT, Trace, TraceMeta
from moelab.trace.store import TraceStore, TraceWriter, write_trace


def synthetic_rows(n: int, L: int, k: int, E: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.permutation(E)[:k] for _ in range(L)]) for _ in range(n)]).astype(
        np.int64
    )
    ids[::7, 0, -1] = NO_EXPERT  # a dropped slot now and then
    doc = np.repeat(np.arange(n // 10 + 1), 10)[:n]
    pos = np.concatenate([np.arange(10)] * (n // 10 + 1))[:n].astype(np.int32)
    return {
        "doc_id": doc,
        "position": pos,
        "token_id": rng.integers(0, 50000, n).astype(np.int32),
        "domain": (doc % 3).astype(np.int16),
        "is_bos": pos == 0,
        "expert_ids": ids,
        "weights": rng.random((n, L, k)).astype(np.float16),
        "logits": rng.normal(size=(n, L, E)).astype(np.float16),
    }


@pytest.mark.parametrize("E", [8, 300])
def test_round_trip_exact(tmp_path: Path, E: int) -> None:
    L, k, n = 3, 2, 95
    meta = TraceMeta(num_layers=L, num_experts=E, top_k=k, layer_indices=[0, 1, 2], split="test")
    rows = synthetic_rows(n, L, k, E)
    w = TraceWriter(tmp_path / "s", meta, shard_tokens=30, logits=True)
    for a in range(0, n, 20):
        w.append(**{key: v[a : a + 20] for key, v in rows.items()})
    w.close()
    store = TraceStore.open(tmp_path / "s")
    assert store.num_tokens == n and len(store.shards) == 3  # 40 + 40 + 15 rows
    tr = store.load()
    for key in ("doc_id", "position", "token_id", "domain", "is_bos"):
        np.testing.assert_array_equal(getattr(tr, key), rows[key])
    np.testing.assert_array_equal(tr.expert_ids, rows["expert_ids"])
    np.testing.assert_array_equal(tr.weights, rows["weights"].astype(np.float32))
    np.testing.assert_array_equal(tr.logits, rows["logits"].astype(np.float32))
    # on-disk types are the compact ones of the contract
    sch = store._files[0].schema_arrow
    assert str(sch.field("e0_0").type) == ("uint8" if E <= 255 else "uint16")
    # schema 2: float32 weight/logit columns (Spark cannot read Parquet FLOAT16)
    assert str(sch.field("w0_0").type) == "float"
    assert str(sch.field("logits0").type) == f"fixed_size_list<element: float>[{E}]"
    # expert counts (id columns only) and DuckDB agree with numpy
    want = np.zeros((L, E), np.int64)
    for li in range(L):
        v = rows["expert_ids"][:, li].ravel()
        want[li] = np.bincount(v[v >= 0], minlength=E)
    np.testing.assert_array_equal(store.expert_counts(), want)
    got = dict(store.sql("select e1_0, count(*) from trace group by e1_0").fetchall())
    assert got == {
        int(e): int(c)
        for e, c in zip(*np.unique(rows["expert_ids"][:, 1, 0], return_counts=True), strict=True)
    }


def test_write_trace_round_trip_with_drop_flags(tmp_path: Path) -> None:
    L, k, E, n = 2, 2, 8, 57
    rows = synthetic_rows(n, L, k, E, seed=4)
    meta = TraceMeta(num_layers=L, num_experts=E, top_k=k, split="test")
    dropped = np.zeros((n, L, k), bool)
    dropped[3, 1, 0] = dropped[40, 0, 1] = True
    tr = Trace(meta=meta, dropped=dropped, **{key: v for key, v in rows.items()})
    st = write_trace(tr, tmp_path / "s", shard_tokens=20, chunk_tokens=13)
    assert len(st.shards) == 3 and st.meta.extra["dropped"] and "dropped" not in meta.extra
    back = st.load()
    for key in ("doc_id", "position", "token_id", "expert_ids", "dropped"):
        np.testing.assert_array_equal(getattr(back, key), getattr(tr, key))
    np.testing.assert_array_equal(back.logits, rows["logits"].astype(np.float32))
    no_logits = write_trace(tr, tmp_path / "n", logits=False).load()
    assert no_logits.logits is None and no_logits.num_tokens == n
    tr.logits = None
    with pytest.raises(TraceError, match="no logits"):
        write_trace(tr, tmp_path / "x", logits=True)
    with pytest.raises(TraceError, match="chunk_tokens"):
        write_trace(tr, tmp_path / "y", chunk_tokens=0)


def test_foreign_readers_without_moelab(tmp_path: Path, mixtral_dir: Path) -> None:
    trace_model(mixtral_dir, make_docs(4), None, tmp_path / "t", seq_len=16, progress=False)
    code = (
        "import sys, duckdb, pyarrow.dataset as ds\n"
        f"d = r'{tmp_path / 't'}'\n"
        "n = duckdb.sql(f\"select count(*), sum(is_bos::int), max(e1_1) from read_parquet('{d}/shards/*.parquet')\").fetchall()[0]\n"
        "t = ds.dataset(d + '/shards', format='parquet').to_table(columns=['e0_0', 'logits0'])\n"
        "assert 'moelab' not in sys.modules\n"
        "print(n[0], n[1], n[2], t.num_rows, len(t['logits0'][0]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    tr = TraceStore.open(tmp_path / "t").load()
    assert [int(x) for x in out] == [
        tr.num_tokens,
        4,
        int(tr.expert_ids[:, 1, 1].max()),
        tr.num_tokens,
        6,
    ]


def test_resume_after_kill_equals_single_run(tmp_path: Path, mixtral_dir: Path) -> None:
    docs = make_docs(9, seed=3)
    kw = dict(
        seq_len=16,
        batch_size=2,
        shard_tokens=20,
        hidden_rate=0.3,
        progress=False,
        hidden_points=("router_input", "residual"),
    )
    full = trace_model(mixtral_dir, docs, None, tmp_path / "full", **kw).load()
    with pytest.raises(KeyboardInterrupt):
        trace_model(mixtral_dir, docs, None, tmp_path / "killed", _stop_after_batches=5, **kw)
    killed = tmp_path / "killed"
    n_shards = len(list((killed / "shards").glob("*.parquet")))
    assert 0 < n_shards and not (killed / "done-r000.json").exists()
    # a kill during a write leaves a partial temp file: it must be ignored and cleaned up
    (killed / "shards" / ".part-r000-000099.parquet.abc.tmp").write_bytes(b"PAR1 partial")
    partial = TraceStore.open(killed).num_tokens
    assert 0 < partial < full.num_tokens
    resumed = trace_model(mixtral_dir, docs, None, killed, **kw).load()
    for key in (
        "doc_id",
        "position",
        "token_id",
        "domain",
        "is_bos",
        "expert_ids",
        "weights",
        "logits",
        "hidden_rows",
    ):
        np.testing.assert_array_equal(getattr(resumed, key), getattr(full, key), err_msg=key)
    for p in ("router_input", "residual"):
        np.testing.assert_array_equal(resumed.hidden[p], full.hidden[p])
    assert not list((killed / "shards").glob(".*.tmp"))


def test_resume_with_other_model_or_options_fails(tmp_path: Path, mixtral_dir: Path) -> None:
    docs = make_docs(4)
    trace_model(mixtral_dir, docs, None, tmp_path / "t", seq_len=16, progress=False)
    other = tiny.build("qwen2_moe", tmp_path / "qwen")
    with pytest.raises(TraceError, match=r"meta\.json.*existing trace has"):
        trace_model(other, docs, None, tmp_path / "t", seq_len=16, progress=False)
    other_mixtral = tiny.build("mixtral", tmp_path / "mix2", seed=5)  # same shapes, other weights
    with pytest.raises(TraceError, match="model_fingerprint"):
        trace_model(other_mixtral, docs, None, tmp_path / "t", seq_len=16, progress=False)
    with pytest.raises(TraceError, match="logits"):
        trace_model(
            mixtral_dir, docs, None, tmp_path / "t", seq_len=16, logits=False, progress=False
        )


def test_corrupt_and_truncated_shards(tmp_path: Path, mixtral_dir: Path) -> None:
    trace_model(
        mixtral_dir, make_docs(6), None, tmp_path / "t", seq_len=16, shard_tokens=30, progress=False
    )
    shards = sorted((tmp_path / "t" / "shards").glob("*.parquet"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(TraceError, match=shards[1].name + ".*corrupt or truncated"):
        TraceStore.open(tmp_path / "t")
    with pytest.raises(TraceError, match=shards[1].name):
        trace_model(
            mixtral_dir,
            make_docs(6),
            None,
            tmp_path / "t",
            seq_len=16,
            shard_tokens=30,
            progress=False,
        )
    shards[1].write_bytes(b"\x00" * len(data))  # garbage of the right size
    with pytest.raises(TraceError, match=shards[1].name):
        TraceStore.open(tmp_path / "t")


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="does not exist"):
        TraceStore.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceError, match="meta.json"):
        TraceStore.open(tmp_path / "empty")


def test_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text(
        json.dumps({"model_type": "no_such_family_xyz"})
    )
    with pytest.raises(ModelError, match="unknown model family.*no_such_family_xyz"):
        load_model(tmp_path / "weird")
    with pytest.raises(ModelError, match="unknown model family: Linear"):
        get_adapter(torch.nn.Linear(2, 2))
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "llama"))
    with pytest.raises(ModelError, match="no MoE layers found"):
        trace_model(tmp_path / "llama", make_docs(2), None, tmp_path / "t", progress=False)


def test_hidden_subset_and_sampling(tmp_path: Path, mixtral_dir: Path) -> None:
    docs = make_docs(6)
    st = trace_model(
        mixtral_dir,
        docs,
        None,
        tmp_path / "t",
        seq_len=16,
        hidden_rate=0.5,
        hidden_layers=[1],
        progress=False,
    )
    tr = st.load()
    expect = hidden_sample(tr.doc_id, tr.position, 0.5, 0)
    np.testing.assert_array_equal(tr.hidden_rows, np.flatnonzero(expect))
    h = tr.hidden["router_input"]
    assert h.shape == (expect.sum(), 2, 32)
    assert np.isnan(h[:, 0]).all() and np.isfinite(h[:, 1]).all()
    docs_, pos_, compact = st.read_hidden("router_input")
    assert compact.shape == (expect.sum(), 1, 32)
    np.testing.assert_array_equal(compact[:, 0], h[:, 1])
    np.testing.assert_array_equal(docs_, tr.doc_id[tr.hidden_rows])
    assert 0.3 < expect.mean() < 0.7


def test_max_tokens_budget_and_export(tmp_path: Path, mixtral_dir: Path) -> None:
    docs = make_docs(6)
    st = trace_model(
        mixtral_dir, docs, None, tmp_path / "t", seq_len=16, max_tokens=50, progress=False
    )
    tr = st.load()
    assert tr.num_tokens == 50
    eam, doc_ids = expert_activation_matrix(st)
    assert eam.shape == (len(np.unique(tr.doc_id)), 2, 6) and eam.dtype == np.float32
    for i, d in enumerate(doc_ids):
        rows = tr.doc_id == d
        for li in range(2):
            np.testing.assert_array_equal(
                eam[i, li], np.bincount(tr.expert_ids[rows, li].ravel(), minlength=6)
            )
    assert eam.sum() == 50 * 2 * 2
    path = export_moe_infinity(st, tmp_path / "eam")
    loaded = np.load(
        path, allow_pickle=False
    )  # how MoE-Infinity's ExpertTracer.load_trace reads it
    np.testing.assert_array_equal(loaded, eam)


def test_dtype_option_and_public_api(tmp_path: Path, mixtral_dir: Path) -> None:
    import moelab.trace as mt

    model = mt.load_model(mixtral_dir, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    st = mt.trace_model(
        mixtral_dir,
        make_docs(3),
        None,
        tmp_path / "t",
        dtype="bfloat16",
        seq_len=16,
        progress=False,
    )
    tr = st.load()
    docs = make_docs(3)
    ids = torch.tensor([[1, *docs[0].token_ids[:15]]])  # mixtral's bos = 1; first chunk of 16
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    n = ids.shape[1]
    ref = out.router_logits[0].float().numpy().astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(tr.logits[:n, 0], ref)
    with pytest.raises(ModelError, match="dtype='int8'"):
        mt.load_model(mixtral_dir, dtype="int8")
