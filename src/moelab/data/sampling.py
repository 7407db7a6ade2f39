"""Sampling documents across domains, so that a token cap covers every domain."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def interleave_by_domain(docs: Sequence[T], seed: int = 0, shuffle: bool = True) -> list[T]:
    """Round-robin over domains: one document of each domain in turn (domains in order of first
    appearance), so the first N tokens of the result hold every domain in about equal shares.

    Within a domain, documents are shuffled with `seed` when `shuffle` (else kept in corpus
    order). Deterministic for a given (docs, seed); a single-domain corpus is only shuffled.
    """
    by_dom: dict[str, list[T]] = {}
    for doc in docs:
        by_dom.setdefault(str(getattr(doc, "domain", "")), []).append(doc)
    rng = np.random.default_rng(seed)
    queues: list[list[T]] = []
    for items in by_dom.values():
        if shuffle:
            items = [items[i] for i in rng.permutation(len(items))]
        queues.append(items)
    out: list[T] = []
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


def domain_shares(
    domains: Sequence[Any], weights: Sequence[float] | None = None
) -> dict[str, float]:
    """Share of each domain (by count, or by `weights` such as token counts)."""
    w = np.ones(len(domains)) if weights is None else np.asarray(weights, dtype=float)
    tot = float(w.sum()) or 1.0
    out: dict[str, float] = {}
    for d, x in zip(domains, w, strict=True):
        out[str(d)] = out.get(str(d), 0.0) + float(x) / tot
    return out
