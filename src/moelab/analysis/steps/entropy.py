"""Registry entry: Per-token routing entropy (needs router logits).

Computed through `c.src`, so it runs on the in-memory trace or out of core on DuckDB or Spark
(moelab.analysis.sources); writes numbers, CSV, figures and its report section.
"""

from __future__ import annotations

from moelab.analysis import plots
from moelab.analysis.output import per_layer_rows as _per_layer
from moelab.analysis.steps import Analysis, Context, register


def run(c: Context) -> None:
    """Compute, record and render this analysis."""
    src = c.src
    o = c.o
    summary = c.summary
    num_e = c.num_e
    layers_x = c.layers_x
    ent = src.routing_entropy()
    rows = _per_layer(mean_norm_entropy=ent.mean_norm_entropy, mean_top1_prob=ent.mean_top1_prob)
    o.numbers["routing_entropy"] = rows
    o.csv("routing_entropy", rows)
    summary.append(
        {
            "analysis": "per-token routing entropy / log E (mean)",
            "value": float(ent.mean_norm_entropy.mean()),
            "chance": 1.0,
            "shuffle baseline": float("nan"),
        }
    )
    sec = o.section(
        "Per-token routing entropy",
        "Mean entropy of each token's router distribution, divided by log E. 1 means the router"
        " is undecided (uniform probabilities); low values mean confident routing. Independent of"
        " load balance: a balanced router can still be confident per token.",
    )
    o.png(
        sec,
        "routing_entropy",
        plots.lines(
            layers_x,
            {
                "mean H(p)/log E": ent.mean_norm_entropy,
                "mean top-1 probability": ent.mean_top1_prob,
            },
            "Per-token routing entropy",
            "MoE layer",
            "value",
            {"uniform router": 1.0, "1/E": 1 / num_e},
        ),
        "",
    )


ANALYSIS = register(Analysis(name="routing entropy", needs=("logits",), run=run, per_layer=False))
