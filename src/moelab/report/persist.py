"""Save a report's sections as JSON and load them back, so a pipeline stage can hand its
finished sections (figures already rendered to inline HTML) to a later report."""

from __future__ import annotations

import json
from pathlib import Path

from moelab._io import atomic_write_json
from moelab.errors import MoelabError
from moelab.report.html import Report, Section


def save_sections(report: Report, path: str | Path) -> None:
    """Write report.sections and report.summary to a JSON file atomically."""
    atomic_write_json(
        path,
        {
            "title": report.title,
            "summary": report.summary,
            "sections": [
                {"title": s.title, "caption": s.caption, "items": [list(i) for i in s.items]}
                for s in report.sections
            ],
        },
        indent=None,
    )


def load_sections(path: str | Path) -> tuple[list[dict], list[Section]]:
    """(summary rows, sections) from a file written by save_sections."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        sections = [
            Section(s["title"], s.get("caption", ""), [(k, h) for k, h in s["items"]])
            for s in d["sections"]
        ]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise MoelabError(f"{p}: not a saved report-sections file ({exc})") from None
    return list(d.get("summary", [])), sections
