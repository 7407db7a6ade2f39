"""Output of `analyze`: numbers (JSON-safe), CSV tables, PNG and plotly figures, report sections."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from moelab._io import atomic_write_text
from moelab.report import Report


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def finite(obj: Any) -> Any:
    """Replace NaN/inf by None recursively so numbers.json is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def per_layer_rows(**cols: np.ndarray) -> list[dict[str, Any]]:
    """One row per layer {"layer": i, name: float(value[i]), ...}."""
    n = len(next(iter(cols.values())))
    return [{"layer": i, **{k: float(v[i]) for k, v in cols.items()}} for i in range(n)]


def sample_layers(num_l: int, at_most: int = 4) -> list[int]:
    """Up to `at_most` evenly spaced layers (first and last included)."""
    return sorted({int(round(v)) for v in np.linspace(0, num_l - 1, min(at_most, num_l))})


class Out:
    """Collects numbers and figures; writes PNG/HTML files and fills the report."""

    def __init__(self, out_dir: Path, report: Report | None, figures: bool = True) -> None:
        self.dir = out_dir
        self.figures = figures
        self.fig_dir = out_dir / "figures"
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        self.report = report
        self.numbers: dict[str, Any] = {"skipped": {}}
        self.files: list[str] = []

    def png(self, sec: Any, name: str, fig: Any, caption: str) -> None:
        import matplotlib.pyplot as plt

        if not self.figures:
            plt.close(fig)
            return
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        data = buf.getvalue()
        from moelab._io import atomic_write_bytes

        atomic_write_bytes(self.fig_dir / f"{name}.png", data)
        self.files.append(f"figures/{name}.png")
        if sec is not None:
            sec.png(data, caption)

    def plotly(self, sec: Any, name: str, fig: Any, caption: str) -> None:
        if not self.figures:
            return
        js = self.fig_dir / "plotly.min.js"
        if not js.exists():  # one shared copy beside the figure pages (they work offline)
            from plotly.offline import get_plotlyjs

            atomic_write_text(js, get_plotlyjs())
            self.files.append("figures/plotly.min.js")
        atomic_write_text(
            self.fig_dir / f"{name}.html", fig.to_html(include_plotlyjs="directory", full_html=True)
        )
        self.files.append(f"figures/{name}.html")
        if sec is not None:
            sec.plotly(fig, caption)

    def section(self, title: str, caption: str) -> Any:
        return self.report.section(title, caption) if self.report is not None else None

    def csv(self, name: str, rows: list[dict[str, Any]]) -> None:
        write_csv(self.dir / f"{name}.csv", rows)
        self.files.append(f"{name}.csv")
