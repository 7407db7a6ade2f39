"""N-gram statistical predictor: token-id context -> expert membership counts per layer.

The token id alone already predicts much of the routing (Jiang et al. 2024, "Mixtral of
Experts", Sec. 5: a table "token id -> most frequent expert pair" reached 66% mean hit rate on
the 100 most frequent tokens, built and scored on the same data). Here the context is the
source token's id and up to n-1 preceding ids of the same document (document starts are
padded with a sentinel id); for each order j = n..1 the train split gives, per layer, how often
each expert was in the target set after that context. Prediction backs off (Katz-style, without
discounting) from the longest context seen at least `min_count` times to shorter ones and
finally to the layer prior. `mode="expert"` ranks experts by membership frequency;
`mode="set"` puts the context's most frequent whole set first (the table of the paper).
The source token is the target token itself (spatial horizons: the id is known before layer 0)
or the token `tokens_ahead` earlier (temporal horizon: the target's id is not yet known).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from moelab.errors import ConfigError
from moelab.predict.base import Horizon, Predictor, source_rows
from moelab.predict.baselines import expert_prior
from moelab.trace.schema import Trace

MODES = ("expert", "set")


class NGramPredictor(Predictor):
    """Longest-matching token context (n-gram with backoff) -> per-layer expert frequencies."""

    name = "ngram"

    def __init__(
        self,
        horizon: Horizon | None = None,
        seed: int = 0,
        n: int = 2,
        min_count: int = 2,
        mode: str = "expert",
    ) -> None:
        super().__init__(horizon or Horizon(layers_ahead=1), seed)
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"NGramPredictor: n={n!r} must be an int >= 1")
        if min_count < 1:
            raise ConfigError(f"NGramPredictor: min_count={min_count} must be >= 1")
        if mode not in MODES:
            raise ConfigError(f"NGramPredictor: mode={mode!r}, expected one of {MODES}")
        self.n, self.min_count, self.mode = n, int(min_count), mode
        self.context_tokens = n
        self.vocab = 0
        self.tables: dict[str, np.ndarray] = {}
        self.last_backoff: dict[str, float] = {}
        self._lookup_cache: tuple[bytes, tuple[np.ndarray, np.ndarray]] | None = None

    def describe(self) -> str:
        return f"ngram(n={self.n}{',set' if self.mode == 'set' else ''})"

    def config(self) -> dict[str, Any]:
        return {"n": self.n, "min_count": self.min_count, "mode": self.mode}

    # ---------------------------------------------------------------- contexts
    def _keys(self, trace: Trace, order: int) -> tuple[np.ndarray, np.ndarray]:
        """(int64 context key [N], source exists [N]) of the given order at each target row."""
        pad, unk = self.vocab, self.vocab + 1
        base = self.vocab + 2
        if self.horizon.kind == "temporal":
            src = source_rows(trace, self.horizon.tokens_ahead)
        else:
            src = np.arange(trace.num_tokens)
        ok = src >= 0
        prev = trace.prev_row()
        key = np.zeros(trace.num_tokens, np.int64)
        cur = src.copy()
        for i in range(order):
            tid = trace.token_id[np.maximum(cur, 0)].astype(np.int64)
            tid = np.where((tid < 0) | (tid >= self.vocab), unk, tid)
            tid = np.where(cur >= 0, tid, pad)
            key += tid * np.int64(base) ** i
            cur = np.where(cur >= 0, prev[np.maximum(cur, 0)], -1)
        return key, ok

    def _fit(self, train: Trace) -> None:
        self._lookup_cache = None
        self.vocab = int(train.token_id.max()) + 1
        if (self.vocab + 2) ** self.n >= 2**63:
            raise ConfigError(
                f"NGramPredictor: n={self.n} with vocabulary {self.vocab} overflows 64-bit context keys;"
                " use a smaller n"
            )
        e, num_layers = self.num_experts, self.num_layers
        self.tables = {"prior": expert_prior(train)}
        tgt = train.expert_ids.astype(np.int64)  # [N, L, k]
        for order in range(1, self.n + 1):
            key, ok = self._keys(train, order)
            key, t = key[ok], tgt[ok]
            uk, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
            keep = cnt >= self.min_count
            remap = np.full(uk.size, -1, np.int64)
            remap[keep] = np.arange(int(keep.sum()))
            row = remap[inv.reshape(-1)]
            use = row >= 0
            counts = np.zeros((int(keep.sum()), num_layers, e), np.int32)
            r, t = row[use], t[use]
            for j in range(t.shape[2]):
                valid = t[:, :, j] >= 0
                rr = np.repeat(r[:, None], num_layers, 1)[valid]
                ll = np.broadcast_to(np.arange(num_layers), valid.shape)[valid]
                np.add.at(counts, (rr, ll, t[:, :, j][valid]), 1)
            self.tables[f"keys.{order}"] = uk[keep]
            self.tables[f"n.{order}"] = cnt[keep].astype(np.int32)
            self.tables[f"counts.{order}"] = counts
            if self.mode == "set":
                self.tables[f"sets.{order}"] = self._mode_sets(r, t, int(keep.sum()))

    def _mode_sets(self, row: np.ndarray, tgt: np.ndarray, n_ctx: int) -> np.ndarray:
        """[n_ctx, L, k] most frequent target set of each context per layer (ties: first seen)."""
        out = np.full((n_ctx, self.num_layers, self.top_k), -1, np.int16)
        for layer in range(self.num_layers):
            sets, sid = np.unique(np.sort(tgt[:, layer], axis=1), axis=0, return_inverse=True)
            pair = row * sets.shape[0] + sid.reshape(-1)
            up, pc = np.unique(pair, return_counts=True)
            ctx = up // sets.shape[0]
            order = np.lexsort((-pc, ctx))
            first = np.ones(order.size, bool)
            first[1:] = ctx[order][1:] != ctx[order][:-1]
            best = order[first]
            out[ctx[best], layer] = sets[up[best] % sets.shape[0]]
        return out

    # ---------------------------------------------------------------- prediction
    def lookup(self, trace: Trace) -> tuple[np.ndarray, np.ndarray]:
        """(order used [N] (0 = prior), table row [N]) by longest-match backoff (cached per input)."""
        h = hashlib.blake2b(digest_size=16)
        for a in (trace.token_id, trace.doc_id, trace.position):
            h.update(np.ascontiguousarray(a).tobytes())
        key = h.digest()
        if self._lookup_cache is not None and self._lookup_cache[0] == key:
            return self._lookup_cache[1]
        res = self._lookup(trace)
        self._lookup_cache = (key, res)
        return res

    def _lookup(self, trace: Trace) -> tuple[np.ndarray, np.ndarray]:
        used = np.zeros(trace.num_tokens, np.int64)
        idx = np.full(trace.num_tokens, -1, np.int64)
        for order in range(self.n, 0, -1):
            keys = self.tables[f"keys.{order}"]
            if keys.size == 0:
                continue
            key, ok = self._keys(trace, order)
            pos = np.minimum(np.searchsorted(keys, key), keys.size - 1)
            hit = ok & (keys[pos] == key) & (used == 0)
            used[hit], idx[hit] = order, pos[hit]
        return used, idx

    def _predict(self, trace: Trace, layer: int, avail: np.ndarray) -> np.ndarray:
        used, idx = self.lookup(trace)
        prior = self.tables["prior"][layer]
        out = np.broadcast_to(prior * 1e-3, (trace.num_tokens, self.num_experts)).copy()
        out[used == 0] = prior
        for order in range(1, self.n + 1):
            m = used == order
            if not m.any():
                continue
            c = self.tables[f"counts.{order}"][idx[m], layer].astype(np.float32)
            out[m] += c / self.tables[f"n.{order}"][idx[m]][:, None]
            if self.mode == "set":
                s = self.tables[f"sets.{order}"][idx[m], layer].astype(np.int64)
                rows = np.repeat(np.flatnonzero(m), s.shape[1]).reshape(s.shape)
                v = s >= 0
                out[rows[v], s[v]] += 1.0
        a = used[avail]
        self.last_backoff = {
            f"order{j}": float((a == j).mean()) if a.size else 0.0 for j in range(self.n + 1)
        }
        return out

    def size(self) -> dict[str, Any]:
        """Contexts stored per order and bytes of all tables."""
        per = {f"order{j}": int(self.tables[f"keys.{j}"].size) for j in range(1, self.n + 1)}
        return {
            "contexts": int(sum(per.values())),
            "contexts_per_order": per,
            "bytes": int(sum(v.nbytes for v in self.tables.values())),
        }

    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"vocab": self.vocab}, dict(self.tables)

    def _set_state(self, state: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        self._lookup_cache = None
        self.vocab = int(state["vocab"])
        self.tables = dict(tensors)
