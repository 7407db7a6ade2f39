"""Out-of-core analyses (DuckDB and Spark over the shards) equal the in-memory analyses on the
same store: integer counts exactly, deterministic statistics to 1e-12; shuffle baselines are
drawn from the margins and agree in distribution."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moelab.analysis import (
    coactivation,
    predictability,
    repeat,
    specialization,
    transitions,
    usage,
)
from moelab.analysis import counts as C
from moelab.analysis import outofcore as O
from moelab.analysis._common import doc_split
from moelab.analysis.dense_counts import CountSpec
from moelab.analysis.engines import DuckDBEngine, parse_bytes
from moelab.analysis.run import analyze
from moelab.analysis.sources import StoreSource
from moelab.analysis.synthetic import synthetic_trace
from moelab.errors import AnalysisError, ConfigError
from moelab.trace.schema import NO_EXPERT
from moelab.trace.store import TraceStore, write_trace

DEC = [" the", ",", " 42", "foo_bar", " ", "x"]


def decode(i: int) -> str:
    return DEC[i % len(DEC)]


def write_store(path, tr, shard_tokens=700, logits=True):
    write_trace(tr, path, shard_tokens=shard_tokens, logits=logits, chunk_tokens=500)
    return path


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    tr = synthetic_trace(3000, 3, 8, 2, vocab=60, doc_len=100, logits=True, seed=1)
    tr.expert_ids[5, 1, 1] = NO_EXPERT  # a dropped slot
    tr.weights[5, 1, 1] = 0.0
    tr.expert_ids[7, 2, :] = NO_EXPERT  # a fully dropped token (top-1 = none)
    tr.weights[7, 2, :] = 0.0
    path = write_store(tmp_path_factory.mktemp("ooc") / "store", tr)
    loaded = TraceStore.open(path).load()
    eng = DuckDBEngine(path, memory_limit="256MiB", threads=1)
    yield loaded, O.StoreCounts(eng), path
    eng.close()


def close(a, b, fields, rtol=1e-12):
    for f in fields:
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=rtol, atol=1e-15, err_msg=f)


def test_usage_balance_entropy(stored):
    tr, sc, _ = stored
    for kw in ({"normalize": "slots"}, {"normalize": "tokens"}):
        a, b = O.usage(sc, **kw), usage.usage(tr, **kw)
        np.testing.assert_array_equal(a.counts, b.counts)
        assert a.n_tokens == b.n_tokens and a.chance == b.chance
    a, b = O.usage(sc, "slots", weighted=True), usage.usage(tr, "slots", weighted=True)
    np.testing.assert_allclose(a.counts, b.counts, rtol=1e-9)
    a, b = O.usage(sc, "tokens", weighted=True), usage.usage(tr, "tokens", weighted=True)
    assert a.chance == pytest.approx(b.chance, rel=1e-6)  # memory sums float32 weights
    tid, ctx = int(tr.token_id[2]), [int(tr.token_id[1])]
    a = O.usage(sc, "tokens", token_id=tid, prev_ids=ctx, min_count=1)
    b = usage.usage(tr, "tokens", token_id=tid, prev_ids=ctx, min_count=1)
    np.testing.assert_array_equal(a.counts, b.counts)
    assert a.selection == b.selection and a.n_tokens == b.n_tokens
    assert a.baseline.shape == b.baseline.shape and np.allclose(a.baseline.sum(1), 2.0)
    close(O.balance(sc), usage.balance(tr), ["norm_entropy", "max_over_mean", "cv", "gini"])
    np.testing.assert_allclose(
        O.balance(sc, seed=3).baseline["cv"], usage.balance(tr, seed=3).baseline["cv"]
    )
    close(
        O.routing_entropy(sc.eng),
        usage.routing_entropy(tr),
        ["mean_norm_entropy", "mean_top1_prob"],
        1e-9,
    )


def test_transitions_and_coactivation(stored):
    tr, sc, _ = stored
    for layer in range(2):
        a, b = O.expert_transitions(sc, layer), transitions.expert_transitions(tr, layer)
        np.testing.assert_array_equal(a.counts, b.counts)
        close(a, b, ["lift", "npmi", "conditional"])
        a, b = O.set_transitions(sc, layer), transitions.set_transitions(tr, layer)
        np.testing.assert_array_equal(a.counts, b.counts)
        # shuffled ~ independent, as far from lift 1 as the in-memory permutation baseline
        dev_a = np.abs(a.baseline_lift[a.counts > 20] - 1).mean()
        dev_b = np.abs(b.baseline_lift[b.counts > 20] - 1).mean()
        assert dev_a < 2 * dev_b + 0.05 and dev_a < 0.3
    a, b = O.transition_summary(sc, 2), transitions.transition_summary(tr, 2)
    close(a, b, ["nmi_set", "nmi_top1", "top1_predictability", "top1_chance"])
    a, b = O.transition_summary(sc), transitions.transition_summary(tr)
    close(a, b, ["nmi_set", "nmi_top1", "top1_predictability", "top1_chance"])
    # the shuffle baselines have the in-memory baselines' distribution: both far below the
    # planted structure and within a few plug-in bias levels of each other
    assert (a.nmi_set_shuffled < a.nmi_set / 2).all()
    np.testing.assert_allclose(a.nmi_set_shuffled, b.nmi_set_shuffled, rtol=0.5)
    for layer in range(3):
        a, b = O.coactivation(sc, layer), coactivation.coactivation(tr, layer)
        np.testing.assert_array_equal(a.counts, b.counts)
        close(a, b, ["conditional", "npmi", "baseline_conditional"])


def test_repeat_predictability_spread(stored):
    tr, sc, _ = stored
    a, b = O.repeat_rate(sc), repeat.repeat_rate(tr)
    assert a.n_pairs == b.n_pairs
    close(
        a,
        b,
        ["same_top1", "any_overlap", "mean_overlap", "load_top1", "load_any", "load_mean"],
    )
    np.testing.assert_allclose(a.shuffled_top1, b.shuffled_top1, atol=0.05)
    a, b = O.predictability(sc, min_count=5), predictability.predictability(tr, min_count=5)
    # from the (token, state) tables of all rows plus the held-out counts: identical
    c = O.predictability(sc, min_count=5, tables=O._key_tables(sc, "g", "token_id"))
    for f, v in vars(a).items():
        np.testing.assert_array_equal(v, getattr(c, f), err_msg=f)
    bogus = O._key_tables(sc, "g", "domain")  # not the token table: refused, not misread
    with pytest.raises(AnalysisError, match="do not fit inside the full"):
        O.predictability(sc, min_count=5, tables=bogus)
    assert (a.n_train, a.n_test) == (b.n_train, b.n_test)
    fields = ["acc_token", "acc_bigram", "acc_majority", "recall_token", "recall_bigram"]
    close(a, b, fields + ["cond_entropy", "set_entropy"])
    assert (a.cond_entropy_shuffled < a.set_entropy).all()
    a = O.spread_token_vs_position(sc, 5)
    b = predictability.spread_token_vs_position(tr, 5)
    close(a, b, ["consistency_token", "consistency_position", "norm_cond_entropy_token"])
    close(a, b, ["norm_cond_entropy_position"])
    # from the (token, state) tables the specialisation views hold: the same numbers and draws
    c = O.spread_token_vs_position(sc, 5, tables=O._key_tables(sc, "g", "token_id"))
    for f, v in vars(a).items():
        np.testing.assert_array_equal(v, getattr(c, f), err_msg=f)


def test_dense_token_matrices_equal_row_level(tmp_path, monkeypatch):
    """Predictability and spread from dense [token, label] matrices equal the row-level code
    on the same tables, the seeded shuffle baselines included (same margins, same draws),
    with dropped slots, fully dropped tokens and repeated experts in both parts."""
    from moelab.analysis import token_matrix as TM

    tr = synthetic_trace(2400, 2, 6, 2, vocab=40, doc_len=60, logits=False, seed=7)
    rng = np.random.default_rng(0)
    rows = rng.choice(tr.num_tokens, 150, replace=False)
    tr.expert_ids[rows[:50], 0, 1] = NO_EXPERT
    tr.expert_ids[rows[50:80], 1, :] = NO_EXPERT
    tr.expert_ids[rows[80:], 0, 1] = tr.expert_ids[rows[80:], 0, 0]  # a repeated expert
    eng = DuckDBEngine(write_store(tmp_path / "s", tr, logits=False), threads=1)
    sc = O.StoreCounts(eng)
    pred, spread = O.predictability(sc, min_count=3), O.spread_token_vs_position(sc, 3)
    monkeypatch.setattr(TM, "MAX_DENSE_CELLS", 0)  # every table row-level
    pred_rows, spread_rows = O.predictability(sc, min_count=3), O.spread_token_vs_position(sc, 3)
    eng.close()
    assert (pred.n_train, pred.n_test) == (pred_rows.n_train, pred_rows.n_test)
    fields = ["acc_token", "acc_bigram", "acc_majority", "acc_token_shuffled", "recall_token"]
    close(pred, pred_rows, [*fields, "recall_bigram", "cond_entropy", "set_entropy"])
    close(pred, pred_rows, ["cond_entropy_shuffled"])
    assert (pred.recall_token > pred.acc_token).all() and (pred.acc_token > 0).all()
    fields = ["consistency_token", "consistency_position", "consistency_shuffled"]
    close(spread, spread_rows, [*fields, "norm_cond_entropy_token", "norm_cond_entropy_position"])
    assert not np.isnan(spread.consistency_shuffled).any()
    # both parts hold rows of every kind (the split of O.predictability: seed 0, 20%)
    docs = np.unique(tr.doc_id)
    held = np.isin(tr.doc_id, docs[doc_split(docs, 0.2, 0)])
    for part in (held, ~held):
        for sel in (rows[:50], rows[50:80], rows[80:]):
            assert part[sel].any()


def test_token_keyed_results_do_not_depend_on_row_order(stored, monkeypatch):
    """The token-keyed tables are used in the engine's row order (no canonical sort): the
    same store with every query's rows permuted gives identical numbers, seeded shuffle
    baselines included (Spark and DuckDB return groups in different orders)."""
    _, sc, path = stored

    def run(sc):
        pred, spread = O.predictability(sc, min_count=5), O.spread_token_vs_position(sc, 5)
        spec = [O.by_domain(sc), O.by_vocab(sc, "input", 5), O.by_vocab(sc, "next", 5)]
        spec.append(O.by_token_class(sc, decode))
        return pred, spread, spec

    want = run(sc)
    run_sql = DuckDBEngine._run
    perm = np.random.default_rng(3)

    def permuted(self, con, sql):
        res = run_sql(self, con, sql)
        order = perm.permutation(len(next(iter(res.values())))) if res else None
        return {c: v[order] for c, v in res.items()} if res else res

    monkeypatch.setattr(DuckDBEngine, "_run", permuted)
    eng = DuckDBEngine(path, threads=1)
    got = run(O.StoreCounts(eng))
    eng.close()
    for a, b in zip(got[:2], want[:2], strict=True):
        for f, v in vars(a).items():
            np.testing.assert_array_equal(v, getattr(b, f), err_msg=f)
    for a, b in zip(got[2], want[2], strict=True):
        a, b = getattr(a, "view", a), getattr(b, "view", b)
        for f in ("counts", "share", "specialization_shuffled", "mean_max_share_shuffled"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


def test_specialisation(stored):
    tr, sc, _ = stored
    a, b = O.by_domain(sc), specialization.by_domain(tr)
    assert a.names == b.names
    np.testing.assert_array_equal(a.counts, b.counts)
    close(a, b, ["share", "overall", "specialization", "mean_max_share"])
    for target in ("input", "next"):
        a, b = O.by_vocab(sc, target, 5), specialization.by_vocab(tr, target, 5)
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        assert a.n_dropped == b.n_dropped
        np.testing.assert_array_equal(a.view.counts, b.view.counts)
        close(a.view, b.view, ["share", "specialization", "mean_max_share"])
    a, b = O.by_token_class(sc, decode), specialization.by_token_class(tr, decode)
    assert a.names == b.names
    close(a, b, ["share", "specialization"])


def test_shuffled_table_keeps_margins():
    rng = np.random.default_rng(0)
    rows, cols = np.array([5, 0, 7, 3]), np.array([6, 6, 3])
    for split in (None, 0, 1, 2, 4):  # all permutation, mixed, all hypergeometric draws
        t = C.shuffled_table(rows, cols, rng, split=split)
        np.testing.assert_array_equal(t.sum(1), rows)
        np.testing.assert_array_equal(t.sum(0), cols)
    big = rng.integers(0, 5, 300)
    t = C.shuffled_table(big, np.array([big.sum() - 7, 7]), rng)
    np.testing.assert_array_equal(t.sum(1), big)
    with pytest.raises(ValueError):
        C.shuffled_table(np.array([1]), np.array([2]), rng)


@pytest.mark.parametrize("split", [0, 1, 3, None])
def test_shuffled_table_has_the_permutation_distribution(split):
    """Every split draws the exact hypergeometric table: each cell's mean r_i c_j / N and
    variance r_i c_j (N - r_i)(N - c_j) / (N^2 (N - 1)) over many draws."""
    rng = np.random.default_rng(5)
    rows, cols = np.array([9, 4, 2, 1]), np.array([7, 5, 4])
    n, reps = rows.sum(), 4000
    draws = np.stack([C.shuffled_table(rows, cols, rng, split=split) for _ in range(reps)])
    mean = np.outer(rows, cols) / n
    var = np.outer(rows * (n - rows), cols * (n - cols)) / (n**2 * (n - 1))
    np.testing.assert_allclose(draws.mean(0), mean, atol=4 * np.sqrt(var.max() / reps))
    np.testing.assert_allclose(draws.var(0), var, rtol=0.12, atol=0.01)
    # the pairing itself: P(cell (0, 0) = 7) by the hypergeometric pmf
    from scipy.stats import hypergeom

    p7 = hypergeom(n, rows[0], cols[0]).pmf(7)
    assert abs((draws[:, 0, 0] == 7).mean() - p7) < 4 * np.sqrt(p7 * (1 - p7) / reps)


def test_analyze_store_numbers_match_memory(stored, tmp_path):
    tr, _, path = stored
    kw = {"figures": False, "min_count": 5, "do_projections": False}
    mem = analyze(tr, tmp_path / "mem", write_report=False, **kw)
    eng = DuckDBEngine(path)
    eng.batch_layers = 2  # the per-layer tables unioned in batches (as on Spark)
    src = StoreSource(eng, sample_tokens=1000)
    ooc = analyze(src, tmp_path / "ooc", write_report=True, **kw)
    src.close()
    assert set(mem) - {"sample"} == set(ooc) - {"sample"}
    assert ooc["engine"] == "duckdb" and mem["engine"] == "memory"
    assert ooc["sample"]["tokens"] >= 1000 and ooc["sample"]["documents"] >= 10
    assert mem["skipped"] == ooc["skipped"]
    for key in ("slots", "tokens"):
        np.testing.assert_allclose(ooc["usage"][key], mem["usage"][key], rtol=1e-12)
    for a, b in zip(ooc["balance"], mem["balance"], strict=True):
        assert a["gini"] == pytest.approx(b["gini"], rel=1e-12)
    for a, b in zip(
        ooc["predictability"]["per_layer"], mem["predictability"]["per_layer"], strict=True
    ):
        assert a["acc_token"] == pytest.approx(b["acc_token"], rel=1e-12)
    for a, b in zip(ooc["repeat"]["per_layer"], mem["repeat"]["per_layer"], strict=True):
        assert a["same_top1"] == pytest.approx(b["same_top1"], rel=1e-12)
    assert json.loads((tmp_path / "ooc" / "numbers.json").read_text())["n_tokens"] == 3000
    assert (tmp_path / "ooc" / "report.html").stat().st_size > 1000


def test_memory_limit_parsing():
    assert parse_bytes("4GiB") == 4 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("2g") == 2 * 2**30
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(ConfigError, match="--memory-limit"):
            parse_bytes(bad)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tr = synthetic_trace(1200, 2, 8, 2, vocab=30, doc_len=60, logits=False, seed=4)
    tr.expert_ids[3, 1, 1] = NO_EXPERT
    tr.weights[3, 1, 1] = 0.0
    return write_store(tmp_path_factory.mktemp("spark") / "s", tr, 500, logits=False)


def cli(args, capsys, monkeypatch):
    import sys

    from moelab.cli import main

    monkeypatch.setattr(sys, "argv", ["moelab", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    cap = capsys.readouterr()
    return (0 if exc.value.code is None else int(exc.value.code)), cap.out + cap.err


def test_cli_engines_and_memory_limit(small, tmp_path, capsys, monkeypatch):
    base = ["analyze", str(small), "--no-figures", "--no-projections", "--min-count", "3"]
    code, out = cli(
        [*base, "--out", str(tmp_path / "d"), "--memory-limit", "1GiB"], capsys, monkeypatch
    )
    assert code == 0, out
    d = json.loads((tmp_path / "d" / "numbers.json").read_text())
    assert d["engine"] == "duckdb" and d["sample"]["tokens"] == 1200  # the whole small store
    code, out = cli(
        [*base, "--out", str(tmp_path / "s"), "--engine", "spark", "--master", "local[1]"],
        capsys,
        monkeypatch,
    )
    assert code == 0, out
    s = json.loads((tmp_path / "s" / "numbers.json").read_text())
    assert s["engine"] == "spark"
    # Spark's numbers equal DuckDB's: every integer count and what is computed from it, the
    # seeded baselines too (tables in canonical order); weighted usage sums floats in the
    # engine's own order
    s["usage"].pop("weighted"), d["usage"].pop("weighted")
    keys = ("usage", "balance", "predictability", "spread", "repeat", "transitions")
    for key in (*keys, "coactivation", "top_tokens_mid_layer"):
        assert json.dumps(s[key], sort_keys=True) == json.dumps(d[key], sort_keys=True), key
    assert json.dumps(s["specialization"]) == json.dumps(d["specialization"])
    for args, want in (
        (["--engine", "bogus"], "expected duckdb, spark or memory"),
        (["--engine", "memory", "--memory-limit", "1KB"], "use --engine duckdb"),
        (["--memory-limit", "lots"], "--memory-limit 'lots'"),
        (["--master", "local[2]"], "--master is a Spark option"),
    ):
        code, out = cli([*base, "--out", str(tmp_path / "x"), *args], capsys, monkeypatch)
        assert code == 2 and want in out, out


def test_codes_equal_unique_rows():
    rng = np.random.default_rng(5)
    m = rng.integers(-1, 9, size=(500, 3))
    u, inv = C.codes(*m.T)
    eu, einv = np.unique(m, axis=0, return_inverse=True)
    np.testing.assert_array_equal(u, eu)
    np.testing.assert_array_equal(inv, einv.reshape(-1))
    wide = np.stack([rng.integers(0, 2**40, 200), rng.integers(0, 2**40, 200)], 1)
    wide[::2] = wide[1::2]  # repeats; spans too wide for a 62-bit key: the axis=0 fallback
    u, inv = C.codes(*wide.T)
    np.testing.assert_array_equal(u[inv], wide)
    assert len(u) == 100


def test_materialised_states_equal_sql_definition(stored):
    """DuckDB builds rt in numpy; Spark runs rc_sql: both must give the same codes and top-1."""
    from moelab.analysis import engines as E

    _, sc, _ = stored
    eng, m = sc.eng, sc.eng.meta
    eng.query("SELECT COUNT(*) AS n FROM rt")  # materialised
    for name, body in (("rt0", E.rt_sql(m)), ("rt1", E.rt_top1_sql(m)), ("rw0", E.rw_sql(m))):
        eng.con.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")
    cols = ", ".join(f"t{li}, c{li}" for li in range(m.num_layers))
    order = "ORDER BY doc_id, position"
    a = eng.query(f"SELECT doc_id, position, {cols} FROM rt {order}")
    b = eng.query(f"SELECT doc_id, position, {cols} FROM ({E.rc_sql(m)}) q {order}")
    for key in a:
        np.testing.assert_array_equal(a[key].astype(np.int64), b[key].astype(np.int64), key)
    ids, top = C.decode_states(a["c2"], m)
    assert (top == a["t2"]).all() and (ids[ids >= 0] < m.num_experts).all()
    assert (top == -1).sum() == 1  # the fully dropped token of the fixture


@pytest.mark.parametrize(("num_e", "k"), [(8, 2), (6, 3), (40, 2), (64, 4)])
def test_state_code_tables_equal_arithmetic(num_e, k):
    """Decoding state codes by the cached per-code tables (small B^(k+1)) gives the ids, top-1
    and set index that the arithmetic and set_index give; large code spaces decode by
    arithmetic (64 experts, k=4: no table of 65^5 codes is built)."""
    from moelab.analysis._common import set_index
    from moelab.trace.schema import TraceMeta

    meta = TraceMeta(num_layers=1, num_experts=num_e, top_k=k, layer_indices=[0])
    base = num_e + 1
    rng = np.random.default_rng(num_e + k)
    ids = rng.integers(-1, num_e, (500, k))
    ids[:50, 1] = ids[:50, 0]  # repeated experts: no valid set
    top = rng.integers(-1, num_e, 500)
    code = (top + 1) * base**k + sum((ids[:, j] + 1) * base**j for j in range(k))
    got_ids, got_top = C.decode_states(code, meta)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_top, top)
    st = C.States({}, got_ids, got_top, np.ones(500, np.int64), None, code)
    want = set_index(ids, num_e)
    np.testing.assert_array_equal(st.sets(num_e), want)
    distinct = np.array([len(set(r)) == k for r in ids.tolist()])
    np.testing.assert_array_equal(want >= 0, distinct & (ids >= 0).all(1))
    C._code_luts.cache_clear()
    C.decode_states(code, meta)
    assert C._code_luts.cache_info().misses == (1 if base ** (k + 1) <= 2**16 else 0)


def test_state_codes_too_wide_and_draw_orientation():
    from moelab.analysis.engines import code_base
    from moelab.errors import AnalysisError
    from moelab.trace.schema import TraceMeta

    meta = TraceMeta(num_layers=1, num_experts=256, top_k=8, layer_indices=[0])
    with pytest.raises(AnalysisError, match="62-bit"):
        code_base(meta)
    rng = np.random.default_rng(1)
    rows, cols = np.full(10, 50), np.array([250, 250])  # few columns: draws along them
    t = C.shuffled_table(rows, cols, rng)
    np.testing.assert_array_equal(t.sum(1), rows)
    np.testing.assert_array_equal(t.sum(0), cols)
    assert t.shape == (10, 2) and 0 < t[:, 0].std()


def test_modes_and_sort_order():
    rng = np.random.default_rng(2)
    key, lab = rng.integers(0, 30, 2000), rng.integers(-1, 6, 2000)
    w = rng.integers(0, 4, 2000)
    k, mv, mc, size = O._modes(key, lab, w)
    for g, v, c, n in zip(k, mv, mc, size, strict=True):  # the brute-force mode, ties smallest
        sel = (key == g) & (lab >= 0)
        tally = np.bincount(lab[sel], weights=w[sel], minlength=6)
        assert v == int(np.argmax(tally)) and c == tally.max() and n == tally.sum()
    cols = [rng.integers(-1, 50, 500), rng.integers(0, 3, 500)]
    np.testing.assert_array_equal(C.sort_order(cols), np.lexsort(cols[::-1]))
    wide = [rng.integers(0, 2**40, 300), rng.integers(0, 2**40, 300)]  # lexsort fallback
    np.testing.assert_array_equal(C.sort_order(wide), np.lexsort(wide[::-1]))


def test_pairs_from_the_stream_equal_the_join(stored, tmp_path):
    """pr comes from each row's previous stream row; a store whose rows are out of order
    (documents split across shards) falls back to the join and gives the same pairs."""
    import pyarrow.parquet as pq

    from moelab.analysis import engines as E

    _, sc, path = stored
    eng, m = sc.eng, sc.eng.meta
    cols = "doc_id, token_id, is_bos, p_token, p_bos, " + ", ".join(
        f"c{li}, p_c{li}" for li in range(m.num_layers)
    )
    order = f"ORDER BY {cols}"
    joined = eng.query(f"SELECT {cols} FROM ({E.pc_sql(m, 'rt')}) q {order}")
    streamed = eng.query(f"SELECT {cols} FROM pr {order}")
    assert (
        eng._tables == ["rtc"] and joined["doc_id"].size == 3000 - 30
    )  # one pair per non-first row
    for key in joined:
        np.testing.assert_array_equal(streamed[key], joined[key], key)
    # the same rows, each shard's rows reversed: no previous row is adjacent any more
    shuffled = tmp_path / "reversed"
    (shuffled / "shards").mkdir(parents=True)
    for f in (path / "shards").iterdir():
        t = pq.read_table(f)
        pq.write_table(t.take(np.arange(t.num_rows)[::-1]), shuffled / "shards" / f.name)
    for f in path.iterdir():
        if f.is_file():
            (shuffled / f.name).write_bytes(f.read_bytes())
    with DuckDBEngine(shuffled, threads=1) as other:
        got = other.query(f"SELECT {cols} FROM pr {order}")
        assert other._tables == ["rtc", "prj"]
        for key in joined:
            np.testing.assert_array_equal(got[key], joined[key], key)
        a = list(C.prev_pair_states_many(other, list(range(1, m.num_layers))))
    b = list(C.prev_pair_states_many(eng, list(range(1, m.num_layers))))
    for (x0, x1), (y0, y1) in zip(a, b, strict=True):
        np.testing.assert_array_equal(x0.count, y0.count)
        np.testing.assert_array_equal(x1.ids, y1.ids)


def test_unique_inverse_equals_numpy():
    rng = np.random.default_rng(3)
    cases = [
        rng.integers(-5, 40, 1000),  # small range: the counting pass
        np.sort(rng.integers(0, 2**40, 500)),  # sorted: one pass
        rng.integers(0, 2**40, 500),  # wide and unsorted: np.unique
        np.array([7], np.int64),
        np.zeros(0, np.int64),
        rng.integers(0, 300, 50).astype(np.int32),
    ]
    for x in cases:
        u, inv = C.unique_inverse(x)
        eu, einv = np.unique(x, return_inverse=True)
        np.testing.assert_array_equal(u, eu)
        np.testing.assert_array_equal(inv, einv.reshape(-1))
        assert u.dtype == x.dtype


def test_argsort_stable_equals_numpy():
    rng = np.random.default_rng(4)
    for x in (rng.integers(0, 50, 3000), rng.integers(0, 2**40, 2000), rng.integers(0, 2**60, 50)):
        np.testing.assert_array_equal(C.argsort_stable(x), np.argsort(x, kind="stable"))
    np.testing.assert_array_equal(C.argsort_stable(np.zeros(0, np.int64)), np.zeros(0, np.int64))


def _sorted(res: dict) -> dict:
    """A query result in a canonical row order (every column, as a lexsort key)."""
    keys = [res[c] for c in sorted(res)]
    order = np.lexsort(keys[::-1]) if keys and keys[0].size else np.zeros(0, np.int64)
    return {c: v[order] for c, v in res.items()}


def _equal(a: dict, b: dict, floats: tuple[str, ...] = ()) -> None:
    a, b = _sorted(a), _sorted(b)
    assert sorted(a) == sorted(b)
    for c in a:
        if c in floats:
            np.testing.assert_allclose(a[c], b[c], rtol=1e-12, err_msg=c)
        else:
            np.testing.assert_array_equal(a[c].astype(np.int64), b[c].astype(np.int64), c)


def test_spark_codes_tallies_and_stacked_queries_equal_duckdb(small):
    """Spark computes rt's codes with DuckDB's numpy function (mapInArrow): rt and pr equal
    DuckDB's row by row, the weighted tallies equal layer_weight_states, and the per-layer
    queries run as one LATERAL VIEW stack scan give exactly the UNION ALL's tables."""
    from moelab.analysis.engines import SparkEngine, stacked_sql

    d = DuckDBEngine(small, threads=1)
    s = SparkEngine(small, "local[1]")
    try:
        m = d.meta
        cols = ", ".join(f"t{li}, c{li}" for li in range(m.num_layers))
        q = f"SELECT doc_id, position, token_id, domain, is_bos, {cols} FROM rt"
        a = d.query(q)
        _equal(a, s.query(q))
        assert a["doc_id"].size == 1200
        assert (C.decode_states(a["c1"], m)[0] == -1).sum() == 1  # the fixture's dropped slot
        pcols = ", ".join(f"c{li}, p_c{li}" for li in range(m.num_layers))
        q = f"SELECT doc_id, token_id, is_bos, p_token, p_bos, {pcols} FROM pr"
        _equal(d.query(q), s.query(q))
        wd, ws = d.layer_weight_states(), s.layer_weight_states()
        _equal(wd, ws, floats=("w0", "w1"))
        docs = np.unique(a["doc_id"])[::3]
        d.set_test_docs(docs), s.set_test_docs(docs)
        keys = {"tok": "token_id", "te": "CAST(is_test AS INT)"}
        k, layers = m.top_k, range(m.num_layers)
        src = "rw a JOIN rt b1 ON b1.doc_id = a.doc_id AND b1.position = a.position - 1"
        specs = [
            [C.grouped_spec(li, keys) for li in layers],
            [
                C._pair_spec(0, 1, "", "rt", "NOT is_bos"),
                C._pair_spec(1, 0, "", "rt", "NOT is_bos"),
            ],
            [C._pair_spec(li, li, "p_", "pr", "NOT is_bos AND NOT p_bos") for li in layers],
            [
                CountSpec((("g", g), ("y", f"t{li}")), "rt", "NOT is_bos")
                for li in layers
                for g in ("token_id", "position")
            ],
        ]
        weighted = [
            C.grouped_sql(k, li, {}, src, "NOT a.is_bos AND a.token_id = 3", "a.", True)
            for li in layers
        ]
        s.batch_layers = 8
        for parts in [[x.sql() for x in group] for group in specs] + [weighted]:
            assert stacked_sql(parts) is not None, parts[0]
            want = list(C.batched(d, parts))
            got = list(C.batched(s, parts))
            assert len(got) == len(parts) and any(r["n"].size for r in got)
            for x, y in zip(want, got, strict=True):
                _equal(x, y, floats=("w0", "w1"))
        # DuckDB's dense numpy counts = Spark's stacked GROUP BYs, table by table
        for group in specs:
            for x, y in zip(C.counted(d, group), C.counted(s, group), strict=True):
                _equal(x, y)
        assert sum(int(r["n"][r["te"] == 1].sum()) for r in C.counted(s, specs[0])) > 0
    finally:
        s.close()
        d.close()


