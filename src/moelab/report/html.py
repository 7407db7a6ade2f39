"""`Report`: a small builder for one self-contained HTML page (no network needed to open it).

A report is a title, an optional summary table and a list of sections; each section has a title,
a plain-language caption and items: text paragraphs, matplotlib figures (inline base64 PNG),
plotly figures (interactive; plotly.js is embedded inline once, in the page head) and tables.
Later stages add their own sections to the same object before `write(path)`:

    rep = Report("moelab analysis")
    sec = rep.section("Expert usage", "What the figure shows; uniform routing would give ...")
    sec.figure(fig)            # matplotlib Figure
    sec.plotly(go_fig)         # plotly Figure
    sec.table([{"layer": 0, "entropy": 0.98}])
    rep.write("out/report.html")   # atomic
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from moelab._io import atomic_write_text
from moelab.errors import InputError

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1180px;
padding:1rem 2rem;color:#1d2430;line-height:1.45}
h1{border-bottom:2px solid #446;padding-bottom:.3rem}h2{margin-top:2.2rem;color:#234}
.caption{color:#444;max-width:900px}.fig{margin:.8rem 0}.fig img{max-width:100%;height:auto}
.figcap{font-size:.9rem;color:#555;margin-top:.2rem}
table.data{border-collapse:collapse;font-size:.85rem;margin:.6rem 0}
table.data th,table.data td{border:1px solid #ccd;padding:.2rem .5rem;text-align:right}
table.data th{background:#eef}table.data td:first-child,table.data th:first-child{text-align:left}
nav ul{columns:2;font-size:.9rem}.meta{color:#777;font-size:.8rem}
.warning{background:#fde8e8;border:2px solid #b00;color:#700;padding:.5rem .8rem}
ul.facts{font-size:.85rem;color:#333}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "–"
        return f"{v:.4g}"
    return html.escape(str(v))


def _table_html(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p><em>(no rows)</em></p>"
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


@dataclass
class Section:
    """One titled part of a report; add items in display order."""

    title: str
    caption: str = ""
    items: list[tuple[str, str]] = field(default_factory=list)  # (kind, html)

    def text(self, text: str) -> Section:
        """Add a paragraph of plain text (escaped)."""
        self.items.append(("text", f"<p>{html.escape(text)}</p>"))
        return self

    def figure(self, fig: Any, caption: str = "", dpi: int = 110) -> Section:
        """Add a matplotlib Figure as an inline PNG (the figure is closed afterwards)."""
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        return self.png(buf.getvalue(), caption)

    def png(self, data: bytes, caption: str = "") -> Section:
        """Add PNG bytes as an inline image."""
        if not data.startswith(b"\x89PNG"):
            raise InputError("Section.png: data is not a PNG image (missing PNG signature)")
        b64 = base64.b64encode(data).decode("ascii")
        alt = html.escape(caption or self.title)
        self.items.append(
            (
                "png",
                f'<div class="fig"><img alt="{alt}" src="data:image/png;base64,{b64}">'
                f'<div class="figcap">{html.escape(caption)}</div></div>',
            )
        )
        return self

    def plotly(self, fig: Any, caption: str = "") -> Section:
        """Add an interactive plotly Figure (uses the plotly.js embedded once in the page)."""
        div = fig.to_html(full_html=False, include_plotlyjs=False, config={"responsive": True})
        self.items.append(
            (
                "plotly",
                f'<div class="fig plotly-fig">{div}<div class="figcap">{html.escape(caption)}</div></div>',
            )
        )
        return self

    def table(
        self, rows: list[dict[str, Any]], caption: str = "", columns: list[str] | None = None
    ) -> Section:
        """Add a table from a list of row dicts (floats shown with 4 significant digits)."""
        cap = f'<div class="figcap">{html.escape(caption)}</div>' if caption else ""
        self.items.append(("table", _table_html(rows, columns) + cap))
        return self

    def html(self, anchor: str) -> str:
        """The section as HTML."""
        cap = f'<p class="caption">{html.escape(self.caption)}</p>' if self.caption else ""
        return (
            f'<section id="{anchor}"><h2>{html.escape(self.title)}</h2>{cap}'
            + "".join(h for _, h in self.items)
            + "</section>"
        )


class Report:
    """A self-contained HTML page made of sections; `write(path)` saves it atomically."""

    def __init__(self, title: str, intro: str = "") -> None:
        self.title = title
        self.intro = intro
        self.summary: list[dict[str, Any]] = []
        self.sections: list[Section] = []
        self.warnings: list[str] = []  # shown in a banner above everything else
        self.facts: list[tuple[str, str]] = []  # (name, value) lines under the title

    def add_warning(self, text: str) -> None:
        """A loud banner at the top of the page (e.g. a run stopped by its time cap)."""
        self.warnings.append(text)

    def add_fact(self, name: str, value: Any) -> None:
        """One 'name: value' line in the header (corpus, splits, seed, version, commit)."""
        self.facts.append((name, str(value)))

    def section(self, title: str, caption: str = "") -> Section:
        """Append and return a new section."""
        sec = Section(title, caption)
        self.sections.append(sec)
        return sec

    def add_summary(self, rows: list[dict[str, Any]]) -> None:
        """Add rows to the summary table shown at the top of the page."""
        self.summary.extend(rows)

    @property
    def needs_plotly(self) -> bool:
        """True when some section holds a plotly figure."""
        return any(kind == "plotly" for s in self.sections for kind, _ in s.items)

    def to_html(self) -> str:
        """The whole page as one HTML string."""
        head_js = ""
        if self.needs_plotly:
            from plotly.offline import get_plotlyjs

            head_js = f'<script type="text/javascript">{get_plotlyjs()}</script>'
        nav = "".join(
            f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>'
            for i, s in enumerate(self.sections)
        )
        summary = f"<h2>Summary</h2>{_table_html(self.summary)}" if self.summary else ""
        intro = f"<p>{html.escape(self.intro)}</p>" if self.intro else ""
        intro += "".join(
            f'<p class="warning"><b>WARNING:</b> {html.escape(w)}</p>' for w in self.warnings
        )
        if self.facts:
            intro += '<ul class="facts">' + "".join(
                f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in self.facts
            )
            intro += "</ul>"
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        body = "".join(s.html(f"s{i}") for i, s in enumerate(self.sections))
        return (
            f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style>{head_js}</head><body>"
            f'<h1>{html.escape(self.title)}</h1>{intro}<p class="meta">generated {stamp} by moelab</p>'
            f"{summary}<nav><ul>{nav}</ul></nav>{body}</body></html>"
        )

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the page to `path` atomically."""
        atomic_write_text(path, self.to_html())
