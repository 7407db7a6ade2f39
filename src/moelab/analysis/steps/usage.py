"""Registry entry: Expert usage and load balance.

Computed through `c.src`, so it runs on the in-memory trace or out of core on DuckDB or Spark
(moelab.analysis.sources); writes numbers, CSV, figures and its report section.
"""

from __future__ import annotations

from moelab.analysis import plots
from moelab.analysis.output import per_layer_rows as _per_layer
from moelab.analysis.steps import Analysis, Context, register
from moelab.errors import AnalysisError


def run(c: Context) -> None:
    """Compute, record and render this analysis."""
    src = c.src
    o = c.o
    summary = c.summary
    seed = c.seed
    token_ids = c.token_ids
    context = c.context
    decode = c.decode
    num_l = c.num_l
    num_e = c.num_e
    layers_x = c.layers_x
    skip = c.skip
    us = src.usage("slots", seed=seed)
    ut = src.usage("tokens", seed=seed)
    uw = src.usage("slots", weighted=True, seed=seed)
    bal = src.balance(seed=seed)
    o.numbers["usage"] = {
        "slots": us.share.tolist(),
        "tokens": ut.share.tolist(),
        "weighted": uw.share.tolist(),
        "chance_slots": us.chance,
        "chance_tokens": ut.chance,
    }
    o.csv(
        "usage",
        [
            {
                "layer": i,
                "expert": e,
                "slot_share": us.share[i, e],
                "token_share": ut.share[i, e],
                "weighted_share": uw.share[i, e],
                "slots": us.counts[i, e],
            }
            for i in range(num_l)
            for e in range(num_e)
        ],
    )
    rows = _per_layer(
        norm_entropy=bal.norm_entropy,
        max_over_mean=bal.max_over_mean,
        cv=bal.cv,
        gini=bal.gini,
        dead=bal.dead,
        norm_entropy_uniform_sample=bal.baseline["norm_entropy"],
        cv_uniform_sample=bal.baseline["cv"],
    )
    o.numbers["balance"] = rows
    o.csv("balance", rows)
    summary.append(
        {
            "analysis": "balance: normalised entropy (mean over layers)",
            "value": float(bal.norm_entropy.mean()),
            "chance": 1.0,
            "shuffle baseline": float(bal.baseline["norm_entropy"].mean()),
        }
    )
    summary.append(
        {
            "analysis": "balance: max/mean load (worst layer)",
            "value": float(bal.max_over_mean.max()),
            "chance": 1.0,
            "shuffle baseline": float(bal.baseline["max_over_mean"].max()),
        }
    )
    sec = o.section(
        "Expert usage and load balance",
        "Share of routing slots each expert receives, per MoE layer. Under uniform routing every"
        f" cell would be 1/E = {1 / num_e:.3f} (white); red = used more, blue = used less."
        " Balance metrics: normalised entropy (1 = perfectly even), max/mean (1 = even), CV and"
        " Gini (0 = even), dead experts (share below 0.1/E).",
    )
    o.png(
        sec,
        "usage_slots",
        plots.heatmap(
            us.share,
            "Expert usage (share of slots)",
            "expert",
            "MoE layer",
            center=us.chance,
            cbar_label="share of slots",
        ),
        f"Usage per layer; chance 1/E = {us.chance:.3f}.",
    )
    o.plotly(
        sec,
        "usage_slots",
        plots.usage_plotly(us.share, us.chance, "Expert usage (interactive)"),
        "Hover for exact shares; colour centred on chance.",
    )
    o.png(
        sec,
        "usage_weighted",
        plots.heatmap(
            uw.share,
            "Gate-weighted usage (share of gate mass)",
            "expert",
            "MoE layer",
            center=1 / num_e,
        ),
        "Same, weighting each slot by its gate weight.",
    )
    o.png(
        sec,
        "balance",
        plots.lines(
            layers_x,
            {
                "normalised entropy": bal.norm_entropy,
                "Gini": bal.gini,
                "CV": bal.cv,
                "entropy, uniform sample": bal.baseline["norm_entropy"],
            },
            "Load balance per layer",
            "MoE layer",
            "value",
            {"even (entropy)": 1.0, "even (CV, Gini)": 0.0},
            dashed=["entropy, uniform sample"],
        ),
        "Dashed: the same metric for uniform random routing of equal size (finite-sample level).",
    )
    if sec is not None:
        sec.table(rows, "Balance per layer.")
    for pos, tid in enumerate(token_ids or []):
        ctx = context if (pos == 0 and context) else None
        try:
            ut1 = src.usage("tokens", token_id=int(tid), prev_ids=ctx, min_count=1, seed=seed)
        except AnalysisError as exc:
            skip(f"usage for token {tid}", exc)
            continue
        name = f"usage_token_{tid}" + ("_ctx" if ctx else "")
        label = ut1.selection + (f" ({decode(int(tid))!r})" if decode else "")
        o.numbers.setdefault("usage_tokens", {})[label] = {
            "share": ut1.share.tolist(),
            "n": ut1.n_tokens,
        }
        o.png(
            sec,
            name,
            plots.heatmap(
                ut1.share - ut1.baseline,
                f"Usage for {label} minus random tokens",
                "expert",
                "MoE layer",
                center=0.0,
            ),
            f"Share of the {ut1.n_tokens} occurrences of {label} routed to each expert, minus the share for"
            " the same number of random tokens (0 = no token preference; chance k/E for both).",
        )


ANALYSIS = register(Analysis(name="usage and balance", needs=(), run=run, per_layer=False))
