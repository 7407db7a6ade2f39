"""Registry entry: Layer-to-layer transitions (l -> l+n).

Computed through `c.src`, so it runs on the in-memory trace or out of core on DuckDB or Spark
(moelab.analysis.sources); writes numbers, CSV, figures and its report section.
"""

from __future__ import annotations

import numpy as np

from moelab.analysis import plots
from moelab.analysis._common import set_members
from moelab.analysis.output import per_layer_rows as _per_layer
from moelab.analysis.output import sample_layers as _sample_layers
from moelab.analysis.steps import Analysis, Context, register
from moelab.errors import AnalysisError


def run(c: Context) -> None:
    """Compute, record and render this analysis."""
    src = c.src
    o = c.o
    summary = c.summary
    seed = c.seed
    n = c.n
    num_l = c.num_l
    num_e = c.num_e
    k = c.k
    ts = src.transition_summary(n=n, seed=seed)
    x = np.arange(num_l - n)
    rows = _per_layer(
        nmi_set=ts.nmi_set,
        nmi_set_shuffled=ts.nmi_set_shuffled,
        nmi_top1=ts.nmi_top1,
        nmi_top1_shuffled=ts.nmi_top1_shuffled,
        top1_predictability=ts.top1_predictability,
        top1_majority=ts.top1_chance,
        top1_shuffled=ts.top1_shuffled,
    )
    o.numbers["transitions"] = {"n": n, "per_layer": rows}
    o.csv("transitions", rows)
    summary.append(
        {
            "analysis": f"layer l→l+{n}: NMI of top-{k} sets (mean)",
            "value": float(ts.nmi_set.mean()),
            "chance": 0.0,
            "shuffle baseline": float(ts.nmi_set_shuffled.mean()),
        }
    )
    summary.append(
        {
            "analysis": f"layer l→l+{n}: top-1 predictability (mean)",
            "value": float(ts.top1_predictability.mean()),
            "chance": float(ts.top1_chance.mean()),
            "shuffle baseline": float(ts.top1_shuffled.mean()),
        }
    )
    sec = o.section(
        f"Layer-to-layer transitions (l → l+{n})",
        "How much a token's experts at one layer tell about its experts n layers later."
        " NMI = I/√(H·H) between the layers' top-k sets (0 = independent, 1 = determined);"
        " top-1 predictability = accuracy of guessing the later top-1 expert from the earlier one"
        " (chance = always guessing the most used expert). Matrices count every one of the k×k"
        " expert pairs; lift 1 (white) = independence.",
    )
    o.png(
        sec,
        "transitions_summary",
        plots.lines(
            x,
            {
                "NMI (sets)": ts.nmi_set,
                "NMI (top-1)": ts.nmi_top1,
                "NMI, shuffled": ts.nmi_set_shuffled,
                "top-1 predictability": ts.top1_predictability,
                "top-1, majority guess": ts.top1_chance,
            },
            f"Transitions l → l+{n}",
            "from MoE layer l",
            "value",
            {"independent (NMI)": 0.0},
            dashed=["NMI, shuffled", "top-1, majority guess"],
        ),
        "",
    )
    mats = {}
    for layer in _sample_layers(num_l - n, 3):
        tm = src.expert_transitions(layer, n, seed=seed)
        mats[layer] = {
            "conditional": tm.conditional.tolist(),
            "lift": tm.lift.tolist(),
            "npmi": tm.npmi.tolist(),
        }
        o.png(
            sec,
            f"transition_lift_L{layer}",
            plots.heatmap(
                tm.lift,
                f"Lift, expert at layer {layer} → {layer + n}",
                f"expert at layer {layer + n}",
                f"expert at layer {layer}",
                center=1.0,
                cbar_label="lift",
            ),
            f"P(a at {layer}, b at {layer + n}) / (P(a) P(b)); 1 = independent. Shuffled rows give lift ≈ 1"
            f" (max |lift−1| after shuffling: {np.abs(tm.baseline_lift - 1).max():.3f}).",
        )
        try:
            st = src.set_transitions(layer, n, seed=seed)
        except AnalysisError as exc:
            o.numbers["skipped"][f"set transitions layer {layer}"] = str(exc)
            continue
        labels = [str(set_members(i, num_e, k)) for i in range(st.conditional.shape[0])]
        o.png(
            sec,
            f"set_transition_L{layer}",
            plots.heatmap(
                st.conditional,
                f"P(set at {layer + n} | set at {layer})",
                f"set at layer {layer + n}",
                f"set at layer {layer}",
                xticklabels=labels,
                yticklabels=labels,
                cbar_label="conditional",
            ),
            f"Order-free top-{k} sets (C({num_e},{k}) = {len(labels)}); rows sum to 1; under independence every"
            " row equals the later layer's set distribution.",
        )
    o.numbers["transitions"]["matrices"] = mats


ANALYSIS = register(Analysis(name="transitions", needs=(), run=run, per_layer=True))
