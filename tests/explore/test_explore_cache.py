"""The explorer's cache: the predictor's fitted tables against DuckDB / numpy computed
independently from the shards, chunking that never changes them, a store that cannot be
written, and a key that follows the store's content."""

from __future__ import annotations

import collections
import json
import os

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from explore_testutil import build_store

from moelab.analysis._common import doc_split
from moelab.explore import queries as Q
from moelab.explore.cache import (
    _cache_key,
    build_cache,
    build_token_tables,
    pred_columns,
    user_cache_dir,
)
from moelab.trace.store import TraceStore


def _train_pairs_duckdb(store) -> dict[tuple[int, int], int]:
    """(token, previous token) -> train occurrences, by DuckDB over the shards (no cache)."""
    con = duckdb.connect()
    glob = str(store / "shards" / "*.parquet")
    docs = np.array(
        [
            r[0]
            for r in con.execute(
                "SELECT DISTINCT doc_id FROM read_parquet(?) ORDER BY doc_id", [glob]
            ).fetchall()
        ]
    )
    held = docs[doc_split(docs, 0.2, 0)].tolist()
    rows = con.execute(
        "WITH s AS (SELECT doc_id, token_id, is_bos, CASE WHEN lag(position) OVER w ="
        " position - 1 THEN lag(token_id) OVER w ELSE -1 END AS prev FROM read_parquet(?)"
        " WINDOW w AS (PARTITION BY doc_id ORDER BY position))"
        " SELECT token_id, prev, count(*) FROM s WHERE NOT is_bos AND NOT list_contains(?, doc_id)"
        " GROUP BY ALL",
        [glob, held],
    ).fetchall()
    return {(int(t), int(p)): int(n) for t, p, n in rows}


def test_fit_tables_match_duckdb_and_numpy(explorer, store, ref):
    pairs = pq.read_table(explorer.cache_path.parent / "fit_pairs.parquet").to_pydict()
    prior = pq.read_table(explorer.cache_path.parent / "fit_prior.parquet").to_pydict()
    want = _train_pairs_duckdb(store)
    got = {
        (t, p): n for t, p, n in zip(pairs["token_id"], pairs["prev_id"], pairs["n"], strict=True)
    }
    assert got == want and len(want) > 50
    keys = list(zip(pairs["token_id"], pairs["prev_id"], strict=True))
    assert keys == sorted(keys)  # sorted by (token, previous) for the row-group skipping
    by_tok = collections.Counter()
    for (t, _), n in want.items():
        by_tok[t] += n
    assert dict(zip(prior["token_id"], prior["n"], strict=True)) == dict(by_tok)
    # top-k sets: count desc, then the token's count desc, then id asc (numpy reference)
    t = ref.trace
    docs = np.unique(t.doc_id)
    train = ref.keep & ~np.isin(t.doc_id, docs[doc_split(docs, 0.2, 0)])
    meta = explorer.meta
    qcols, pcols = pred_columns(meta, "q"), pred_columns(meta, "p")
    for row in range(len(prior["token_id"])):
        tok = prior["token_id"][row]
        m = train & (t.token_id == tok)
        for layer in range(meta.num_layers):
            pc = collections.Counter(int(e) for e in t.expert_ids[m, layer].ravel() if e >= 0)
            top = sorted(range(meta.num_experts), key=lambda e: (-pc[e], e))[: meta.top_k]
            got_q = [prior[c][row] for c in qcols[layer * meta.top_k : (layer + 1) * meta.top_k]]
            assert got_q == top
            for prow in np.flatnonzero(np.array(pairs["token_id"]) == tok):
                mp = m & (ref.prev == pairs["prev_id"][prow])
                cc = collections.Counter(int(e) for e in t.expert_ids[mp, layer].ravel() if e >= 0)
                top = sorted(range(meta.num_experts), key=lambda e: (-cc[e], -pc[e], e))
                cols = pcols[layer * meta.top_k : (layer + 1) * meta.top_k]
                assert [pairs[c][prow] for c in cols] == top[: meta.top_k]


