"""evaluate/compare (labels, shared rows, files), report section, CLI, and a TraceStore round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from moelab.predict import (
    FrequencyPrior,
    GateLookahead,
    Horizon,
    NGramPredictor,
    Predictor,
    PreviousLayer,
    TokenBuckets,
    compare,
    evaluate,
    make_predictor,
    report_section,
)
from moelab.predict.metrics import score_rows
from moelab.trace.store import TraceStore, TraceWriter


def write_store(trace, gates, path: Path) -> Path:
    """Write a synthetic Trace (+ gates, hidden side store) through TraceWriter."""
    w = TraceWriter(
        path, trace.meta, shard_tokens=256, logits=False, hidden_points=tuple(trace.hidden)
    )
    hpos = np.full(trace.num_tokens, -1)
    hpos[trace.hidden_rows] = np.arange(len(trace.hidden_rows))
    for a in range(0, trace.num_tokens, 100):
        sl = slice(a, a + 100)
        local = np.flatnonzero(hpos[sl] >= 0)
        w.append(
            doc_id=trace.doc_id[sl],
            position=trace.position[sl],
            token_id=trace.token_id[sl],
            domain=trace.domain[sl],
            is_bos=trace.is_bos[sl],
            expert_ids=trace.expert_ids[sl],
            weights=trace.weights[sl],
            hidden={k: v[hpos[sl][local]] for k, v in trace.hidden.items()},
            hidden_rows=local,
        )
    w.close()
    gates.save(path / "gates.safetensors")
    return path


def test_evaluate_values_and_labels(synth):
    trace, gates, train, test = synth
    exact = GateLookahead(Horizon(), gates=gates).fit(train)
    r = evaluate(exact, test, "test")
    assert r["split"] == "test" and r["in_sample"] is False and "held-out" in r["scored_on"]
    assert r["overall"]["recall@k"] == 1.0 and r["overall"]["exact_set"] == 1.0
    assert r["overall"]["rows"] == test.num_tokens * test.meta.num_layers
    p = PreviousLayer(Horizon(layers_ahead=1)).fit(train)
    r = evaluate(p, train, "train", in_sample=True, buckets=TokenBuckets.from_trace(train))
    assert "in-sample" in r["scored_on"] and set(r["per_layer"]) == {"1", "2", "3"}
    # per-layer numbers equal a direct metric computation
    s = p.predict_scores(train, 2)
    want = score_rows(s, train.expert_ids[:, 2])
    assert r["per_layer"]["2"]["recall@k"] == pytest.approx(want["recall@k"])
    # buckets partition the rows
    assert sum(b["rows"] for b in r["buckets"].values()) == r["overall"]["rows"]
    # overall = row-weighted mean of the layers
    pl = r["per_layer"]
    mean = sum(v["recall@k"] * v["rows"] for v in pl.values()) / sum(v["rows"] for v in pl.values())
    assert r["overall"]["recall@k"] == pytest.approx(mean)


def test_token_buckets():
    b = TokenBuckets(top_ids=np.array([1, 2]), counts={1: 50, 2: 40, 3: 10, 4: 2}, rare_max=5)
    m = b.assign(np.array([1, 3, 4, 99]))
    assert m["top2"].tolist() == [True, False, False, False]
    assert m["rare(<=5)"].tolist() == [False, False, True, True]
    assert m["other"].tolist() == [False, True, False, False]


def test_compare_same_rows_files_and_report(synth, tmp_path):
    trace, gates, train, test = synth
    # hidden states on half of the rows only: gate lookahead sees fewer rows
    keep = np.arange(0, len(test.hidden_rows), 2)
    half = type(test)(
        **{
            **test.__dict__,
            "hidden": {k: v[keep] for k, v in test.hidden.items()},
            "hidden_rows": test.hidden_rows[keep],
        }
    )
    h = Horizon(layers_ahead=1)
    ps = [
        FrequencyPrior(h).fit(train),
        NGramPredictor(h, n=2).fit(train),
        GateLookahead(h, gates=gates).fit(train),
    ]
    res = compare(ps, half, train=train, split_name="test", out_dir=tmp_path, show=False)
    held = [r for r in res.results if not r["in_sample"]]
    ins = [r for r in res.results if r["in_sample"]]
    assert len(held) == 3 and len(ins) == 3
    assert {r["overall"]["rows"] for r in held} == {len(keep) * 3}  # common rows across predictors
    assert all(r["split"] == "train" and "in-sample" in r["scored_on"] for r in ins)
    text = (tmp_path / "compare.csv").read_text()
    assert text.splitlines()[0].startswith("predictor,horizon,scored_on,rows,recall@k")
    assert len(text.splitlines()) == 7
    assert (tmp_path / "per_layer_d1.png").read_bytes().startswith(b"\x89PNG")
    assert len(json.loads((tmp_path / "compare.json").read_text())) == 6
    sec = report_section(res)
    kinds = [k for k, _ in sec.items]
    assert sec.title == "Expert predictors" and kinds == ["table", "png"]


def test_trace_store_integration_and_cli(synth, tmp_path):
    trace, gates, _, _ = synth
    path = write_store(trace, gates, tmp_path / "trace")
    store = TraceStore.open(path)
    loaded = store.load()
    assert np.array_equal(loaded.expert_ids, trace.expert_ids)
    # gate lookahead at d = 0 from the float16 side store still reproduces (almost) every set
    p = GateLookahead(Horizon(), gates=store.gates()).fit(loaded)
    r = evaluate(p, loaded, "all", measure_cost=False)
    assert r["overall"]["exact_set"] > 0.97
    # CLI: fit (with a document holdout), eval on that holdout, compare
    from moelab.cli import app

    runner = CliRunner()
    out = runner.invoke(
        app,
        [
            "predict",
            "fit",
            "--train",
            str(path),
            "--predictor",
            "ngram2",
            "--horizon",
            "d=1",
            "--out",
            str(tmp_path / "ng"),
            "--holdout",
            "0.3",
        ],
    )
    assert out.exit_code == 0, out.output
    q = Predictor.load(tmp_path / "ng")
    assert isinstance(q, NGramPredictor) and q.fit_info["holdout"] == 0.3
    assert q.fit_info["train_tokens"] < trace.num_tokens
    out = runner.invoke(
        app,
        ["predict", "eval", "--model", str(tmp_path / "ng"), "--out", str(tmp_path / "ev.json")],
    )
    assert out.exit_code == 0, out.output
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert "held out" in ev["split"] and ev["overall"]["rows"] > 0
    out = runner.invoke(
        app,
        [
            "predict",
            "compare",
            "--train",
            str(path),
            "--horizons",
            "d=1,t+1",
            "--predictors",
            "prior,prev-layer,prev-token,ngram1,gate-lookahead",
            "--out",
            str(tmp_path / "cmp"),
        ],
    )
    assert out.exit_code == 0, out.output
    rows = (tmp_path / "cmp" / "compare.csv").read_text().splitlines()
    # d=1: prior, prev-layer, ngram1, gate-lookahead; t+1: prior, prev-token, ngram1 -> 7 x 2 splits
    assert len(rows) == 1 + 14
    out = runner.invoke(
        app,
        [
            "predict",
            "fit",
            "--train",
            str(path),
            "--predictor",
            "nope",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert out.exit_code != 0 and "nope" in str(out.exception)
    assert make_predictor("prior", Horizon(layers_ahead=1)).name == "prior"
