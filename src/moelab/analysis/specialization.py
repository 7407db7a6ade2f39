"""Expert specialisation: by domain, by vocabulary (input and next token), top tokens per expert,
and by coarse token class read from the decoded token string (no external tagger).

Shares are "share of the group's tokens whose top-k includes expert e" (uniform = k/E), as in
the per-domain histograms of Mixtral (Jiang et al. 2024, Fig. 7) and OLMoE (Muennighoff et al.
2024 §5.3; vocabulary specialisation N(x,e)/N(x) for input and predicted tokens, Eq. 6-7 there).
Ratios over rare tokens mislead, so vocabulary statistics keep only tokens with N(x) >=
min_count. Each group view carries a summary "specialisation" per layer: the count-weighted mean
over groups of the total-variation distance between the group's expert distribution and the
overall one (0 = no specialisation), with a shuffle baseline (group labels permuted), which
measures what finite samples alone give.
"""

from __future__ import annotations

import keyword
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from moelab.analysis._common import check_trace, token_mask
from moelab.errors import AnalysisError
from moelab.trace.schema import NO_EXPERT, Trace

TOKEN_CLASSES = ("whitespace", "punctuation", "digits", "identifier", "letters", "other")


@dataclass
class GroupShares:
    """Per-group expert shares share[G, L, E] = N(g, e) / N(g), with group names and counts."""

    names: list[str]
    counts: np.ndarray  # [G] tokens per group
    share: np.ndarray  # [G, L, E]
    overall: np.ndarray  # [L, E] share over all tokens used
    chance: float  # k/E
    specialization: np.ndarray  # [L] weighted mean total-variation distance to overall
    specialization_shuffled: np.ndarray  # [L] same with group labels shuffled
    mean_max_share: np.ndarray  # [L] count-weighted mean of max_e share (chance -> k/E)
    mean_max_share_shuffled: np.ndarray  # [L]


def group_shares(ids: np.ndarray, group: np.ndarray, n_groups: int, num_experts: int) -> np.ndarray:
    """[G, L, E] share of each group's rows whose slots include expert e (ids [n, L, k])."""
    n, num_l, k = ids.shape
    size = np.bincount(group, minlength=n_groups).astype(np.float64)
    out = np.zeros((n_groups, num_l, num_experts))
    ge = group.astype(np.int64)[:, None] * num_experts  # [n, 1]
    overflow = n_groups * num_experts
    for layer in range(num_l):
        e = ids[:, layer, :]
        code = ge + e
        code[e == NO_EXPERT] = overflow
        c = np.bincount(code.ravel(), minlength=overflow + 1)[:overflow]
        out[:, layer, :] = c.reshape(n_groups, num_experts)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(size[:, None, None] > 0, out / np.maximum(size, 1)[:, None, None], 0.0)


