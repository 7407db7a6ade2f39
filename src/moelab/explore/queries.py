"""DuckDB queries behind `moelab explore`: per-token routing views over a trace store.

Each view is a plain function (an Explorer or a store path + filters in, small numpy arrays /
dicts out) over the per-token cache (moelab.explore.cache). User input reaches SQL only as
bound parameters (`?`); column names come only from the whitelist derived from meta.json
(layer and slot indices are checked ints). Views:

- heatmap: per layer, how many occurrences routed to each expert (any of the k slots), share
  of occurrences against chance k/E;
- trajectories: the most frequent top-1 paths across all layers (Sankey);
- co-occurrence between two layers (all k x k slot pairs) with row / column / joint
  normalisation and lift P(i,j) / (P(i) P(j)), cells below a minimum count masked (a rare pair
  with P(j|i) near 1 is not a useful path);
- predictor: recall@k of a token-id prior and of a previous-token-conditioned table (n-gram
  n=2 with backoff to the prior, as moelab.predict.ngram; Jiang et al. 2024, "Mixtral of
  Experts", Sec. 5, for the token-id table), fitted on the training documents of a seeded
  document split and scored on its held-out documents;
- contexts: a few occurrences with their surrounding tokens.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from moelab.errors import AnalysisError
from moelab.explore.cache import (
    MAX_PATHS,
    build_cache,
    expert_columns,
    pred_columns,
    tally_chunk,
    tally_columns,
    top1_columns,
)
from moelab.explore.tokens import Vocab, load_vocab
from moelab.trace.schema import TraceMeta
from moelab.trace.store import TraceStore, id_dtype

NORMS = ("row", "column", "joint")
MAX_TOP = MAX_PATHS  # trajectories without filters read the cache's top MAX_PATHS per token
MAX_CONTEXTS = 50
MAX_WIDTH = 64


class ExploreInputError(AnalysisError):
    """A request the explorer cannot answer as asked (bad layer, unknown domain, ...): HTTP 400."""

    status = 400


class NotFoundError(ExploreInputError):
    """The token (with these filters) does not occur, or no token matches a text: HTTP 404."""

    status = 404


@dataclass(frozen=True)
class Filters:
    """Which occurrences a view looks at: token id, optional previous / next id and domain."""

    token: int
    prev: int | None = None
    next: int | None = None
    domain: str | None = None


@dataclass
class Explorer:
    """An opened trace store with its per-token cache, tokenizer and a DuckDB connection."""

    path: Path
    meta: TraceMeta
    cache_path: Path
    vocab: Vocab
    holdout: float
    seed: int
    num_rows: int  # non-BOS rows in the cache
    con: Any = None
    tables: dict[str, str] = field(default_factory=dict)  # view name -> read_parquet('file')
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def sentinel(self) -> int:
        """On-disk value of a dropped slot (255 or 65535)."""
        return int(np.iinfo(id_dtype(self.meta.num_experts)).max)

    @property
    def src(self) -> str:
        """The view over the cache (created at open; its name is fixed, not user text)."""
        return "tok"

    def table(self, name: str) -> str:
        """SQL of a cache file: read_parquet of its path (the views of the same names answer
        the same, but DuckDB re-reads a view's Parquet footer on every query: 40 ms for the
        rows of a 10M-token, 32-layer store)."""
        return self.tables.get(name, name)

    @property
    def rows(self) -> str:
        """SQL of the cached rows (one per non-BOS occurrence)."""
        return self.table("tok")

    def cursor(self) -> Any:
        """A DuckDB cursor of the shared connection (one per request thread)."""
        with self._lock:
            return self.con.cursor()

    def token_label(self, token_id: int) -> str:
        """Decoded text of an id (or <id>)."""
        return self.vocab.text(int(token_id))

    def split_note(self) -> dict[str, Any]:
        """How predictor scores split the trace (fit vs held-out), for every answer."""
        split = self.meta.split or "unnamed"
        pct = round(100 * self.holdout)
        return {
            "trace_split": split,
            "fit_on": f"train documents: {100 - pct}% of the trace's documents ({split!r} split)",
            "scored_on": (
                f"held-out documents: {pct}% of the trace's documents ({split!r} split), chosen"
                f" by a seeded document split (seed {self.seed}); the store holds one split only"
            ),
            "held_out": True,
            "seed": self.seed,
            "holdout": self.holdout,
        }


def open_explorer(
    path: str | Path,
    cache_dir: str | Path | None = None,
    tokenizer: str | Path | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    threads: int | None = None,
) -> Explorer:
    """Open a trace store for exploring: check it, build or reuse its cache, load its tokenizer."""
    import duckdb

    store = TraceStore.open(Path(path))
    info = build_cache(
        store, None if cache_dir is None else Path(cache_dir), holdout, seed, threads=threads
    )
    con = duckdb.connect()
    if threads:
        con.execute(f"SET threads={int(threads)}")
    con.execute("SET parquet_metadata_cache=true")  # the cache files do not change while open
    views = {"tok": info.path, "fitq": info.prior_path, "fitp": info.pairs_path}
    views.update(heat=info.heat_path, paths=info.paths_path, tally=info.tally_path)
    tables = {}
    for view, file in views.items():
        lit = "'" + str(file).replace("'", "''") + "'"
        tables[view] = f"read_parquet({lit})"
        con.execute(f"CREATE VIEW {view} AS SELECT * FROM {tables[view]}")
    n = int(con.execute(f"SELECT count(*) FROM {tables['tok']}").fetchone()[0])
    vocab = load_vocab(store.path, store.meta, None if tokenizer is None else Path(tokenizer))
    return Explorer(store.path, store.meta, info.path, vocab, holdout, seed, n, con, tables)


@lru_cache(maxsize=4)
def _open_cached(path: str) -> Explorer:
    return open_explorer(path)


def as_explorer(ex: Explorer | str | Path) -> Explorer:
    """An Explorer as given, or one opened (and kept) for a store path."""
    return ex if isinstance(ex, Explorer) else _open_cached(str(Path(ex).resolve()))


# ------------------------------------------------------------------------------- filters
def domain_code(ex: Explorer, domain: str | None) -> int | None:
    """Code of a domain name from meta.json (None = all); ExploreInputError if unknown."""
    if domain is None or domain == "":
        return None
    names = list(ex.meta.domains)
    if domain not in names:
        raise ExploreInputError(
            f"domain {domain!r} is not in this trace; expected one of {names or '(none recorded)'}"
        )
    return names.index(domain)


def _where(ex: Explorer, f: Filters) -> tuple[str, list[Any]]:
    """WHERE clause (fixed text with ? placeholders) and its parameters for the filters."""
    parts, params = ["token_id = ?"], [int(f.token)]
    if f.prev is not None:
        parts.append("prev_id = ?")
        params.append(int(f.prev))
    if f.next is not None:
        parts.append("next_id = ?")
        params.append(int(f.next))
    code = domain_code(ex, f.domain)
    if code is not None:
        parts.append("domain = ?")
        params.append(code)
    return " AND ".join(parts), params


def describe(ex: Explorer, f: Filters) -> str:
    """Human-readable filters, e.g. 'can' after 'I' in domain 'en'."""
    s = f"{ex.token_label(f.token)!r} (id {f.token})"
    if f.prev is not None:
        s += f" after {ex.token_label(f.prev)!r} (id {f.prev})"
    if f.next is not None:
        s += f" before {ex.token_label(f.next)!r} (id {f.next})"
    if f.domain:
        s += f" in domain {f.domain!r}"
    return s


def _layer(ex: Explorer, layer: int, name: str) -> int:
    if not 0 <= int(layer) < ex.meta.num_layers:
        raise ExploreInputError(
            f"{name}={layer}: expected a MoE layer in 0..{ex.meta.num_layers - 1}"
        )
    return int(layer)


def _ecol(ex: Explorer, layer: int, slot: int) -> str:
    """Quoted id column name, from the whitelist only."""
    name = f"e{int(layer)}_{int(slot)}"
    if name not in expert_columns(ex.meta):
        raise ExploreInputError(f"no column {name} in this trace")
    return f'"{name}"'


def _not_found(ex: Explorer, f: Filters) -> NotFoundError:
    if ex.vocab.size and not 0 <= f.token < ex.vocab.size:
        return NotFoundError(
            f"token id {f.token} is outside the tokenizer's vocabulary (0..{ex.vocab.size - 1})"
        )
    return NotFoundError(f"no occurrence of {describe(ex, f)} in this trace")


def count(ex: Explorer | str | Path, f: Filters) -> int:
    """Number of (non-BOS) occurrences matching the filters."""
    ex = as_explorer(ex)
    where, params = _where(ex, f)
    return int(
        ex.cursor().execute(f"SELECT count(*) FROM {ex.rows} WHERE {where}", params).fetchone()[0]
    )


def token_counts(ex: Explorer | str | Path, ids: list[int]) -> dict[int, int]:
    """Occurrences of each id (non-BOS rows)."""
    ex = as_explorer(ex)
    ids = [int(i) for i in ids]
    if not ids:
        return {}
    marks = ", ".join("?" for _ in ids)
    rows = (
        ex.cursor()
        .execute(
            f"SELECT token_id, count(*) FROM {ex.rows} WHERE token_id IN ({marks}) GROUP BY token_id",
            ids,
        )
        .fetchall()
    )
    got = {int(a): int(b) for a, b in rows}
    return {i: got.get(i, 0) for i in ids}


def top_tokens(ex: Explorer | str | Path, limit: int = 20) -> list[tuple[int, int]]:
    """The most frequent token ids as (id, count)."""
    ex = as_explorer(ex)
    return [
        (int(a), int(b))
        for a, b in ex.cursor()
        .execute(
            f"SELECT token_id, count(*) AS n FROM {ex.rows} GROUP BY token_id ORDER BY n DESC, token_id"
            " LIMIT ?",
            [int(limit)],
        )
        .fetchall()
    ]


# ------------------------------------------------------------------------------- views
def heatmap(ex: Explorer | str | Path, f: Filters) -> dict[str, Any]:
    """Per layer and expert: occurrences routed to it (any slot), share, chance k/E.

    Without previous / next / domain filters the counts come from the per-token table built
    with the cache (heat.parquet); with filters, from one read of the matching rows
    (bincount per slot column; dropped slots not counted)."""
    ex = as_explorer(ex)
    m = ex.meta
    num_l, num_e, k = m.num_layers, m.num_experts, m.top_k
    where, params = _where(ex, f)
    cur = ex.cursor()
    counts = np.zeros((num_l, num_e), np.int64)
    if len(params) == 1:  # the token only
        n = int(cur.execute(f"SELECT count(*) FROM {ex.rows} WHERE {where}", params).fetchone()[0])
        if n == 0:
            raise _not_found(ex, f)
        d = cur.execute(
            f"SELECT layer, expert, n FROM {ex.table('heat')} WHERE token_id = ?", [int(f.token)]
        ).fetchnumpy()
        counts[np.asarray(d["layer"], np.int64), np.asarray(d["expert"], np.int64)] = d["n"]
    else:
        cols = [_ecol(ex, li, j) for li in range(num_l) for j in range(k)]
        d = cur.execute(
            f"SELECT {', '.join(cols)} FROM {ex.rows} WHERE {where}", params
        ).fetchnumpy()
        n = int(np.asarray(d[cols[0].strip('"')]).size)
        if n == 0:
            raise _not_found(ex, f)
        for s, c in enumerate(cols):
            ids = np.asarray(d[c.strip('"')])
            counts[s // k] += np.bincount(ids[ids != ex.sentinel], minlength=num_e)[:num_e]
    share = counts / n
    chance = k / num_e
    return {"n": n, "counts": counts, "share": share, "chance": chance, "ratio": share / chance}


def trajectories(ex: Explorer | str | Path, f: Filters, top: int = 10) -> dict[str, Any]:
    """The `top` most frequent top-1 expert paths over all layers, with their counts (ties:
    paths in ascending order of t0, t1, ...).

    Without previous / next / domain filters they come from the per-token table built with the
    cache (paths.parquet, the MAX_PATHS most frequent per token); with filters, from one
    GROUP BY over the matching rows."""
    ex = as_explorer(ex)
    if not 1 <= int(top) <= MAX_TOP:
        raise ExploreInputError(f"top={top}: expected 1..{MAX_TOP}")
    where, params = _where(ex, f)
    tcols = ", ".join(f'"{c}"' for c in top1_columns(ex.meta))
    if len(params) == 1:  # the token only
        q = (
            f"SELECT {tcols}, n, n_paths, n_all FROM {ex.table('paths')}"
            " WHERE token_id = ? AND rank < ? ORDER BY rank"
        )
    else:
        q = (
            f"WITH g AS (SELECT {tcols}, count(*) AS n FROM {ex.rows} WHERE {where} GROUP BY ALL)"
            f" SELECT *, (SELECT count(*) FROM g) AS n_paths, (SELECT sum(n) FROM g) AS n_all"
            f" FROM g ORDER BY n DESC, {tcols} LIMIT ?"
        )
    rows = ex.cursor().execute(q, [*params, int(top)]).fetchall()
    if not rows:
        raise _not_found(ex, f)
    num_l = ex.meta.num_layers
    paths = np.array([r[:num_l] for r in rows], dtype=np.int64)
    paths = np.where(paths == ex.sentinel, -1, paths)
    cnt = np.array([r[num_l] for r in rows], dtype=np.int64)
    n = int(rows[0][num_l + 2])
    return {
        "n": n,
        "n_paths": int(rows[0][num_l + 1]),
        "paths": paths,
        "counts": cnt,
        "covered": float(cnt.sum() / n),
    }


def cooccurrence(
    ex: Explorer | str | Path,
    f: Filters,
    layer_a: int,
    layer_b: int,
    norm: str = "row",
    min_count: int = 1,
) -> dict[str, Any]:
    """[E, E] counts of (expert i at layer_a, expert j at layer_b) over all slot pairs of the
    occurrences (distinct slots when the layers are equal), normalised by row (P(j|i)),
    column (P(i|j)) or jointly (P(i,j)), and lift; cells with count < min_count are NaN."""
    ex = as_explorer(ex)
    la, lb = _layer(ex, layer_a, "layer_a (la)"), _layer(ex, layer_b, "layer_b (lb)")
    if norm not in NORMS:
        raise ExploreInputError(f"norm={norm!r}: expected one of {NORMS}")
    if int(min_count) < 1:
        raise ExploreInputError(f"min_count={min_count}: expected an integer >= 1")
    k, num_e = ex.meta.top_k, ex.meta.num_experts
    exprs = [
        f"{_ecol(ex, la, i)}::INTEGER * 65536 + {_ecol(ex, lb, j)}::INTEGER"
        for i in range(k)
        for j in range(k)
        if la != lb or i != j
    ]
    where, params = _where(ex, f)
    sel = ", ".join(f"histogram({x})" for x in exprs) if exprs else "NULL"
    row = (
        ex.cursor()
        .execute(f"SELECT count(*), {sel} FROM {ex.rows} WHERE {where}", params)
        .fetchone()
    )
    n = int(row[0])
    if n == 0:
        raise _not_found(ex, f)
    counts = np.zeros((num_e, num_e), np.int64)
    for h in row[1:]:
        for code, c in (h or {}).items():
            a, b = divmod(int(code), 65536)
            if a != ex.sentinel and b != ex.sentinel:
                counts[a, b] += int(c)
    total = counts.sum()
    rs, cs = counts.sum(1, keepdims=True), counts.sum(0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        joint = counts / total if total else np.zeros_like(counts, float)
        by = {"row": counts / rs, "column": counts / cs, "joint": joint}[norm]
        lift = joint / ((rs / total) * (cs / total)) if total else np.zeros_like(joint)
    mask = counts < int(min_count)
    value = np.where(mask, np.nan, by)
    lift = np.where(mask, np.nan, lift)
    return {
        "n": n,
        "pairs": int(total),
        "counts": counts,
        "value": value,
        "lift": lift,
        "norm": norm,
        "min_count": int(min_count),
        "masked": int(mask.sum()),
    }


def _filter_sql(ex: Explorer, f: Filters) -> tuple[str, list[Any]]:
    """The filters other than the token (for rows already restricted to it), as SQL + params."""
    where, params = _where(ex, f)
    rest = where.split(" AND ", 1)
    return (rest[1] if len(rest) > 1 else "TRUE"), params[1:]


def _recall(ok: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """[L] mean over rows with a routed slot of hits / routed slots (NaN for a layer with
    none), from exact integer tallies: ok [L] rows with a routed slot, sums [L, k] summed hits
    of the rows with v = 1..k routed slots (one division per v)."""
    total = np.zeros(ok.shape[0])
    for v in range(1, sums.shape[1] + 1):
        total += sums[:, v - 1] / v
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok > 0, total / np.maximum(ok, 1), np.nan)


Tallies = tuple[int, int, np.ndarray, np.ndarray, np.ndarray]  # scored, backoff, ok, sp, sc


def _sum_tallies(d: dict[str, Any], meta: TraceMeta, min_fit: int) -> Tallies:
    """Sum pred_tally rows (module moelab.explore.cache): the previous-token table where the
    row group's pair count n_pair >= min_fit, else the prior (exact integer sums)."""
    num_l, k = meta.num_layers, meta.top_k
    ok_c, sp_c, sc_c = tally_columns(meta)
    use = np.asarray(d["n_pair"], np.int64) >= int(min_fit)
    rows = np.asarray(d["rows"], np.int64)

    def col(names: list[str], sel: np.ndarray | None = None) -> np.ndarray:
        a = np.stack([np.asarray(d[c], np.int64) for c in names], axis=1)
        return (a if sel is None else a[sel]).sum(0)

    ok = col(ok_c)
    sp = col(sp_c).reshape(num_l, k)
    sc = (col(sc_c, use) + col(sp_c, ~use)).reshape(num_l, k)
    return int(rows.sum()), int(rows[~use].sum()), ok, sp, sc


