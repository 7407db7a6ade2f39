"""`moelab explore`: a local web app (FastAPI + DuckDB) to look at routing token by token.

Token search by text or id with previous / next token and domain filters, per-layer expert
heatmap, top trajectories (Sankey), layer-to-layer co-occurrence, held-out predictor hit rate
and occurrences in context, all over a per-token cache of a trace store (see docs/guide/09-explore.md).
"""

from moelab.explore.queries import (
    ExploreInputError,
    Explorer,
    Filters,
    NotFoundError,
    contexts,
    cooccurrence,
    heatmap,
    open_explorer,
    predictor,
    trajectories,
)

__all__ = [
    "Explorer",
    "ExploreInputError",
    "Filters",
    "NotFoundError",
    "contexts",
    "cooccurrence",
    "heatmap",
    "open_explorer",
    "predictor",
    "trajectories",
]
