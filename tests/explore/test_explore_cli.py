"""`moelab explore`: refuses a folder that is not a trace store with a message (exit 2), binds
to 127.0.0.1 by default, reuses its cache and rebuilds it when the shards change."""

from __future__ import annotations

import os
import sys

import pytest
from explore_testutil import build_store

from moelab.errors import TraceError
from moelab.explore.cache import build_cache
from moelab.explore.queries import open_explorer
from moelab.trace.store import TraceStore


def _main(monkeypatch, capsys, *args):
    from moelab.cli import main

    monkeypatch.setattr(sys, "argv", ["moelab", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def test_not_a_trace_store(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(TraceError, match="not a moelab trace store"):
        open_explorer(tmp_path)
    code, err = _main(monkeypatch, capsys, "explore", str(tmp_path))
    assert code == 2 and "not a moelab trace store" in err
    code, err = _main(monkeypatch, capsys, "explore", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in err


def test_bad_port_and_holdout(store, monkeypatch, capsys):
    code, err = _main(monkeypatch, capsys, "explore", str(store), "--port", "70000")
    assert code == 2 and "--port" in err
    code, err = _main(monkeypatch, capsys, "explore", str(store), "--holdout", "1.5")
    assert code == 2 and "holdout" in err


def test_default_host_is_localhost(store, monkeypatch, capsys):
    import uvicorn

    seen = {}

    def fake_run(app, host, port, **kw):
        seen.update(host=host, port=port, app=app)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    from moelab.cli import app

    monkeypatch.setattr(sys, "argv", ["moelab", "explore", str(store), "--threads", "1"])
    app(standalone_mode=False)
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8765
    monkeypatch.setattr(
        sys, "argv", ["moelab", "explore", str(store), "--host", "0.0.0.0", "--port", "9000"]
    )
    app(standalone_mode=False)
    assert seen["host"] == "0.0.0.0" and seen["port"] == 9000


def test_cache_reused_and_rebuilt(tmp_path):
    root = build_store(tmp_path / "s", n=1200, shard_tokens=400, held_drop=False)
    store = TraceStore.open(root)
    a = build_cache(store, threads=1)
    assert a.rebuilt and a.path == root / "cache" / "explore" / "rows.parquet"
    assert not build_cache(store, threads=1).rebuilt
    assert build_cache(store, holdout=0.3, threads=1).rebuilt  # another split
    shard = store.shards[0]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the shards changed
    assert build_cache(TraceStore.open(root), holdout=0.3, threads=1).rebuilt
    assert TraceStore.open(root).num_tokens == 1200  # the cache folder does not upset the store


def test_unwritable_cache_dir_says_what_to_do(tmp_path):
    root = build_store(tmp_path / "s", n=600, shard_tokens=300, held_drop=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a cache folder below a file cannot be created (even by root)
    with pytest.raises(TraceError, match="--cache"):
        build_cache(TraceStore.open(root), blocker / "c", threads=1)
