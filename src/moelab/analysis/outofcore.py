"""The count-based analyses computed out of core: GROUP BY tables from an engine (DuckDB or
Spark, moelab.analysis.engines) over the shards, then small numpy post-processing.

Each function returns the same dataclass as its in-memory counterpart (usage.usage,
transitions.transition_summary, ...), with equal counts and equal deterministic statistics
(tests/analysis/test_analysis_outofcore.py). Shuffle baselines cannot permute rows that are
never loaded; they are drawn from the margins instead: a random permutation of one side of a
contingency table gives a table distributed as sequential multivariate hypergeometric draws
from the margins (counts.shuffled_table), a random partner drawn with replacement gives
multinomial rows. They have the distribution of the in-memory baselines, not their values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from moelab.analysis import counts as C
from moelab.analysis import token_matrix as TM
from moelab.analysis._common import (
    MAX_DENSE_SETS,
    all_sets,
    doc_split,
    entropy,
    mutual_information,
    n_sets,
    nmi,
)
from moelab.analysis.coactivation import Coactivation, from_counts
from moelab.analysis.dense_counts import CountSpec
from moelab.analysis.engines import Engine
from moelab.analysis.predictability import PredictabilityResult, SpreadResult
from moelab.analysis.repeat import (
    RepeatResult,
    empty_tallies,
    load_chances,
    overlap_count,
    repeat_result,
)
from moelab.analysis.specialization import (
    TOKEN_CLASSES,
    GroupShares,
    VocabShares,
    _summaries,
    token_class,
)
from moelab.analysis.transitions import TransitionMatrix, TransitionSummary, _derive
from moelab.analysis.usage import BalanceResult, RoutingEntropyResult, UsageResult, balance_metrics
from moelab.errors import AnalysisError
from moelab.trace.schema import TraceMeta

# -- helpers ---------------------------------------------------------------------------------


def _check(eng: Engine, what: str) -> None:
    m = eng.meta
    if m.num_layers == 0 or m.top_k == 0:
        raise AnalysisError(
            f"{what}: the trace has {m.num_layers} MoE layers and k={m.top_k};"
            " expected at least one layer and one slot"
        )


def expert_counts(st: C.States, num_e: int, weighted: bool = False) -> np.ndarray:
    """[E] slot counts (or summed weights) of a States table (empty slots skipped)."""
    out = np.zeros(num_e, np.float64)
    for j in range(st.ids.shape[1]):
        ok = st.ids[:, j] >= 0
        w = st.wsum[ok, j] if weighted else st.count[ok].astype(np.float64)
        out += np.bincount(st.ids[ok, j], weights=w, minlength=num_e)[:num_e]
    return out


def _pairs(a: np.ndarray, b: np.ndarray, w: np.ndarray, na: int, nb: int) -> np.ndarray:
    """[na, nb] weighted counts of (a, b) skipping negatives (pair_counts with weights)."""
    ok = (a >= 0) & (b >= 0)
    return (
        np.bincount(a[ok] * nb + b[ok], weights=w[ok].astype(np.float64), minlength=na * nb)
        .reshape(na, nb)
        .astype(np.float64)
    )


def _expert_pairs(a_ids: np.ndarray, b_ids: np.ndarray, w: np.ndarray, num_e: int) -> np.ndarray:
    """[E, E] all k x k slot pairs weighted by w (expert_pair_counts over a count table)."""
    out = np.zeros((num_e, num_e))
    for i in range(a_ids.shape[1]):
        for j in range(b_ids.shape[1]):
            out += _pairs(a_ids[:, i], b_ids[:, j], w, num_e, num_e)
    return out


def _weighted_mi(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> tuple[float, float, float]:
    """Plug-in (I, H(X), H(Y)) in nats from labels with counts (sparse_mi over a count table)."""
    ok = (a >= 0) & (b >= 0) & (w > 0)
    a, b, w = a[ok], b[ok], w[ok].astype(np.float64)
    n = w.sum()
    if n == 0:
        return 0.0, 0.0, 0.0

    def h(x: np.ndarray) -> float:
        _, inv = C.unique_inverse(x)
        return float(entropy(np.bincount(inv.reshape(-1), weights=w) / n))

    hx, hy = h(a), h(b)
    _, ia = C.unique_inverse(a)
    _, ib = C.unique_inverse(b)
    hxy = h(ia.reshape(-1).astype(np.int64) * (int(ib.max()) + 1) + ib.reshape(-1))
    return max(hx + hy - hxy, 0.0), hx, hy


def _state_index(st: C.States) -> tuple[np.ndarray, np.ndarray]:
    """(distinct states [U, k+1] (ids, top1), index of each table row into them)."""
    return C.codes(*st.ids.T, st.top1)


# -- usage and balance -----------------------------------------------------------------------


class StoreCounts:
    """Memo of the count tables one `analyze` run shares between analyses (one store)."""

    def __init__(self, eng: Engine) -> None:
        self.eng = eng
        self._states: list[C.States] | None = None
        self._pairs: dict[tuple[int, int], tuple[C.States, C.States]] = {}
        self._docs: np.ndarray | None = None

    def states(self) -> list[C.States]:
        """Per-layer state counts over non-BOS rows (with weight sums)."""
        if self._states is None:
            self._states = C.layer_states(self.eng, weights=True)
        return self._states

    def pair(self, a: int, b: int) -> tuple[C.States, C.States]:
        """Joint state counts of layers a and b (memoised)."""
        if (a, b) not in self._pairs:
            self._pairs[(a, b)] = C.pair_states(self.eng, a, b)
        return self._pairs[(a, b)]

    def prefetch_pairs(self, n: int) -> None:
        """Fetch every (l, l+n) joint table not memoised yet (batched per engine)."""
        want = [(a, a + n) for a in range(self.eng.meta.num_layers - n)]
        want = [p for p in want if p not in self._pairs]
        for p, ab in zip(want, C.pair_states_many(self.eng, want), strict=True):
            self._pairs[p] = ab

    def n_tokens(self) -> int:
        """Non-BOS rows."""
        return self.states()[0].total

    def n_tokens_all(self) -> int:
        """All rows, BOS included."""
        return C.scalar(self.eng, "SELECT COUNT(*) AS n FROM trace")

    def docs(self) -> np.ndarray:
        """Sorted distinct document ids."""
        if self._docs is None:
            self._docs = C.distinct_docs(self.eng)
        return self._docs


def usage(
    sc: StoreCounts,
    normalize: str = "slots",
    weighted: bool = False,
    token_id: int | None = None,
    prev_ids: list[int] | None = None,
    min_count: int = 1,
    seed: int = 0,
) -> UsageResult:
    """usage.usage out of core: all tokens, one token id, or a token id after previous ids."""
    if normalize not in ("slots", "tokens"):
        raise AnalysisError(f"usage: normalize={normalize!r}; expected 'slots' or 'tokens'")
    eng, m = sc.eng, sc.eng.meta
    _check(eng, "usage")
    num_e, k = m.num_experts, m.top_k
    pool = sc.states()
    desc = "all tokens"
    if token_id is None:
        if prev_ids:
            raise AnalysisError(
                "usage: prev_ids given without token_id; pass the current token id too"
            )
        sel = pool
    else:
        sel = _token_states(sc, int(token_id), list(prev_ids or []))
        desc = f"token id {token_id}" + (f" after {list(prev_ids)}" if prev_ids else "")
    n = sel[0].total if sel else 0
    if n == 0:
        raise AnalysisError("usage: no non-BOS tokens in the trace")
    if n < min_count:
        raise AnalysisError(
            f"usage: only {n} tokens match ({desc}); min_count={min_count} — lower min_count or"
            " trace more text"
        )
    counts = np.stack([expert_counts(s, num_e, weighted) for s in sel])

    def norm(c: np.ndarray) -> np.ndarray:
        if normalize == "slots":
            s = c.sum(axis=1, keepdims=True)
            return np.where(s > 0, c / np.where(s > 0, s, 1), 0.0)
        return c / n

    if normalize == "slots":
        chance = 1.0 / num_e
    elif weighted:
        chance = float(sum(s.wsum.sum() for s in sel) / (n * len(sel))) / num_e
    else:
        chance = k / num_e
    baseline = None
    if token_id is not None:  # a random subset of the same size: hypergeometric from the pool
        rng = np.random.default_rng(seed)
        rows = []
        for s in pool:
            take = min(n, s.total)
            draw = rng.multivariate_hypergeometric(s.count, take)
            sub = C.States({}, s.ids, s.top1, draw, s.wsum)
            if weighted:  # mean weight per state times the drawn rows
                sub.wsum = s.wsum / np.maximum(s.count, 1)[:, None] * draw[:, None]
            rows.append(expert_counts(sub, num_e, weighted))
        baseline = norm(np.stack(rows))
    return UsageResult(norm(counts), counts, normalize, weighted, chance, n, baseline, desc)


def _token_states(sc: StoreCounts, token_id: int, prev_ids: list[int]) -> list[C.States]:
    """Per-layer states of the non-BOS rows with `token_id` preceded by `prev_ids`."""
    eng, m = sc.eng, sc.eng.meta
    occurs = C.scalar(
        eng, f"SELECT COUNT(*) AS n FROM rt WHERE NOT is_bos AND token_id = {token_id}"
    )
    if occurs == 0:
        distinct = C.scalar(eng, "SELECT COUNT(DISTINCT token_id) AS n FROM trace")
        raise AnalysisError(
            f"usage: token id {token_id} does not occur in the trace ({sc.n_tokens_all()} tokens,"
            f" {distinct} distinct ids); pick an id that occurs"
        )
    joins = ""
    for i, pid in enumerate(reversed(prev_ids), start=1):
        joins += (
            f" JOIN rt b{i} ON b{i}.doc_id = a.doc_id AND b{i}.position = a.position - {i}"
            f" AND b{i}.token_id = {int(pid)}"
        )
    out = list(
        C.grouped_layers(
            eng,
            list(range(m.num_layers)),
            source=f"rw a{joins}",
            where=f"NOT a.is_bos AND a.token_id = {token_id}",
            prefix="a.",
            weights=True,
        )
    )
    if out[0].total == 0:
        raise AnalysisError(
            f"usage: token id {token_id} never follows previous ids {prev_ids} in the"
            " trace; pick a context that occurs"
        )
    return out


def balance(sc: StoreCounts, dead_fraction: float = 0.1, seed: int = 0) -> BalanceResult:
    """usage.balance out of core (the same seeded uniform-sample baseline)."""
    u = usage(sc, normalize="slots")
    mt = balance_metrics(u.share, dead_fraction)
    rng = np.random.default_rng(seed)
    slots = u.counts.sum(axis=1).astype(np.int64)
    num_e = sc.eng.meta.num_experts
    sample = np.stack([rng.multinomial(max(int(s), 1), np.full(num_e, 1.0 / num_e)) for s in slots])
    base = balance_metrics(sample / sample.sum(axis=1, keepdims=True), dead_fraction)
    chance = {"norm_entropy": 1.0, "max_over_mean": 1.0, "cv": 0.0, "gini": 0.0, "dead": 0.0}
    return BalanceResult(
        mt["norm_entropy"],
        mt["max_over_mean"],
        mt["cv"],
        mt["gini"],
        mt["dead"],
        dead_fraction,
        base,
        chance,
    )


def routing_entropy(eng: Engine, batch_rows: int = 65536) -> RoutingEntropyResult:
    """usage.routing_entropy by Arrow streaming over the shards' logit columns (one record
    batch in memory at a time)."""
    import pyarrow.parquet as pq

    from moelab.analysis._common import softmax_probs
    from moelab.trace.store import decode_floats

    m = eng.meta
    if not m.extra.get("logits", False):
        raise AnalysisError(
            "routing entropy needs full router logits, but this trace has none; retrace with"
            " logits=True (`moelab trace ... --logits`)"
        )
    num_l, num_e = m.num_layers, m.num_experts
    ent, top, n = np.zeros(num_l), np.zeros(num_l), 0
    cols = ["is_bos"] + [f"logits{li}" for li in range(num_l)]
    for s in eng.shards:
        for b in pq.ParquetFile(str(s)).iter_batches(batch_size=batch_rows, columns=cols):
            keep = ~b.column(0).to_numpy(zero_copy_only=False)
            if not keep.any():
                continue
            n += int(keep.sum())
            for li in range(num_l):
                x = decode_floats(b.column(li + 1), num_e)[keep].astype(np.float32)
                if m.score_fn == "sigmoid":
                    p = softmax_probs(x, "sigmoid")
                    ent[li] += entropy(p).sum()
                    top[li] += p.max(axis=-1).sum()
                    continue
                x -= x.max(axis=-1, keepdims=True)
                e = np.exp(x)
                z = e.sum(axis=-1)
                ent[li] += (np.log(z) - (e * x).sum(axis=-1) / z).sum(dtype=np.float64)
                top[li] += (1.0 / z).sum(dtype=np.float64)
    if n == 0:
        raise AnalysisError("routing entropy: no non-BOS tokens in the trace")
    denom = np.log(num_e) if num_e > 1 else 1.0
    return RoutingEntropyResult(ent / n / denom, top / n, 1.0)


# -- co-activation ---------------------------------------------------------------------------


def coactivation(
    sc: StoreCounts, layer: int, seed: int = 0, max_baseline: int = 50_000
) -> Coactivation:
    """coactivation.coactivation out of core (the same seeded load-weighted baseline)."""
    m = sc.eng.meta
    k, num_e = m.top_k, m.num_experts
    if k < 2:
        raise AnalysisError(f"co-activation: needs top_k >= 2 to form pairs; the trace has k={k}")
    if not -m.num_layers <= layer < m.num_layers:
        raise AnalysisError(
            f"co-activation: layer={layer} is out of range; the trace has {m.num_layers} MoE layers"
        )
    st = sc.states()[layer % m.num_layers]
    n = st.total
    if n == 0:
        raise AnalysisError("co-activation: no non-BOS tokens in the trace")
    counts = np.zeros((num_e, num_e))
    for i in range(k):
        for j in range(i + 1, k):
            counts += _pairs(st.ids[:, i], st.ids[:, j], st.count, num_e, num_e)
    counts = counts + counts.T
    np.fill_diagonal(counts, 0.0)
    n_e = expert_counts(st, num_e)
    return from_counts(layer % m.num_layers, counts, n_e, n, k, seed, max_baseline)


# -- transitions -----------------------------------------------------------------------------


def _check_pair(sc: StoreCounts, layer: int, n: int, what: str) -> int:
    num_l = sc.eng.meta.num_layers
    if not -num_l <= layer < num_l:
        raise AnalysisError(
            f"{what}: layer={layer} is out of range; the trace has {num_l} MoE layers"
        )
    layer %= num_l
    if n < 1 or layer + n >= num_l:
        raise AnalysisError(
            f"{what}: layer {layer} -> {layer}+{n} is outside the {num_l} MoE layers;"
            " expected n >= 1 and layer + n < num_layers"
        )
    return layer


def _shuffled_pairs(
    a: C.States, b: C.States, rng: np.random.Generator
) -> tuple[C.States, C.States]:
    """The joint table after randomly re-pairing the rows of side b (margins kept)."""
    ua, ia = _state_index(a)
    ub, ib = _state_index(b)
    ra = np.bincount(ia, weights=a.count, minlength=len(ua)).astype(np.int64)
    cb = np.bincount(ib, weights=a.count, minlength=len(ub)).astype(np.int64)
    t = C.shuffled_table(ra, cb, rng)
    ii, jj = np.nonzero(t)
    k = a.ids.shape[1]
    cnt = t[ii, jj]
    return (
        C.States({}, ua[ii, :k], ua[ii, k], cnt),
        C.States({}, ub[jj, :k], ub[jj, k], cnt),
    )


def expert_transitions(sc: StoreCounts, layer: int, n: int = 1, seed: int = 0) -> TransitionMatrix:
    """transitions.expert_transitions out of core (baseline drawn from the margins)."""
    layer = _check_pair(sc, layer, n, "expert transitions")
    num_e = sc.eng.meta.num_experts
    a, b = sc.pair(layer, layer + n)
    counts = _expert_pairs(a.ids, b.ids, a.count, num_e)
    sa, sb = _shuffled_pairs(a, b, np.random.default_rng(seed))
    base = _expert_pairs(sa.ids, sb.ids, sa.count, num_e)
    joint, cond, lf, nm = _derive(counts)
    return TransitionMatrix(layer, n, counts, joint, cond, lf, nm, _derive(base)[2], "expert")


def set_transitions(sc: StoreCounts, layer: int, n: int = 1, seed: int = 0) -> TransitionMatrix:
    """transitions.set_transitions out of core (baseline drawn from the margins)."""
    layer = _check_pair(sc, layer, n, "set transitions")
    num_e, k = sc.eng.meta.num_experts, sc.eng.meta.top_k
    s = n_sets(num_e, k)
    if s > MAX_DENSE_SETS:
        raise AnalysisError(
            f"set transitions: C({num_e},{k}) = {s} sets is too many for a dense matrix"
            f" (limit {MAX_DENSE_SETS}); use expert_transitions or transition_summary instead"
        )
    a, b = sc.pair(layer, layer + n)
    counts = _pairs(a.sets(num_e), b.sets(num_e), a.count, s, s)
    sa, sb = _shuffled_pairs(a, b, np.random.default_rng(seed))
    base = _pairs(sa.sets(num_e), sb.sets(num_e), sa.count, s, s)
    joint, cond, lf, nm = _derive(counts)
    return TransitionMatrix(layer, n, counts, joint, cond, lf, nm, _derive(base)[2], "set")


def transition_summary(
    sc: StoreCounts, n: int = 1, seed: int = 0, progress: Callable[[], None] | None = None
) -> TransitionSummary:
    """transitions.transition_summary out of core (NMI, top-1 predictability, baselines)."""
    m = sc.eng.meta
    num_l, num_e, k = m.num_layers, m.num_experts, m.top_k
    if n < 1:
        raise AnalysisError(
            f"transition summary: n={n}: the layer distance must be >= 1 (MoE layer l to l+n)"
        )
    if n >= num_l:
        raise AnalysisError(
            f"transition summary: n={n} needs at least n+1 MoE layers; the trace has {num_l}"
        )
    if sc.n_tokens() == 0:
        raise AnalysisError("transition summary: no non-BOS tokens in the trace")
    rng = np.random.default_rng(seed)
    s = n_sets(num_e, k)
    out = {key: np.zeros(num_l - n) for key in ("ns", "nt", "nss", "nts", "p", "pc", "ps")}

    def stats(a: C.States, b: C.States) -> tuple[float, float, float]:
        sa, sb = a.sets(num_e), b.sets(num_e)
        if s <= MAX_DENSE_SETS:
            ns = nmi(*mutual_information(_pairs(sa, sb, a.count, s, s)))
        else:
            ns = nmi(*_weighted_mi(sa, sb, a.count))
        c = _pairs(a.top1, b.top1, a.count, num_e, num_e)
        nt = nmi(*mutual_information(c))
        tot = c.sum()
        return ns, nt, float(c.max(axis=1).sum() / tot) if tot > 0 else 0.0

    sc.prefetch_pairs(n)
    for layer in range(num_l - n):
        a, b = sc.pair(layer, layer + n)
        out["ns"][layer], out["nt"][layer], out["p"][layer] = stats(a, b)
        sa, sb = _shuffled_pairs(a, b, rng)
        out["nss"][layer], out["nts"][layer], out["ps"][layer] = stats(sa, sb)
        ok = b.top1 >= 0
        valid = np.bincount(b.top1[ok], weights=b.count[ok], minlength=num_e)
        out["pc"][layer] = valid.max() / max(valid.sum(), 1)
        if progress:
            progress()
    return TransitionSummary(
        n, out["ns"], out["nt"], out["nss"], out["nts"], out["p"], out["pc"], out["ps"]
    )


# -- repeat rate -----------------------------------------------------------------------------


def repeat_rate(
    sc: StoreCounts, seed: int = 0, progress: Callable[[], None] | None = None
) -> RepeatResult:
    """repeat.repeat_rate out of core (consecutive pairs by a self-join on doc_id, position)."""
    m = sc.eng.meta
    num_l, num_e, k = m.num_layers, m.num_experts, m.top_k
    rng = np.random.default_rng(seed)
    res = empty_tallies(num_l)
    n_pairs = 0
    layers = list(range(num_l))
    for layer, (a, b) in zip(layers, C.prev_pair_states_many(sc.eng, layers), strict=True):
        n_pairs = a.total
        if n_pairs == 0:
            raise AnalysisError(
                "repeat rate: no pair of consecutive non-BOS tokens in one document; trace longer"
                " texts"
            )
        ov = overlap_count(a.ids, b.ids)
        w = a.count.astype(np.float64)
        res["t"][layer] = w[a.top1 == b.top1].sum() / n_pairs
        res["a"][layer] = w[ov > 0].sum() / n_pairs
        res["m"][layer] = (w * ov).sum() / n_pairs
        pool = sc.states()[layer]
        ua, ia = _state_index(a)
        ra = np.bincount(ia, weights=a.count, minlength=len(ua)).astype(np.int64)
        t = C.multinomial_table(ra, pool.count / pool.total, rng)  # [Ua, pool states]
        ii, jj = np.nonzero(t)
        cnt = t[ii, jj].astype(np.float64)
        ovs = overlap_count(ua[ii, :k], pool.ids[jj])
        res["st"][layer] = cnt[ua[ii, k] == pool.top1[jj]].sum() / n_pairs
        res["sa"][layer] = cnt[ovs > 0].sum() / n_pairs
        res["sm"][layer] = (cnt * ovs).sum() / n_pairs
        ok = pool.top1 >= 0
        res["lt"][layer], res["la"][layer], res["lm"][layer] = load_chances(
            np.bincount(pool.top1[ok], weights=pool.count[ok], minlength=num_e),
            expert_counts(pool, num_e),
            pool.sets(num_e),
            pool.total,
            num_e,
            k,
            pool.count,
        )
        if progress:
            progress()
    return repeat_result(res, num_e, k, int(n_pairs))


# -- specialisation --------------------------------------------------------------------------


def _group_view(
    per_layer: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]],
    meta: TraceMeta,
    names: list[str],
    seed: int,
) -> GroupShares:
    """GroupShares from per_layer(l) = (group index of each table row, -1 = not counted; the
    rows' state codes; their counts) for each layer (built one at a time), G = len(names).
    A layer's (group, slot ids) counts are one dense [G, U] matrix when it fits (U distinct
    id tuples): the expert shares and the shuffle's margins are its products and sums."""
    num_l, k, num_e = meta.num_layers, meta.top_k, meta.num_experts
    n_groups = len(names)
    first = per_layer(0)
    g0, _, n0 = first
    counts = np.bincount(np.where(g0 >= 0, g0, n_groups), weights=n0, minlength=n_groups + 1)
    counts = counts[:n_groups].astype(np.float64)
    share = np.zeros((n_groups, num_l, num_e))
    s_share = np.zeros_like(share)
    rng = np.random.default_rng(seed)
    size = np.maximum(counts, 1)[:, None]
    for li in range(num_l):
        g, code, cnt = first if li == 0 else per_layer(li)
        us, iu = C.state_rows(code, meta)
        if TM.fits(n_groups + 1, us.shape[0]):
            cell = np.where(g >= 0, g, n_groups) * us.shape[0] + iu
            mat = np.bincount(cell, weights=cnt, minlength=(n_groups + 1) * us.shape[0])
            mat = mat.reshape(n_groups + 1, us.shape[0])[:n_groups]
            used = mat.sum(0) > 0  # the id tuples of the counted rows, in the same order
            mat, us = mat[:, used], us[used]
            slots = _slot_matrix(us, num_e)
            share[:, li, :] = (mat @ slots) / size
            cols = mat.sum(0).astype(np.int64)
        else:
            ok = g >= 0
            ids = C.decode_states(code[ok], meta)[0]
            share[:, li, :] = _group_expert(g[ok], ids, cnt[ok], n_groups, num_e) / size
            us, iu = C.codes(*ids.T)
            cols = np.bincount(iu, weights=cnt[ok], minlength=len(us)).astype(np.int64)
            slots = _slot_matrix(us, num_e)
        t = C.shuffled_table(counts.astype(np.int64), cols, rng)
        s_share[:, li, :] = (t @ slots) / size
    share = np.where(counts[:, None, None] > 0, share, 0.0)
    s_share = np.where(counts[:, None, None] > 0, s_share, 0.0)
    overall = np.tensordot(counts, share, axes=1) / max(counts.sum(), 1.0)
    spec, mms = _summaries(share, counts, overall, k)
    s_spec, s_mms = _summaries(s_share, counts, overall, k)
    return GroupShares(names, counts, share, overall, k / num_e, spec, s_spec, mms, s_mms)


