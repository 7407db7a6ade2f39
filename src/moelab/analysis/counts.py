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

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from moelab.analysis._common import set_index
from moelab.analysis.dense_counts import CountSpec
from moelab.analysis.engines import MAX_TALLY_CODES, Engine, code_base
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
        k = self.ids.shape[1]
        if self.code is not None and (num_experts + 1) ** (k + 1) <= MAX_TALLY_CODES:
            return _code_luts(num_experts + 1, k)[2][self.code]  # one gather
        return set_index(self.ids, num_experts)

    @property
    def total(self) -> int:
        """Rows counted."""
        return int(self.count.sum())


class CompactTables:
    """A list of keyed count tables kept as (key, state code, count) in the engine's small
    integer types (a third of the memory of decoded States); each item is decoded when read."""

    def __init__(self, results: Iterator[dict[str, np.ndarray]], key: str, meta: TraceMeta) -> None:
        self.key, self.meta = key, meta
        self._rows = [[_narrow(r[key]), _narrow(r["c"]), _narrow(r["n"])] for r in results]

    def __len__(self) -> int:
        return len(self._rows)

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(key, state code, count) of table i as stored (not decoded)."""
        g, code, n = self._rows[i]
        return g, code, n

    def __getitem__(self, i: int) -> States:
        g, code, n = self._rows[i]
        code = code.astype(np.int64)
        ids, top = decode_states(code, self.meta)
        return States({self.key: g.astype(np.int64)}, ids, top, n.astype(np.int64), None, code)

    def __iter__(self) -> Iterator[States]:
        return (self[i] for i in range(len(self)))


def _narrow(col: np.ndarray) -> np.ndarray:
    """An integer column as int32 when its values fit (as is when already narrower)."""
    if col.dtype.itemsize <= 4 or col.size == 0:
        return col
    if int(col.min()) >= -(2**31) and int(col.max()) < 2**31:
        return col.astype(np.int32)
    return col


def sort_order(cols: list[np.ndarray]) -> np.ndarray:
    """Row order sorting the integer columns lexicographically (first column first), by one
    argsort of a mixed-radix key when the value ranges fit in 62 bits, else np.lexsort."""
    if not cols or cols[0].size == 0:
        return np.zeros(0 if not cols else cols[0].size, np.int64)
    radix = _radix_key(cols)
    if radix is None:
        return np.lexsort(cols[::-1])
    key, _, span = radix
    return argsort_stable(key, math.prod(span))


def _radix_key(cols: list[np.ndarray]) -> tuple[np.ndarray, list[int], list[int]] | None:
    """(mixed-radix key [n] >= 0 ordering the non-empty integer columns lexicographically,
    each column's minimum, each column's span), or None when the spans' product needs more
    than 62 bits. Minima and maxima are taken per column: a strided axis-0 reduction of the
    stacked columns is 10x slower."""
    lo = [int(c.min()) for c in cols]
    span = [int(c.max()) - a + 1 for c, a in zip(cols, lo, strict=True)]
    if math.prod(span) >= 2**62:
        return None
    key = np.asarray(cols[0], dtype=np.int64) - lo[0]
    for c, a, b in zip(cols[1:], lo[1:], span[1:], strict=True):
        key = key * b + (np.asarray(c, dtype=np.int64) - a)
    return key, lo, span


def argsort_stable(key: np.ndarray, span: int | None = None) -> np.ndarray:
    """np.argsort(key, kind="stable") for non-negative integer keys < span: when span * n
    fits in 62 bits, one value sort of key * n + row (numpy's vectorised sort of values is
    several times faster than its argsort), else the stable argsort."""
    n = key.size
    span = int(key.max()) + 1 if span is None and n else (span or 0)
    if n and span * n < 2**62:
        packed = np.sort(key.astype(np.int64) * n + np.arange(n, dtype=np.int64))
        return packed % n
    return np.argsort(key, kind="stable")


@functools.lru_cache(maxsize=8)
def _code_luts(base: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids [B^(k+1), k], top-1, set index, slot key) of every state code of base B = E + 1
    and k slots: decoding a table is one gather per column (B^(k+1) <= 2^16); the slot key
    orders the codes' id tuples lexicographically (codes that differ only in top-1 share it)."""
    c = np.arange(base ** (k + 1), dtype=np.int64)
    ids = np.stack([(c // base**j) % base - 1 for j in range(k)], 1)
    key = np.zeros(c.size, np.int64)
    for j in range(k):
        key = key * base + ids[:, j] + 1
    return ids, c // base**k - 1, set_index(ids, base - 1), key


def state_rows(code: np.ndarray, meta: TraceMeta) -> tuple[np.ndarray, np.ndarray]:
    """codes(*ids.T) of the states' slot ids (unique id tuples [U, k] in lexicographic order,
    each row's index into them), straight from the state codes when they are tabulated."""
    base, k = code_base(meta), meta.top_k
    if base ** (k + 1) > MAX_TALLY_CODES or np.asarray(code).size == 0:
        return codes(*decode_states(code, meta)[0].T)
    key = _code_luts(base, k)[3]
    uk, inv = unique_inverse(key[np.asarray(code, dtype=np.int64)], base**k)
    return _key_ids(uk, base, k), inv


def _key_ids(key: np.ndarray, base: int, k: int) -> np.ndarray:
    """[n, k] slot ids of slot keys (_code_luts)."""
    out = np.empty((key.size, k), np.int64)
    rest = np.asarray(key, dtype=np.int64)
    for j in range(k - 1, -1, -1):
        out[:, j] = rest % base - 1
        rest = rest // base
    return out


def decode_states(code: np.ndarray, meta: TraceMeta) -> tuple[np.ndarray, np.ndarray]:
    """(ids [S, k] with -1 = no expert, top-1 [S]) of state codes (engines.state_code_sql)."""
    base, k = code_base(meta), meta.top_k
    c = np.asarray(code, dtype=np.int64)
    if base ** (k + 1) <= MAX_TALLY_CODES:
        ids, top, _, _ = _code_luts(base, k)
        return ids[c], top[c]
    ids = np.empty((c.size, k), np.int64)
    for j in range(k):
        ids[:, j] = (c // base**j) % base - 1
    return ids, c // base**k - 1


def _states(
    res: dict[str, np.ndarray],
    key_names: list[str],
    meta: TraceMeta,
    w: bool = False,
    ordered: bool = True,
) -> States:
    code = res["c"].astype(np.int64)
    keys = {n: res[n].astype(np.int64) for n in key_names}
    count = res["n"].astype(np.int64)
    ws = np.stack([res[f"w{j}"].astype(np.float64) for j in range(meta.top_k)], 1) if w else None
    if ordered:
        # canonical row order (engines return groups in any order): seeded draws from the
        # tables are then the same on every engine
        order = sort_order([*keys.values(), code])
        code, count = code[order], count[order]
        keys = {n: v[order] for n, v in keys.items()}
        ws = ws[order] if ws is not None else None
    ids, top = decode_states(code, meta)
    return States(keys, ids, top, count, ws, code)


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
    (weights: summed gate weights per slot too, over a source with them: rw): grouped_spec's
    query."""
    aggs = (
        [f"SUM(CAST({prefix}w{layer}_{j} AS DOUBLE)) AS w{j}" for j in range(k)] if weights else []
    )
    return grouped_spec(layer, keys, source, where, prefix).sql(aggs)


def batched(
    eng: Engine,
    parts: list[str],
    then: Callable[[dict[str, np.ndarray]], Any] = lambda r: r,
) -> Iterator[Any]:
    """Run the SELECTs `parts` (same columns) as UNION ALL queries of eng.batch_layers parts
    each (DuckDB: 1, one layer's table in memory at a time, the next one's query running
    meanwhile; Spark: several, fewer jobs) and yield then(each part's result) in order."""
    step = max(1, int(getattr(eng, "batch_layers", 1)))
    if step == 1:
        yield from eng.query_many(parts, then)
        return
    for start in range(0, len(parts), step):
        chunk = parts[start : start + step]
        if len(chunk) == 1:
            yield then(eng.query(chunk[0]))
            continue
        res = eng.query(eng.union_sql(chunk))
        for i in range(len(chunk)):
            sel = res["part_"] == i
            yield then({c: v[sel] for c, v in res.items() if c != "part_"})


def counted(
    eng: Engine,
    specs: list[CountSpec],
    then: Callable[[dict[str, np.ndarray]], Any] = lambda r: r,
) -> Iterator[Any]:
    """then(counts of each CountSpec) in order: the engine's own counting where it has one
    (DuckDB: dense numpy counts where the value ranges allow), else the specs' GROUP BY SQL
    through `batched`. Rows come in any order."""
    if hasattr(eng, "count_many"):
        yield from eng.count_many(specs, then)
    else:
        yield from batched(eng, [spec.sql() for spec in specs], then)


def grouped_spec(
    layer: int,
    keys: dict[str, str] | None = None,
    source: str = "rt",
    where: str = "NOT is_bos",
    prefix: str = "",
) -> CountSpec:
    """The count of (key expressions, state c of `layer`) as a CountSpec."""
    items = tuple((keys or {}).items()) + (("c", f"{prefix}c{layer}"),)
    return CountSpec(items, source, where)


def grouped_layers(
    eng: Engine,
    layers: list[int],
    keys: dict[str, str] | None = None,
    source: str = "rt",
    where: str = "NOT is_bos",
    prefix: str = "",
    weights: bool = False,
    ordered: bool = True,
) -> Iterator[States]:
    """`grouped` for each of `layers`, in order (batched per engine). ordered=False keeps
    the engine's row order, for callers whose results do not depend on it (margins,
    bincounts, sorted uniques): it saves a sort of every table."""
    k = eng.meta.top_k
    names = list(keys or {})

    def then(res: dict[str, np.ndarray]) -> States:
        return _states(res, names, eng.meta, weights, ordered)

    if weights:
        parts = [grouped_sql(k, li, keys, source, where, prefix, weights) for li in layers]
        yield from batched(eng, parts, then)
    else:
        yield from counted(
            eng, [grouped_spec(li, keys, source, where, prefix) for li in layers], then
        )


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


def _pair_spec(la: int, lb: int, pb: str, source: str, where: str) -> CountSpec:
    return CountSpec((("c", f"c{la}"), ("bc", f"{pb}c{lb}")), source, where)


def pair_states_many(eng: Engine, pairs: list[tuple[int, int]]) -> Iterator[tuple[States, States]]:
    """Joint counts of (state at layer a, state at layer b) of the same non-BOS row for each
    (a, b), as two aligned States (a's and b's columns; counts shared)."""
    specs = [_pair_spec(a, b, "", "rt", "NOT is_bos") for a, b in pairs]
    yield from counted(eng, specs, lambda res: _split(res, eng.meta))


def pair_states(eng: Engine, layer_a: int, layer_b: int) -> tuple[States, States]:
    """pair_states_many for one pair."""
    return next(pair_states_many(eng, [(layer_a, layer_b)]))


def prev_pair_states_many(eng: Engine, layers: list[int]) -> Iterator[tuple[States, States]]:
    """Joint counts of (state of a non-BOS row, state of the previous non-BOS token of its
    document) at each layer (the consecutive-token pairs of the repeat-rate analysis)."""
    where = "NOT is_bos AND NOT p_bos"
    specs = [_pair_spec(li, li, "p_", "pr", where) for li in layers]
    yield from counted(eng, specs, lambda res: _split(res, eng.meta))


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


# measured on this machine (out/prof/hg.py): one multivariate_hypergeometric call costs
# ~19 us plus ~0.25 us per category; shuffling and counting labels ~65 ns per item
_DRAW_CALL_S, _DRAW_CATEGORY_S, _PERMUTE_ITEM_S = 2.0e-5, 2.5e-7, 6.5e-8


def _split_plan(side: np.ndarray, other: int) -> tuple[np.ndarray, int, float]:
    """(labels of `side` by decreasing count, how many of them to draw one by one, modelled
    cost in s): the largest labels are drawn by hypergeometric draws, the rest by permuting
    their few items, at the split that minimises the modelled cost."""
    order = np.argsort(-side, kind="stable")
    left = side.sum() - np.concatenate([[0], np.cumsum(side[order])])
    cost = np.arange(order.size + 1) * (_DRAW_CALL_S + _DRAW_CATEGORY_S * other)
    cost = cost + left * _PERMUTE_ITEM_S
    m = int(np.argmin(cost))
    return order, m, float(cost[m])


def shuffled_table(
    rows: np.ndarray, cols: np.ndarray, rng: np.random.Generator, split: int | None = None
) -> np.ndarray:
    """[R, C] counts of a uniformly random pairing of R row labels (with counts `rows`) and C
    column labels (counts `cols`, same total): the contingency table after a random
    permutation of one side, drawn from the margins alone, so shuffle baselines need no
    row-level data. Exact: the largest row labels draw their columns by sequential
    multivariate hypergeometric draws, the remaining items are paired by one permutation
    (`split` = how many rows are drawn one by one; default: the cheaper plan, either side)."""
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    if rows.sum() != cols.sum():
        raise ValueError("shuffled_table: the margins have different totals")
    if split is None:
        r_plan, c_plan = _split_plan(rows, cols.size), _split_plan(cols, rows.size)
        if c_plan[2] < r_plan[2]:  # drawing along the columns is cheaper (same distribution)
            return _draw_split(cols, rows, rng, *c_plan[:2]).T
        return _draw_split(rows, cols, rng, *r_plan[:2])
    order = np.argsort(-rows, kind="stable")
    return _draw_split(rows, cols, rng, order, min(max(int(split), 0), rows.size))


def _draw_split(
    rows: np.ndarray, cols: np.ndarray, rng: np.random.Generator, order: np.ndarray, m: int
) -> np.ndarray:
    """shuffled_table with rows order[:m] drawn one by one, the rest by a permutation."""
    left = cols.copy()
    out = np.zeros((rows.size, cols.size), np.int64)
    for i in order[:m]:
        r = int(rows[i])
        if r == 0:
            break
        d = left.copy() if r == left.sum() else rng.multivariate_hypergeometric(left, r)
        out[i] = d
        left -= d
    rest = order[m:][rows[order[m:]] > 0]
    if rest.size:
        n_c = cols.size
        a = np.repeat(np.arange(rest.size, dtype=np.int64) * n_c, rows[rest])
        b = np.repeat(np.arange(n_c, dtype=np.int8 if n_c < 128 else np.int64), left)
        rng.shuffle(b)
        out[rest] = np.bincount(a + b, minlength=rest.size * n_c).reshape(rest.size, n_c)
    return out


def multinomial_table(rows: np.ndarray, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[R, C] counts when each of rows[i] items draws a column independently with probs p (a
    random partner drawn with replacement)."""
    return np.stack([rng.multinomial(int(r), p) for r in rows]) if rows.size else np.zeros((0,))


def unique_inverse(x: np.ndarray, span: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(x, return_inverse=True) for a 1-D integer array, without a sort when x is
    already sorted (one pass) or its values span a small range (a counting pass): the same
    sorted uniques and inverse. `span` = max - min + 1 when the caller knows it."""
    x = np.asarray(x)
    if x.ndim != 1 or x.dtype.kind not in "iu":
        u, inv = np.unique(x, return_inverse=True)
        return u, inv.reshape(-1)
    if x.size == 0:
        return x.copy(), np.zeros(0, np.int64)
    order = None  # x is sorted already
    if x.size > 1 and not bool((x[1:] >= x[:-1]).all()):
        lo = int(x.min())
        span = int(x.max()) - lo + 1 if span is None else int(span)
        if span <= max(4 * x.size, 1 << 16):
            seen = np.zeros(span, bool)
            off = x - lo
            seen[off] = True
            present = np.flatnonzero(seen)
            remap = np.zeros(span, np.int64)
            remap[present] = np.arange(present.size)
            return (present + lo).astype(x.dtype), remap[off]
        order = argsort_stable(x.astype(np.int64) - lo, span)
    xs = x if order is None else x[order]
    first = np.ones(x.size, bool)
    first[1:] = xs[1:] != xs[:-1]
    rank = np.cumsum(first) - 1
    if order is None:
        return xs[first], rank
    inv = np.empty(x.size, np.int64)
    inv[order] = rank
    return xs[first], inv


def codes(*cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique rows [U, c] in lexicographic order, inverse [n]) of the stacked integer
    columns (one 1-D unique over a mixed-radix key when the value ranges fit in 62 bits)."""
    cs = [np.asarray(c, dtype=np.int64) for c in cols]
    if cs[0].size == 0:
        return np.zeros((0, len(cs)), np.int64), np.zeros(0, np.int64)
    radix = _radix_key(cs)
    if radix is None:
        u, inv = np.unique(np.stack(cs, 1), axis=0, return_inverse=True)
        return u, inv.reshape(-1)
    key, lo, span = radix
    uk, inv = unique_inverse(key, math.prod(span))
    u = np.empty((uk.size, len(cs)), np.int64)
    rest = uk
    for j in range(len(cs) - 1, -1, -1):
        u[:, j] = rest % span[j] + lo[j]
        rest = rest // span[j]
    return u, inv
