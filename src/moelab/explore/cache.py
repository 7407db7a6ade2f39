"""Per-token cache of a trace store for `moelab explore`: one Parquet file sorted by token id.

Every view of the explorer starts from "the occurrences of token T" (with optional previous /
next token and domain filters). Scanning the shards for that is a full read per request, so
the explorer writes once, beside the store, a Parquet file holding the id columns needed by
the views, sorted by token id, then held-out flag, document and position (row groups then
cover narrow token-id ranges and DuckDB skips all others from the row-group statistics; a
frequent token's held-out rows, the predictor's scored rows, fill row groups of their own, and
within them the rows of one previous token lie together, so a previous-token filter skips
most of a frequent token's row groups too):

  token_id, prev_id, next_id (-1 at a document boundary or gap), doc_id, position, domain,
  heldout (the document's split for predictor scores), e{l}_{j} (expert ids as on disk),
  t{l} (top-1 expert of layer l: the slot with the highest combine weight)

BOS rows are left out (as the analyses do); they still serve as the previous token of the
first real token.

Beside it, the predictor view's fitted tables (everything of the predictor that does not
depend on a request's filters), computed once from the train (not held-out) rows:

  fit_prior.parquet  token_id, n (train occurrences), q{l}_{j}: the token's k most frequent
                     experts per layer (count desc, then id asc), rank order
  fit_pairs.parquet  token_id, prev_id, n (train occurrences after prev_id), p{l}_{j}: the k
                     most frequent experts per layer after that previous token (count desc,
                     then the token's count desc, then id asc), sorted by (token_id, prev_id)
  pred_tally.parquet the predictor's hit tallies of the held-out rows, per (token_id, domain,
                     n_pair = train occurrences of the row's (token, previous token) pair):
                     rows, and per layer ok{l} (rows with a routed slot), sp{l}_{v} / sc{l}_{v}
                     (v = 1..k: summed hits of the token prior / of the pair's top-k, or of the
                     prior when the pair has no train row, over rows with v routed slots);
                     a request without previous / next filter sums them (a lookup)

Beside those, two per-token tables of the views without filters:

  heat.parquet       token_id, layer, expert, n (> 0): the heatmap counts
  paths.parquet      token_id, rank, n, n_paths, n_all, t{l}: the token's MAX_PATHS most
                     frequent top-1 paths (count desc, then t0, t1, ... asc), n_paths distinct
                     paths and n_all occurrences of the token

The files are rebuilt when the store changes (meta.json's bytes; each shard's name, size,
mtime and Parquet footer), when the held-out fraction or seed changes, or when this module's
CACHE_VERSION changes. The cache goes to STORE/cache/explore; when the store cannot be
written (a read-only store), to a per-store folder of the user's cache
($XDG_CACHE_HOME or ~/.cache)/moelab/explore/<hash of the store's path>.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moelab._io import atomic_write_json, atomic_write_with
from moelab.analysis._common import doc_split
from moelab.errors import TraceError
from moelab.trace.schema import TraceMeta
from moelab.trace.store import TraceStore, id_dtype

CACHE_VERSION = 3
ROWS_FILE = "rows.parquet"
PRIOR_FILE = "fit_prior.parquet"
PAIRS_FILE = "fit_pairs.parquet"
HEAT_FILE = "heat.parquet"
PATHS_FILE = "paths.parquet"
TALLY_FILE = "pred_tally.parquet"
TABLE_FILES = (PRIOR_FILE, PAIRS_FILE, HEAT_FILE, PATHS_FILE, TALLY_FILE)
MAX_PATHS = 100  # paths kept per token (the trajectories view asks for at most this many)
KEY_FILE = "key.json"
ROW_GROUP = 65_536
FIT_ROW_GROUP = 8_192  # a token's rows of the fit / heat tables span few rows: small groups
FOOTER_MAX = 1 << 24  # bytes of a shard's Parquet footer hashed into the key (at most)


@dataclass(frozen=True)
class CacheInfo:
    """Where the cache lives and what it was built from."""

    path: Path  # the Parquet file of the rows
    key: dict[str, Any]
    rebuilt: bool  # True when this call wrote it

    @property
    def prior_path(self) -> Path:
        """The predictor's per-token prior table."""
        return self.path.parent / PRIOR_FILE

    @property
    def pairs_path(self) -> Path:
        """The predictor's per-(token, previous token) table."""
        return self.path.parent / PAIRS_FILE

    @property
    def heat_path(self) -> Path:
        """The per-token expert counts (heatmap without filters)."""
        return self.path.parent / HEAT_FILE

    @property
    def paths_path(self) -> Path:
        """The per-token most frequent top-1 paths (trajectories without filters)."""
        return self.path.parent / PATHS_FILE

    @property
    def tally_path(self) -> Path:
        """The predictor's held-out hit tallies per (token, domain, pair count)."""
        return self.path.parent / TALLY_FILE


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