def _summaries(
    share: np.ndarray, counts: np.ndarray, overall: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    w = counts / max(counts.sum(), 1)
    tv = 0.5 * np.abs(share - overall[None]).sum(-1) / max(k, 1)  # [G, L]
    return (w[:, None] * tv).sum(0), (w[:, None] * share.max(-1)).sum(0)


def _group_view(
    trace: Trace, rows: np.ndarray, group: np.ndarray, names: list[str], seed: int
) -> GroupShares:
    k, num_e = trace.meta.top_k, trace.meta.num_experts
    ids = trace.expert_ids[rows]
    n_groups = len(names)
    counts = np.bincount(group, minlength=n_groups).astype(np.float64)
    share = group_shares(ids, group, n_groups, num_e)
    overall = np.tensordot(counts, share, axes=1) / max(counts.sum(), 1.0)  # count-weighted mean
    spec, mms = _summaries(share, counts, overall, k)
    shuf = np.random.default_rng(seed).permutation(group)
    s_share = group_shares(ids, shuf, n_groups, num_e)
    s_spec, s_mms = _summaries(s_share, counts, overall, k)
    return GroupShares(names, counts, share, overall, k / num_e, spec, s_spec, mms, s_mms)


def by_domain(trace: Trace, seed: int = 0) -> GroupShares:
    """Expert shares per domain (uniform k/E), with a shuffled-domain baseline."""
    check_trace(trace, "specialisation by domain")
    rows = token_mask(trace)
    codes, group = np.unique(trace.domain[rows], return_inverse=True)
    dn = trace.meta.domains
    names = [dn[c] if 0 <= c < len(dn) else f"domain {c}" for c in codes.tolist()]
    return _group_view(trace, rows, group.astype(np.int64), names, seed)


def next_token_ids(trace: Trace) -> np.ndarray:
    """[N] token id of the next row of the same document, or -1 at a document end."""
    prev = trace.prev_row()
    nxt = np.full(trace.num_tokens, -1, dtype=np.int64)
    has = np.flatnonzero(prev >= 0)
    nxt[prev[has]] = trace.token_id[has]
    return nxt


@dataclass
class VocabShares:
    """Vocabulary specialisation N(x,e)/N(x) for tokens with N(x) >= min_count."""

    target: str  # "input" | "next"
    token_ids: np.ndarray  # [V']
    view: GroupShares  # groups = token ids in token_ids order
    min_count: int
    n_dropped: int  # distinct tokens below min_count


def by_vocab(
    trace: Trace, target: str = "input", min_count: int = 10, seed: int = 0
) -> VocabShares:
    """N(x, e)/N(x) per token x (input token or next token) with N(x) >= min_count."""
    check_trace(trace, "specialisation by vocabulary")
    if min_count < 1:
        raise AnalysisError(f"specialisation by vocabulary: min_count={min_count}; expected >= 1")
    rows = token_mask(trace)
    if target == "input":
        lab = trace.token_id.astype(np.int64)
    elif target == "next":
        lab = next_token_ids(trace)
        rows = rows & (lab >= 0)
    else:
        raise AnalysisError(
            f"specialisation by vocabulary: target={target!r}; expected 'input' or 'next'"
        )
    uniq, inv, cnt = np.unique(lab[rows], return_inverse=True, return_counts=True)
    keep = cnt >= min_count
    if not keep.any():
        raise AnalysisError(
            f"specialisation by vocabulary: no token occurs at least min_count={min_count} times"
            f" (most frequent: {int(cnt.max()) if cnt.size else 0}); lower min_count or trace more text"
        )
    remap = np.full(uniq.size, -1, dtype=np.int64)
    remap[keep] = np.arange(int(keep.sum()))
    g = remap[inv]
    sel = np.flatnonzero(rows)[g >= 0]
    rows2 = np.zeros_like(rows)
    rows2[sel] = True
    view = _group_view(trace, rows2, g[g >= 0], [str(int(t)) for t in uniq[keep]], seed)
    return VocabShares(target, uniq[keep], view, min_count, int((~keep).sum()))


def make_decoder(tokenizer: Any) -> Callable[[int], str]:
    """A function id -> decoded string from a callable, a `tokenizers.Tokenizer` or an HF tokenizer."""
    if tokenizer is None:
        raise AnalysisError("a tokenizer is needed to decode token strings; pass tokenizer=...")
    if hasattr(tokenizer, "decode"):
        return lambda i: tokenizer.decode([int(i)])
    if callable(tokenizer):
        return lambda i: str(tokenizer(int(i)))
    raise AnalysisError(
        f"tokenizer of type {type(tokenizer).__name__} has no decode(); pass a callable"
    )


def top_tokens(
    vocab: VocabShares, layer: int, top: int = 10, decode: Callable[[int], str] | None = None
) -> list[list[tuple[int, str, float, int]]]:
    """Per expert of `layer`: the `top` tokens with the highest N(x,e)/N(x) (ties by N(x)),
    as (token id, decoded string or '', share, N(x))."""
    share = vocab.view.share[:, layer, :]  # [V', E]
    counts = vocab.view.counts
    out = []
    for e in range(share.shape[1]):
        order = np.lexsort((-counts, -share[:, e]))[:top]
        out.append(
            [
                (
                    int(vocab.token_ids[i]),
                    decode(int(vocab.token_ids[i])) if decode else "",
                    float(share[i, e]),
                    int(counts[i]),
                )
                for i in order
            ]
        )
    return out


def token_class(text: str) -> str:
    """Coarse class of a decoded token string: whitespace, punctuation, digits, identifier
    (code-like: contains '_', inner capitals, or a Python keyword), letters, or other."""
    if text == "":
        return "other"
    t = text.strip()
    if t == "":
        return "whitespace"
    if all(unicodedata.category(c)[0] in "PS" for c in t):
        return "punctuation"
    if t.isdigit():
        return "digits"
    if t.isidentifier() and (
        "_" in t
        or keyword.iskeyword(t)
        or any(c.isupper() for c in t[1:])
        and any(c.islower() for c in t)
    ):
        return "identifier"
    if t.isalpha():
        return "letters"
    return "other"


def by_token_class(trace: Trace, decode: Callable[[int], str], seed: int = 0) -> GroupShares:
    """Expert shares per token class of the decoded input token (uniform k/E)."""
    check_trace(trace, "specialisation by token class")
    rows = token_mask(trace)
    uniq, inv = np.unique(trace.token_id[rows], return_inverse=True)
    cls_of = np.array(
        [TOKEN_CLASSES.index(token_class(decode(int(t)))) for t in uniq], dtype=np.int64
    )
    group = cls_of[inv]
    present = np.unique(group)
    remap = np.full(len(TOKEN_CLASSES), -1, dtype=np.int64)
    remap[present] = np.arange(present.size)
    return _group_view(trace, rows, remap[group], [TOKEN_CLASSES[c] for c in present], seed)
