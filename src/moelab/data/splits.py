"""Train/validation/test splits by document, seeded, stored as splits.json.

Splitting by whole documents (never by token windows) guarantees that no text of the
validation or test split is trained on, the usual protocol for held-out perplexity
(e.g. Radford et al. 2019, GPT-2, Sec. 3.1 on de-duplicated held-out sets). Each document's
split is a function of (seed, doc_id) alone: a seeded hash maps the id to u in [0, 1) and
u < f_train -> train, u < f_train + f_val -> validation, else test. So the assignment is
reproducible, independent of read order, and the same for a document whatever other documents
(or byte cap) a later run loads -- a tracer re-splitting a smaller sample of the corpus never
puts a training document into its test split. Only a domain too small to reach every split
this way (a split left empty with >= 3 documents) borrows its highest-u documents for the empty
validation/test split; that fallback depends on the domain's members.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from moelab._io import atomic_write_json
from moelab.data.corpora import Document
from moelab.errors import DataError

__all__ = ["SPLITS", "split_documents", "save_splits", "load_splits", "apply_splits"]

SPLITS = ("train", "validation", "test")


def _unit(seed: int, doc_id: str) -> float:
    """Seeded hash of a document id mapped to [0, 1)."""
    h = hashlib.blake2b(f"split:{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def split_documents(
    docs: Sequence[Document], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, list[Document]]:
    """Split documents into {"train", "validation", "test"} by document, per domain, seeded."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(
            f"split_documents: fractions={tuple(fractions)} must be 3 non-negative numbers summing to 1"
            " (train, validation, test)"
        )
    if not docs:
        raise DataError("split_documents: no documents to split (the corpus is empty)")
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"split_documents: duplicate document id {dup!r}; ids must be unique")
    f_train, f_val, f_test = fractions
    u = [_unit(seed, i) for i in ids]
    where = ["train" if x < f_train else "validation" if x < f_train + f_val else "test" for x in u]
    by_domain: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        by_domain.setdefault(d.domain, []).append(i)
    for members in by_domain.values():
        if len(members) < 3:
            continue
        for name, frac in (("test", f_test), ("validation", f_val)):
            if frac > 0 and not any(where[i] == name for i in members):
                donors = [i for i in members if where[i] == "train"]
                if len(donors) > 1:
                    where[max(donors, key=lambda i: u[i])] = name
    chosen = {s: {i for i, w in enumerate(where) if w == s} for s in SPLITS}
    # keep the corpus order inside each split
    return {s: [d for i, d in enumerate(docs) if i in chosen[s]] for s in SPLITS}


def save_splits(
    splits: dict[str, list[Document]], path: str | os.PathLike[str], seed: int = 0
) -> None:
    """Write splits.json: document ids (and their domains) of each split, plus the seed."""
    obj = {
        "seed": seed,
        "splits": {s: [d.doc_id for d in splits.get(s, [])] for s in SPLITS},
        "domains": {d.doc_id: d.domain for s in SPLITS for d in splits.get(s, [])},
    }
    atomic_write_json(path, obj)


def load_splits(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Read splits.json -> {split: [doc ids]}; DataError if missing or malformed."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
        out = {s: list(obj["splits"][s]) for s in SPLITS}
    except FileNotFoundError:
        raise DataError(
            f"splits file {p} does not exist; it is written by `moelab train`"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(
            f"splits file {p} is malformed ({exc}); expected {{'splits': {{train, validation, test}}}}"
        ) from None
    return out


def apply_splits(
    docs: Sequence[Document], split_ids: dict[str, list[str]]
) -> dict[str, list[Document]]:
    """Re-create a saved split from documents; DataError if an id of the split is missing."""
    by_id = {d.doc_id: d for d in docs}
    out = {}
    for s in SPLITS:
        missing = [i for i in split_ids.get(s, []) if i not in by_id]
        if missing:
            raise DataError(
                f"apply_splits: {len(missing)} document(s) of split {s!r} are not in the corpus"
                f" (first: {missing[0]!r}); was the corpus or its seed changed?"
            )
        out[s] = [by_id[i] for i in split_ids.get(s, [])]
    return out
