"""End to end: analyze() writes numbers, CSVs, figures and a report that renders in Chromium;
the CLI command runs on a stored trace; missing logits/empty traces give clear messages."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from test_analysis_sql import write_store
from typer.testing import CliRunner

from moelab.analysis.run import analyze
from moelab.analysis.synthetic import synthetic_trace
from moelab.errors import AnalysisError
from moelab.report.browser import check_page, find_chromium

STRINGS = [" the", ",", " 42", "foo_bar", " ", "x"]


class FakeTokenizer:
    """decode([id]) like tokenizers.Tokenizer."""

    def decode(self, ids: list[int]) -> str:
        return STRINGS[ids[0] % len(STRINGS)]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    tr = synthetic_trace(4000, 3, 8, 2, vocab=60, doc_len=100, seed=0)
    early = synthetic_trace(4000, 3, 8, 2, vocab=60, doc_len=100, seed=0, chain_strength=0.0)
    nums = analyze(
        tr,
        out,
        tokenizer=FakeTokenizer(),
        compare=early,
        token_ids=[1, 999],
        context=[2],
        min_count=5,
        max_points=150,
        seed=0,
    )
    return tr, out, nums


def test_numbers_and_files(result):
    tr, out, nums = result
    for key in (
        "usage",
        "balance",
        "routing_entropy",
        "transitions",
        "coactivation",
        "repeat",
        "trajectories",
        "specialization",
        "predictability",
        "spread",
        "saturation",
        "projections",
        "summary",
    ):
        assert key in nums, key
    assert (
        "usage for token 999" in nums["skipped"]
        and "does not occur" in nums["skipped"]["usage for token 999"]
    )
    assert nums["repeat"]["chance_top1"] == pytest.approx(1 / 8)
    assert len(nums["balance"]) == 3 and len(nums["transitions"]["per_layer"]) == 2
    assert set(nums["specialization"]) >= {"domain", "input token (N≥5)", "token class"}
    assert nums["saturation"]["chance"]["2"] == pytest.approx(0.25)
    text = (out / "numbers.json").read_text()
    assert "NaN" not in text  # strict JSON: NaN written as null
    on_disk = json.loads(text)
    assert on_disk["summary"][0] == nums["summary"][0]
    assert on_disk["repeat"]["chance_any"] == pytest.approx(nums["repeat"]["chance_any"])
    with open(out / "usage.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 8
    share = np.array([float(r["slot_share"]) for r in rows]).reshape(3, 8)
    np.testing.assert_allclose(share.sum(1), 1.0)
    for name in (
        "usage_slots.png",
        "usage_slots.html",
        "sankey.html",
        "token_grid.png",
        "plotly.min.js",
        "repeat.png",
        "projection_tsne.html",
        "saturation.png",
    ):
        assert (out / "figures" / name).is_file(), name
    html = (out / "report.html").read_text()
    assert html.count('<img alt="') >= 15
    assert "chance" in html and "Consecutive-token repeat rate" in html


@pytest.mark.skipif(
    find_chromium() is None, reason="Chromium is not installed (Debian package `chromium`)"
)
def test_report_renders_in_chromium(result):
    _, out, _ = result
    check = check_page(out / "report.html")
    assert check.errors == [], check.errors
    assert check.dom.count('class="main-svg"') >= 3  # usage heatmap, Sankey, projections drawn
    assert check.dom.count("<img ") >= 15
    assert check.nonblank_fraction > 0.02


def test_without_logits_skips_with_reason(tmp_path):
    tr = synthetic_trace(1500, 2, 8, 2, vocab=40, doc_len=100, logits=False, seed=2)
    nums = analyze(tr, tmp_path, write_report=False, figures=False, seed=0)
    assert "logits" in nums["skipped"]["routing entropy"]
    assert "logits" in nums["skipped"]["projections"]
    assert "usage" in nums and "predictability" in nums
    assert not (tmp_path / "report.html").exists() and not list((tmp_path / "figures").iterdir())


def test_empty_trace_message(tmp_path):
    tr = synthetic_trace(10, 2, 8, 2, seed=0).select(np.zeros(10, dtype=bool))
    with pytest.raises(AnalysisError, match="empty"):
        analyze(tr, tmp_path)


def test_cli_analyze(tmp_path):
    from moelab.cli import app

    tr = synthetic_trace(1200, 2, 4, 2, vocab=30, doc_len=100, logits=False, seed=3)
    store = write_store(tmp_path / "store", tr)
    res = CliRunner().invoke(
        app,
        [
            "analyze",
            str(store),
            "--out",
            str(tmp_path / "out"),
            "--token",
            "3",
            "--no-projections",
            "--no-figures",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "report.html" in res.output
    nums = json.loads((tmp_path / "out" / "numbers.json").read_text())
    assert nums["n_tokens"] == 1200 and "usage_tokens" in nums


def test_cli_missing_trace_is_a_clear_error(tmp_path):
    from moelab.cli import app
    from moelab.errors import MoelabError

    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and isinstance(res.exception, MoelabError)
    assert "nope" in str(res.exception)


def test_many_experts_top8_of_64(tmp_path):
    tr = synthetic_trace(600, 2, 64, 8, vocab=40, doc_len=100, seed=4)
    nums = analyze(tr, tmp_path, write_report=False, figures=False, do_projections=False, seed=0)
    assert "C(64,8)" in nums["skipped"]["set transitions layer 0"]
    assert 0.0 <= nums["transitions"]["per_layer"][0]["nmi_set"] <= 1.0
    assert nums["repeat"]["per_layer"][0]["load_chance_any"] is None  # too many sets for q^T D q
    assert nums["predictability"]["chance"] == pytest.approx(1 / 4426165368)


def test_a_single_moe_layer_gets_every_analysis_that_needs_one_layer(tmp_path):
    """A MoEfied model with dense first layers can have one MoE layer: no layer-to-layer flow
    exists, the rest of the report still builds (regression: the Sankey indexed flows[0])."""
    tr = synthetic_trace(1200, 1, 8, 2, vocab=40, doc_len=100, seed=5)
    nums = analyze(tr, tmp_path, seed=0, do_projections=False)
    assert nums["trajectories"]["n_tokens"] > 0 and "usage" in nums
    assert not (tmp_path / "figures" / "sankey.html").exists()
    assert (tmp_path / "report.html").exists()
