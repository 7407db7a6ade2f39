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
from moelab.analysis.engines import Engine


@dataclass
class States:
    """One count table: key columns [S] (by name), expert ids [S, k], top-1 [S], counts [S]."""

    keys: dict[str, np.ndarray]
    ids: np.ndarray  # [S, k] int64, -1 = no expert
    top1: np.ndarray  # [S] int64
    count: np.ndarray  # [S] int64
    wsum: np.ndarray | None = None  # [S, k] summed gate weights per slot

    def sets(self, num_experts: int) -> np.ndarray:
        """[S] order-free set index (-1 where a slot is empty or an expert repeats)."""
        if self.ids.shape[0] == 0:
            return np.zeros(0, np.int64)
        return set_index(self.ids, num_experts)

    @property
    def total(self) -> int:
        """Rows counted."""
        return int(self.count.sum())


def _ids(prefix: str, layer: int, k: int) -> list[str]:
    return [f"{prefix}e{layer}_{j}" for j in range(k)]


def _states(res: dict[str, np.ndarray], key_names: list[str], k: int, w: bool = False) -> States:
    ids = np.stack([res[f"s{j}"].astype(np.int64) for j in range(k)], 1)
    ws = np.stack([res[f"w{j}"].astype(np.float64) for j in range(k)], 1) if w else None
    keys = {n: res[n].astype(np.int64) for n in key_names}
    ids = ids.reshape(-1, k)
    top = res["t"].astype(np.int64)
    # canonical row order (engines return groups in any order): seeded draws from the
    # tables are then the same on every engine
    order = np.lexsort([top, *ids.T[::-1], *[keys[n] for n in reversed(key_names)]])
    return States(
        {n: v[order] for n, v in keys.items()},
        ids[order],
        top[order],
        res["n"].astype(np.int64)[order],
        None if ws is None else ws[order],
    )


def _split(res: dict[str, np.ndarray], k: int) -> tuple[States, States]:
    """Two aligned States (a: s*, t; b: b*, bt) of one joint table, in canonical order."""
    bnames = [f"b{j}" for j in range(k)] + ["bt"]
    j = _states(res, bnames, k)
    b = States(
        {},
        np.stack([j.keys[f"b{i}"] for i in range(k)], 1).reshape(-1, k),
        j.keys["bt"],
        j.count,
    )
    return States({}, j.ids, j.top1, j.count), b


def state_select(layer: int, k: int, prefix: str = "") -> list[str]:
    """SELECT items naming a layer's state s0..s{k-1}, t."""
    return [f"{c} AS s{j}" for j, c in enumerate(_ids(prefix, layer, k))] + [
        f"{prefix}t{layer} AS t"
    ]


def grouped_sql(
    k: int,
    layer: int,
    keys: dict[str, str] | None = None,
    source: str = "rt",
    where: str = "NOT is_bos",
    prefix: str = "",
    weights: bool = False,
) -> str:
    """SQL counting (key expressions, state of `layer`) over `source` rows matching `where`."""
    keys = keys or {}
    items = [f"{expr} AS {name}" for name, expr in keys.items()] + state_select(layer, k, prefix)
    groups = list(keys.values()) + _ids(prefix, layer, k) + [f"{prefix}t{layer}"]
    aggs = ["COUNT(*) AS n"]
    if weights:
        aggs += [f"SUM({prefix}w{layer}_{j}) AS w{j}" for j in range(k)]
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
        sql = " UNION ALL ".join(
            f"SELECT {i} AS part_, q.* FROM ({p}) q" for i, p in enumerate(chunk)
        )
        res = eng.query(sql)
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
        yield _states(res, list(keys or {}), k, weights)


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
    """Per MoE layer: counts of each state over non-BOS rows (one UNION ALL query)."""
    k, num_l = eng.meta.top_k, eng.meta.num_layers
    parts = []
    for li in range(num_l):
        items = [f"{li} AS layer", *state_select(li, k), "COUNT(*) AS n"]
        if weights:
            items += [f"SUM(w{li}_{j}) AS w{j}" for j in range(k)]
        groups = ", ".join(_ids("", li, k) + [f"t{li}"])
        parts.append(f"SELECT {', '.join(items)} FROM rt WHERE NOT is_bos GROUP BY {groups}")
    res = eng.query(" UNION ALL ".join(parts))
    out = []
    for li in range(num_l):
        sel = res["layer"] == li
        out.append(_states({c: v[sel] for c, v in res.items()}, [], k, weights))
    return out


def _pair_sql(k: int, la: int, lb: int, pb: str, source: str, where: str) -> str:
    items = state_select(la, k) + [f"{c} AS b{j}" for j, c in enumerate(_ids(pb, lb, k))]
    items += [f"{pb}t{lb} AS bt", "COUNT(*) AS n"]
    groups = _ids("", la, k) + [f"t{la}"] + _ids(pb, lb, k) + [f"{pb}t{lb}"]
    return f"SELECT {', '.join(items)} FROM {source} WHERE {where} GROUP BY {', '.join(groups)}"


def pair_states_many(eng: Engine, pairs: list[tuple[int, int]]) -> Iterator[tuple[States, States]]:
    """Joint counts of (state at layer a, state at layer b) of the same non-BOS row for each
    (a, b), as two aligned States (a's and b's columns; counts shared)."""
    k = eng.meta.top_k
    parts = [_pair_sql(k, a, b, "", "rt", "NOT is_bos") for a, b in pairs]
    for res in batched(eng, parts):
        yield _split(res, k)


def pair_states(eng: Engine, layer_a: int, layer_b: int) -> tuple[States, States]:
    """pair_states_many for one pair."""
    return next(pair_states_many(eng, [(layer_a, layer_b)]))


def prev_pair_states_many(eng: Engine, layers: list[int]) -> Iterator[tuple[States, States]]:
    """Joint counts of (state of a non-BOS row, state of the previous non-BOS token of its
    document) at each layer (the consecutive-token pairs of the repeat-rate analysis)."""
    k = eng.meta.top_k
    where = "NOT is_bos AND NOT p_bos"
    parts = [_pair_sql(k, li, li, "p_", "pr", where) for li in layers]
    for res in batched(eng, parts):
        yield _split(res, k)


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
    if rows.size * cols.size > limit or rows.size > 256:  # many rows: one vectorised
        # permutation of the labels expanded to rows beats a Python loop of draws
        a = np.repeat(np.arange(rows.size), rows)
        b = rng.permutation(np.repeat(np.arange(cols.size), cols))
        return (
            np.bincount(a * cols.size + b, minlength=rows.size * cols.size)
            .reshape(rows.size, cols.size)
            .astype(np.int64)
        )
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
        d = rng.multivariate_hypergeometric(left, r)
        out[i] = d
        left -= d
    return out


def multinomial_table(rows: np.ndarray, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[R, C] counts when each of rows[i] items draws a column independently with probs p (a
    random partner drawn with replacement)."""
    return np.stack([rng.multinomial(int(r), p) for r in rows]) if rows.size else np.zeros((0,))


def codes(*cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique rows [U, c], inverse [n]) of the stacked integer columns."""
    m = np.stack([np.asarray(c, dtype=np.int64) for c in cols], 1)
    if m.shape[0] == 0:
        return m, np.zeros(0, np.int64)
    u, inv = np.unique(m, axis=0, return_inverse=True)
    return u, inv.reshape(-1)