def pred_columns(meta: TraceMeta, prefix: str) -> list[str]:
    """Names of the fitted top-k columns {prefix}{l}_{j} (q: token prior, p: after a previous)."""
    return [f"{prefix}{li}_{j}" for li in range(meta.num_layers) for j in range(meta.top_k)]


def tally_columns(meta: TraceMeta) -> tuple[list[str], list[str], list[str]]:
    """Names of pred_tally's per-layer columns: ok{l}, sp{l}_{v}, sc{l}_{v} (v = 1..k)."""
    num_l, k = meta.num_layers, meta.top_k
    ok = [f"ok{li}" for li in range(num_l)]
    sp = [f"sp{li}_{v}" for li in range(num_l) for v in range(1, k + 1)]
    sc = [f"sc{li}_{v}" for li in range(num_l) for v in range(1, k + 1)]
    return ok, sp, sc


def _footer_digest(path: Path) -> str:
    """sha256 of a Parquet file's footer (schema, row groups, column statistics, offsets)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size < 12:
            return ""
        f.seek(size - 8)
        tail = f.read(8)
        n = min(int.from_bytes(tail[:4], "little"), size - 8, FOOTER_MAX)
        f.seek(size - 8 - n)
        return hashlib.sha256(f.read(n) + tail).hexdigest()


def _cache_key(store: TraceStore, holdout: float, seed: int) -> dict[str, Any]:
    shards = []
    for s in store.shards:
        st = s.stat()
        shards.append([s.name, int(st.st_size), int(st.st_mtime_ns), _footer_digest(s)])
    meta = hashlib.sha256((Path(store.path) / "meta.json").read_bytes()).hexdigest()
    return {
        "version": CACHE_VERSION,
        "holdout": float(holdout),
        "seed": int(seed),
        "meta": meta,
        "shards": shards,
    }


def default_cache_dir(store_path: Path) -> Path:
    """STORE/cache/explore: the cache folder beside the shards."""
    return Path(store_path) / "cache" / "explore"


def user_cache_dir(store_path: Path) -> Path:
    """The cache folder of a store that cannot be written: per store path, in the user's cache."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    tag = hashlib.sha256(str(Path(store_path).resolve()).encode()).hexdigest()[:16]
    return Path(root) / "moelab" / "explore" / f"{Path(store_path).resolve().name}-{tag}"


def _valid(cache_dir: Path, key: dict[str, Any]) -> bool:
    """True when `cache_dir` holds a complete cache built under `key`."""
    key_file = cache_dir / KEY_FILE
    if not all((cache_dir / f).is_file() for f in (ROWS_FILE, *TABLE_FILES, KEY_FILE)):
        return False
    try:
        return json.loads(key_file.read_text()) == key
    except (OSError, ValueError):
        return False


