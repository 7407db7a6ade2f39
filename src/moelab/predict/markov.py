"""Layer-transition (or token-transition) Markov predictor from the train split's set counts.

For each target layer l, the source set S is the top-k set of the same token at layer l - d
(spatial) or of the previous token at layer l (temporal). Fitting counts, over train rows,
how often each expert is in the target set given S (the set-transition matrix of routing
analyses, e.g. the layer-transition study of Mixtral in Jiang et al. 2024, "Mixtral of
Experts", Sec. 5), and the per-expert pair counts C[j, e] used to back off when S is rare:

    p(e | S) = (c_S[e] + beta * p_pair(e | S)) / (n_S + beta),
    p_pair(e | S) = (sum_{j in S} C[j, e] + k * prior[e]) / (sum_{j in S} N[j] + 1)

(Dirichlet smoothing of the set estimate towards the pair estimate, which is itself smoothed
towards the layer prior). Sets seen fewer than `min_count` times are not stored.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moelab.errors import ConfigError
from moelab.predict.base import Horizon, Predictor, multi_hot, source_rows
from moelab.predict.baselines import expert_prior
from moelab.trace.schema import Trace


def _sorted_sets(ids: np.ndarray) -> np.ndarray:
    """Canonical set form: slots sorted ascending with NO_EXPERT (-1) first."""
    return np.sort(ids.astype(np.int64), axis=1)


def lookup_sets(table: np.ndarray, query: np.ndarray) -> np.ndarray:
    """[n] index of each query row [n, k] in table [S, k] (rows sorted), or -1 if absent."""
    if table.shape[0] == 0:
        return np.full(query.shape[0], -1, np.int64)
    base = int(max(table.max(), query.max())) + 2
    if base ** table.shape[1] < 2**62:  # integer keys + binary search (fast path)
        pw = base ** np.arange(table.shape[1], dtype=np.int64)
        tk, qk = (table + 1) @ pw, (query + 1) @ pw
        order = np.argsort(tk, kind="stable")
        pos = np.minimum(np.searchsorted(tk[order], qk), tk.size - 1)
        return np.where(tk[order][pos] == qk, order[pos], -1)
    both = np.concatenate([table, query], axis=0)
    _, inv = np.unique(both, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    pos = np.full(inv.max() + 1, -1, np.int64)
    pos[inv[: table.shape[0]]] = np.arange(table.shape[0])
    return pos[inv[table.shape[0] :]]


class MarkovPredictor(Predictor):
    """p(expert in target set | source set), with backoff to pairwise transitions and prior."""

    name = "markov"
    context_tokens = 1

    def __init__(
        self, horizon: Horizon | None = None, seed: int = 0, min_count: int = 2, beta: float = 2.0
    ) -> None:
        super().__init__(horizon or Horizon(layers_ahead=1), seed)
        if min_count < 1 or beta <= 0:
            raise ConfigError(
                f"MarkovPredictor: min_count={min_count} must be >= 1 and beta={beta} > 0"
            )
        self.min_count, self.beta = int(min_count), float(beta)
        self.tables: dict[str, np.ndarray] = {}

    def describe(self) -> str:
        return f"markov(min={self.min_count})"

    def config(self) -> dict[str, Any]:
        return {"min_count": self.min_count, "beta": self.beta}

    def _pairs(self, trace: Trace, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source ids [n, k], target ids [n, k], usable rows [n]) for target `layer`."""
        if self.horizon.kind == "temporal":
            src = source_rows(trace, self.horizon.tokens_ahead)
            s_ids = trace.expert_ids[np.maximum(src, 0), layer]
            ok = src >= 0
        else:
            s_ids = trace.expert_ids[:, layer - self.horizon.layers_ahead]
            ok = np.ones(trace.num_tokens, bool)
        return s_ids.astype(np.int64), trace.expert_ids[:, layer].astype(np.int64), ok

    def _fit(self, train: Trace) -> None:
        e = self.num_experts
        prior = expert_prior(train)
        self.tables = {"prior": prior}
        for layer in self.target_layers():
            s_ids, t_ids, ok = self._pairs(train, layer)
            s_ids, t_ids = s_ids[ok], t_ids[ok]
            src_hot, tgt_hot = multi_hot(s_ids, e), multi_hot(t_ids, e)
            pair = src_hot.T @ tgt_hot  # [E, E] C[j, e]
            pair_n = src_hot.sum(0)  # [E] N[j]
            sets, inv, cnt = np.unique(
                _sorted_sets(s_ids), axis=0, return_inverse=True, return_counts=True
            )
            inv = inv.reshape(-1)
            counts = np.zeros((sets.shape[0], e), np.float32)
            np.add.at(counts, inv, tgt_hot)
            keep = cnt >= self.min_count
            self.tables[f"sets.{layer}"] = sets[keep].astype(np.int16)
            self.tables[f"counts.{layer}"] = counts[keep]
            self.tables[f"n.{layer}"] = cnt[keep].astype(np.float32)
            self.tables[f"pair.{layer}"] = pair.astype(np.float32)
            self.tables[f"pair_n.{layer}"] = pair_n.astype(np.float32)

    def _predict(self, trace: Trace, layer: int, avail: np.ndarray) -> np.ndarray:
        t = self.tables
        s_ids, _, _ = self._pairs(trace, layer)
        hot = multi_hot(s_ids, self.num_experts)
        p_pair = (hot @ t[f"pair.{layer}"] + self.top_k * t["prior"][layer]) / (
            hot @ t[f"pair_n.{layer}"] + 1.0
        )[:, None]
        idx = lookup_sets(t[f"sets.{layer}"].astype(np.int64), _sorted_sets(s_ids))
        found = idx >= 0
        c = np.zeros_like(p_pair)
        n = np.zeros(trace.num_tokens, np.float32)
        c[found] = t[f"counts.{layer}"][idx[found]]
        n[found] = t[f"n.{layer}"][idx[found]]
        return (c + self.beta * p_pair) / (n + self.beta)[:, None]

    def size(self) -> dict[str, int]:
        """Number of stored source sets over all layers and bytes of the tables."""
        sets = sum(v.shape[0] for k, v in self.tables.items() if k.startswith("sets."))
        return {"contexts": int(sets), "bytes": int(sum(v.nbytes for v in self.tables.values()))}

    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, dict(self.tables)

    def _set_state(self, state: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        self.tables = dict(tensors)
