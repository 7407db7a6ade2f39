"""Counts of rows grouped by a few integer columns, as one numpy bincount over dense cells.

The count queries of the out-of-core analyses group by a key (a token id, a position, a
domain) and one or two state codes: the value ranges are small (tens of thousands of tokens,
a few dozen states in use), so the (key, state) combinations fit in a dense array. Fetching
the columns and counting them with one bincount takes 18-55% less CPU than a SQL hash
aggregate over the same rows for the token-keyed tables (bench/RESULTS.md, #18 sixth pass). `CountSpec` says what
to count; engines run it as this dense count where the ranges allow and as SQL otherwise, with
identical results (a set of (values, count) rows; callers never depend on the row order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# the largest dense cell array (int64 counts: 128 MiB); more cells go to the SQL aggregate
MAX_CELLS = 1 << 24
# a column is compacted to its present values only when its range is at most this wide
MAX_COMPACT_SPAN = 1 << 22


@dataclass(frozen=True)
class CountSpec:
    """COUNT(*) AS n of the rows of `source` matching `where`, grouped by the integer SQL
    expressions of `items` ((output name, expression) pairs)."""

    items: tuple[tuple[str, str], ...]
    source: str
    where: str

    def sql(self, aggregates: Sequence[str] = ()) -> str:
        """The GROUP BY query (the form every engine runs; Spark stacks per-layer ones), with
        `aggregates` (SQL items such as SUM(...) AS w0) after the count."""
        sel = ", ".join([f"{expr} AS {name}" for name, expr in self.items])
        group = ", ".join(expr for _, expr in self.items)
        aggs = ", ".join(["COUNT(*) AS n", *aggregates])
        return f"SELECT {sel}, {aggs} FROM {self.source} WHERE {self.where} GROUP BY {group}"

    def rows_sql(self) -> str:
        """The grouped columns of every matching row (what the dense count counts)."""
        sel = ", ".join(f"{expr} AS {name}" for name, expr in self.items)
        return f"SELECT {sel} FROM {self.source} WHERE {self.where}"


def dense_group_counts(
    cols: dict[str, np.ndarray], max_cells: int = MAX_CELLS
) -> dict[str, np.ndarray] | None:
    """{name: distinct values, ..., "n": counts} of the rows of the integer columns `cols`
    (equal lengths), in lexicographic order of the columns; None when the combinations do
    not fit in max_cells dense cells (then the caller groups another way)."""
    names = list(cols)
    arrs = [np.asarray(cols[name]) for name in names]
    if not arrs or any(a.ndim != 1 or a.dtype.kind not in "iu" for a in arrs):
        return None
    n = arrs[0].size
    if any(a.size != n for a in arrs):
        raise ValueError("dense_group_counts: the columns have different lengths")
    if n == 0:
        return {
            **{name: a[:0].copy() for name, a in zip(names, arrs, strict=True)},
            "n": np.zeros(0, np.int64),
        }
    lo = [int(a.min()) for a in arrs]
    span = [int(a.max()) - b + 1 for a, b in zip(arrs, lo, strict=True)]
    # compact the narrowest columns to their present values (state codes: a few dozen of
    # hundreds) until the cells fit; wide key columns (token ids) stay as offsets
    index = [a.astype(np.int64) - b for a, b in zip(arrs, lo, strict=True)]
    present: list[np.ndarray | None] = [None] * len(arrs)  # None: every offset 0..span-1
    size = list(span)
    for j in sorted(range(len(arrs)), key=lambda i: span[i]):
        if math.prod(size) <= max_cells:
            break
        if span[j] > MAX_COMPACT_SPAN:
            return None
        seen = np.zeros(span[j], bool)
        seen[index[j]] = True
        present[j] = np.flatnonzero(seen)
        remap = np.zeros(span[j], np.int64)
        remap[present[j]] = np.arange(present[j].size)
        index[j], size[j] = remap[index[j]], present[j].size
    if math.prod(size) > max_cells:
        return None
    cell = index[0]
    for idx, m in zip(index[1:], size[1:], strict=True):
        cell = cell * m + idx
    count = np.bincount(cell, minlength=math.prod(size))
    nz = np.flatnonzero(count)
    out: dict[str, np.ndarray] = {}
    rest = nz
    for j in range(len(arrs) - 1, -1, -1):
        off = rest % size[j] if present[j] is None else present[j][rest % size[j]]
        out[names[j]] = (off + lo[j]).astype(arrs[j].dtype)
        rest = rest // size[j]
    out = {name: out[name] for name in names}
    out["n"] = count[nz].astype(np.int64)
    return out
