"""Speed ratios from interleaved repeats, with their spread and an honest verdict.

A ratio measured once on a shared machine is noise presented as a result. `RatioSummary`
holds the per-repeat ratios (each repeat times both variants back to back), their median and
min-max, and says "no measurable difference" when the range includes 1.0. Where the variant
cannot truly be faster than the reference (offloaded vs all-resident: same work plus loads),
a median above 1 is flagged as measurement noise instead of shown as a speed-up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from moelab.errors import InputError


@dataclass(frozen=True)
class RatioSummary:
    """Per-repeat speed ratios (variant / reference) and what they support."""

    ratios: tuple[float, ...]
    cannot_exceed_one: bool = False  # True: a ratio > 1 is physically noise

    def __post_init__(self) -> None:
        if not self.ratios:
            raise InputError("RatioSummary: no repeats (need at least one measured ratio)")
        if not all(np.isfinite(r) and r > 0 for r in self.ratios):
            raise InputError(f"RatioSummary: ratios must be finite and > 0, got {self.ratios}")

    @property
    def median(self) -> float:
        """Median over repeats."""
        return float(np.median(self.ratios))

    @property
    def low(self) -> float:
        """Smallest repeat."""
        return float(min(self.ratios))

    @property
    def high(self) -> float:
        """Largest repeat."""
        return float(max(self.ratios))

    @property
    def verdict(self) -> str:
        """'no measurable difference', 'measurement noise: ...' or 'slower'/'faster'."""
        if self.low <= 1.0 <= self.high:
            return "no measurable difference"
        if self.cannot_exceed_one and self.median > 1.0:
            return "measurement noise: cannot be faster than the reference"
        return "faster" if self.median > 1.0 else "slower"

    def text(self) -> str:
        """e.g. '0.65x (0.61-0.70 over 5 repeats): slower'."""
        n = len(self.ratios)
        return (
            f"{self.median:.2f}x ({self.low:.2f}-{self.high:.2f} over {n} repeat"
            f"{'s' if n != 1 else ''}): {self.verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ratios, median, min, max, repeats, verdict, text."""
        d = asdict(self)
        d["ratios"] = list(self.ratios)
        d.update(
            median=self.median, min=self.low, max=self.high, repeats=len(self.ratios),
            verdict=self.verdict, text=self.text(),
        )  # fmt: skip
        return d