def _writable(cache_dir: Path) -> OSError | None:
    """None when files can be created in `cache_dir` (made if needed), else the error."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = cache_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        return exc
    return None


def build_cache(
    store: TraceStore,
    cache_dir: Path | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    threads: int | None = None,
    memory_limit: str | None = "2GB",
) -> CacheInfo:
    """Write (or reuse) the per-token cache of `store`; returns where it is and its key.

    Without `cache_dir`: STORE/cache/explore, or user_cache_dir(STORE) when the store cannot
    be written; a given `cache_dir` must be writable (unless it holds a valid cache already).
    """
    if not 0.0 < holdout < 1.0:
        raise TraceError(f"explore: holdout={holdout}; expected a fraction in (0, 1)")
    if not store.shards:
        raise TraceError(f"{store.path}: the trace has no shards; nothing to explore")
    key = _cache_key(store, holdout, seed)
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        if _valid(cache_dir, key):
            return CacheInfo(cache_dir / ROWS_FILE, key, rebuilt=False)
        err = _writable(cache_dir)
    else:
        cache_dir = default_cache_dir(store.path)
        for cand in (cache_dir, user_cache_dir(store.path)):
            if _valid(cand, key):
                return CacheInfo(cand / ROWS_FILE, key, rebuilt=False)
        err = _writable(cache_dir)
        if err is not None:  # a read-only store: the user's cache
            cache_dir = user_cache_dir(store.path)
            err = _writable(cache_dir)
    if err is not None:
        raise TraceError(
            f"{cache_dir}: cannot write the explorer's cache there ({err.strerror}); pass"
            " --cache DIR with a writable folder"
        ) from None
    rows, key_file = cache_dir / ROWS_FILE, cache_dir / KEY_FILE
    key_file.unlink(missing_ok=True)  # the files below are replaced one by one
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
            ORDER BY b.token_id, h.heldout, prev_id, b.doc_id, b.position
        """

        def write(tmp: Path) -> None:
            con.execute(
                f"COPY ({query}) TO {_sql_str(str(tmp))}"
                f" (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {ROW_GROUP})"
            )

        atomic_write_with(rows, write)
    finally:
        con.close()
    build_token_tables(rows, meta, cache_dir)
    atomic_write_json(key_file, key)
    try:
        os.rmdir(cache_dir / "duckdb-tmp")
    except OSError:
        pass
    return CacheInfo(rows, key, rebuilt=True)


