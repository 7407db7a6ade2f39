"""Registry entry: Consecutive-token repeat rate.

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
    seed = c.seed
    k = c.k
    layers_x = c.layers_x
    rr = src.repeat_rate(seed=seed)
    rows = _per_layer(
        same_top1=rr.same_top1,
        any_overlap=rr.any_overlap,
        mean_overlap=rr.mean_overlap,
        load_chance_top1=rr.load_top1,
        load_chance_any=rr.load_any,
        load_chance_mean=rr.load_mean,
        shuffled_top1=rr.shuffled_top1,
        shuffled_any=rr.shuffled_any,
        shuffled_mean=rr.shuffled_mean,
    )
    o.numbers["repeat"] = {
        "per_layer": rows,
        "chance_top1": rr.chance_top1,
        "chance_any": rr.chance_any,
        "chance_mean": rr.chance_mean,
        "n_pairs": rr.n_pairs,
    }
    o.csv("repeat", rows)
    summary.append(
        {
            "analysis": "consecutive tokens: same top-1 (mean)",
            "value": float(rr.same_top1.mean()),
            "chance": rr.chance_top1,
            "shuffle baseline": float(rr.shuffled_top1.mean()),
        }
    )
    summary.append(
        {
            "analysis": f"consecutive tokens: any top-{k} overlap (mean)",
            "value": float(rr.any_overlap.mean()),
            "chance": rr.chance_any,
            "shuffle baseline": float(rr.shuffled_any.mean()),
        }
    )
    sec = o.section(
        "Consecutive-token repeat rate",
        "How often token t uses the same experts as token t−1 in the same layer. Chance for uniform"
        f" routing: same top-1 1/E = {rr.chance_top1:.3f}, any overlap 1 − C(E−k,k)/C(E,k) ="
        f" {rr.chance_any:.3f}, mean overlap k²/E = {rr.chance_mean:.3f}. Dashed: load-weighted chance"
        " (independent draws with the observed loads). Above the dashed line = temporal locality an"
        " expert cache can exploit.",
    )
    o.png(
        sec,
        "repeat",
        plots.lines(
            layers_x,
            {
                "same top-1": rr.same_top1,
                "any overlap": rr.any_overlap,
                "top-1, load-weighted chance": rr.load_top1,
                "any overlap, load-weighted chance": rr.load_any,
            },
            "Consecutive-token repeat rate",
            "MoE layer",
            "rate",
            {"1/E": rr.chance_top1, "1−C(E−k,k)/C(E,k)": rr.chance_any},
            dashed=["top-1, load-weighted chance", "any overlap, load-weighted chance"],
        ),
        "",
    )


ANALYSIS = register(Analysis(name="repeat rate", needs=(), run=run, per_layer=True))
