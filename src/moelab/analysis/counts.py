"""Count tables of a trace store, computed by an engine (DuckDB or Spark) over the shards.

Every count-based analysis reduces to a few GROUP BY tables whose size depends on the number
of distinct (token, expert-tuple) combinations, never on the number of rows; the tables are
fetched one layer at a time, so memory stays bounded by the engine's memory limit plus one
layer's table. A row's routing at a layer is its *state*: the k slot ids as stored (-1 = no
expert) and its top-1 expert; set indices (combinatorial number system) are derived from the
ids in numpy exactly as the in-memory analyses derive them.

Functions are plain: an Engine (moelab.analysis.engines) and parameters in, numpy arrays out.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from moelab.analysis._common import set_index
from moelab.analysis.engines import Engine, code_base
from moelab.trace.schema import TraceMeta


@dataclass
class States:
    """One count table: key columns [S] (by name), expert ids [S, k], top-1 [S], counts [S]."""

    keys: dict[str, np.ndarray]
    ids: np.ndarray  # [S, k] int64, -1 = no expert
    top1: np.ndarray  # [S] int64
    count: np.ndarray  # [S] int64
    wsum: np.ndarray | None = None  # [S, k] summed gate weights per slot
    code: np.ndarray | None = None  # [S] state codes (engines.state_code_sql), when known

    def sets(self, num_experts: int) -> np.ndarray:
        """[S] order-free set index (-1 where a slot is empty or an expert repeats)."""
        if self.ids.shape[0] == 0:
            return np.zeros(0, np.int64)
        return set_index(self.ids, num_experts)

    @property
    def total(self) -> int:
        """Rows counted."""
        return int(self.count.sum())


class CompactTables:
    """A list of keyed States kept as (key, state code, count) in 32-bit columns where they fit
    (a third of the memory of decoded States); each item is decoded when read."""

    def __init__(self, tables: Iterator[States], key: str, meta: TraceMeta) -> None:
        self.key, self.meta, self._rows = key, meta, []
        for st in tables:
            cols = [st.keys[key], st.code, st.count]
            self._rows.append(
                [c.astype(np.int32) if c.size and np.abs(c).max() < 2**31 else c for c in cols]
            )

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> States:
        g, code, n = self._rows[i]
        ids, top = decode_states(code, self.meta)
        return States({self.key: g.astype(np.int64)}, ids, top, n.astype(np.int64), None, code)

    def __iter__(self) -> Iterator[States]:
        return (self[i] for i in range(len(self)))


def sort_order(cols: list[np.ndarray]) -> np.ndarray:
    """Row order sorting the integer columns lexicographically (first column first), by one
    argsort of a mixed-radix key when the value ranges fit in 62 bits, else np.lexsort."""
    if not cols or cols[0].size == 0:
        return np.zeros(0 if not cols else cols[0].size, np.int64)
    lo = [int(c.min()) for c in cols]
    span = [int(c.max()) - lo[i] + 1 for i, c in enumerate(cols)]
    total = 1
    for x in span:
        total *= x
    if total >= 2**62:
        return np.lexsort(cols[::-1])
    key = np.zeros(cols[0].size, np.int64)
    for c, a, b in zip(cols, lo, span, strict=True):
        key = key * b + (c.astype(np.int64) - a)
    return np.argsort(key, kind="stable")


def decode_states(code: np.ndarray, meta: TraceMeta) -> tuple[np.ndarray, np.ndarray]:
    """(ids [S, k] with -1 = no expert, top-1 [S]) of state codes (engines.state_code_sql)."""
    base, k = code_base(meta), meta.top_k
    c = np.asarray(code, dtype=np.int64)
    ids = np.empty((c.size, k), np.int64)
    for j in range(k):
        ids[:, j] = (c // base**j) % base - 1
    return ids, c // base**k - 1


def _states(
    res: dict[str, np.ndarray], key_names: list[str], meta: TraceMeta, w: bool = False, c: str = "c"
) -> States:
    k = meta.top_k
    code = res[c].astype(np.int64)
    keys = {n: res[n].astype(np.int64) for n in key_names}
    # canonical row order (engines return groups in any order): seeded draws from the
    # tables are then the same on every engine
    order = sort_order([*[keys[n] for n in key_names], code])
    code = code[order]
    ids, top = decode_states(code, meta)
    ws = np.stack([res[f"w{j}"].astype(np.float64) for j in range(k)], 1)[order] if w else None
    return States(
        {n: v[order] for n, v in keys.items()},
        ids,
        top,
        res["n"].astype(np.int64)[order],
        ws,
        code,
    )


def _split(res: dict[str, np.ndarray], meta: TraceMeta) -> tuple[States, States]:
    """Two aligned States (a: c; b: bc) of one joint table, in canonical order."""
    j = _states(res, ["bc"], meta)
    bids, btop = decode_states(j.keys["bc"], meta)
    b = States({}, bids, btop, j.count, None, j.keys["bc"])
    return States({}, j.ids, j.top1, j.count, None, j.code), b


def state_select(layer: int, prefix: str = "") -> list[str]:
    """SELECT item naming a layer's state code c."""
    return [f"{prefix}c{layer} AS c"]


