"""Registry entry: Co-activation of experts within a layer.

Computed through `c.src`, so it runs on the in-memory trace or out of core on DuckDB or Spark
(moelab.analysis.sources); writes numbers, CSV, figures and its report section.
"""

from __future__ import annotations

import numpy as np

from moelab.analysis import plots
from moelab.analysis.output import sample_layers as _sample_layers
from moelab.analysis.steps import Analysis, Context, register


def run(c: Context) -> None:
    """Compute, record and render this analysis."""
    src = c.src
    o = c.o
    seed = c.seed
    num_l = c.num_l
    num_e = c.num_e
    k = c.k
    sec = o.section(
        "Co-activation within a layer",
        f"P(expert b chosen | expert a chosen) over all C(k,2) pairs of a token's top-{k}. Uniform"
        f" random sets give (k−1)/(E−1) = {(k - 1) / max(num_e - 1, 1):.3f} everywhere; structure"
        " means experts that are picked together.",
    )
    res = {}
    for layer in _sample_layers(num_l, 3):
        ca = src.coactivation(layer, seed=seed)
        res[layer] = {
            "conditional": ca.conditional.tolist(),
            "npmi": ca.npmi.tolist(),
            "max_abs_npmi": float(np.abs(ca.npmi[~np.eye(num_e, dtype=bool)]).max()),
        }
        o.png(
            sec,
            f"coactivation_L{layer}",
            plots.heatmap(
                ca.conditional,
                f"P(b | a), layer {layer}",
                "expert b",
                "expert a",
                center=ca.chance_conditional,
            ),
            f"White = chance {ca.chance_conditional:.3f}.",
        )
    o.numbers["coactivation"] = res


ANALYSIS = register(Analysis(name="co-activation", needs=(), run=run, per_layer=False))
