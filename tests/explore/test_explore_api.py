"""Every endpoint of `moelab explore` against numpy / DuckDB computed independently on the
same tiny store; bad input answers 4xx with a message; parameters never reach SQL as text."""

from __future__ import annotations

import collections
import json

import duckdb
import numpy as np
import pytest
from explore_testutil import CAN, HELD_DROP, I_, SPACE_CAN, WORDS

from moelab.analysis._common import doc_split

VIEWS = ["heatmap", "trajectories", "cooccurrence", "predictor", "contexts"]


def _heat_ref(ref, m):
    ids = ref.trace.expert_ids[m]
    out = np.zeros((3, 8), np.int64)
    for layer in range(3):
        v = ids[:, layer, :].ravel()
        out[layer] = np.bincount(v[v >= 0], minlength=8)
    return out


def _top1(ref, m):
    ids, w = ref.trace.expert_ids[m], ref.trace.weights[m]
    w = np.where(ids >= 0, w, -np.inf)
    j = np.argmax(w, axis=2)
    return np.take_along_axis(ids, j[..., None], axis=2)[..., 0]


@pytest.mark.parametrize(
    "filters",
    [
        {"token": CAN},
        {"token": CAN, "prev": I_},
        {"token": 1, "next": 5},
        {"token": 5, "domain": "domain1"},
    ],
)
def test_heatmap_matches_numpy(client, ref, filters):
    r = client.get("/api/heatmap", params=filters)
    assert r.status_code == 200, r.text
    d = r.json()
    m = ref.mask(**filters)
    want = _heat_ref(ref, m)
    assert d["n"] == int(m.sum()) > 0
    assert np.array_equal(np.array(d["counts"]), want)
    np.testing.assert_allclose(d["share"], want / m.sum(), rtol=1e-12)
    assert d["chance"] == pytest.approx(2 / 8)
    np.testing.assert_allclose(d["ratio"], want / m.sum() / 0.25, rtol=1e-12)
    assert d["filters"]["token"] == filters["token"]


def test_heatmap_counts_dropped_slot_out(client, ref):
    t = ref.trace
    row = 7
    tok = int(t.token_id[row])
    d = client.get("/api/heatmap", params={"token": tok}).json()
    m = ref.mask(tok)
    # layer 1 has one slot less than 2 per occurrence (the dropped slot of row 7)
    assert np.array(d["counts"])[1].sum() == 2 * m.sum() - 1
    assert np.array(d["counts"])[0].sum() == 2 * m.sum()
    # the same through the filtered path (a read of the rows, not the per-token table)
    dom = t.meta.domains[int(t.domain[row])]
    d = client.get("/api/heatmap", params={"token": tok, "domain": dom}).json()
    m = ref.mask(tok, domain=dom)
    assert np.array_equal(np.array(d["counts"]), _heat_ref(ref, m))
    assert np.array(d["counts"])[1].sum() == 2 * m.sum() - 1


