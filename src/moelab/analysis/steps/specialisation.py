"""Registry entry: Specialisation by domain, vocabulary and token class.

Computed through `c.src`, so it runs on the in-memory trace or out of core on DuckDB or Spark
(moelab.analysis.sources); writes numbers, CSV, figures and its report section.
"""

from __future__ import annotations

from typing import Any

from moelab.analysis import plots, specialization
from moelab.analysis.steps import Analysis, Context, register
from moelab.errors import AnalysisError


def run(c: Context) -> None:
    """Compute, record and render this analysis."""
    src = c.src
    o = c.o
    summary = c.summary
    seed = c.seed
    min_count = c.min_count
    decode = c.decode
    num_l = c.num_l
    num_e = c.num_e
    k = c.k
    layers_x = c.layers_x
    sec = o.section(
        "Specialisation",
        f"Share of a group's tokens whose top-{k} includes each expert; uniform = k/E = {k / num_e:.3f}."
        " Specialisation score = weighted mean total-variation distance between a group's expert"
        " distribution and the overall one (0 = none); the shuffled score (labels permuted) shows"
        " the level that finite samples alone produce.",
    )
    res: dict[str, Any] = {}
    views: list[tuple[str, Any]] = []
    try:
        views.append(("domain", src.by_domain(seed=seed)))
    except AnalysisError as exc:
        o.numbers["skipped"]["specialisation by domain"] = str(exc)
    vocab_in = None
    for target in ("input", "next"):
        try:
            v = src.by_vocab(target, min_count=min_count, seed=seed)
        except AnalysisError as exc:
            o.numbers["skipped"][f"vocabulary ({target})"] = str(exc)
            continue
        views.append((f"{target} token (N≥{min_count})", v.view))
        vocab_in = v if target == "input" else vocab_in
    if decode is not None:
        try:
            views.append(("token class", src.by_token_class(decode, seed=seed)))
        except AnalysisError as exc:
            o.numbers["skipped"]["token class"] = str(exc)
    else:
        o.numbers["skipped"]["token class"] = (
            "no tokenizer given (pass --tokenizer) to decode token strings"
        )
    rows = []
    for name, view in views:
        res[name] = {
            "specialization": view.specialization.tolist(),
            "specialization_shuffled": view.specialization_shuffled.tolist(),
            "mean_max_share": view.mean_max_share.tolist(),
            "groups": len(view.names),
        }
        rows.append(
            {
                "grouping": name,
                "groups": len(view.names),
                "specialisation (mean)": float(view.specialization.mean()),
                "shuffled": float(view.specialization_shuffled.mean()),
                "mean max share": float(view.mean_max_share.mean()),
                "max share, shuffled": float(view.mean_max_share_shuffled.mean()),
            }
        )
        summary.append(
            {
                "analysis": f"specialisation by {name} (mean TV distance)",
                "value": float(view.specialization.mean()),
                "chance": 0.0,
                "shuffle baseline": float(view.specialization_shuffled.mean()),
            }
        )
    o.numbers["specialization"] = res
    o.csv("specialization", rows)
    if sec is not None:
        sec.table(rows, "Mean over layers.")
    if views:
        o.png(
            sec,
            "specialization",
            plots.lines(
                layers_x,
                {f"{n_}": v.specialization for n_, v in views}
                | {f"{n_}, shuffled": v.specialization_shuffled for n_, v in views},
                "Specialisation per layer",
                "MoE layer",
                "TV distance",
                {"none": 0.0},
                dashed=[f"{n_}, shuffled" for n_, _ in views],
            ),
            "",
        )
    for name, view in views:
        if name in ("domain", "token class") and len(view.names) >= 1:
            layer = num_l // 2
            o.png(
                sec,
                f"specialization_{name.replace(' ', '_')}",
                plots.heatmap(
                    view.share[:, layer, :],
                    f"Share by {name}, layer {layer}",
                    "expert",
                    name,
                    center=k / num_e,
                    yticklabels=view.names,
                ),
                f"White = k/E = {k / num_e:.3f}.",
            )
    if vocab_in is not None:
        layer = num_l // 2
        tt = specialization.top_tokens(vocab_in, layer, top=8, decode=decode)
        trows = [
            {
                "expert": e,
                "top tokens (share of their occurrences routed here)": ", ".join(
                    f"{(s if s else tid)!r} {sh:.2f}" for tid, s, sh, _ in lst
                ),
            }
            for e, lst in enumerate(tt)
        ]
        o.numbers["top_tokens_mid_layer"] = trows
        if sec is not None:
            sec.table(
                trows,
                f"Layer {layer}: tokens (N≥{min_count}) most often routed to each expert.",
            )


ANALYSIS = register(Analysis(name="specialisation", needs=(), run=run, per_layer=True))
