"""Registry entry: Router saturation against an earlier checkpoint (on the sample).

Computed through `c.src`, so it runs on the in-memory trace or out of core on DuckDB or Spark
(moelab.analysis.sources); writes numbers, CSV, figures and its report section.
"""

from __future__ import annotations

import numpy as np

from moelab.analysis import plots, saturation
from moelab.analysis.output import per_layer_rows as _per_layer
from moelab.analysis.sources import StoreSource, load_docs
from moelab.analysis.steps import Analysis, Context, register


def run(c: Context) -> None:
    """Compute, record and render this analysis."""
    src = c.src
    o = c.o
    seed = c.seed
    text_doc = c.text_doc
    layers_x = c.layers_x
    compare = c.compare
    final = src.sample(text_doc)
    early = compare
    if isinstance(compare, StoreSource):  # the same documents of the earlier store
        early = load_docs(compare.eng.shards, compare.meta, np.unique(final.doc_id))
    elif isinstance(src, StoreSource):
        early = compare.select(np.isin(compare.doc_id, np.unique(final.doc_id)))
    sr = saturation.router_saturation(early, final, seed=seed)
    cols = {f"saturation_k{kk}": sr.saturation[kk] for kk in sr.ks}
    cols |= {f"shuffled_k{kk}": sr.shuffled[kk] for kk in sr.ks}
    rows = _per_layer(**cols)
    o.numbers["saturation"] = {
        "per_layer": rows,
        "chance": {str(kk): v for kk, v in sr.chance.items()},
    }
    o.csv("saturation", rows)
    sec = o.section(
        "Router saturation (OLMoE Eq. 5)",
        "Share of the final checkpoint's top-k experts the earlier checkpoint already picks for the"
        " same token; chance k/E.",
    )
    o.png(
        sec,
        "saturation",
        plots.lines(
            layers_x,
            {f"k={kk}": sr.saturation[kk] for kk in sr.ks},
            "Router saturation",
            "MoE layer",
            "saturation",
            {f"k/E, k={kk}": sr.chance[kk] for kk in sr.ks},
        ),
        "",
    )


ANALYSIS = register(
    Analysis(name="router saturation", needs=("compare", "sample"), run=run, per_layer=False)
)