def _slot_matrix(ids: np.ndarray, num_e: int) -> np.ndarray:
    """[U, E] how many slots of each row of ids [U, k] hold expert e (empty slots skipped): a
    table of counts over those rows times this matrix is _group_expert of the table."""
    out = np.zeros((ids.shape[0], num_e))
    rows = np.arange(ids.shape[0])
    for j in range(ids.shape[1]):
        ok = ids[:, j] >= 0
        np.add.at(out, (rows[ok], ids[ok, j]), 1.0)
    return out


def _group_expert(
    g: np.ndarray, ids: np.ndarray, w: np.ndarray, n_groups: int, num_e: int
) -> np.ndarray:
    out = np.zeros((n_groups, num_e))
    for j in range(ids.shape[1]):
        ok = ids[:, j] >= 0
        out += np.bincount(
            g[ok] * num_e + ids[ok, j],
            weights=w[ok].astype(np.float64),
            minlength=n_groups * num_e,
        ).reshape(n_groups, num_e)
    return out


def _key_tables(
    sc: StoreCounts,
    key: str,
    expr: str,
    source: str = "rt",
    where: str = "NOT is_bos",
    prefix: str = "",
    progress: Callable[[], None] | None = None,
) -> C.CompactTables:
    """Per layer, counts of (key expression, state), kept compact (decoded when read)."""
    layers = list(range(sc.eng.meta.num_layers))
    specs = [C.grouped_spec(li, {key: expr}, source, where, prefix) for li in layers]

    def tables() -> Iterator[dict[str, np.ndarray]]:
        # kept as the engine returns them (any row order: the specialisation views take
        # margins, bincounts and sorted uniques), decoded when read
        for res in C.counted(sc.eng, specs):
            yield res
            if progress:
                progress()

    return C.CompactTables(tables(), key, sc.eng.meta)


