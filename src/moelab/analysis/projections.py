"""2-D projections of per-token router probability vectors (layers x experts flattened): PCA,
t-SNE (van der Maaten & Hinton 2008, scikit-learn) and UMAP (McInnes et al. 2018, when the
`umap-learn` package is installed), with kNN accuracy (5-fold, k=5) and silhouette score of a
labelling (domain, token class, or a chosen token set). Chance for kNN accuracy is the majority
class share; the shuffle baseline scores the same embedding with permuted labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moelab.analysis._common import require_logits, softmax_probs, token_mask
from moelab.errors import AnalysisError
from moelab.trace.schema import Trace


@dataclass
class Projection:
    """2-D embeddings of a token sample and how well they separate the labels."""

    rows: np.ndarray  # [M] trace rows used
    labels: np.ndarray  # [M] int label per point
    label_names: list[str]
    coords: dict[str, np.ndarray]  # method -> [M, 2]
    knn_accuracy: dict[str, float]  # method -> 5-NN 5-fold accuracy ("full" = raw vectors)
    knn_shuffled: dict[str, float]
    silhouette: dict[str, float]
    chance: float  # majority-class share
    skipped: dict[str, str] = field(default_factory=dict)  # method -> reason


def router_vectors(trace: Trace, rows: np.ndarray) -> np.ndarray:
    """[M, L*E] router probabilities of the given rows (needs logits)."""
    logits = require_logits(trace, "projections")
    p = softmax_probs(logits[rows], trace.meta.score_fn)
    return p.reshape(rows.size, -1)


def _knn(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    _, counts = np.unique(y, return_counts=True)
    folds = int(min(5, counts.min()))
    if folds < 2:
        return float("nan")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(KNeighborsClassifier(n_neighbors=5), x, y, cv=cv).mean())


def projections(
    trace: Trace,
    labels: np.ndarray,
    label_names: list[str],
    methods: tuple[str, ...] = ("pca", "tsne", "umap"),
    max_points: int = 2000,
    tsne_iter: int = 500,
    seed: int = 0,
) -> Projection:
    """PCA / t-SNE / UMAP of router probability vectors of a seeded sample of non-BOS tokens,
    with kNN accuracy and silhouette for `labels` ([N] int, -1 = leave out)."""
    require_logits(trace, "projections")
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score
    from threadpoolctl import threadpool_limits

    labels = np.asarray(labels)
    if labels.shape != (trace.num_tokens,):
        raise AnalysisError(
            f"projections: labels shape {labels.shape}; expected ({trace.num_tokens},)"
        )
    pool = np.flatnonzero(token_mask(trace) & (labels >= 0))
    if pool.size < 10:
        raise AnalysisError(
            f"projections: only {pool.size} labelled non-BOS tokens; need at least 10"
        )
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(pool, size=min(max_points, pool.size), replace=False))
    x = router_vectors(trace, rows)
    y = labels[rows]
    y_shuf = rng.permutation(y)
    multi = np.unique(y).size >= 2
    coords: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    for method in methods:
        if method == "pca":
            coords["pca"] = PCA(n_components=2, random_state=seed).fit_transform(x)
        elif method == "tsne":
            perplexity = float(min(30.0, max(2.0, (rows.size - 1) / 3.0)))
            # one OpenMP thread: Barnes-Hut t-SNE on a few thousand points gains little from
            # threads, and spinning OpenMP threads on a shared machine made it ~10x slower
            with threadpool_limits(limits=1, user_api="openmp"):
                coords["tsne"] = TSNE(
                    n_components=2,
                    perplexity=perplexity,
                    init="pca",
                    max_iter=max(tsne_iter, 250),
                    random_state=seed,
                ).fit_transform(x)
        elif method == "umap":
            try:
                import umap  # type: ignore[import-not-found]
            except ImportError:
                skipped["umap"] = "umap-learn is not installed (pip install umap-learn)"
                continue
            coords["umap"] = umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
        else:
            raise AnalysisError(
                f"projections: unknown method {method!r}; expected pca, tsne or umap"
            )
    knn, knn_s, sil = {}, {}, {}
    for name, z in [("full", x), *coords.items()]:
        knn[name] = _knn(z, y, seed) if multi else float("nan")
        knn_s[name] = _knn(z, y_shuf, seed) if multi else float("nan")
        sil[name] = float(silhouette_score(z, y, random_state=seed)) if multi else float("nan")
    _, counts = np.unique(y, return_counts=True)
    return Projection(
        rows, y, label_names, coords, knn, knn_s, sil, float(counts.max() / y.size), skipped
    )