def _fit_chunk(
    tok: np.ndarray, prev: np.ndarray, ids: np.ndarray, meta: TraceMeta
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Fitted tables of train rows holding every row of their tokens: (prior, pairs) columns.

    ids [n, L*k] as on disk (dropped slot = the dtype's max, not counted). Expert counts per
    (token, previous token, layer) by one bincount; the token prior is their sum per token;
    top-k sets by a stable argsort (ties -> lower id), the pair counts ranked first and the
    token's counts breaking their ties (count * (max prior + 1) + prior, exact in int64).
    """
    num_l, num_e, k = meta.num_layers, meta.num_experts, meta.top_k
    eb = num_e + 1  # one extra bucket for dropped slots
    key = (tok.astype(np.int64) << 32) | (prev.astype(np.int64) + 1)
    uniq, inv = np.unique(key, return_inverse=True)
    npairs = uniq.size
    base = inv.astype(np.int64) * (num_l * eb)
    codes = np.empty((num_l * k, tok.size), np.int64)
    for s in range(num_l * k):
        codes[s] = base + (s // k) * eb + np.minimum(ids[:, s], num_e)
    counts = np.bincount(codes.ravel(), minlength=npairs * num_l * eb)
    del codes
    counts = counts.reshape(npairs, num_l, eb)[:, :, :num_e]
    pair_tok = (uniq >> 32).astype(np.int32)
    pair_prev = ((uniq & 0xFFFFFFFF) - 1).astype(np.int32)
    n_pair = np.bincount(inv, minlength=npairs).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, pair_tok[1:] != pair_tok[:-1]])
    prior = np.add.reduceat(counts, starts, axis=0)  # [tokens, L, E]
    n_tok = np.add.reduceat(n_pair, starts)
    owner = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, npairs]))
    big = int(prior.max(initial=0)) + 1
    prior_top = np.argsort(-prior, axis=-1, kind="stable")[..., :k]
    pair_top = np.argsort(-(counts * big + prior[owner]), axis=-1, kind="stable")[..., :k]
    dt = id_dtype(num_e)
    prior_cols = {"token_id": pair_tok[starts], "n": n_tok}
    pair_cols = {"token_id": pair_tok, "prev_id": pair_prev, "n": n_pair}
    for li in range(num_l):
        for j in range(k):
            prior_cols[f"q{li}_{j}"] = prior_top[:, li, j].astype(dt)
            pair_cols[f"p{li}_{j}"] = pair_top[:, li, j].astype(dt)
    return prior_cols, pair_cols


def _heat_chunk(tok: np.ndarray, ids: np.ndarray, meta: TraceMeta) -> dict[str, np.ndarray]:
    """Heatmap cells (token, layer, expert, count > 0) of rows holding every row of their
    tokens; ids [n, L*k] as on disk (dropped slots not counted)."""
    num_l, num_e, k = meta.num_layers, meta.num_experts, meta.top_k
    eb = num_e + 1
    uniq, inv = np.unique(tok, return_inverse=True)
    base = inv.astype(np.int64) * (num_l * eb)
    codes = np.empty((num_l * k, tok.size), np.int64)
    for s in range(num_l * k):
        codes[s] = base + (s // k) * eb + np.minimum(ids[:, s], num_e)
    counts = np.bincount(codes.ravel(), minlength=uniq.size * num_l * eb)
    del codes
    counts = counts.reshape(uniq.size, num_l, eb)[:, :, :num_e]
    t, li, e = np.nonzero(counts)
    return {
        "token_id": uniq[t].astype(np.int32),
        "layer": li.astype(np.int32),
        "expert": e.astype(id_dtype(num_e)),
        "n": counts[t, li, e],
    }


def _hits(ids: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """[n, L] hits: routed slots whose expert is one of the k predicted ([n, L*k] each; the
    predicted experts are distinct and < E, never the dropped-slot value)."""
    n, lk = ids.shape
    out = np.zeros((n, lk // k), np.int64)
    for j in range(k):
        for i in range(k):
            out += ids[:, j::k] == pred[:, i::k]
    return out


def tally_chunk(
    tok: np.ndarray,
    dom: np.ndarray,
    prev: np.ndarray,
    ids: np.ndarray,
    prior: dict[str, np.ndarray],
    pairs: dict[str, np.ndarray],
    meta: TraceMeta,
) -> dict[str, np.ndarray]:
    """pred_tally rows (see the module doc) of held-out rows whose tokens' train rows made
    `prior` / `pairs` (rows of tokens without a train row are left out: nothing to score)."""
    num_l, k = meta.num_layers, meta.top_k
    sentinel = int(np.iinfo(id_dtype(meta.num_experts)).max)
    ptok = prior["token_id"]
    at = np.minimum(np.searchsorted(ptok, tok), max(ptok.size - 1, 0))
    keep = (ptok[at] == tok) if ptok.size else np.zeros(tok.size, bool)
    tok, dom, prev, ids, at = tok[keep], dom[keep], prev[keep], ids[keep], at[keep]
    qcols, pcols = pred_columns(meta, "q"), pred_columns(meta, "p")
    q = np.stack([prior[c] for c in qcols], axis=1)[at]  # [n, L*k] the token's prior
    pkey = (pairs["token_id"].astype(np.int64) << 32) | (pairs["prev_id"].astype(np.int64) + 1)
    rkey = (tok.astype(np.int64) << 32) | (prev.astype(np.int64) + 1)
    pos = np.minimum(np.searchsorted(pkey, rkey), max(pkey.size - 1, 0))
    seen = (pkey[pos] == rkey) if pkey.size else np.zeros(tok.size, bool)
    n_pair = np.where(seen, pairs["n"][pos] if pkey.size else 0, 0).astype(np.int64)
    p = np.stack([pairs[c] for c in pcols], axis=1)[pos] if pkey.size else q.copy()
    p[~seen] = q[~seen]  # an unseen pair: the prior (any min_fit >= 1 backs off to it)
    routed = np.zeros((tok.size, num_l), np.int64)
    for j in range(k):
        routed += ids[:, j::k] != sentinel
    hp, hc = _hits(ids, q, k), _hits(ids, p, k)
    key = np.stack([tok.astype(np.int64), dom.astype(np.int64), n_pair], axis=1)
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.reshape(-1).astype(np.int64)
    g = uniq.shape[0]
    b = (k + 1) ** 2
    base = (inv * (num_l * b))[:, None] + (np.arange(num_l, dtype=np.int64) * b)[None, :]
    h = np.arange(k + 1)
    out: dict[str, np.ndarray] = {
        "token_id": uniq[:, 0].astype(np.int32),
        "domain": uniq[:, 1].astype(np.int32),
        "n_pair": uniq[:, 2],
        "rows": np.bincount(inv, minlength=g).astype(np.int64),
    }
    ok_c, sp_c, sc_c = tally_columns(meta)
    for hits, names in ((hp, sp_c), (hc, sc_c)):
        code = base + routed * (k + 1) + hits
        cnt = np.bincount(code.ravel(), minlength=g * num_l * b).reshape(g, num_l, k + 1, k + 1)
        if names is sp_c:
            ok = cnt[:, :, 1:].sum((2, 3))
            for li in range(num_l):
                out[ok_c[li]] = ok[:, li]
        sums = (cnt * h).sum(-1)  # [g, L, routed]: summed hits per number of routed slots
        for li in range(num_l):
            for v in range(1, k + 1):
                out[names[li * k + v - 1]] = sums[:, li, v]
    return out


def _paths_chunk(tok: np.ndarray, top1: np.ndarray) -> dict[str, np.ndarray]:
    """paths rows (see the module doc) of rows holding every row of their tokens; top1 [n, L]
    the cached t{l} values (the dropped-slot value kept as on disk)."""
    num_l = top1.shape[1]
    keys = np.concatenate([tok.astype(np.int64)[:, None], top1.astype(np.int64)], axis=1)
    uniq, cnt = np.unique(keys, axis=0, return_counts=True)
    # token asc, count desc, then t0, t1, ... asc (the trajectories view's ORDER BY)
    order = np.lexsort((*(uniq[:, c] for c in range(num_l, 0, -1)), -cnt, uniq[:, 0]))
    uniq, cnt = uniq[order], cnt[order].astype(np.int64)
    t = uniq[:, 0]
    starts = np.flatnonzero(np.r_[True, t[1:] != t[:-1]])
    sizes = np.diff(np.r_[starts, t.size])
    rank = np.arange(t.size) - np.repeat(starts, sizes)
    n_all = np.repeat(np.add.reduceat(cnt, starts), sizes)
    n_paths = np.repeat(sizes, sizes).astype(np.int64)
    keep = rank < MAX_PATHS
    out = {
        "token_id": t[keep].astype(np.int32),
        "rank": rank[keep].astype(np.int32),
        "n": cnt[keep],
        "n_paths": n_paths[keep],
        "n_all": n_all[keep],
    }
    for li in range(num_l):
        out[f"t{li}"] = uniq[keep, li + 1].astype(top1.dtype)
    return out


def build_token_tables(
    rows: Path, meta: TraceMeta, out_dir: Path, chunk_rows: int = ROW_GROUP
) -> None:
    """Write the per-token tables (the predictor's fit on the train rows and its hit tallies
    on the held-out rows, the heatmap and top paths of all rows; see the module doc) from the
    rows cache into `out_dir`.

    Streams rows.parquet (sorted by token id) in chunks of about `chunk_rows` rows that never
    split a token, so memory stays bounded by the largest token.
    """
    ecols, tcols = expert_columns(meta), top1_columns(meta)
    pf = pq.ParquetFile(rows)
    names = {"prior": PRIOR_FILE, "pairs": PAIRS_FILE, "heat": HEAT_FILE}
    names.update(paths=PATHS_FILE, tally=TALLY_FILE)
    out: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in names}

    def flush(pieces: list[pa.Table]) -> None:
        t = pa.concat_tables(pieces)
        ids = np.stack([t.column(c).to_numpy() for c in ecols], axis=1)
        tok = t.column("token_id").to_numpy()
        out["heat"].append(_heat_chunk(tok, ids, meta))
        top1 = np.stack([t.column(c).to_numpy() for c in tcols], axis=1)
        out["paths"].append(_paths_chunk(tok, top1))
        held = t.column("heldout").to_numpy(zero_copy_only=False)
        train = ~held
        if not train.any():
            return
        prev = t.column("prev_id").to_numpy()
        prior, pairs = _fit_chunk(tok[train], prev[train], ids[train], meta)
        out["prior"].append(prior)
        out["pairs"].append(pairs)
        if held.any():
            dom = t.column("domain").to_numpy()
            out["tally"].append(
                tally_chunk(tok[held], dom[held], prev[held], ids[held], prior, pairs, meta)
            )

    pending: list[pa.Table] = []
    n_pending = 0
    for batch in pf.iter_batches(
        batch_size=chunk_rows,
        columns=["token_id", "prev_id", "domain", "heldout", *ecols, *tcols],
    ):
        t = pa.Table.from_batches([batch])
        pending.append(t)
        n_pending += t.num_rows
        if n_pending < chunk_rows:
            continue
        last = pending[-1].column("token_id")[-1].as_py()
        if pending[0].column("token_id")[0].as_py() == last:
            continue  # one token so far: keep reading
        whole = pa.concat_tables(pending)
        cut = int(np.searchsorted(whole.column("token_id").to_numpy(), last, side="left"))
        flush([whole.slice(0, cut)])
        pending, n_pending = [whole.slice(cut)], whole.num_rows - cut
    if n_pending:
        flush(pending)
    for name, file in names.items():
        path = Path(out_dir) / file
        parts = [p for p in out[name] if p["token_id"].size]
        if parts:
            table = pa.table({c: np.concatenate([p[c] for p in parts]) for c in parts[0]})
        else:  # no (train / held-out) row at all
            table = _empty_table(meta, name)
        atomic_write_with(
            path,
            lambda tmp, t=table: pq.write_table(
                t, tmp, compression="zstd", row_group_size=FIT_ROW_GROUP
            ),
        )


def _empty_table(meta: TraceMeta, name: str) -> pa.Table:
    """An empty per-token table with the right columns."""
    dt = pa.from_numpy_dtype(id_dtype(meta.num_experts))
    i32, i64 = pa.int32(), pa.int64()
    if name == "heat":
        return pa.schema(
            [("token_id", i32), ("layer", i32), ("expert", dt), ("n", i64)]
        ).empty_table()
    if name == "paths":
        fields = [("token_id", i32), ("rank", i32), ("n", i64), ("n_paths", i64), ("n_all", i64)]
        return pa.schema(fields + [(c, dt) for c in top1_columns(meta)]).empty_table()
    if name == "tally":
        ok, sp, sc = tally_columns(meta)
        fields = [("token_id", i32), ("domain", i32), ("n_pair", i64), ("rows", i64)]
        return pa.schema(fields + [(c, i64) for c in ok + sp + sc]).empty_table()
    fields = [("token_id", i32)]
    if name == "pairs":
        fields.append(("prev_id", i32))
    fields.append(("n", i64))
    fields += [(c, dt) for c in pred_columns(meta, "p" if name == "pairs" else "q")]
    return pa.schema(fields).empty_table()


def _sql_str(text: str) -> str:
    """A SQL string literal of a file path we chose (quotes doubled); never user query text."""
    return "'" + text.replace("'", "''") + "'"


def _safe_size(text: str) -> str:
    """A DuckDB memory size like '2GB' (digits + unit only)."""
    import re

    if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", text.strip()):
        raise TraceError(f"explore: memory limit {text!r}; expected a size like 2GB or 512MB")
    return text.strip()