def test_stacked_sql_only_for_per_column_variants():
    from moelab.analysis.engines import stacked_sql

    one = "SELECT c0 AS c, COUNT(*) AS n FROM rt WHERE NOT is_bos GROUP BY c0"
    two = one.replace("c0", "c1")
    got = stacked_sql([one, two])
    assert got == (
        "SELECT part_, x_0_ AS c, COUNT(*) AS n FROM rt  LATERAL VIEW stack(2, 0, c0, 1, c1)"
        " s_ AS part_, x_0_ WHERE NOT is_bos GROUP BY part_, x_0_"
    )
    for bad in (
        [one],  # nothing to stack
        [one, one.replace("FROM rt", "FROM pr")],  # another source
        [one, one.replace("AS c,", "AS d,")],  # another output name
        [one.replace("is_bos", "is_bos AND c0 > 0"), two.replace("is_bos", "is_bos OR c1 > 0")],
        [one, one.replace("NOT is_bos", "token_id = 4")],  # another shape
        [one, two.replace(" GROUP BY c1", "")],
        ["SELECT COUNT(*) AS n FROM rt WHERE c0 = 1", "SELECT COUNT(*) AS n FROM rt WHERE c1 = 1"],
        [f"SELECT * FROM ({one}) q GROUP BY c", f"SELECT * FROM ({two}) q GROUP BY c"],
    ):
        assert stacked_sql(bad) is None, bad


