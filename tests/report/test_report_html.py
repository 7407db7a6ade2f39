"""Report builder: structure, inline figures, plotly.js embedded once, escaping, atomic write,
and a real render in headless Chromium without console errors."""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
import pytest  # noqa: E402

from moelab.errors import InputError  # noqa: E402
from moelab.report import Report  # noqa: E402
from moelab.report.browser import check_page, find_chromium  # noqa: E402


def _report() -> Report:
    rep = Report("Test <report>", "intro & more")
    rep.add_summary([{"metric": "NMI", "value": 0.123456, "chance": 0.0}])
    sec = rep.section("First", "caption <b>escaped</b>")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    sec.figure(fig, "a line")
    sec.plotly(go.Figure(go.Heatmap(z=np.eye(3))), "heatmap")
    sec2 = rep.section("Second")
    sec2.plotly(
        go.Figure(
            go.Sankey(node={"label": ["a", "b"]}, link={"source": [0], "target": [1], "value": [1]})
        )
    )
    sec2.table([{"a": 1, "b": float("nan")}, {"a": "x<y"}])
    sec2.text("plain <text>")
    return rep


def test_report_structure(tmp_path):
    rep = _report()
    path = tmp_path / "r" / "report.html"
    rep.write(path)
    html = path.read_text()
    assert html.count('<img alt="a line" src="data:image/png;base64,') == 1
    assert html.count('class="fig plotly-fig"') == 2
    assert html.count("Plotly.newPlot") >= 2
    # plotly.js is embedded exactly once, inline (no <script src=...>: works offline)
    assert len(re.findall(r"<script[^>]*\bsrc=", html)) == 0
    assert html.count("plotly.js v") <= 2 and len(html) > 1_000_000
    assert (
        "caption &lt;b&gt;escaped&lt;/b&gt;" in html
        and "x&lt;y" in html
        and "<b>escaped" not in html
    )
    assert "0.1235" in html and "–" in html  # 4 significant digits, NaN shown as a dash
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # atomic: no temp files left


def test_report_without_plotly_is_small(tmp_path):
    rep = Report("small")
    rep.section("only text").text("hello")
    rep.write(tmp_path / "s.html")
    assert (tmp_path / "s.html").stat().st_size < 10_000


def test_png_validation():
    with pytest.raises(InputError, match="PNG"):
        Report("x").section("s").png(b"GIF89a")


@pytest.mark.skipif(
    find_chromium() is None, reason="Chromium is not installed (Debian package `chromium`)"
)
def test_report_renders_in_chromium(tmp_path):
    path = tmp_path / "report.html"
    _report().write(path)
    check = check_page(path)
    assert check.errors == [], check.errors
    assert check.dom.count('class="main-svg"') >= 2  # plotly drew both figures
    assert "sankey" in check.dom and "<img" in check.dom
    assert check.nonblank_fraction > 0.01
    bad = tmp_path / "bad.html"
    bad.write_text("<html><head></head><body><script>notDefined();</script></body></html>")
    assert any("notDefined" in e for e in check_page(bad).errors)  # the checker can fail