def by_domain(sc: StoreCounts, seed: int = 0) -> GroupShares:
    """specialization.by_domain out of core."""
    m = sc.eng.meta
    tabs = _key_tables(sc, "g", "domain")
    codes_ = np.unique(tabs[0].keys["g"])
    dn = m.domains
    names = [dn[c] if 0 <= c < len(dn) else f"domain {c}" for c in codes_.tolist()]

    def per(li: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g, code, n = tabs.raw(li)
        return _positions(codes_, g), code, n

    return _group_view(per, m, names, seed)


def _vocab_view(tabs: C.CompactTables, target: str, min_count: int, seed: int) -> VocabShares:
    g0, _, n0 = tabs.raw(0)
    uniq, inv = C.unique_inverse(g0)
    cnt = np.bincount(inv.reshape(-1), weights=n0, minlength=uniq.size).astype(np.int64)
    keep = cnt >= min_count
    if not keep.any():
        raise AnalysisError(
            f"specialisation by vocabulary: no token occurs at least min_count={min_count} times"
            f" (most frequent: {int(cnt.max()) if cnt.size else 0}); lower min_count or trace more text"
        )
    kept = uniq[keep]

    def per(li: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g, code, n = tabs.raw(li)
        return _positions(kept, g), code, n  # -1: a token below min_count

    view = _group_view(per, tabs.meta, [str(int(x)) for x in kept], seed)
    return VocabShares(target, kept, view, min_count, int((~keep).sum()))


def by_vocab(
    sc: StoreCounts,
    target: str = "input",
    min_count: int = 10,
    seed: int = 0,
    tables: C.CompactTables | None = None,
) -> VocabShares:
    """specialization.by_vocab out of core (input token, or the next token of the document)."""
    if min_count < 1:
        raise AnalysisError(f"specialisation by vocabulary: min_count={min_count}; expected >= 1")
    if target == "input":
        tabs = tables if tables is not None else _key_tables(sc, "g", "token_id")
    elif target == "next":  # rows that have a next token: the previous side of the pairs
        tabs = _key_tables(sc, "g", "token_id", "pr", "NOT p_bos", "p_")
    else:
        raise AnalysisError(
            f"specialisation by vocabulary: target={target!r}; expected 'input' or 'next'"
        )
    return _vocab_view(tabs, target, min_count, seed)


def by_token_class(
    sc: StoreCounts,
    decode: Callable[[int], str],
    seed: int = 0,
    tables: C.CompactTables | None = None,
) -> GroupShares:
    """specialization.by_token_class out of core."""
    m = sc.eng.meta
    tabs = tables if tables is not None else _key_tables(sc, "g", "token_id")
    uniq = np.unique(tabs[0].keys["g"])
    cls_of = np.array(
        [TOKEN_CLASSES.index(token_class(decode(int(t)))) for t in uniq], dtype=np.int64
    )
    present = np.unique(cls_of)
    remap = np.full(len(TOKEN_CLASSES), -1, dtype=np.int64)
    remap[present] = np.arange(present.size)

    def per(li: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g, code, n = tabs.raw(li)
        return remap[cls_of[_positions(uniq, g)]], code, n

    names = [TOKEN_CLASSES[c] for c in present]
    return _group_view(per, m, names, seed)


# -- predictability --------------------------------------------------------------------------


def _modes(
    key: np.ndarray, label: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(keys [G], mode label [G], mode count [G], size [G]) over rows with label >= 0; ties go
    to the smallest label (as mode_by_group)."""
    ok = (label >= 0) & (w > 0)
    key, label, w = key[ok], label[ok], w[ok]
    if key.size == 0:
        z = np.zeros(0, np.int64)
        return z, z, z, z
    u, inv = C.codes(key, label)  # sorted by (key, label)
    c = np.bincount(inv, weights=w, minlength=len(u)).astype(np.int64)
    first = np.ones(len(u), bool)
    first[1:] = u[1:, 0] != u[:-1, 0]
    starts = np.flatnonzero(first)
    group = np.cumsum(first) - 1
    cmax = np.maximum.reduceat(c, starts)
    best = np.flatnonzero(c == cmax[group])  # in label order within each key
    pick = best[np.r_[True, group[best[1:]] != group[best[:-1]]]]  # smallest label
    size = np.add.reduceat(c, starts)
    return u[starts, 0], u[pick, 1], c[pick], size


def _lookup(keys: np.ndarray, vals: np.ndarray, q: np.ndarray, default: np.ndarray) -> np.ndarray:
    """vals of q in sorted keys, `default` (array) where q is not a key."""
    if keys.size == 0:
        return default.copy()
    pos = _positions(keys, q)
    return np.where(pos >= 0, vals[np.maximum(pos, 0)], default)


def _positions(keys: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Index of each q in the sorted unique integer `keys`, -1 where absent (a dense table
    when the key range is small, else a binary search)."""
    if keys.size == 0 or q.size == 0:
        return np.full(q.size, -1, np.int64)
    lo, hi = int(min(keys[0], q.min())), int(max(keys[-1], q.max()))
    if hi - lo + 1 <= max(4 * (keys.size + q.size), 1 << 16):
        table = np.full(hi - lo + 1, -1, np.int64)
        table[keys - lo] = np.arange(keys.size)
        return table[q - lo]
    pos = np.minimum(np.searchsorted(keys, q), keys.size - 1)
    return np.where(keys[pos] == q, pos, -1)


def _hits(
    pred: np.ndarray,
    ids: np.ndarray,
    members: Callable[[np.ndarray], np.ndarray],
    y: np.ndarray | None = None,
    overlap: np.ndarray | None = None,
) -> np.ndarray:
    """[n] |members(pred) ∩ ids| per row (0 where pred < 0). With the rows' set indices y and
    the [S, S] set overlap matrix, rows with a valid set are one lookup."""
    if overlap is not None and y is not None:
        ok = (y >= 0) & (pred >= 0)
        hit = np.zeros(ids.shape[0], np.int64)
        hit[ok] = overlap[pred[ok], y[ok]]
        rest = np.flatnonzero(~ok)
        if rest.size:
            hit[rest] = _hits(pred[rest], ids[rest], members)
        return hit
    k = ids.shape[1]
    p = members(np.maximum(pred, 0))
    pcols = [np.ascontiguousarray(p[:, j]) for j in range(p.shape[1])]
    hit = np.zeros(ids.shape[0], np.int64)
    for i in range(k):
        col = ids[:, i]
        found = pcols[0] == col
        for pc in pcols[1:]:
            found |= pc == col
        hit += found & (col >= 0)
    return np.where(pred >= 0, hit, 0)


def _cond_entropy_w(group: np.ndarray, label: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(H(label | group), H(label)) in bits from a weighted table."""
    n = w.sum()
    _, ig = C.unique_inverse(group)
    _, iy = C.unique_inverse(label)
    _, ij = C.codes(group, label)
    cg = np.bincount(ig.reshape(-1), weights=w)
    cy = np.bincount(iy.reshape(-1), weights=w)
    cj = np.bincount(ij.reshape(-1), weights=w)
    ln2 = np.log(2)
    return float(entropy(cj / n) - entropy(cg / n)) / ln2, float(entropy(cy / n)) / ln2


def _shuffled_labels(
    key: np.ndarray, label: np.ndarray, w: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(key, label, count) rows of the table after permuting the keys over the rows."""
    uk, ik = C.unique_inverse(key)
    ul, il = C.unique_inverse(label)
    rk = np.bincount(ik.reshape(-1), weights=w, minlength=uk.size).astype(np.int64)
    cl = np.bincount(il.reshape(-1), weights=w, minlength=ul.size).astype(np.int64)
    t = C.shuffled_table(rk, cl, rng)
    ii, jj = np.nonzero(t)
    return uk[ii], ul[jj], t[ii, jj]


SHARED_PAIRS_SQL = (
    "SELECT bs_prev, bs_cur,"
    " CAST(row_number() OVER (ORDER BY bs_prev, bs_cur) - 1 AS BIGINT) AS bs_id FROM ("
    "SELECT p_token AS bs_prev, token_id AS bs_cur FROM pr WHERE NOT is_bos"
    " GROUP BY p_token, token_id"
    " HAVING SUM(CASE WHEN is_test THEN 1 ELSE 0 END) > 0"
    " AND SUM(CASE WHEN is_test THEN 0 ELSE 1 END) > 0) q"
)


def _mismatch() -> AnalysisError:
    return AnalysisError(
        "predictability: the held-out counts do not fit inside the full (token, state)"
        " table; the two tables come from different stores or filters"
    )


def _split_table(every: C.States, held: C.States) -> C.States:
    """The (tok, te, state) table from the (g = token, state) counts of all rows and of the
    held-out rows: training counts are the difference (a held-out group missing from the
    full table means the two did not come from the same rows: AnalysisError)."""
    n = every.count.size
    _, inv = C.codes(
        np.concatenate([every.keys["g"], held.keys["g"]]),
        np.concatenate([every.code, held.code]),
    )
    row_of = np.full(int(inv.max(initial=-1)) + 1, -1, np.int64)
    row_of[inv[:n]] = np.arange(n)
    pos = row_of[inv[n:]]
    train = every.count.copy()
    train[pos[pos >= 0]] -= held.count[pos >= 0]
    if (pos < 0).any() or (train < 0).any():
        raise _mismatch()
    keep = train > 0
    te = np.concatenate([np.zeros(int(keep.sum()), np.int64), np.ones(held.count.size, np.int64)])
    return C.States(
        {"tok": np.concatenate([every.keys["g"][keep], held.keys["g"]]), "te": te},
        np.concatenate([every.ids[keep], held.ids]),
        np.concatenate([every.top1[keep], held.top1]),
        np.concatenate([train[keep], held.count]),
        None,
        np.concatenate([every.code[keep], held.code]),
    )


@dataclass
class _TokenRule:
    """One layer's token-rule results: numerators over the held-out rows (correct sets, sets
    equal to the majority set, correct after shuffling the tokens, recalled experts), the
    conditional entropies, and the rule itself (tokens -> predicted set, else `default`)."""

    correct: float
    majority: float
    shuffled: float
    recalled: float
    h: float
    hh: float
    hs: float
    keys: np.ndarray
    pred: np.ndarray
    default: int


def _token_rule_rows(
    tt: C.States,
    ut: np.ndarray,
    it: np.ndarray,
    y: np.ndarray,
    glob: int,
    min_count: int,
    rng: np.random.Generator,
    members: Callable[[np.ndarray], np.ndarray],
    overlap: np.ndarray | None,
) -> _TokenRule:
    """_TokenRule from the rows of the (token, is_test, state) table (ut, it: its distinct
    tokens and each row's index into them)."""
    tok, te, w = tt.keys["tok"], tt.keys["te"] == 1, tt.count
    tr = ~te
    mk, mv, _, _ = _modes(tok[tr], y[tr], w[tr])
    p_tok = _lookup(mk, mv, tok, np.full(tok.size, glob))
    wt = np.where(te, w, 0).astype(np.float64)
    sk, sl, sw = _shuffled_labels(tok[tr], y[tr], w[tr], rng)
    msk, msv, _, _ = _modes(sk, sl, sw)
    p_shuf = _lookup(msk, msv, tok, np.full(tok.size, glob))
    recalled = (wt * _hits(p_tok, tt.ids, members, y, overlap)).sum()
    h = hh = hs = 0.0
    tc = np.bincount(it, weights=w, minlength=ut.size)
    fr = (tc[it] >= min_count) & (y >= 0)
    if fr.any():
        h, hh = _cond_entropy_w(tok[fr], y[fr], w[fr].astype(float))
        sk2, sl2, sw2 = _shuffled_labels(tok[fr], y[fr], w[fr], rng)
        hs = _cond_entropy_w(sk2, sl2, sw2.astype(float))[0]
    return _TokenRule(
        wt[p_tok == y].sum(),
        wt[y == glob].sum(),
        wt[p_shuf == y].sum(),
        recalled,
        h,
        hh,
        hs,
        mk,
        mv,
        glob,
    )


@dataclass
class _TokenParts:
    """One layer's (token, set) counts as dense training and held-out matrices over the sorted
    distinct tokens, plus the held-out rows without a valid set (slot by slot when scored)."""

    train: TM.LabelMatrix
    test: TM.LabelMatrix
    bad_tok: np.ndarray  # [b] index of each such row's token into train.groups
    bad_ids: np.ndarray  # [b, k] its expert ids
    bad_w: np.ndarray  # [b] its count

    @classmethod
    def of_table(cls, tt: C.States, n_sets_: int, num_e: int) -> _TokenParts | None:
        """From the (tok, te, state) table; None when the matrices would not be dense."""
        ut, it = C.unique_inverse(tt.keys["tok"])
        if not TM.fits(ut.size, n_sets_):
            return None
        te, y = tt.keys["te"] == 1, tt.sets(num_e)
        train, test = TM.LabelMatrix.split(ut, it, y, tt.count, n_sets_, te)
        bad = te & (y < 0)
        return cls(train, test, it[bad], tt.ids[bad], tt.count[bad])

    @classmethod
    def of_split(
        cls, every: C.States, held: C.States, n_sets_: int, num_e: int
    ) -> _TokenParts | None:
        """From the (g = token, state) tables of all rows and of the held-out rows: the
        training matrix is the difference (the dense form of _split_table, without its join
        of the two tables); None when the matrices would not be dense."""
        ut, ie = C.unique_inverse(every.keys["g"])
        if not TM.fits(ut.size, n_sets_):
            return None
        ih = _positions(ut, held.keys["g"])
        if (ih < 0).any():
            raise _mismatch()
        yh = held.sets(num_e)
        full = TM.LabelMatrix.indexed(ut, ie, every.sets(num_e), every.count, n_sets_)
        test = TM.LabelMatrix.indexed(ut, ih, yh, held.count, n_sets_)
        train = TM.LabelMatrix(ut, full.valid - test.valid, full.invalid - test.invalid)
        if (train.valid < 0).any() or (train.invalid < 0).any():
            raise _mismatch()
        bad = yh < 0
        return cls(train, test, ih[bad], held.ids[bad], held.count[bad])

    @property
    def n_train(self) -> int:
        return int(self.train.totals.sum())

    @property
    def n_test(self) -> int:
        return int(self.test.totals.sum())


def _token_rule_dense(
    parts: _TokenParts,
    min_count: int,
    rng: np.random.Generator,
    members: Callable[[np.ndarray], np.ndarray],
    overlap: np.ndarray,
) -> _TokenRule:
    """_token_rule_rows on the [tokens, sets] matrices of the train and held-out counts: the
    same numbers and the same seeded draws (the shuffles see the same margins in the same
    order)."""
    train, test = parts.train, parts.test
    glob = int(np.argmax(train.valid.sum(0)))
    p_tok = TM.modes(train.valid, glob)
    p_shuf = TM.shuffled_modes(train, rng, glob)
    rows = np.arange(train.groups.size)
    recalled = float((test.valid * overlap[p_tok]).sum())
    if parts.bad_w.size:  # held-out rows without a valid set: slot by slot
        hits = _hits(p_tok[parts.bad_tok], parts.bad_ids, members)
        recalled += float((parts.bad_w * hits).sum())
    h = hh = hs = 0.0
    joint = (train.valid + test.valid)[(train.totals + test.totals) >= min_count]
    if joint.sum() > 0:
        h, hh = TM.cond_entropy(joint)
        hs = TM.cond_entropy(TM.shuffled_joint(joint, rng))[0]
    return _TokenRule(
        float(test.valid[rows, p_tok].sum()),
        float(test.valid[:, glob].sum()),
        float(test.valid[rows, p_shuf].sum()),
        recalled,
        h,
        hh,
        hs,
        train.groups,
        p_tok,
        glob,
    )


def _bigram_gain(
    bg: C.States,
    pair_token: np.ndarray,
    rule: _TokenRule,
    num_e: int,
    n_sets_: int,
    members: Callable[[np.ndarray], np.ndarray],
    overlap: np.ndarray | None,
) -> tuple[float, float]:
    """(correct sets gained, recalled experts gained) over the held-out rows of the (bp =
    shared pair id, te, state) table when rows use their (previous, current) pair's training
    mode instead of the token rule (pair_token: each pair's current token)."""
    bp, bte, bw = bg.keys["bp"], bg.keys["te"] == 1, bg.count
    by = bg.sets(num_e)
    n_pairs = pair_token.size
    pt_pair = _lookup(rule.keys, rule.pred, pair_token, np.full(n_pairs, rule.default))
    if overlap is not None and rule.default >= 0 and TM.fits(n_pairs, n_sets_):
        train, test = TM.LabelMatrix.split(np.arange(n_pairs), bp, by, bw, n_sets_, bte)
        has = train.valid.sum(1) > 0
        p_big = np.where(has, np.argmax(train.valid, axis=1), pt_pair)
        rows = np.arange(n_pairs)
        corr = float(test.valid[rows, p_big].sum() - test.valid[rows, pt_pair].sum())
        gain = overlap[p_big].astype(np.int64) - overlap[pt_pair]
        hit = float((test.valid * gain).sum())
        bad = np.flatnonzero(bte & (by < 0))  # no valid set: slot by slot
        if bad.size:
            pb, pt = p_big[bp[bad]], pt_pair[bp[bad]]
            diff = _hits(pb, bg.ids[bad], members) - _hits(pt, bg.ids[bad], members)
            hit += float((bw[bad] * diff).sum())
        return corr, hit
    trb = ~bte
    pk, pv, _, _ = _modes(bp[trb], by[trb], bw[trb])
    pt_b = pt_pair[bp]
    p_big = _lookup(pk, pv, bp, pt_b)
    wbt = np.where(bte, bw, 0).astype(np.float64)
    corr = wbt[p_big == by].sum() - wbt[pt_b == by].sum()
    hb = _hits(p_big, bg.ids, members, by, overlap)
    hbt = _hits(pt_b, bg.ids, members, by, overlap)
    return float(corr), float((wbt * (hb - hbt)).sum())


def predictability(
    sc: StoreCounts,
    test_fraction: float = 0.2,
    min_count: int = 10,
    seed: int = 0,
    progress: Callable[[], None] | None = None,
    tables: C.CompactTables | None = None,
) -> PredictabilityResult:
    """predictability.predictability out of core (held-out documents, the same split;
    `tables`: the per-layer (token, state) tables of all rows when the caller holds them, so
    only the held-out rows are counted by the engine)."""
    eng, m = sc.eng, sc.eng.meta
    num_l, num_e, k = m.num_layers, m.num_experts, m.top_k
    docs = sc.docs()
    test_docs = docs[doc_split(docs, test_fraction, seed)]
    if test_docs.size == 0 or test_docs.size == docs.size:
        raise AnalysisError(
            "predictability: needs at least 2 documents to hold some out; the trace has"
            f" {docs.size}"
        )
    eng.set_test_docs(test_docs)
    s = n_sets(num_e, k)
    dense = s <= MAX_DENSE_SETS
    table = all_sets(num_e, k) if dense else None
    overlap = TM.overlaps(table) if dense else None
    rng = np.random.default_rng(seed)
    res = {key: np.zeros(num_l) for key in ("t", "b", "m", "ts", "rt", "rb", "h", "hs", "hh")}
    n_train = n_test = 0
    layers = list(range(num_l))
    # every statistic below takes modes, margins and lookups over sorted uniques, so the
    # engine's row order is kept (ordered=False)
    if tables is None:
        tts: Iterator[C.States] = C.grouped_layers(
            eng, layers, {"tok": "token_id", "te": "CAST(is_test AS INT)"}, ordered=False
        )
    else:  # the held-out rows' counts, the training counts as the difference
        tts = C.grouped_layers(
            eng, layers, {"g": "token_id"}, where="NOT is_bos AND is_test", ordered=False
        )
    # only (previous, current) pairs seen in both parts change a prediction: a held-out row
    # whose pair has no training rows backs off to the token rule (zero correction), and a
    # training pair never held out predicts nothing that is scored; each shared pair has an
    # id 0..P-1, so the pair tables are keyed by one small integer
    eng.define("bshared", SHARED_PAIRS_SQL)
    shared = eng.query("SELECT bs_id, bs_cur FROM bshared")
    pair_token = np.zeros(shared["bs_id"].size, np.int64)
    pair_token[shared["bs_id"].astype(np.int64)] = shared["bs_cur"].astype(np.int64)
    bgs = C.grouped_layers(
        eng,
        layers,
        {"bp": "bs_id", "te": "CAST(is_test AS INT)"},
        "pr JOIN bshared ON bs_prev = p_token AND bs_cur = token_id",
        ordered=False,
    )

    def tabulated(idx: np.ndarray) -> np.ndarray:
        return table[idx]

    for layer, tt, bg in zip(layers, tts, bgs, strict=True):
        parts = None
        if dense:
            parts = (
                _TokenParts.of_table(tt, s, num_e)
                if tables is None
                else _TokenParts.of_split(tables[layer], tt, s, num_e)
            )
        members = tabulated
        if parts is not None and parts.train.valid.sum() > 0:
            n_train, n_test = parts.n_train, parts.n_test
        else:
            parts = None
            tt = tt if tables is None else _split_table(tables[layer], tt)
            te = tt.keys["te"] == 1
            n_train, n_test = int(tt.count[~te].sum()), int(tt.count[te].sum())
            if not dense:  # the sets the rules predict are sets some row of tt holds

                def members(idx: np.ndarray, tt: C.States = tt) -> np.ndarray:
                    return _members_from(tt, num_e, idx)

        if n_train == 0 or n_test == 0:
            raise AnalysisError("predictability: the train or held-out part has no non-BOS tokens")
        if parts is not None:
            rule = _token_rule_dense(parts, min_count, rng, members, overlap)
        else:
            rule = _token_rule_table(tt, num_e, min_count, rng, members, overlap)
        res["t"][layer] = rule.correct / n_test
        res["m"][layer] = rule.majority / n_test
        res["ts"][layer] = rule.shuffled / n_test
        # bigram: rows with a previous token use the (prev, cur) mode, else the token rule
        corr, hit = _bigram_gain(bg, pair_token, rule, num_e, s, members, overlap)
        res["b"][layer] = (rule.correct + corr) / n_test
        res["rt"][layer] = rule.recalled / n_test / k
        res["rb"][layer] = (rule.recalled + hit) / n_test / k
        res["h"][layer], res["hh"][layer], res["hs"][layer] = rule.h, rule.hh, rule.hs
        if progress:
            progress()
    eng.set_test_docs(np.zeros(0, np.int64))
    return PredictabilityResult(
        res["t"],
        res["b"],
        res["m"],
        res["ts"],
        res["rt"],
        res["rb"],
        1.0 / s,
        n_train,
        n_test,
        res["h"],
        res["hh"],
        res["hs"],
    )


def _members_from(st: C.States, num_e: int, idx: np.ndarray) -> np.ndarray:
    """Sorted members [n, k] of the set indices idx, read off the rows of st holding them
    (for a C(E, k) too large to tabulate; every idx must be a set some row of st holds)."""
    y = st.sets(num_e)
    srt = np.argsort(y)
    pos = np.searchsorted(y[srt], idx)
    return np.sort(st.ids[srt[np.minimum(pos, y.size - 1)]], axis=1)


def _token_rule_table(
    tt: C.States,
    num_e: int,
    min_count: int,
    rng: np.random.Generator,
    members: Callable[[np.ndarray], np.ndarray],
    overlap: np.ndarray | None,
) -> _TokenRule:
    """_token_rule_rows of the (tok, te, state) table, its default the training mode set."""
    te, w = tt.keys["te"] == 1, tt.count
    y = tt.sets(num_e)
    valid_tr = ~te & (y >= 0)
    ut, it = C.unique_inverse(tt.keys["tok"])
    glob = -1
    if valid_tr.any():
        uy, iy = C.unique_inverse(y[valid_tr])
        glob = int(uy[np.argmax(np.bincount(iy, weights=w[valid_tr]))])
    return _token_rule_rows(tt, ut, it, y, glob, min_count, rng, members, overlap)


def spread_token_vs_position(
    sc: StoreCounts,
    min_count: int = 10,
    seed: int = 0,
    tables: C.CompactTables | None = None,
) -> SpreadResult:
    """predictability.spread_token_vs_position out of core (`tables`: the per-layer (token,
    state) tables when the caller holds them already; the (token, top-1) counts are summed
    from them instead of queried)."""
    m = sc.eng.meta
    num_l, num_e = m.num_layers, m.num_experts
    rng = np.random.default_rng(seed)
    out = {key: np.zeros(num_l) for key in ("ct", "cp", "cs", "ht", "hp")}

    def spec(key: str, layer: int) -> CountSpec:
        return CountSpec((("g", key), ("y", f"t{layer}")), "rt", "NOT is_bos")

    def table(r: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # any row order: the statistics and the shuffles' margins are taken over sorted uniques
        return r["g"].astype(np.int64), r["y"].astype(np.int64), r["n"].astype(np.int64)

    def consistency(g: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
        _, _, mc, size = _modes(g, y, w)
        keep = size >= min_count
        return float(mc[keep].sum() / size[keep].sum()) if keep.any() else float("nan")

    def norm_h(g: np.ndarray, ig: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
        gc = np.bincount(ig, weights=w)  # ig: each row's index into g's sorted uniques
        f = (gc[ig] >= min_count) & (y >= 0)
        if not f.any():
            return float("nan")
        h, hy = _cond_entropy_w(g[f], y[f], w[f].astype(float))
        return h / hy if hy > 0 else 0.0

    def stats(
        g: np.ndarray, y: np.ndarray, w: np.ndarray, shuffle: bool
    ) -> tuple[float, float, float]:
        """(consistency, normalised H(top-1 | key), consistency after shuffling the keys)."""
        ug, ig = C.unique_inverse(g)
        if not TM.fits(ug.size, num_e):
            shuf = consistency(*_shuffled_labels(g, y, w, rng)) if shuffle else float("nan")
            return consistency(g, y, w), norm_h(g, ig, y, w), shuf
        mat = TM.LabelMatrix.indexed(ug, ig, y, w, num_e)
        joint = mat.valid[mat.totals >= min_count]
        nh = float("nan")
        if joint.sum() > 0:
            h, hy = TM.cond_entropy(joint)
            nh = h / hy if hy > 0 else 0.0
        shuf = TM.consistency(TM.shuffled(mat, rng)[1], min_count) if shuffle else float("nan")
        return TM.consistency(mat.valid, min_count), nh, shuf

    def from_states(st: C.States) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u, inv = C.codes(st.keys["g"], st.top1)
        return (
            u[:, 0],
            u[:, 1],
            np.bincount(inv, weights=st.count, minlength=len(u)).astype(np.int64),
        )

    keys = ("position",) if tables is not None else ("token_id", "position")
    results = C.counted(sc.eng, [spec(key, layer) for layer in range(num_l) for key in keys])
    for layer in range(num_l):
        tg, ty, tw = table(next(results)) if tables is None else from_states(tables[layer])
        pg, py, pw = table(next(results))
        out["ct"][layer], out["ht"][layer], out["cs"][layer] = stats(tg, ty, tw, True)
        out["cp"][layer], out["hp"][layer], _ = stats(pg, py, pw, False)
    return SpreadResult(
        out["ct"], out["cp"], out["cs"], out["ht"], out["hp"], 1.0 / num_e, min_count
    )
