"""Registry entry: Trajectories through the layers (on the sample).

Computed through `c.src`, so it runs on the in-memory trace or out of core on DuckDB or Spark
(moelab.analysis.sources); writes numbers, CSV, figures and its report section.
"""

from __future__ import annotations

from moelab.analysis import plots, trajectories
from moelab.analysis._common import set_members
from moelab.analysis.steps import Analysis, Context, register


def run(c: Context) -> None:
    """Compute, record and render this analysis."""
    src = c.src
    o = c.o
    summary = c.summary
    seed = c.seed
    decode = c.decode
    text_doc = c.text_doc
    num_l = c.num_l
    num_e = c.num_e
    k = c.k
    sample = src.sample(text_doc)
    tr = trajectories.trajectories(sample, "set", seed=seed)
    rows = [
        {
            "depth": int(tr.depths[d]),
            "distinct": float(tr.distinct[d]),
            "distinct_shuffled": float(tr.distinct_shuffled[d]),
            "distinct_chance": float(tr.distinct_chance[d]),
            "entropy_bits": float(tr.entropy_bits[d]),
            "entropy_shuffled": float(tr.entropy_shuffled[d]),
            "entropy_chance": float(tr.entropy_chance[d]),
        }
        for d in range(tr.depths.size)
    ]
    top = [
        {
            "count": c,
            "path": " → ".join(str(set_members(s, num_e, k)) if s >= 0 else "-" for s in p),
        }
        for p, c in tr.top_paths[:10]
    ]
    o.numbers["trajectories"] = {"per_depth": rows, "top_paths": top, "n_tokens": tr.n_tokens}
    o.csv("trajectories", rows)
    summary.append(
        {
            "analysis": "distinct expert-set paths through all layers",
            "value": float(tr.distinct[-1]),
            "chance": float(tr.distinct_chance[-1]),
            "shuffle baseline": float(tr.distinct_shuffled[-1]),
        }
    )
    sec = o.section(
        "Trajectories through the layers",
        "Each token's path of top-k sets across layers. Fewer distinct paths / lower path entropy than"
        " the shuffled baseline (each layer permuted independently) means choices chain across layers."
        f" Chance (uniform routing) is near min(d·log2 C(E,k), log2 N) = {tr.entropy_chance[-1]:.1f}"
        " bits at full depth.",
    )
    o.png(
        sec,
        "trajectory_entropy",
        plots.lines(
            tr.depths,
            {
                "path entropy": tr.entropy_bits,
                "shuffled": tr.entropy_shuffled,
                "uniform chance": tr.entropy_chance,
            },
            "Path entropy of layer prefixes",
            "layers 0..d−1",
            "bits",
            dashed=["shuffled", "uniform chance"],
        ),
        "",
    )
    if sec is not None:
        sec.table(top, "Most frequent full paths.")
    sl = list(range(min(num_l, 6)))
    if len(sl) >= 2:  # a flow needs two layers; a one-MoE-layer model has none
        flows = trajectories.top1_flow(sample, sl)
        o.plotly(
            sec,
            "sankey",
            plots.sankey(flows, sl, "Top-1 expert flow, first layers"),
            "Width = number of tokens moving from expert a at one layer to expert b at the"
            " next; under independence every node splits in proportion to the next layer's"
            " loads.",
        )
    rows_g, grid = trajectories.token_grid(sample, text_doc, max_tokens=48)
    toks = [decode(int(t)) if decode else str(int(t)) for t in sample.token_id[rows_g]]
    o.png(
        sec,
        "token_grid",
        plots.token_grid(grid, toks, num_e, "Top-1 expert per token and layer"),
        "One text, token by token (rows) through the MoE layers (columns), coloured by top-1 expert.",
    )


ANALYSIS = register(Analysis(name="trajectories", needs=("sample",), run=run, per_layer=False))