def _tallies_cached(ex: Explorer, cur: Any, f: Filters, min_fit: int) -> Tallies:
    """The predictor's tallies of the token's held-out rows (optionally of one domain): the
    token's rows of pred_tally, built with the cache (a lookup)."""
    ok_c, sp_c, sc_c = tally_columns(ex.meta)
    sql = f"SELECT n_pair, rows, {', '.join(ok_c + sp_c + sc_c)} FROM {ex.table('tally')}"
    sql += " WHERE token_id = ?"
    params = [int(f.token)]
    code = domain_code(ex, f.domain)
    if code is not None:
        sql += " AND domain = ?"
        params.append(code)
    return _sum_tallies(cur.execute(sql, params).fetchnumpy(), ex.meta, min_fit)


def _tallies_rows(ex: Explorer, cur: Any, f: Filters, min_fit: int) -> Tallies:
    """The same tallies from the held-out rows that match the filters, read from the rows
    cache and tallied by the function that built pred_tally (so the same integers), with the
    token's prior and its (token, previous token) rows of the fitted tables."""
    m = ex.meta
    fsql, fparams = _filter_sql(ex, f)
    tok = int(f.token)
    ecols = expert_columns(m)
    sel = ", ".join(_ecol(ex, li, j) for li in range(m.num_layers) for j in range(m.top_k))
    d = cur.execute(
        f"SELECT prev_id, domain, {sel} FROM {ex.rows} WHERE token_id = ? AND heldout AND {fsql}",
        [tok, *fparams],
    ).fetchnumpy()
    prev = np.asarray(d["prev_id"], np.int32)
    if prev.size == 0:
        zk = np.zeros((m.num_layers, m.top_k), np.int64)
        return 0, 0, np.zeros(m.num_layers, np.int64), zk, zk.copy()
    ids = np.stack([np.asarray(d[c]) for c in ecols], axis=1)
    qcols = ", ".join(f'"{c}"' for c in pred_columns(m, "q"))
    pcols = ", ".join(f'"{c}"' for c in pred_columns(m, "p"))
    prior = cur.execute(
        f"SELECT token_id, {qcols} FROM {ex.table('fitq')} WHERE token_id = ?", [tok]
    ).fetchnumpy()
    psql, pparams = "token_id = ?", [tok]
    if f.prev is not None:
        psql += " AND prev_id = ?"
        pparams.append(int(f.prev))
    pairs = cur.execute(
        f"SELECT token_id, prev_id, n, {pcols} FROM {ex.table('fitp')} WHERE {psql}"
        " ORDER BY prev_id",
        pparams,
    ).fetchnumpy()
    prior = {c: np.asarray(v) for c, v in prior.items()}
    pairs = {c: np.asarray(v) for c, v in pairs.items()}
    tok_col = np.full(prev.size, tok, np.int32)
    dom = np.asarray(d["domain"])
    t = tally_chunk(tok_col, dom, prev, ids, prior, pairs, m)
    return _sum_tallies(t, m, min_fit)


