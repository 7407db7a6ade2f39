"""Self-contained HTML reports (figures inline, plotly.js embedded once, works offline)."""

from moelab.report.html import Report, Section

__all__ = ["Report", "Section"]