def test_trajectories_match_numpy(client, ref):
    r = client.get("/api/trajectories", params={"token": CAN, "top": 5})
    assert r.status_code == 200, r.text
    d = r.json()
    m = ref.mask(CAN)
    paths = collections.Counter(map(tuple, _top1(ref, m).tolist()))
    want = sorted(paths.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    got = [(tuple(p), c) for p, c in zip(d["paths"], d["counts"], strict=True)]
    assert got == want
    assert d["n"] == int(m.sum()) and d["n_paths"] == len(paths)
    assert d["covered"] == pytest.approx(sum(c for _, c in want) / m.sum())


@pytest.mark.parametrize("norm", ["row", "column", "joint"])
@pytest.mark.parametrize("layers", [(0, 2), (1, 1)])
def test_cooccurrence_matches_numpy(client, ref, norm, layers):
    la, lb = layers
    r = client.get(
        "/api/cooccurrence",
        params={"token": 1, "la": la, "lb": lb, "norm": norm, "min_count": 4},
    )
    assert r.status_code == 200, r.text
    d = r.json()
    m = ref.mask(1)
    ids = ref.trace.expert_ids[m]
    c = np.zeros((8, 8), np.int64)
    for row in ids:
        for i in range(2):
            for j in range(2):
                if la == lb and i == j:
                    continue
                a, b = row[la, i], row[lb, j]
                if a >= 0 and b >= 0:
                    c[a, b] += 1
    assert np.array_equal(np.array(d["counts"]), c)
    assert d["n"] == int(m.sum()) and d["pairs"] == int(c.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        val = {
            "row": c / c.sum(1, keepdims=True),
            "column": c / c.sum(0, keepdims=True),
            "joint": c / c.sum(),
        }[norm]
        joint = c / c.sum()
        lift = joint / (joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True))
    low = c < 4
    got = np.array([[np.nan if x is None else x for x in r] for r in d["value"]], float)
    got_lift = np.array([[np.nan if x is None else x for x in r] for r in d["lift"]], float)
    assert np.array_equal(np.isnan(got), low)
    np.testing.assert_allclose(got[~low], val[~low], rtol=1e-12)
    np.testing.assert_allclose(got_lift[~low], lift[~low], rtol=1e-12)
    assert d["masked"] == int(low.sum())
    if norm == "row":
        np.testing.assert_allclose(np.nansum(np.where(low, 0, val), 1)[c.sum(1) > 0].max(), 1.0)


def _predictor_ref(ref, token, prev=None, domain=None, min_fit=5):
    """Pure-Python reference: fit on train documents (all occurrences of the token), score
    recall@k on held-out occurrences that match the filters."""
    t = ref.trace
    docs = np.unique(t.doc_id)
    held_docs = set(docs[doc_split(docs, 0.2, 0)].tolist())
    base = ref.keep & (t.token_id == token)
    rows = np.flatnonzero(base)
    train = [r for r in rows if int(t.doc_id[r]) not in held_docs]
    scored = [
        r
        for r in rows
        if int(t.doc_id[r]) in held_docs
        and (prev is None or ref.prev[r] == prev)
        and (domain is None or t.meta.domains[t.domain[r]] == domain)
    ]
    prior_hits, ctx_hits, backoff = [], [], 0
    for r in scored:
        p = ref.prev[r]
        ctx_rows = [q for q in train if ref.prev[q] == p]
        if len(ctx_rows) < min_fit:
            backoff += 1
    for layer in range(3):
        pc = collections.Counter(int(e) for q in train for e in t.expert_ids[q, layer] if e >= 0)
        prior = sorted(range(8), key=lambda e: (-pc[e], e))[:2]
        hp, hc = [], []
        for r in scored:
            true = {int(e) for e in t.expert_ids[r, layer] if e >= 0}
            if not true:
                continue
            ctx_rows = [q for q in train if ref.prev[q] == ref.prev[r]]
            if len(ctx_rows) >= min_fit:
                cc = collections.Counter(
                    int(e) for q in ctx_rows for e in t.expert_ids[q, layer] if e >= 0
                )
                pred = sorted(range(8), key=lambda e: (-cc[e], -pc[e], e))[:2]
            else:
                pred = prior
            hp.append(len(true & set(prior)) / len(true))
            hc.append(len(true & set(pred)) / len(true))
        prior_hits.append(np.mean(hp))
        ctx_hits.append(np.mean(hc))
    return len(train), len(scored), prior_hits, ctx_hits, backoff / len(scored)


@pytest.mark.parametrize(
    "filters",
    [{"token": 1}, {"token": CAN, "prev": 0}, {"token": 5, "domain": "domain1"}, "dropped"],
)
def test_predictor_matches_reference(client, ref, filters):
    if filters == "dropped":  # the token of the held-out row with a dropped slot
        filters = {"token": int(ref.trace.token_id[HELD_DROP])}
        assert (ref.trace.expert_ids[HELD_DROP] < 0).any()
    r = client.get("/api/predictor", params={**filters, "min_fit": 3})
    assert r.status_code == 200, r.text
    d = r.json()
    n_train, n_scored, prior, ctx, backoff = _predictor_ref(ref, min_fit=3, **filters)
    assert (d["n_train"], d["n_scored"]) == (n_train, n_scored) and n_scored > 0
    assert d["n"] == int(ref.mask(**filters).sum())
    np.testing.assert_allclose(d["prior"], prior, rtol=1e-12)
    np.testing.assert_allclose(d["context"], ctx, rtol=1e-12)
    assert d["backoff"] == pytest.approx(backoff)
    assert d["held_out"] is True and d["trace_split"] == "test"
    assert "held-out" in d["scored_on"] and "seed 0" in d["scored_on"]
    assert d["chance"] == pytest.approx(0.25)


def _predictor_exact(ref, token, prev=None, next=None, domain=None, min_fit=5):
    """Pure-Python reference with the explorer's arithmetic: integer sums of hits per layer and
    number of routed slots v, then sum_v S_v / v (in order v = 1..k) over the rows with a
    routed slot; returns (n_scored, prior [3], context [3], backoff) or None (nothing to
    score / fit)."""
    t = ref.trace
    docs = np.unique(t.doc_id)
    held_docs = set(docs[doc_split(docs, 0.2, 0)].tolist())
    rows = np.flatnonzero(ref.keep & (t.token_id == token))
    train = [r for r in rows if int(t.doc_id[r]) not in held_docs]
    scored = [r for r in np.flatnonzero(ref.mask(token, prev, next, domain)) if r not in train]
    if not train or not scored:
        return None
    pair_n = collections.Counter(int(ref.prev[q]) for q in train)
    out = {"prior": [], "context": []}
    for layer in range(3):
        pc = collections.Counter(int(e) for q in train for e in t.expert_ids[q, layer] if e >= 0)
        prior = sorted(range(8), key=lambda e: (-pc[e], e))[:2]
        ok, sp, sc = 0, [0, 0], [0, 0]
        for r in scored:
            true = [int(e) for e in t.expert_ids[r, layer] if e >= 0]
            if not true:
                continue
            p = int(ref.prev[r])
            pred = prior
            if pair_n[p] >= min_fit:
                cc = collections.Counter(
                    int(e)
                    for q in train
                    if ref.prev[q] == p
                    for e in t.expert_ids[q, layer]
                    if e >= 0
                )
                pred = sorted(range(8), key=lambda e: (-cc[e], -pc[e], e))[:2]
            ok += 1
            sp[len(true) - 1] += sum(e in prior for e in true)
            sc[len(true) - 1] += sum(e in pred for e in true)
        for name, s in (("prior", sp), ("context", sc)):
            total = np.float64(0.0)
            for v in (1, 2):
                total += np.int64(s[v - 1]) / v
            out[name].append(float(total / ok) if ok else float("nan"))
    backoff = sum(pair_n[int(ref.prev[r])] < min_fit for r in scored) / len(scored)
    return len(scored), out["prior"], out["context"], backoff


def test_predictor_engines_equal_the_exact_reference(explorer, ref):
    """Every token x filters x min_fit: the cached tallies (a lookup), the tallies of the
    rows and the pure-Python reference give bitwise the same numbers."""
    from moelab.explore import queries as Q

    t = ref.trace
    checked = 0
    for token in range(1, len(WORDS)):
        if not ref.mask(token).any():
            continue
        p0 = collections.Counter(ref.prev[ref.mask(token)].tolist()).most_common(1)[0][0]
        n0 = collections.Counter(ref.next[ref.mask(token)].tolist()).most_common(1)[0][0]
        dom = t.meta.domains[token % 2]
        for filt in ({}, {"domain": dom}, {"prev": p0}, {"next": n0}, {"prev": p0, "domain": dom}):
            if not ref.mask(token, **filt).any():
                continue
            f = Q.Filters(token, **filt)
            for min_fit in (1, 3, 50):
                want = _predictor_exact(ref, token, min_fit=min_fit, **filt)
                engines = ["rows"] if ("prev" in filt or "next" in filt) else ["rows", "cached"]
                for engine in engines:
                    d = Q.predictor(explorer, f, min_fit, engine=engine)
                    if want is None:
                        assert d["prior"] is None and d["note"], (token, filt, engine)
                        continue
                    n_scored, prior, ctx, backoff = want
                    assert d["n_scored"] == n_scored, (token, filt, engine)
                    assert np.array_equal(d["prior"], prior, equal_nan=True), (token, filt)
                    assert np.array_equal(d["context"], ctx, equal_nan=True), (token, filt)
                    assert d["backoff"] == backoff, (token, filt, engine, min_fit)
                    checked += 1
    assert checked > 200
    with pytest.raises(Q.ExploreInputError, match="cached"):
        Q.predictor(explorer, Q.Filters(CAN, prev=I_), engine="cached")


def test_contexts_show_the_document_text(client, ref):
    r = client.get("/api/contexts", params={"token": CAN, "prev": I_, "limit": 5, "width": 3})
    assert r.status_code == 200, r.text
    d = r.json()
    t = ref.trace
    assert d["n"] == int(ref.mask(CAN, prev=I_).sum()) and 0 < len(d["rows"]) <= 5
    for row in d["rows"]:
        sel = (t.doc_id == row["doc_id"]) & (np.abs(t.position - row["position"]) <= 3)
        want = t.token_id[sel][np.argsort(t.position[sel])].tolist()
        assert row["ids"] == want
        assert row["ids"][row["center"]] == CAN and row["ids"][row["center"] - 1] == I_
        assert row["token"].strip() == "can" and row["left"].rstrip().endswith("I")
        text = " ".join(WORDS[i] for i in want)
        assert (row["left"] + row["token"] + row["right"]) == text
    keys = {(row["doc_id"], row["position"]) for row in d["rows"]}
    assert len(keys) == len(d["rows"])  # distinct occurrences


def test_search_by_text_and_id(client, ref):
    r = client.get("/api/search", params={"q": "can"})
    assert r.status_code == 200, r.text
    d = r.json()
    got = {m["id"]: m["count"] for m in d["matches"]}
    assert set(got) == {CAN, SPACE_CAN}  # "can" and " can"
    for i, c in got.items():
        assert c == int(ref.mask(i).sum())
    counts = [m["count"] for m in d["matches"]]
    assert counts == sorted(counts, reverse=True)
    d2 = client.get("/api/search", params={"q": "I can"}).json()
    assert [s["id"] for s in d2["sequence"]] == [I_, CAN]
    d3 = client.get("/api/search", params={"id": 5}).json()
    assert d3["matches"] == [{"id": 5, "text": "the", "count": int(ref.mask(5).sum())}]


def test_info(client, ref):
    d = client.get("/api/info").json()
    assert d["tokens"] == int(ref.keep.sum())
    assert (d["num_layers"], d["num_experts"], d["top_k"]) == (3, 8, 2)
    assert d["domains"] == ["domain0", "domain1"] and d["tokenizer"] is True
    tok = ref.trace.token_id[ref.keep]
    ids, cnt = np.unique(tok, return_counts=True)
    order = np.lexsort((ids, -cnt))[:12]
    assert [(f["id"], f["count"]) for f in d["frequent"]] == list(
        zip(ids[order].tolist(), cnt[order].tolist(), strict=True)
    )
    assert d["split"]["held_out"] is True


def test_page_and_plotly_are_served(client):
    r = client.get("/")
    assert r.status_code == 200 and 'id="heatmap-table"' in r.text
    js = client.get("/static/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000


BAD = [
    ("/api/heatmap", {}),  # token missing
    ("/api/heatmap", {"token": "abc"}),
    ("/api/heatmap", {"token": "-3"}),
    ("/api/heatmap", {"token": "99999999999999"}),
    ("/api/heatmap", {"token": "1.5"}),
    ("/api/heatmap", {"token": 999}),  # not in the trace (outside the vocabulary)
    ("/api/heatmap", {"token": 1, "prev": 49, "next": 49, "domain": "domain0"}),  # no match
    ("/api/heatmap", {"token": 1, "domain": "nope"}),
    ("/api/trajectories", {"token": 1, "top": 0}),
    ("/api/trajectories", {"token": 1, "top": "many"}),
    ("/api/cooccurrence", {"token": 1, "la": 3}),
    ("/api/cooccurrence", {"token": 1, "lb": -1}),
    ("/api/cooccurrence", {"token": 1, "norm": "diagonal"}),
    ("/api/cooccurrence", {"token": 1, "min_count": 0}),
    ("/api/predictor", {"token": 1, "min_fit": "x"}),
    ("/api/contexts", {"token": 1, "limit": 1000}),
    ("/api/contexts", {"token": 1, "width": -1}),
    ("/api/search", {}),
    ("/api/search", {"q": "zzz-not-a-word"}),
    ("/api/search", {"q": "can", "id": 2}),
    ("/api/search", {"id": 2**31 - 1}),  # a valid id that does not occur
]


@pytest.mark.parametrize("url,params", BAD)
def test_bad_input_is_a_4xx_with_a_message(client, ref, url, params):
    r = client.get(url, params=params)
    assert 400 <= r.status_code < 500, (url, params, r.status_code, r.text)
    msg = r.json()["detail"]
    assert isinstance(msg, str) and len(msg) > 10


def test_unknown_token_message_names_it(client):
    r = client.get("/api/heatmap", params={"token": 999})
    assert r.status_code == 404 and "999" in r.json()["detail"]
    r = client.get("/api/search", params={"q": "zzz"})
    assert r.status_code == 404 and "zzz" in r.json()["detail"]
    r = client.get("/api/heatmap", params={"token": "abc"})
    assert r.status_code == 422 and "token" in r.json()["detail"]


INJECT = [
    "1 OR 1=1",
    "1; DROP TABLE tok; --",
    "domain0' OR '1'='1",
    "x'); COPY tok TO '/tmp/pwned.csv'; --",
]


@pytest.mark.parametrize("text", INJECT)
def test_sql_injection_text_is_harmless(client, explorer, ref, text, tmp_path):
    before = explorer.cache_path.read_bytes()
    assert client.get("/api/heatmap", params={"token": text}).status_code == 422
    r = client.get("/api/heatmap", params={"token": 1, "domain": text})
    assert r.status_code == 400 and "not in this trace" in r.json()["detail"]
    r = client.get("/api/cooccurrence", params={"token": 1, "norm": text})
    assert r.status_code in (400, 422)
    r = client.get("/api/search", params={"q": text})
    assert r.status_code in (200, 404)
    if r.status_code == 200:  # the tokenizer may split the text into known words
        assert all(m["id"] < len(WORDS) for m in r.json()["matches"])
    # nothing was executed: the cache is unchanged and the views still answer the same
    assert explorer.cache_path.read_bytes() == before
    d = client.get("/api/heatmap", params={"token": 1}).json()
    assert d["n"] == int(ref.mask(1).sum())


def test_queries_are_parameterised_against_duckdb(explorer, store):
    """The same count by an independent DuckDB query over the shards (no cache)."""
    from moelab.explore import queries as Q

    con = duckdb.connect()
    glob = str(store / "shards" / "*.parquet")
    n = con.execute(
        "SELECT count(*) FROM read_parquet(?) WHERE token_id = ? AND NOT is_bos", [glob, CAN]
    ).fetchone()[0]
    assert Q.count(explorer, Q.Filters(CAN)) == n
    assert Q.count(str(store), Q.Filters(CAN)) == n  # a store path works too
    assert json.loads((explorer.cache_path.parent / "key.json").read_text())["holdout"] == 0.2