def predictor(
    ex: Explorer | str | Path, f: Filters, min_fit: int = 5, engine: str = "auto"
) -> dict[str, Any]:
    """recall@k for the token's experts per layer: a token-id prior (train counts of the
    token) and a previous-token table (train counts of (previous, token), used when seen at
    least `min_fit` times, else the prior), fitted on the train documents on all occurrences
    of the token and scored on the held-out occurrences that match the filters.

    recall of one occurrence at layer l = |predicted k ∩ routed experts| / |routed experts|
    (dropped slots are not routed); the mean is over occurrences with a routed slot at l.
    The fit does not depend on the filters: the per-token and per-(token, previous token)
    top-k tables are built once with the cache (fit_prior / fit_pairs, moelab.explore.cache),
    and so are the hit tallies of the held-out rows per (token, domain, pair count)
    (pred_tally). Without previous / next filters a request sums the token's tallies
    (engine "cached"); with them it reads the matching held-out rows and tallies them with
    the same function (engine "rows"; also right without filters). Both give the same
    integer tallies, so the same numbers; "auto" picks.
    """
    ex = as_explorer(ex)
    if int(min_fit) < 1:
        raise ExploreInputError(f"min_fit={min_fit}: expected an integer >= 1")
    if engine not in ("auto", "cached", "rows"):
        raise ExploreInputError(f"engine={engine!r}: expected auto, cached or rows")
    filtered = f.prev is not None or f.next is not None
    if engine == "cached" and filtered:
        raise ExploreInputError("engine='cached' answers without previous / next filters only")
    m = ex.meta
    k = m.top_k
    fsql, fparams = _filter_sql(ex, f)
    cur = ex.cursor()
    tok = int(f.token)
    n_match = int(
        cur.execute(
            f"SELECT count(*) FROM {ex.rows} WHERE token_id = ? AND {fsql}", [tok, *fparams]
        ).fetchone()[0]
    )
    if n_match == 0:
        raise _not_found(ex, f)
    prior_row = cur.execute(
        f"SELECT n FROM {ex.table('fitq')} WHERE token_id = ?", [tok]
    ).fetchone()
    n_train = 0 if prior_row is None else int(prior_row[0])
    if n_train == 0:
        n_scored = int(
            cur.execute(
                f"SELECT count(*) FROM {ex.rows} WHERE token_id = ? AND heldout AND {fsql}",
                [tok, *fparams],
            ).fetchone()[0]
        )
    else:
        from_rows = engine == "rows" or (engine == "auto" and filtered)
        tallies = (_tallies_rows if from_rows else _tallies_cached)(ex, cur, f, int(min_fit))
        n_scored, n_back, ok, sp, sc = tallies
    out: dict[str, Any] = {
        "n": n_match,
        "n_train": n_train,
        "n_scored": n_scored,
        "min_fit": int(min_fit),
        "chance": k / m.num_experts,
        "k": k,
        **ex.split_note(),
    }
    if n_train == 0 or n_scored == 0:
        out.update(
            prior=None,
            context=None,
            prior_mean=None,
            context_mean=None,
            backoff=None,
            note=(
                "no train-document occurrence of the token to fit on"
                if n_train == 0
                else "no held-out occurrence matches these filters: nothing to score"
            ),
        )
        return out
    prior_hit, ctx_hit = _recall(ok, sp), _recall(ok, sc)
    out.update(
        prior=prior_hit,
        context=ctx_hit,
        prior_mean=float(np.nanmean(prior_hit)),
        context_mean=float(np.nanmean(ctx_hit)),
        backoff=float(n_back / n_scored),
        note="",
    )
    return out


