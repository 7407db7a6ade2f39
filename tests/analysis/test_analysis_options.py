"""`moelab analyze` / analyze() validate their options before reading or writing anything."""

from __future__ import annotations

import sys

import pytest
from test_analysis_sql import write_store

from moelab.analysis.run import analyze
from moelab.analysis.synthetic import synthetic_trace
from moelab.analysis.transitions import transition_summary
from moelab.cli import main
from moelab.errors import AnalysisError, ConfigError


def run(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """Run the real entry point (moelab.cli.main); (exit code, stdout + stderr)."""
    monkeypatch.setattr(sys, "argv", ["moelab", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    cap = capsys.readouterr()
    return (0 if exc.value.code is None else int(exc.value.code)), cap.out + cap.err


@pytest.mark.parametrize(
    ("flag", "value", "want"),
    [
        ("--n", "0", "expected a layer distance >= 1"),
        ("--n", "-2", "expected a layer distance >= 1"),
        ("--max-points", "-5", "expected an integer >= 10"),
        ("--max-points", "3", "expected an integer >= 10"),
        ("--min-count", "0", "expected an integer >= 1"),
    ],
)
def test_cli_refuses_bad_options(tmp_path, capsys, monkeypatch, flag, value, want) -> None:
    tr = synthetic_trace(600, 2, 4, 2, vocab=30, doc_len=100, seed=3)
    store = write_store(tmp_path / "store", tr)
    out = tmp_path / "out"
    code, output = run(["analyze", str(store), "--out", str(out), flag, value], capsys, monkeypatch)
    assert code == 2, output
    assert "Traceback" not in output
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} {value}: {want}"), output
    assert not out.exists()


def test_api_refuses_bad_options_and_unknown_doc(tmp_path) -> None:
    tr = synthetic_trace(600, 2, 4, 2, vocab=30, doc_len=100, seed=3)
    with pytest.raises(ConfigError, match="--n 0"):
        analyze(tr, tmp_path / "a", n=0)
    with pytest.raises(ConfigError, match="--max-points -5"):
        analyze(tr, tmp_path / "a", max_points=-5)
    with pytest.raises(ConfigError, match="--doc 12345: document id not in the trace"):
        analyze(tr, tmp_path / "a", text_doc=12345)
    assert not (tmp_path / "a").exists()


def test_transition_summary_gives_the_true_reason() -> None:
    tr = synthetic_trace(600, 3, 4, 2, vocab=30, doc_len=100, seed=3)
    with pytest.raises(AnalysisError, match="layer distance must be >= 1"):
        transition_summary(tr, n=0)
    with pytest.raises(AnalysisError, match="needs at least n\\+1 MoE layers; the trace has 3"):
        transition_summary(tr, n=3)
