"""Store integrity: TraceStore.open checks the cheap invariants, `moelab trace-verify` checks
everything, and rerunning `moelab trace` repairs a store that lost its last shards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from trace_testutil import build_moelab, make_docs
from typer.testing import CliRunner

from moelab.cli import app
from moelab.errors import TraceError
from moelab.trace.api import trace_model
from moelab.trace.store import TraceStore, verify_store

KW = dict(seq_len=16, batch_size=2, shard_tokens=40, progress=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_moelab(tmp_path_factory.mktemp("integrity"))


@pytest.fixture()
def store(ckpt: Path, tmp_path: Path) -> Path:
    out = tmp_path / "store"
    st = trace_model(ckpt, make_docs(8), None, out, hidden_rate=0.3, **KW)
    assert len(st.shards) >= 4
    return out


def _shards(out: Path) -> list[Path]:
    return sorted((out / "shards").glob("*.parquet"))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moelab.cli", *args], capture_output=True, text=True, timeout=300
    )


def _same_rows(a: Path, b: Path) -> None:
    ta, tb = TraceStore.open(a).load(), TraceStore.open(b).load()
    assert ta.num_tokens == tb.num_tokens
    for name in ("doc_id", "position", "token_id", "expert_ids", "weights"):
        np.testing.assert_array_equal(getattr(ta, name), getattr(tb, name))
    np.testing.assert_array_equal(ta.hidden_rows, tb.hidden_rows)


def test_lost_last_shard_is_refused_verified_and_repaired(
    store: Path, ckpt: Path, tmp_path: Path
) -> None:
    ref = tmp_path / "ref"
    shutil.copytree(store, ref)
    done = json.loads((store / "done-r000.json").read_text())
    last = _shards(store)[-1]
    lost_rows = pq.ParquetFile(str(last)).metadata.num_rows
    last.unlink()
    with pytest.raises(TraceError) as err:
        TraceStore.open(store)
    msg = str(err.value)
    assert "done-r000.json" in msg and f"{done['rows']} rows in {done['shards']} shards" in msg
    assert f"{done['rows'] - lost_rows} rows in {done['shards'] - 1} shards" in msg
    assert last.name in msg and "rerun the same `moelab trace` command" in msg
    # analyze refuses it (exit 2, one line, nothing written)
    r = _cli("analyze", str(store), "--out", str(tmp_path / "an"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert last.name in r.stderr and not (tmp_path / "an").exists()
    # verify: exit 2 with what is wrong
    r = _cli("trace-verify", str(store))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "1 problem(s)" in r.stderr and last.name in r.stderr
    # rerunning the same trace repairs exactly what is missing
    st = trace_model(ckpt, make_docs(8), None, store, hidden_rate=0.3, **KW)
    assert st.num_tokens == done["rows"]
    assert json.loads((store / "done-r000.json").read_text()) == done
    _same_rows(store, ref)
    rep = verify_store(store)
    assert rep.ok, rep.problems
    r = CliRunner().invoke(app, ["trace-verify", str(store)])
    assert r.exit_code == 0, r.output
    assert f"ok: {done['rows']:,} tokens in {done['shards']} shards" in r.output


def test_lost_middle_shard_says_exactly_what_to_do(store: Path, ckpt: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    shutil.copytree(store, ref)
    shards = _shards(store)
    shards[1].unlink()
    with pytest.raises(TraceError) as err:
        TraceStore.open(store)
    msg = str(err.value)
    assert f"{shards[1].name}: missing" in msg
    assert f"delete the {len(shards) - 2} shard(s) of rank 0 after the gap" in msg
    assert shards[2].name in msg and "done-r000.json" in msg
    # the writer refuses with the same instruction instead of appending after a gap
    with pytest.raises(TraceError, match="after the gap"):
        trace_model(ckpt, make_docs(8), None, store, hidden_rate=0.3, **KW)
    # following the instruction literally repairs the store
    for s in shards[2:]:
        s.unlink()
        (store / "hidden" / s.name.replace(".parquet", ".safetensors")).unlink()
    (store / "done-r000.json").unlink()
    trace_model(ckpt, make_docs(8), None, store, hidden_rate=0.3, **KW)
    _same_rows(store, ref)
    assert verify_store(store).ok


def test_done_marker_disagreeing_upwards_is_refused(store: Path) -> None:
    marker = store / "done-r000.json"
    d = json.loads(marker.read_text())
    marker.write_text(json.dumps({**d, "rows": d["rows"] - 3}))
    with pytest.raises(TraceError, match="modified outside moelab"):
        TraceStore.open(store)


def test_missing_hidden_file_is_refused(store: Path) -> None:
    h = sorted((store / "hidden").glob("*.safetensors"))[0]
    h.unlink()
    with pytest.raises(TraceError, match=f"{h.name}: hidden side-store file missing"):
        TraceStore.open(store)


def test_verify_reads_every_row(store: Path) -> None:
    """A shard whose metadata is fine but holds NaN weights passes open, fails verify."""
    s = _shards(store)[2]
    t = pq.read_table(str(s))
    w = t["w0_0"].to_numpy().copy()
    w[3] = np.nan
    t = t.set_column(t.schema.get_field_index("w0_0"), t.schema.field("w0_0"), pa.array(w))
    pq.write_table(t, str(s))
    TraceStore.open(store)  # cheap invariants hold
    rep = verify_store(store)
    assert not rep.ok
    assert any(s.name in p and "w0_0" in p and "non-finite" in p for p in rep.problems)
    r = CliRunner().invoke(app, ["trace-verify", str(store)])
    assert r.exit_code == 2
    assert "w0_0" in r.output


def test_unfinished_store_opens_but_does_not_verify(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        trace_model(ckpt, make_docs(8), None, out, _stop_after_batches=3, **KW)
    TraceStore.open(out)  # a run in progress may be peeked at
    rep = verify_store(out)
    assert not rep.ok and "have not finished" in rep.problems[0]