def test_stream_batches_carry_and_read_errors(stored, tmp_path):
    """Small record batches (the previous-row carry crosses many batch boundaries, the next
    batch coded in a worker thread) give the same table and tallies as whole shards; a shard
    that cannot be read stops the build with an error naming the store."""
    from moelab.analysis import engines as E
    from moelab.errors import TraceError

    _, sc, path = stored
    sc.eng.query("SELECT COUNT(*) AS n FROM rt")
    order = "ORDER BY doc_id, position"
    want = sc.eng.query(f"SELECT * EXCLUDE (is_test) FROM rtc {order}")
    with DuckDBEngine(path, threads=1) as small:
        small._materialise(batch_rows=64)
        got = small.query(f"SELECT * EXCLUDE (is_test) FROM rtc {order}")
        assert small._tables == ["rtc"]
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], key)
        for key in ("n", "w"):
            np.testing.assert_allclose(small._wstates[key], sc.eng._wstates[key], rtol=1e-12)
    assert want["has_prev"].sum() == 3000 - 30  # one per non-first row of each document
    # the coded batches carry exactly the schema the table is declared with
    import pyarrow as pa
    import pyarrow.parquet as pq

    m = sc.eng.meta
    base, no = E.code_base(m), E.no_expert_value(m.num_experts)
    bt = next(pq.ParquetFile(str(sc.eng.shards[0])).iter_batches(64, columns=E.stream_columns(m)))
    out, _ = E._stream_batch(bt, m.num_layers, m.top_k, base, no, None, None)
    schema = E.stream_schema(m.num_layers, m.top_k, base)
    assert pa.RecordBatch.from_pydict(out).schema.equals(schema)
    assert list(want) == [n for n in schema.names if n != "is_test"]
    broken = tmp_path / "broken"
    (broken / "shards").mkdir(parents=True)
    for f in path.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    shards = sorted((path / "shards").iterdir())
    for i, f in enumerate(shards):
        data = f.read_bytes()
        (broken / "shards" / f.name).write_bytes(data[: len(data) // 2] if i == 2 else data)
    with (
        DuckDBEngine(broken, threads=1) as bad,
        pytest.raises(TraceError, match="broken: could not read the shards"),
    ):
        bad.query("SELECT COUNT(*) AS n FROM rt")

    def items():
        yield from range(5)
        raise ValueError("item 5 failed")

    seen = []
    with pytest.raises(ValueError, match="item 5"):
        for x in E.read_ahead(items()):
            seen.append(x)
    assert seen == [0, 1, 2, 3, 4] and list(E.read_ahead(iter([]))) == []


def test_dense_group_counts_equal_unique_rows():
    """The dense bincount of integer columns gives exactly the distinct rows and counts of
    np.unique (lexicographic order, the columns' dtypes), compacting narrow columns when the
    raw ranges would not fit, and declines (None) what cannot be dense."""
    from moelab.analysis.dense_counts import dense_group_counts

    rng = np.random.default_rng(5)
    n = 5000
    tok = rng.integers(-3, 3000, n)  # a wide key, negative values too
    code = rng.choice(np.array([7, 300, 301, 650, 728], np.int32), n)  # 5 of 729 codes
    flag = rng.integers(0, 2, n).astype(np.int32)
    cols = {"g": tok, "te": flag, "c": code}
    need = np.unique(tok).size * 2 * 5  # every column compacted to its present values
    for cells in (1 << 24, 3003 * 2 * 5, need, need - 1):
        got = dense_group_counts(cols, max_cells=cells)
        if cells < need:  # even compacted the cells do not fit
            assert got is None
            continue
        u, cnt = np.unique(np.stack([tok, flag, code], 1), axis=0, return_counts=True)
        for j, name in enumerate(("g", "te", "c")):
            np.testing.assert_array_equal(got[name], u[:, j])
            assert got[name].dtype == cols[name].dtype
        np.testing.assert_array_equal(got["n"], cnt)
        assert got["n"].sum() == n
    empty = dense_group_counts({"g": tok[:0], "c": code[:0]})
    assert empty["n"].size == 0 and empty["c"].dtype == np.int32
    assert dense_group_counts({"g": np.array([0, 2**40])}, max_cells=10) is None  # too wide
    assert dense_group_counts({"w": np.array([0.5, 1.5])}) is None  # not integers


def test_dense_counts_equal_sql_group_by(stored, monkeypatch):
    """Every out-of-core analysis gives the same numbers, seeded draws included, whether
    DuckDB's count queries are counted densely in numpy or by its SQL GROUP BY (and the
    dense path is the one taken at this size)."""
    from moelab.analysis import dense_counts as D

    _, sc, _ = stored
    calls = []
    real = D.dense_group_counts

    def spy(cols, max_cells=D.MAX_CELLS):
        out = real(cols, max_cells)
        calls.append(out is not None)
        return out

    monkeypatch.setattr("moelab.analysis.engines.dense_group_counts", spy)

    def run():
        return [
            O.predictability(sc, min_count=5),
            O.spread_token_vs_position(sc, 5),
            O.by_domain(sc),
            O.by_vocab(sc, "input", 5),
            O.by_vocab(sc, "next", 5),
            O.repeat_rate(sc),
            O.transition_summary(sc, 1),
            O.coactivation(sc, 1),
        ]

    dense = run()
    assert calls and all(calls)
    monkeypatch.setattr(sc.eng, "dense_counts", False)
    calls.clear()
    sql = run()
    assert not calls
    for a, b in zip(dense, sql, strict=True):
        assert repr(a) == repr(b)
