"""Registry entry: Projections of router probability vectors (on the sample).

Computed through `c.src`, so it runs on the in-memory trace or out of core on DuckDB or Spark
(moelab.analysis.sources); writes numbers, CSV, figures and its report section.
"""

from __future__ import annotations

import numpy as np

from moelab.analysis import plots, projections, specialization
from moelab.analysis.steps import Analysis, Context, register


def run(c: Context) -> None:
    """Compute, record and render this analysis."""
    src = c.src
    o = c.o
    seed = c.seed
    decode = c.decode
    text_doc = c.text_doc
    max_points = c.max_points
    meta = c.meta
    sample = src.sample(text_doc)
    codes, lab = np.unique(sample.domain, return_inverse=True)
    dn = meta.domains
    names = [dn[c] if 0 <= c < len(dn) else f"domain {c}" for c in codes.tolist()]
    what = "domain"
    if len(names) < 2 and decode is not None:
        uniq, inv = np.unique(sample.token_id, return_inverse=True)
        cls = np.array(
            [
                specialization.TOKEN_CLASSES.index(specialization.token_class(decode(int(t))))
                for t in uniq
            ]
        )
        lab = cls[inv]
        names, what = list(specialization.TOKEN_CLASSES), "token class"
    pj = projections.projections(
        sample, lab.astype(np.int64), names, max_points=max_points, seed=seed
    )
    o.numbers["projections"] = {
        "label": what,
        "knn_accuracy": pj.knn_accuracy,
        "knn_shuffled": pj.knn_shuffled,
        "silhouette": pj.silhouette,
        "chance": pj.chance,
        "skipped": pj.skipped,
    }
    sec = o.section(
        "Projections of router probability vectors",
        f"Each point is a token's router probabilities over all layers and experts, projected to 2-D,"
        f" coloured by {what}. 5-NN accuracy (chance = majority share {pj.chance:.3f}) and silhouette"
        " (0 = no separation) say how well routing separates the groups.",
    )
    if sec is not None:
        sec.table(
            [
                {
                    "space": m,
                    "kNN accuracy": pj.knn_accuracy[m],
                    "kNN, labels shuffled": pj.knn_shuffled[m],
                    "silhouette": pj.silhouette[m],
                }
                for m in pj.knn_accuracy
            ]
        )
        for m, why in pj.skipped.items():
            sec.text(f"{m}: skipped — {why}")
    for m, z in pj.coords.items():
        o.plotly(
            sec,
            f"projection_{m}",
            plots.scatter_plotly(z, pj.labels, pj.label_names, f"{m.upper()} by {what}"),
            "",
        )
        o.png(
            None,
            f"projection_{m}",
            plots.scatter(z, pj.labels, pj.label_names, f"{m.upper()} by {what}"),
            "",
        )


ANALYSIS = register(
    Analysis(name="projections", needs=("projections", "sample"), run=run, per_layer=False)
)
