"""Predictability of routing from context: how much the token id (and the previous id) fixes the
expert set.

Held-out accuracy of the rule "predict the most frequent top-k set seen with this token id"
(and with this (previous, current) id pair, backing off to the token id, then to the globally
most frequent set), fitted on training documents and scored on held-out documents (split by
document, never by row). Chance: 1/C(E,k) for uniform routing, and the majority baseline (always
the most frequent set); shuffle baseline: the same rule fitted on token ids permuted in the
training part. Conditional entropy H(set | token) (plug-in, tokens with N(x) >= min_count) vs
H(set). The OpenMoE comparison (Xue et al. 2024 §4, "context-independent specialisation": routing
follows token ids, not positions) measures how concentrated the top-1 expert is within groups of
equal token id vs groups of equal position: count-weighted mean of the group's most common top-1
share, and the normalised conditional entropy H(top1 | group)/H(top1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.analysis._common import (
    MAX_DENSE_SETS,
    all_sets,
    check_trace,
    doc_split,
    entropy,
    layer_sets,
    mode_by_group,
    n_sets,
    token_mask,
    top1,
)
from moelab.errors import AnalysisError
from moelab.trace.schema import Trace


@dataclass
class PredictabilityResult:
    """Per-layer held-out accuracies (exact set match) and set-overlap recalls."""

    acc_token: np.ndarray  # [L] most frequent set given token id
    acc_bigram: np.ndarray  # [L] given (previous, current) ids, with back-off
    acc_majority: np.ndarray  # [L] always the training-set most frequent set
    acc_token_shuffled: np.ndarray  # [L] token rule fitted on permuted token ids
    recall_token: np.ndarray  # [L] mean |predicted ∩ true| / k
    recall_bigram: np.ndarray
    chance: float  # 1 / C(E,k)
    n_train: int
    n_test: int
    cond_entropy: np.ndarray  # [L] H(set | token) bits (tokens with N >= min_count)
    set_entropy: np.ndarray  # [L] H(set) bits over the same rows
    cond_entropy_shuffled: np.ndarray  # [L] H(set | permuted token) bits: plug-in bias level


def _fit_predict(
    key_train: np.ndarray, y_train: np.ndarray, key_test: np.ndarray, n_keys: int, n_labels: int
) -> np.ndarray:
    """Predicted label per test row from the per-key mode in training (-1 where key unseen)."""
    mode, _, _ = mode_by_group(key_train, y_train, n_keys, n_labels)
    out = np.full(key_test.shape[0], -1, dtype=np.int64)
    ok = key_test >= 0
    out[ok] = mode[key_test[ok]]
    return out


def _overlap(pred_sets: np.ndarray, true_ids: np.ndarray, table: np.ndarray, k: int) -> float:
    """Mean |pred ∩ true| / k for predicted set indices (rows of `table`) against true [n, k] ids."""
    if pred_sets.size == 0:
        return 0.0
    p = table[np.maximum(pred_sets, 0)]
    hit = np.zeros(true_ids.shape[0], dtype=np.int64)
    for i in range(k):
        hit += np.any(p == true_ids[:, [i]], axis=1) & (pred_sets >= 0) & (true_ids[:, i] >= 0)
    return float(hit.mean() / k)


def _cond_entropy(group: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    """(H(label | group), H(label)) in bits, plug-in; labels and groups are non-negative ints."""
    n = group.size
    g, y = group.astype(np.int64), label.astype(np.int64)
    ng, ny = int(g.max()) + 1, int(y.max()) + 1
    if ng * ny > 20_000_000:
        _, g = np.unique(g, return_inverse=True)
        _, y = np.unique(y, return_inverse=True)
        ng, ny = int(g.max()) + 1, int(y.max()) + 1
    cy = np.bincount(y, minlength=ny)
    cg = np.bincount(g, minlength=ng)
    if ng * ny <= 20_000_000:
        cj = np.bincount(g * ny + y, minlength=ng * ny)
    else:
        _, cj = np.unique(g * ny + y, return_counts=True)
    ln2 = np.log(2)
    hy = float(entropy(cy / n)) / ln2
    return float(entropy(cj / n) - entropy(cg / n)) / ln2, hy


def predictability(
    trace: Trace, test_fraction: float = 0.2, min_count: int = 10, seed: int = 0
) -> PredictabilityResult:
    """Held-out set accuracy from token id and (prev, cur) ids; H(set | token) per layer."""
    check_trace(trace, "predictability")
    num_l, num_e, k = trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k
    mask = token_mask(trace)
    test = doc_split(trace.doc_id, test_fraction, seed)
    if not test.any() or test.all():
        raise AnalysisError(
            f"predictability: needs at least 2 documents to hold some out; the trace has"
            f" {np.unique(trace.doc_id).size}"
        )
    tr, te = mask & ~test, mask & test
    if not tr.any() or not te.any():
        raise AnalysisError("predictability: the train or held-out part has no non-BOS tokens")
    s = n_sets(num_e, k)
    # token keys: shared vocabulary index over train+test; unseen-in-train keys simply have no mode
    vocab, tok = np.unique(trace.token_id, return_inverse=True)
    tok = tok.astype(np.int64)
    prev = trace.prev_row()
    ptok = np.where(prev >= 0, tok[np.maximum(prev, 0)], -1)
    pair_raw = np.where(ptok >= 0, ptok * vocab.size + tok, -1)
    pu, pinv = np.unique(pair_raw, return_inverse=True)
    pair = np.where(pair_raw >= 0, pinv.astype(np.int64) - int(pu[0] < 0), -1)
    n_pairs = int(pu.size - (pu[0] < 0))
    rng = np.random.default_rng(seed)
    tr_idx, te_idx = np.flatnonzero(tr), np.flatnonzero(te)
    tok_shuf = rng.permutation(tok[tr_idx])
    res = {key: np.zeros(num_l) for key in ("t", "b", "m", "ts", "rt", "rb", "h", "hs", "hh")}
    cnt = np.bincount(tok[mask], minlength=vocab.size)
    frequent = mask & (cnt[tok] >= min_count)
    dense = s <= MAX_DENSE_SETS
    table = all_sets(num_e, k) if dense else None
    for layer in range(num_l):
        ids = trace.expert_ids[:, layer, :]
        y = layer_sets(trace, layer).astype(np.int64)
        ytr, yte = y[tr_idx], y[te_idx]
        if dense:
            lab, ytr_c = np.arange(s), ytr
        else:  # compress labels to the ones seen in training for the mode table
            lab, first, ytr_c = np.unique(ytr, return_index=True, return_inverse=True)
            ytr_c = np.where(ytr >= 0, ytr_c, -1)
        valid = ytr_c[ytr_c >= 0]
        glob = int(lab[np.bincount(valid).argmax()]) if valid.size else -1
        p_tok = _fit_predict(tok[tr_idx], ytr_c, tok[te_idx], vocab.size, lab.size)
        p_tok = np.where(p_tok >= 0, lab[np.maximum(p_tok, 0)], glob)
        p_big = _fit_predict(pair[tr_idx], ytr_c, pair[te_idx], max(n_pairs, 1), lab.size)
        p_big = np.where(p_big >= 0, lab[np.maximum(p_big, 0)], p_tok)
        p_shuf = _fit_predict(tok_shuf, ytr_c, tok[te_idx], vocab.size, lab.size)
        p_shuf = np.where(p_shuf >= 0, lab[np.maximum(p_shuf, 0)], glob)
        res["t"][layer] = np.mean(p_tok == yte)
        res["b"][layer] = np.mean(p_big == yte)
        res["m"][layer] = np.mean(yte == glob)
        res["ts"][layer] = np.mean(p_shuf == yte)
        tid = ids[te_idx].astype(np.int64)
        if dense:
            res["rt"][layer] = _overlap(p_tok, tid, table, k)
            res["rb"][layer] = _overlap(p_big, tid, table, k)
        else:  # members of each training label from its first training row; index by position
            tab = np.sort(ids[tr_idx[first]].astype(np.int64), axis=1)
            res["rt"][layer] = _overlap(np.searchsorted(lab, p_tok), tid, tab, k)
            res["rb"][layer] = _overlap(np.searchsorted(lab, p_big), tid, tab, k)
        fr = np.flatnonzero(frequent & (y >= 0))
        if fr.size:
            res["h"][layer], res["hh"][layer] = _cond_entropy(tok[fr], y[fr])
            res["hs"][layer] = _cond_entropy(rng.permutation(tok[fr]), y[fr])[0]
    return PredictabilityResult(
        res["t"],
        res["b"],
        res["m"],
        res["ts"],
        res["rt"],
        res["rb"],
        1.0 / s,
        int(tr_idx.size),
        int(te_idx.size),
        res["h"],
        res["hh"],
        res["hs"],
    )


@dataclass
class SpreadResult:
    """OpenMoE comparison: top-1 concentration within token-id groups vs position groups."""

    consistency_token: np.ndarray  # [L] weighted mean share of the group's most common top-1
    consistency_position: np.ndarray  # [L]
    consistency_shuffled: np.ndarray  # [L] token groups with permuted labels
    norm_cond_entropy_token: np.ndarray  # [L] H(top1 | token) / H(top1); 1 = no information
    norm_cond_entropy_position: np.ndarray  # [L]
    chance: float  # 1/E (uniform routing, large groups)
    min_count: int


def spread_token_vs_position(trace: Trace, min_count: int = 10, seed: int = 0) -> SpreadResult:
    """Does the token id or the position decide the top-1 expert? (OpenMoE §4)."""
    check_trace(trace, "spread by token id vs position")
    num_l, num_e = trace.meta.num_layers, trace.meta.num_experts
    mask = token_mask(trace)
    _, tok = np.unique(trace.token_id[mask], return_inverse=True)
    _, pos = np.unique(trace.position[mask], return_inverse=True)
    tok, pos = tok.astype(np.int64), pos.astype(np.int64)
    rng = np.random.default_rng(seed)
    shuf = rng.permutation(tok)
    out = {key: np.zeros(num_l) for key in ("ct", "cp", "cs", "ht", "hp")}

    def consistency(g: np.ndarray, y: np.ndarray) -> float:
        ng = int(g.max()) + 1 if g.size else 0
        _, mc, size = mode_by_group(g, y, ng, num_e)
        keep = size >= min_count
        return float(mc[keep].sum() / size[keep].sum()) if keep.any() else float("nan")

    tcount = np.bincount(tok)
    pcount = np.bincount(pos)
    for layer in range(num_l):
        y = top1(trace, layer)[mask].astype(np.int64)
        out["ct"][layer] = consistency(tok, y)
        out["cp"][layer] = consistency(pos, y)
        out["cs"][layer] = consistency(shuf, y)
        ft, fp = (tcount[tok] >= min_count) & (y >= 0), (pcount[pos] >= min_count) & (y >= 0)
        for key, g, f in (("ht", tok, ft), ("hp", pos, fp)):
            if f.any():
                h, hy = _cond_entropy(g[f], y[f])
                out[key][layer] = h / hy if hy > 0 else 0.0
            else:
                out[key][layer] = float("nan")
    return SpreadResult(
        out["ct"], out["cp"], out["cs"], out["ht"], out["hp"], 1.0 / num_e, min_count
    )
