"""Where a result came from: moelab version and source commit, library versions, Python.

Reports and summaries carry this so a number can be traced to the code and the environment
that produced it (the commit is read with `git` from moelab's own source tree when it is a
checkout; an installed wheel has none).
"""

from __future__ import annotations

import platform
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import moelab


@cache
def source_commit() -> str | None:
    """Short commit hash of the checkout moelab is imported from ('+dirty' with uncommitted
    changes), or None when moelab does not live in a git work tree."""
    here = Path(moelab.__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha or None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def provenance() -> dict[str, Any]:
    """moelab version and commit, torch / transformers / numpy versions, Python version."""
    return {
        "moelab_version": moelab.__version__,
        "moelab_commit": source_commit(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "numpy": _version("numpy"),
        "python": platform.python_version(),
    }
