"""Shared by the benchmarks: replace (or extend) one "## ..." section of bench/RESULTS.md."""

from __future__ import annotations

from pathlib import Path

from moelab._io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(path: Path, heading: str, body: str, append: bool = False) -> None:
    """Replace the section starting at the line `heading` up to the next '## ' heading with
    `body` (which starts with `heading`); with `append`, add body after the section's text
    instead. A missing section is appended to the file. Written atomically."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    lines = text.splitlines()
    body_lines = body.rstrip("\n").splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        if append:
            added = (
                body_lines[1:] if body_lines and body_lines[0].strip() == heading else body_lines
            )
            new_lines = [*lines[:end], "", *added, *lines[end:]]
        else:
            new_lines = [*lines[:start], *body_lines, *lines[end:]]
        new = "\n".join(new_lines) + "\n"
    atomic_write_text(path, new)