def grouped_sql(
    k: int,
    layer: int,
    keys: dict[str, str] | None = None,
    source: str = "rt",
    where: str = "NOT is_bos",
    prefix: str = "",
    weights: bool = False,
) -> str:
    """SQL counting (key expressions, state of `layer`) over `source` rows matching `where`
    (weights: summed gate weights per slot too, over a source with them: rw)."""
    keys = keys or {}
    items = [f"{expr} AS {name}" for name, expr in keys.items()] + state_select(layer, prefix)
    groups = list(keys.values()) + [f"{prefix}c{layer}"]
    aggs = ["COUNT(*) AS n"]
    if weights:
        aggs += [f"SUM(CAST({prefix}w{layer}_{j} AS DOUBLE)) AS w{j}" for j in range(k)]
    return (
        f"SELECT {', '.join(items + aggs)} FROM {source} WHERE {where} GROUP BY {', '.join(groups)}"
    )


def batched(eng: Engine, parts: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """Run the SELECTs `parts` (same columns) as UNION ALL queries of eng.batch_layers parts
    each (DuckDB: 1, one layer's table in memory at a time; Spark: several, fewer jobs) and
    yield each part's result in order."""
    step = max(1, int(getattr(eng, "batch_layers", 1)))
    for start in range(0, len(parts), step):
        chunk = parts[start : start + step]
        if len(chunk) == 1:
            yield eng.query(chunk[0])
            continue
        res = eng.query(eng.union_sql(chunk))
        for i in range(len(chunk)):
            sel = res["part_"] == i
            yield {c: v[sel] for c, v in res.items() if c != "part_"}


def grouped_layers(
    eng: Engine,
    layers: list[int],
    keys: dict[str, str] | None = None,
    source: str = "rt",
    where: str = "NOT is_bos",
    prefix: str = "",
    weights: bool = False,
) -> Iterator[States]:
    """`grouped` for each of `layers`, in order (batched per engine)."""
    k = eng.meta.top_k
    parts = [grouped_sql(k, li, keys, source, where, prefix, weights) for li in layers]
    for res in batched(eng, parts):
        yield _states(res, list(keys or {}), eng.meta, weights)


def grouped(
    eng: Engine,
    layer: int,
    keys: dict[str, str] | None = None,
    source: str = "rt",
    where: str = "NOT is_bos",
    prefix: str = "",
    weights: bool = False,
) -> States:
    """Counts of (key expressions, state of `layer`) over `source` rows matching `where`."""
    return next(grouped_layers(eng, [layer], keys, source, where, prefix, weights))


def layer_states(eng: Engine, weights: bool = True) -> list[States]:
    """Per MoE layer: counts of each state over non-BOS rows (one UNION ALL query; with
    weights, the engine's own tally when it keeps one: DuckDB sums while materialising)."""
    k, num_l = eng.meta.top_k, eng.meta.num_layers
    res = eng.layer_weight_states() if weights and hasattr(eng, "layer_weight_states") else None
    if res is None:
        parts = []
        for li in range(num_l):
            items = [f"{li} AS layer", *state_select(li), "COUNT(*) AS n"]
            if weights:
                items += [f"SUM(CAST(w{li}_{j} AS DOUBLE)) AS w{j}" for j in range(k)]
            src = "rw" if weights else "rt"
            parts.append(f"SELECT {', '.join(items)} FROM {src} WHERE NOT is_bos GROUP BY c{li}")
        res = eng.query(" UNION ALL ".join(parts))
    out = []
    for li in range(num_l):
        sel = res["layer"] == li
        out.append(_states({c: v[sel] for c, v in res.items()}, [], eng.meta, weights))
    return out


def _pair_sql(la: int, lb: int, pb: str, source: str, where: str) -> str:
    items = [f"c{la} AS c", f"{pb}c{lb} AS bc", "COUNT(*) AS n"]
    return f"SELECT {', '.join(items)} FROM {source} WHERE {where} GROUP BY c{la}, {pb}c{lb}"


def pair_states_many(eng: Engine, pairs: list[tuple[int, int]]) -> Iterator[tuple[States, States]]:
    """Joint counts of (state at layer a, state at layer b) of the same non-BOS row for each
    (a, b), as two aligned States (a's and b's columns; counts shared)."""
    parts = [_pair_sql(a, b, "", "rt", "NOT is_bos") for a, b in pairs]
    for res in batched(eng, parts):
        yield _split(res, eng.meta)


def pair_states(eng: Engine, layer_a: int, layer_b: int) -> tuple[States, States]:
    """pair_states_many for one pair."""
    return next(pair_states_many(eng, [(layer_a, layer_b)]))


def prev_pair_states_many(eng: Engine, layers: list[int]) -> Iterator[tuple[States, States]]:
    """Joint counts of (state of a non-BOS row, state of the previous non-BOS token of its
    document) at each layer (the consecutive-token pairs of the repeat-rate analysis)."""
    where = "NOT is_bos AND NOT p_bos"
    parts = [_pair_sql(li, li, "p_", "pr", where) for li in layers]
    for res in batched(eng, parts):
        yield _split(res, eng.meta)


def prev_pair_states(eng: Engine, layer: int) -> tuple[States, States]:
    """prev_pair_states_many for one layer."""
    return next(prev_pair_states_many(eng, [layer]))


def scalar(eng: Engine, sql: str) -> int:
    """One integer from a one-row, one-column query."""
    res = eng.query(sql)
    v = next(iter(res.values()))
    return int(v[0]) if v.size else 0


def distinct_docs(eng: Engine) -> np.ndarray:
    """Sorted distinct document ids of the store."""
    return np.sort(eng.query("SELECT DISTINCT doc_id AS d FROM trace")["d"].astype(np.int64))


def shuffled_table(
    rows: np.ndarray, cols: np.ndarray, rng: np.random.Generator, limit: int = 4_000_000
) -> np.ndarray:
    """[R, C] counts of a uniformly random pairing of R row labels (with counts `rows`) and C
    column labels (counts `cols`, same total): the distribution of the contingency table after a
    random permutation of one side, drawn from the margins alone (sequential multivariate
    hypergeometric draws), so shuffle baselines need no row-level data."""
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    if rows.sum() != cols.sum():
        raise ValueError("shuffled_table: the margins have different totals")
    cells = rows.size * cols.size
    if cells > limit or min(rows.size, cols.size) > 256 or cells > 3 * rows.sum():
        # many labels, or few items per cell: one vectorised permutation of the labels
        # expanded to items beats a loop of draws (cost ~ items, not ~ cells; measured: a
        # draw costs ~20 ns per cell, the permutation ~60 ns per item)
        a = np.repeat(np.arange(rows.size), rows)
        b = rng.permutation(np.repeat(np.arange(cols.size), cols))
        return (
            np.bincount(a * cols.size + b, minlength=rows.size * cols.size)
            .reshape(rows.size, cols.size)
            .astype(np.int64)
        )
    if cols.size < rows.size:  # draw along the shorter side (same distribution)
        return _sequential_draws(cols, rows, rng).T
    return _sequential_draws(rows, cols, rng)


def _sequential_draws(rows: np.ndarray, cols: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[R, C] table of sequential multivariate hypergeometric draws (one per row label)."""
    left = cols.copy()
    out = np.zeros((rows.size, cols.size), np.int64)
    for i in np.argsort(-rows, kind="stable"):
        r = int(rows[i])
        if r == 0:
            continue
        if r == left.sum():
            out[i] = left
            left = left - left
            continue
        d = rng.multivariate_hypergeometric(left, r, method="marginals")
        out[i] = d
        left -= d
    return out


def multinomial_table(rows: np.ndarray, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[R, C] counts when each of rows[i] items draws a column independently with probs p (a
    random partner drawn with replacement)."""
    return np.stack([rng.multinomial(int(r), p) for r in rows]) if rows.size else np.zeros((0,))


def codes(*cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique rows [U, c] in lexicographic order, inverse [n]) of the stacked integer
    columns (one 1-D unique over a mixed-radix key when the value ranges fit in 62 bits)."""
    m = np.stack([np.asarray(c, dtype=np.int64) for c in cols], 1)
    if m.shape[0] == 0:
        return m, np.zeros(0, np.int64)
    lo, hi = m.min(axis=0), m.max(axis=0)
    span = (hi - lo + 1).astype(object)
    total = 1
    for x in span:
        total *= int(x)
    if total >= 2**62:
        u, inv = np.unique(m, axis=0, return_inverse=True)
        return u, inv.reshape(-1)
    key = np.zeros(m.shape[0], np.int64)
    for j in range(m.shape[1]):
        key = key * int(span[j]) + (m[:, j] - lo[j])
    uk, inv = np.unique(key, return_inverse=True)
    u = np.empty((uk.size, m.shape[1]), np.int64)
    rest = uk
    for j in range(m.shape[1] - 1, -1, -1):
        u[:, j] = rest % int(span[j]) + lo[j]
        rest = rest // int(span[j])
    return u, inv.reshape(-1)
