"""Saved report sections load back identical and render the same HTML."""

import pytest

from moelab.errors import MoelabError
from moelab.report import Report
from moelab.report.persist import load_sections, save_sections


def test_sections_round_trip(tmp_path):
    rep = Report("t")
    rep.add_summary([{"what": "x", "value": 1.5}])
    sec = rep.section("A", "caption a")
    sec.text("hello <b>").table([{"a": 1, "b": 2.0}], caption="tbl")
    save_sections(rep, tmp_path / "s.json")
    summary, sections = load_sections(tmp_path / "s.json")
    assert summary == rep.summary
    assert [s.title for s in sections] == ["A"]
    assert sections[0].items == rep.sections[0].items
    assert sections[0].html("s0") == rep.sections[0].html("s0")


def test_bad_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MoelabError, match="not a saved report-sections file"):
        load_sections(tmp_path / "bad.json")
