"""Dense per-group label matrices for the token-keyed count analyses out of core.

A layer's count table keyed by token (or position) has about one row per three trace rows at
a million tokens, but when the labels are few (top-1 experts, or the C(E, k) sets of a small
E) the same counts fit in a dense [groups, labels] matrix, where modes, hit counts, shuffle
margins and conditional entropies are row and column reductions instead of sorts. The
functions here take the count tables of moelab.analysis.counts (in any row order) and return
exactly what the row-level code in moelab.analysis.outofcore returns from the same table,
including the seeded shuffle draws (the same sorted margins reach counts.shuffled_table).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.analysis import counts as C

# the largest [groups x labels] matrix built densely (cells: two int64 parts and their
# temporaries stay near 100 MB); larger tables stay row-level
MAX_DENSE_CELLS = 1 << 21


def fits(n_groups: int, n_labels: int) -> bool:
    """True if a [n_groups, n_labels] matrix is built densely."""
    return 0 < n_labels and n_groups * n_labels <= MAX_DENSE_CELLS


@dataclass
class LabelMatrix:
    """Counts of (group, label) for labels 0..L-1 as a dense matrix, plus what the rows with
    an invalid label (< 0) add to each group's total."""

    groups: np.ndarray  # [G] sorted distinct group keys
    valid: np.ndarray  # [G, L] int64 counts of the rows with label >= 0
    invalid: np.ndarray  # [G] int64 counts of the rows with label < 0

    @classmethod
    def indexed(
        cls, groups: np.ndarray, gi: np.ndarray, label: np.ndarray, w: np.ndarray, n_labels: int
    ) -> LabelMatrix:
        """From rows already mapped to group indices gi into `groups`."""
        return cls.split(groups, gi, label, w, n_labels, None)[0]

    @classmethod
    def split(
        cls,
        groups: np.ndarray,
        gi: np.ndarray,
        label: np.ndarray,
        w: np.ndarray,
        n_labels: int,
        part: np.ndarray | None,
    ) -> list[LabelMatrix]:
        """One matrix per part (part: [n] 0/1 per row, or None for one part), by one bincount
        of (part, group, label) where the invalid labels take an extra column."""
        n_parts = 1 if part is None else 2
        g, cols = groups.size, n_labels + 1
        col = np.where(label >= 0, label, n_labels)
        idx = gi * cols + col if part is None else (part.astype(np.int64) * g + gi) * cols + col
        flat = np.bincount(idx, weights=w, minlength=n_parts * g * cols).astype(np.int64)
        out = []
        for m in flat.reshape(n_parts, g, cols):
            out.append(cls(groups, np.ascontiguousarray(m[:, :n_labels]), m[:, n_labels].copy()))
        return out

    @property
    def totals(self) -> np.ndarray:
        """[G] rows per group, invalid labels included."""
        return self.valid.sum(1) + self.invalid

    def margins(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(present groups, their totals, present labels (-1 first if any invalid row), their
        totals): the sorted margins row-level code takes from the same rows."""
        tot = self.totals
        gp = tot > 0
        lab = self.valid.sum(0)
        lp = np.flatnonzero(lab > 0)
        n_bad = int(self.invalid.sum())
        labels = np.concatenate([[-1], lp]) if n_bad else lp
        counts = np.concatenate([[n_bad], lab[lp]]) if n_bad else lab[lp]
        return np.flatnonzero(gp), tot[gp], labels.astype(np.int64), counts.astype(np.int64)


def modes(valid: np.ndarray, default: int) -> np.ndarray:
    """[G] each row's most frequent label (ties: the smallest), `default` for empty rows."""
    if valid.shape[1] == 0:
        return np.full(valid.shape[0], default, np.int64)
    best = np.argmax(valid, axis=1)
    return np.where(valid.max(axis=1) > 0, best, default).astype(np.int64)


def shuffled(m: LabelMatrix, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the present groups, [G', L] valid-label counts) after a random permutation
    of the groups over the rows, drawn from the margins (rows with a label < 0 take part in
    the permutation and are dropped afterwards)."""
    gi, rk, labels, cl = m.margins()
    out = np.zeros((gi.size, m.valid.shape[1]), np.int64)
    if gi.size:
        t = C.shuffled_table(rk, cl, rng)
        ok = labels >= 0
        out[:, labels[ok]] = t[:, ok]
    return gi, out


def shuffled_modes(m: LabelMatrix, rng: np.random.Generator, default: int) -> np.ndarray:
    """[G] each group's mode after a random permutation of the groups over the rows."""
    gi, t = shuffled(m, rng)
    out = np.full(m.groups.size, default, np.int64)
    out[gi] = modes(t, default)
    return out


def consistency(valid: np.ndarray, min_count: int) -> float:
    """Share of the rows of the groups with >= min_count valid rows that carry their group's
    mode label (NaN when no group has that many)."""
    size = valid.sum(1)
    keep = size >= min_count
    if not keep.any():
        return float("nan")
    return float(valid.max(axis=1)[keep].sum() / size[keep].sum())


def _entropy(counts: np.ndarray) -> float:
    """Shannon entropy in nats of the distribution of the counts (zero cells skipped)."""
    c = counts[counts > 0].astype(np.float64)
    n = c.sum()
    return float(np.log(n) - (c * np.log(c)).sum() / n) if n > 0 else 0.0


def cond_entropy(joint: np.ndarray) -> tuple[float, float]:
    """(H(label | group), H(label)) in bits of a [G, L] count matrix."""
    if joint.sum() == 0:
        return 0.0, 0.0
    ln2 = np.log(2)
    h_group = _entropy(joint.sum(1))
    return (_entropy(joint) - h_group) / ln2, _entropy(joint.sum(0)) / ln2


def shuffled_joint(joint: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[G', L'] the table of a random permutation of the groups over the rows of `joint`
    (empty rows and columns dropped, as row-level code never sees them)."""
    r, c = joint.sum(1), joint.sum(0)
    return C.shuffled_table(r[r > 0], c[c > 0], rng)


def overlaps(members: np.ndarray) -> np.ndarray:
    """[S, S] |set a ∩ set b| of the sets whose sorted members are the rows of `members`."""
    s, k = members.shape
    out = np.zeros((s, s), np.int8)
    for i in range(k):
        for j in range(k):
            out += members[:, i][:, None] == members[:, j][None, :]
    return out