def contexts(
    ex: Explorer | str | Path, f: Filters, limit: int = 8, width: int = 8
) -> dict[str, Any]:
    """Up to `limit` occurrences (a deterministic hash-ordered sample) with `width` tokens of
    their document on each side, decoded (left, token, right)."""
    ex = as_explorer(ex)
    if not 1 <= int(limit) <= MAX_CONTEXTS:
        raise ExploreInputError(f"limit={limit}: expected 1..{MAX_CONTEXTS}")
    if not 0 <= int(width) <= MAX_WIDTH:
        raise ExploreInputError(f"width={width}: expected 0..{MAX_WIDTH}")
    limit, width = int(limit), int(width)
    where, params = _where(ex, f)
    cur = ex.cursor()
    n = int(cur.execute(f"SELECT count(*) FROM {ex.rows} WHERE {where}", params).fetchone()[0])
    if n == 0:
        raise _not_found(ex, f)
    occ = cur.execute(
        f"SELECT doc_id, position, domain FROM {ex.rows} WHERE {where}"
        " ORDER BY hash(doc_id, position), doc_id, position LIMIT ?",
        [*params, limit],
    ).fetchall()
    docs = sorted({int(d) for d, _, _ in occ})
    marks = ", ".join("?" for _ in docs)
    wins = ", ".join("(?, ?, ?)" for _ in occ)
    wparams = [v for d, p, _ in occ for v in (int(d), int(p) - width, int(p) + width)]
    files = "[" + ", ".join("'" + str(s).replace("'", "''") + "'" for s in _shards(ex)) + "]"
    rows = cur.execute(
        f"SELECT DISTINCT s.doc_id, s.position, s.token_id FROM read_parquet({files}) s"
        f" JOIN (VALUES {wins}) w(d, lo, hi) ON s.doc_id = w.d AND s.position BETWEEN w.lo AND w.hi"
        f" WHERE s.doc_id IN ({marks})",
        [*wparams, *docs],
    ).fetchall()
    by_doc: dict[int, dict[int, int]] = {}
    for d, p, t in rows:
        by_doc.setdefault(int(d), {})[int(p)] = int(t)
    names = ex.meta.domains
    out = []
    for d, p, dom in occ:
        d, p = int(d), int(p)
        toks = by_doc.get(d, {})
        span = [q for q in range(p - width, p + width + 1) if q in toks]
        ids = [toks[q] for q in span]
        left, mid, right = ex.vocab.window(ids, span.index(p))
        out.append(
            {
                "doc_id": d,
                "position": p,
                "domain": names[int(dom)] if 0 <= int(dom) < len(names) else str(dom),
                "left": left,
                "token": mid,
                "right": right,
                "ids": ids,
                "center": span.index(p),
            }
        )
    return {"n": n, "rows": out}


def _shards(ex: Explorer) -> list[Path]:
    from moelab.trace.store import SHARD_RE

    return sorted(p for p in (ex.path / "shards").glob("part-r*.parquet") if SHARD_RE.match(p.name))
