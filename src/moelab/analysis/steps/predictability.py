"""Registry entry: Predictability from the token id, and token vs position.

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
    min_count = c.min_count
    layers_x = c.layers_x
    pr = src.predictability(min_count=min_count, seed=seed)
    rows = _per_layer(
        acc_token=pr.acc_token,
        acc_prev_token=pr.acc_bigram,
        acc_majority=pr.acc_majority,
        acc_token_shuffled=pr.acc_token_shuffled,
        recall_token=pr.recall_token,
        recall_prev_token=pr.recall_bigram,
        h_set_given_token=pr.cond_entropy,
        h_set=pr.set_entropy,
        h_given_shuffled_token=pr.cond_entropy_shuffled,
    )
    o.numbers["predictability"] = {
        "per_layer": rows,
        "chance": pr.chance,
        "n_train": pr.n_train,
        "n_test": pr.n_test,
    }
    o.csv("predictability", rows)
    summary.append(
        {
            "analysis": "held-out set accuracy from token id (mean)",
            "value": float(pr.acc_token.mean()),
            "chance": pr.chance,
            "shuffle baseline": float(pr.acc_token_shuffled.mean()),
        }
    )
    summary.append(
        {
            "analysis": "held-out set accuracy from (previous, current) id",
            "value": float(pr.acc_bigram.mean()),
            "chance": pr.chance,
            "shuffle baseline": float("nan"),
        }
    )
    summary.append(
        {
            "analysis": "held-out set accuracy of always the majority set",
            "value": float(pr.acc_majority.mean()),
            "chance": pr.chance,
            "shuffle baseline": float("nan"),
        }
    )
    sec = o.section(
        "Predictability from the token id",
        "Accuracy on held-out documents of predicting the exact top-k set as the set most often seen"
        " with this token id (or previous+current ids) in the training documents. Chance:"
        f" 1/C(E,k) = {pr.chance:.4f}; the majority line always predicts the most common set; the"
        " shuffled line fits the rule on permuted token ids.",
    )
    o.png(
        sec,
        "predictability",
        plots.lines(
            layers_x,
            {
                "token id": pr.acc_token,
                "(prev, cur) ids": pr.acc_bigram,
                "majority set": pr.acc_majority,
                "shuffled token ids": pr.acc_token_shuffled,
            },
            "Held-out exact-set accuracy",
            "MoE layer",
            "accuracy",
            {"1/C(E,k)": pr.chance},
            dashed=["majority set", "shuffled token ids"],
        ),
        "",
    )
    o.png(
        sec,
        "conditional_entropy",
        plots.lines(
            layers_x,
            {
                "H(set)": pr.set_entropy,
                "H(set | token)": pr.cond_entropy,
                "H(set | shuffled token)": pr.cond_entropy_shuffled,
            },
            f"Information in the token id (tokens with N≥{min_count})",
            "MoE layer",
            "bits",
            dashed=["H(set | shuffled token)"],
        ),
        "The gap between H(set) and H(set | token) is the information the token id carries; the shuffled"
        " line shows the plug-in estimator's downward bias.",
    )
    sp = src.spread(min_count=min_count, seed=seed)
    srows = _per_layer(
        consistency_token=sp.consistency_token,
        consistency_position=sp.consistency_position,
        consistency_shuffled=sp.consistency_shuffled,
        h_norm_token=sp.norm_cond_entropy_token,
        h_norm_position=sp.norm_cond_entropy_position,
    )
    o.numbers["spread"] = {"per_layer": srows, "chance": sp.chance}
    o.csv("spread", srows)
    o.png(
        sec,
        "spread",
        plots.lines(
            layers_x,
            {
                "grouped by token id": sp.consistency_token,
                "grouped by position": sp.consistency_position,
                "token ids shuffled": sp.consistency_shuffled,
            },
            "Top-1 consistency within groups (OpenMoE comparison)",
            "MoE layer",
            "share of group's most common top-1",
            {"1/E": sp.chance},
            dashed=["token ids shuffled"],
        ),
        "If routing is context-independent and token-based (as OpenMoE found), tokens with the same id agree"
        " far more than tokens at the same position.",
    )


ANALYSIS = register(Analysis(name="predictability", needs=(), run=run, per_layer=True))
