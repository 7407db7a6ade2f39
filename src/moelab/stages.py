"""Cached pipeline stages: each stage writes into its own folder and, when finished, a
`done.json` holding a hash of its parameters and its result summary. A re-run skips finished
stages with unchanged parameters, so an interrupted `moelab demo` resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from moelab._io import atomic_write_json

console = Console()


def params_hash(params: dict[str, Any]) -> str:
    """Stable short hash of JSON-serialisable parameters."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class StageRunner:
    """Runs named stages under `root`, reusing finished ones (same params) and timing each."""

    root: Path
    force: bool = False

    def dir(self, name: str) -> Path:
        """Folder of stage `name`."""
        return self.root / name

    def done(self, name: str, params: dict[str, Any]) -> dict[str, Any] | None:
        """The stored result of a finished stage with these params, else None."""
        marker = self.dir(name) / "done.json"
        if self.force or not marker.exists():
            return None
        try:
            data = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if data.get("params_hash") != params_hash(params):
            return None
        return data.get("result", {})

    def run(
        self,
        name: str,
        params: dict[str, Any],
        fn: Callable[[Path], dict[str, Any]],
        resumable: bool = False,
    ) -> dict[str, Any]:
        """Run `fn(stage_dir) -> result` unless already done; returns the result dict.

        Non-resumable stages start from an empty folder when re-run (no half-written leftovers);
        resumable ones (training, tracing) keep their folder and continue from their checkpoint.
        """
        cached = self.done(name, params)
        if cached is not None:
            console.print(f"[dim]✓ {name}: done earlier, reusing {self.dir(name)}[/dim]")
            return cached
        d = self.dir(name)
        marker = d / "done.json"
        if marker.exists():
            marker.unlink()
        if d.exists() and not resumable:
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        result = fn(d)
        result = dict(result)
        result["seconds"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(
            marker, {"params_hash": params_hash(params), "params": params, "result": result}
        )
        console.print(f"[green]✓ {name}[/green] in {result['seconds']:.1f} s")
        return result