def test_heat_table_matches_duckdb(explorer, store):
    """Per-token expert counts of heat.parquet = DuckDB histograms over the shards."""
    meta = explorer.meta
    con = duckdb.connect()
    glob = str(store / "shards" / "*.parquet")
    cols = [f"e{li}_{j}" for li in range(meta.num_layers) for j in range(meta.top_k)]
    rows = con.execute(
        f"SELECT token_id, {', '.join(f'histogram({c})' for c in cols)} FROM read_parquet(?)"
        " WHERE NOT is_bos GROUP BY token_id",
        [glob],
    ).fetchall()
    want = collections.Counter()
    for tok, *hists in rows:
        for s, h in enumerate(hists):
            for e, c in h.items():
                if e < meta.num_experts:  # not a dropped slot
                    want[(tok, s // meta.top_k, e)] += c
    heat = pq.read_table(explorer.cache_path.parent / "heat.parquet").to_pydict()
    got = {
        (t, li, e): n
        for t, li, e, n in zip(
            heat["token_id"], heat["layer"], heat["expert"], heat["n"], strict=True
        )
    }
    assert got == dict(want) and len(got) > 100
    assert heat["token_id"] == sorted(heat["token_id"])


def test_paths_table_matches_a_group_by(explorer):
    """paths.parquet = per token a DuckDB GROUP BY of the cached top-1 columns, count desc then
    t0, t1, ... asc, the first 100, with the distinct-path and occurrence counts."""
    meta = explorer.meta
    tcols = ", ".join(f"t{li}" for li in range(meta.num_layers))
    con = duckdb.connect()
    rows = str(explorer.cache_path)
    want = con.execute(
        f"WITH g AS (SELECT token_id, {tcols}, count(*) AS n FROM read_parquet(?) GROUP BY ALL),"
        " r AS (SELECT *, row_number() OVER (PARTITION BY token_id ORDER BY n DESC,"
        f" {tcols}) - 1 AS rank, count(*) OVER (PARTITION BY token_id) AS n_paths,"
        " sum(n) OVER (PARTITION BY token_id) AS n_all FROM g)"
        f" SELECT token_id, rank, n, n_paths, n_all, {tcols} FROM r WHERE rank < 100"
        " ORDER BY token_id, rank",
        [rows],
    ).fetchall()
    got = con.execute(
        f"SELECT token_id, rank, n, n_paths, n_all, {tcols} FROM read_parquet(?)",
        [str(explorer.cache_path.parent / "paths.parquet")],
    ).fetchall()
    assert got == want and len(got) > 100
    assert max(r[3] for r in want) > 100  # some token has more paths than are kept


@pytest.mark.parametrize("chunk", [1, 7, 100, 1000])
def test_token_tables_do_not_depend_on_chunking(explorer, tmp_path, chunk):
    """Chunks never split a token, so any chunk size gives the same tables."""
    d = explorer.cache_path.parent
    build_token_tables(explorer.cache_path, explorer.meta, tmp_path, chunk)
    names = ["fit_prior.parquet", "fit_pairs.parquet", "heat.parquet"]
    for name in [*names, "paths.parquet", "pred_tally.parquet"]:
        assert pq.read_table(tmp_path / name).equals(pq.read_table(d / name)), name


def test_predictor_without_held_out_match_says_so(client, ref):
    """A filter whose occurrences all lie in train documents: nothing to score, a note."""
    t = ref.trace
    docs = np.unique(t.doc_id)
    held = np.isin(t.doc_id, docs[doc_split(docs, 0.2, 0)])
    for tok in range(1, 50):
        for prev in range(50):
            m = ref.mask(tok, prev=prev)
            if m.sum() >= 2 and not (m & held).any():
                r = client.get("/api/predictor", params={"token": tok, "prev": prev})
                assert r.status_code == 200, r.text
                d = r.json()
                assert d["n"] == int(m.sum()) and d["n_scored"] == 0
                assert d["prior"] is None and "nothing to score" in d["note"]
                return
    pytest.fail("no (token, previous) pair with train occurrences only in the test store")


def _listing(root):
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    )


def test_store_that_cannot_be_written_uses_the_user_cache(tmp_path, monkeypatch):
    root = build_store(tmp_path / "s", n=900, shard_tokens=300, held_drop=False)
    (root / "cache").write_text("")  # STORE/cache/explore cannot be created (even by root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = _listing(root)
    ex = Q.open_explorer(root, threads=1)
    assert ex.cache_path.parent == user_cache_dir(root)
    assert str(ex.cache_path).startswith(str(tmp_path / "xdg" / "moelab" / "explore"))
    assert _listing(root) == before  # nothing written in the store
    tr = TraceStore.open(root).load()
    assert Q.count(ex, Q.Filters(1)) == int(np.sum((tr.token_id == 1) & ~tr.is_bos)) > 0
    assert Q.predictor(ex, Q.Filters(1))["n_scored"] > 0
    assert not build_cache(TraceStore.open(root), threads=1).rebuilt  # found there again
    assert _listing(root) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_store(tmp_path, monkeypatch):
    root = build_store(tmp_path / "s", n=900, shard_tokens=300, held_drop=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    paths = [root, *root.rglob("*")]
    for p in paths:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        ex = Q.open_explorer(root, threads=1)
        assert ex.cache_path.parent == user_cache_dir(root)
        assert Q.heatmap(ex, Q.Filters(1))["n"] > 0
    finally:
        for p in paths:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_cache_key_follows_the_store_content(tmp_path):
    root = build_store(tmp_path / "s", n=900, shard_tokens=300, held_drop=False)
    store = TraceStore.open(root)
    key = _cache_key(store, 0.2, 0)
    assert build_cache(store, threads=1).rebuilt
    assert not build_cache(store, threads=1).rebuilt
    # a shard rewritten in place with the same size and mtime: its footer differs
    shard = store.shards[1]
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    at = data.rfind(b"parquet-cpp")  # the footer's created_by text
    assert at > 0
    data[at] ^= 0x20
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size
    assert _cache_key(store, 0.2, 0) != key
    data[at] ^= 0x20
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _cache_key(store, 0.2, 0) == key
    # meta.json edited (same shards): rebuilt
    meta = json.loads((root / "meta.json").read_text())
    meta["split"] = "other"
    (root / "meta.json").write_text(json.dumps(meta))
    info = build_cache(TraceStore.open(root), threads=1)
    assert info.rebuilt and info.key["meta"] != key["meta"]
    assert json.loads((info.path.parent / "key.json").read_text()) == info.key
