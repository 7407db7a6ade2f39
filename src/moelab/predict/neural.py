"""Small neural expert predictors in PyTorch, trained on CPU with early stopping.

(a) TokenContextMLP: embeddings of the last n token ids -> expert scores for every layer at
    once, either multi-label over E per layer (sigmoid/BCE) or a softmax over the C(E, k)
    possible sets per layer whose marginals give per-expert scores (cf. the token-based
    predictors of Du et al. 2024, "SiDA-MoE", and Shen et al. 2024 "ProMoE").
(b) HiddenProbe: layer l's hidden state (router input or residual stream) -> experts of layer
    l + d; linear or one-hidden-layer MLP, one model per target layer or shared across layers
    (a learned pre-gate, cf. Hwang et al. 2024, "Pre-gated MoE", Sec. 4).
(c) TemporalMLP: the source token's id(s) and its expert sets at every layer -> the experts of
    the token `tokens_ahead` later at every layer.
Each carves a validation split from the train trace BY DOCUMENT (`split_by_document`) and
stops when the validation loss has not improved for `patience` epochs, keeping the best weights.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from moelab.errors import ConfigError, PredictorError
from moelab.predict.base import (
    Horizon,
    Predictor,
    hidden_index,
    multi_hot,
    source_rows,
    split_by_document,
)
from moelab.predict.gate_lookahead import HIDDEN_POINTS, require_hidden
from moelab.trace.schema import Trace

MAX_SETS = 4096  # largest C(E, k) the set-softmax option accepts


def context_ids(trace: Trace, src: np.ndarray, n: int, vocab: int) -> np.ndarray:
    """[N, n] ids of the n tokens ending at row src (pad = vocab, unknown = vocab + 1)."""
    prev = trace.prev_row()
    out = np.full((trace.num_tokens, n), vocab, np.int64)
    cur = src.copy()
    for i in range(n):
        tid = trace.token_id[np.maximum(cur, 0)].astype(np.int64)
        tid = np.where((tid < 0) | (tid >= vocab), vocab + 1, tid)
        out[:, n - 1 - i] = np.where(cur >= 0, tid, vocab)
        cur = np.where(cur >= 0, prev[np.maximum(cur, 0)], -1)
    return out


def expert_multi_hot(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[N, L, k] ids -> [N, L, E] float32 indicators."""
    n, num_layers, k = ids.shape
    return multi_hot(ids.reshape(n * num_layers, k).astype(np.int64), num_experts).reshape(
        n, num_layers, num_experts
    )


class _MLP(nn.Module):
    """Linear (hidden=0) or Linear-GELU-Linear."""

    def __init__(self, d_in: int, d_out: int, hidden: int) -> None:
        super().__init__()
        self.net = (
            nn.Linear(d_in, d_out)
            if hidden == 0
            else nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _PerLayerMLP(nn.Module):
    """G independent linear/MLP maps applied to x [B, G, D] -> [B, G, E] (batched einsum)."""

    def __init__(self, groups: int, d_in: int, d_out: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        dims = [d_in, d_out] if hidden == 0 else [d_in, hidden, d_out]
        self.w = nn.ParameterList()
        self.b = nn.ParameterList()
        for a, b in itertools.pairwise(dims):
            self.w.append(nn.Parameter(torch.randn(groups, a, b) / a**0.5))
            self.b.append(nn.Parameter(torch.zeros(groups, b)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (w, b) in enumerate(zip(self.w, self.b, strict=True)):
            x = torch.einsum("bgd,gde->bge", x, w) + b
            if i < len(self.w) - 1:
                x = torch.nn.functional.gelu(x)
        return x

    def forward_group(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """Map of group g only: x [B, D] -> [B, E]."""
        for i, (w, b) in enumerate(zip(self.w, self.b, strict=True)):
            x = torch.addmm(b[g], x, w[g])
            if i < len(self.w) - 1:
                x = torch.nn.functional.gelu(x)
        return x


SMALL_ROWS = 64  # inputs up to this many rows keep the caller's torch threads


@contextmanager
def _torch_threads(n: int, rows: int | None = None) -> Iterator[None]:
    """Run with n torch threads (small models train and score faster on one), unless only
    `rows` <= SMALL_ROWS are scored: resizing the pool costs more than such a tiny map, and a
    live decode step would pay it twice per call."""
    old = torch.get_num_threads()
    switch = old != n and (rows is None or rows > SMALL_ROWS)
    if switch:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if switch:
            torch.set_num_threads(old)


class NeuralPredictor(Predictor):
    """Shared training loop, caching and persistence of the torch predictors."""

    name = "neural"

    def __init__(
        self,
        horizon: Horizon,
        seed: int = 0,
        hidden: int = 64,
        epochs: int = 30,
        batch_size: int = 256,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        patience: int = 3,
        val_fraction: float = 0.1,
        device: str = "cpu",
        threads: int = 1,
    ) -> None:
        super().__init__(horizon, seed)
        if hidden < 0 or epochs < 1 or batch_size < 1 or lr <= 0 or patience < 1:
            raise ConfigError(
                f"{type(self).__name__}: hidden={hidden} >= 0, epochs={epochs} >= 1, batch_size={batch_size}"
                f" >= 1, lr={lr} > 0, patience={patience} >= 1 required"
            )
        if not 0 < val_fraction < 1:
            raise ConfigError(
                f"{type(self).__name__}: val_fraction={val_fraction} must be in (0, 1)"
            )
        self.hidden, self.epochs, self.batch_size = int(hidden), int(epochs), int(batch_size)
        self.lr, self.weight_decay, self.patience = float(lr), float(weight_decay), int(patience)
        self.val_fraction, self.device, self.threads = float(val_fraction), device, int(threads)
        self.model: nn.Module | None = None
        self.arch: dict[str, Any] = {}
        self._cache: tuple[bytes, np.ndarray] | None = None

    def config(self) -> dict[str, Any]:
        return {
            "hidden": self.hidden,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "patience": self.patience,
            "val_fraction": self.val_fraction,
            "threads": self.threads,
        }

    # subclass hooks -------------------------------------------------------------
    def _setup(self, train: Trace) -> None:
        """Fix architecture sizes from the train split (stored in self.arch)."""

    def _build(self) -> nn.Module:
        raise NotImplementedError

    def _inputs(self, trace: Trace) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(model inputs per row, rows usable) for a trace."""
        raise NotImplementedError

    def _targets(self, trace: Trace) -> np.ndarray:
        """Training targets per row ([N, G, E] multi-hot, or [N, G] set indices)."""
        raise NotImplementedError

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(out, y)

    def _to_scores(self, out: torch.Tensor) -> torch.Tensor:
        """Model output [B, G, *] -> per-expert scores [B, G, E]."""
        return torch.sigmoid(out)

    def _layer_slot(self, layer: int) -> int:
        """Index of target `layer` in the model's output groups."""
        return layer

    # training -------------------------------------------------------------------
    def _tensors(self, x: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, torch.Tensor]:
        return {k: torch.as_tensor(v[rows], device=self.device) for k, v in x.items()}

    def _fit(self, train: Trace) -> None:
        with _torch_threads(max(self.threads, 1)):
            self._train(train)

    def _train(self, train: Trace) -> None:
        torch.manual_seed(self.seed)
        parts = split_by_document(
            train, {"fit": 1 - self.val_fraction, "val": self.val_fraction}, self.seed
        )
        self._setup(train)
        self.model = self._build().to(self.device)
        data = {}
        for name, tr in parts.items():
            x, ok = self._inputs(tr)
            y = self._targets(tr)
            rows = np.flatnonzero(ok)
            if rows.size == 0:
                raise PredictorError(
                    f"{self.label}: no usable rows in the {name} part of the train split"
                )
            data[name] = (self._tensors(x, rows), torch.as_tensor(y[rows], device=self.device))
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(self.seed)
        xf, yf = data["fit"]
        n = yf.shape[0]
        best, best_state, bad, history = float("inf"), None, 0, []
        bar = tqdm(range(self.epochs), desc=f"fit {self.label}", leave=False, disable=None)
        for epoch in bar:
            self.model.train()
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, self.batch_size):
                b = perm[i : i + self.batch_size]
                loss = self._loss(self.model(**{k: v[b] for k, v in xf.items()}), yf[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            self.model.eval()
            with torch.no_grad():
                xv, yv = data["val"]
                vl = float(self._loss(self.model(**xv), yv))
            history.append(vl)
            bar.set_postfix(val_loss=f"{vl:.4f}")
            if vl < best - 1e-5:
                best, best_state, bad = vl, copy.deepcopy(self.model.state_dict()), 0
                self.fit_info["best_epoch"] = epoch
            else:
                bad += 1
                if bad >= self.patience:
                    break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        self.model.eval()
        self.fit_info.update(
            {
                "val_loss": history,
                "best_val_loss": best,
                "epochs_run": len(history),
                "val_split": "carved from train by document",
                "fit_rows": int(n),
                "val_rows": int(data["val"][1].shape[0]),
            }
        )
        self._cache = None

    # prediction -----------------------------------------------------------------
    def _all_scores(self, trace: Trace) -> np.ndarray:
        """[N, G, E] scores for every row (cached on the bytes of the inputs)."""
        x, _ = self._inputs(trace)
        h = hashlib.blake2b(digest_size=16)
        for k in sorted(x):
            h.update(k.encode())
            h.update(np.ascontiguousarray(x[k]).tobytes())
        key = h.digest()
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        assert self.model is not None
        outs = []
        with _torch_threads(max(self.threads, 1), trace.num_tokens), torch.no_grad():
            for i in range(0, trace.num_tokens, 8192):
                xb = {k: torch.as_tensor(v[i : i + 8192], device=self.device) for k, v in x.items()}
                outs.append(self._to_scores(self.model(**xb)).cpu().numpy())
        s = np.concatenate(outs) if outs else np.zeros((0, 1, self.num_experts), np.float32)
        self._cache = (key, s)
        return s

    def _predict(self, trace: Trace, layer: int, avail: np.ndarray) -> np.ndarray:
        return self._all_scores(trace)[:, self._layer_slot(layer)]

    # persistence ----------------------------------------------------------------
    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self.model is None:
            return {"arch": self.arch}, {}
        return {"arch": self.arch}, {
            k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()
        }

    def _set_state(self, state: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        self.arch = dict(state["arch"])
        self.model = self._build().to(self.device)
        self.model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()})
        self.model.eval()
        self._cache = None


# ------------------------------------------------------------------------- (a) token context
class _TokenNet(nn.Module):
    def __init__(self, vocab: int, n: int, emb: int, hidden: int, groups: int, width: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab + 2, emb)
        self.mlp = _MLP(n * emb, groups * width, hidden)
        self.groups, self.width = groups, width

    def forward(self, ids: torch.Tensor, hot: torch.Tensor | None = None) -> torch.Tensor:
        z = self.emb(ids).flatten(1)
        if hot is not None:
            z = torch.cat([z, hot], dim=1)
        return self.mlp(z).view(-1, self.groups, self.width)


class TokenContextMLP(NeuralPredictor):
    """Embeddings of the last n ids -> per-layer expert scores for all layers at once."""

    name = "token-mlp"

    def __init__(
        self,
        horizon: Horizon | None = None,
        seed: int = 0,
        n: int = 3,
        emb_dim: int = 32,
        mode: str = "multilabel",
        **kw: Any,
    ) -> None:
        super().__init__(horizon or Horizon(layers_ahead=1), seed, **kw)
        if n < 1 or emb_dim < 1 or mode not in ("multilabel", "sets"):
            raise ConfigError(
                f"TokenContextMLP: n={n} >= 1, emb_dim={emb_dim} >= 1, mode in multilabel|sets"
            )
        self.n, self.emb_dim, self.mode = int(n), int(emb_dim), mode
        self.context_tokens = self.n

    def describe(self) -> str:
        return f"token-mlp(n={self.n}{',sets' if self.mode == 'sets' else ''})"

    def config(self) -> dict[str, Any]:
        return {**super().config(), "n": self.n, "emb_dim": self.emb_dim, "mode": self.mode}

    def _setup(self, train: Trace) -> None:
        self.arch = {"vocab": int(train.token_id.max()) + 1}
        if self.mode == "sets":
            sets = list(itertools.combinations(range(self.num_experts), self.top_k))
            if len(sets) > MAX_SETS:
                raise ConfigError(
                    f"TokenContextMLP(mode='sets'): C(E={self.num_experts}, k={self.top_k}) = {len(sets)}"
                    f" sets > {MAX_SETS}; use mode='multilabel'"
                )

    def _membership(self) -> torch.Tensor:
        sets = list(itertools.combinations(range(self.num_experts), self.top_k))
        m = torch.zeros(len(sets), self.num_experts)
        for i, s in enumerate(sets):
            m[i, list(s)] = 1.0
        return m

    def _build(self) -> nn.Module:
        width = self.num_experts if self.mode == "multilabel" else self._membership().shape[0]
        self._member = self._membership() if self.mode == "sets" else None
        return _TokenNet(
            self.arch["vocab"], self.n, self.emb_dim, self.hidden, self.num_layers, width
        )

    def _src(self, trace: Trace) -> np.ndarray:
        if self.horizon.kind == "temporal":
            return source_rows(trace, self.horizon.tokens_ahead)
        return np.arange(trace.num_tokens)

    def _inputs(self, trace: Trace) -> tuple[dict[str, np.ndarray], np.ndarray]:
        src = self._src(trace)
        return {"ids": context_ids(trace, src, self.n, self.arch["vocab"])}, src >= 0

    def _targets(self, trace: Trace) -> np.ndarray:
        if self.mode == "multilabel":
            return expert_multi_hot(trace.expert_ids, self.num_experts)
        e, k = self.num_experts, self.top_k
        index = {s: i for i, s in enumerate(itertools.combinations(range(e), k))}
        srt = np.sort(trace.expert_ids.astype(np.int64), axis=2)
        flat = srt.reshape(-1, k)
        out = np.array([index.get(tuple(r), -100) for r in flat.tolist()], np.int64)
        return out.reshape(trace.num_tokens, self.num_layers)

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.mode == "multilabel":
            return nn.functional.binary_cross_entropy_with_logits(out, y)
        return nn.functional.cross_entropy(
            out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=-100
        )

    def _to_scores(self, out: torch.Tensor) -> torch.Tensor:
        if self.mode == "multilabel":
            return torch.sigmoid(out)
        return torch.softmax(out, dim=-1) @ self._member.to(out.device)


# ------------------------------------------------------------------------- (b) hidden probe
class HiddenProbe(NeuralPredictor):
    """Layer l's hidden state -> experts at layer l + d (linear or MLP; per layer or shared).

    wrap=True also maps the last d layers' inputs to the first d layers of the NEXT token of the
    document (source layer s >= L - d -> target layer s + d - L one token later): in decode those
    are the loads a same-token probe cannot name, and they are asked for while the current
    token's last layers still run.
    """

    name = "probe"
    horizon_kinds = ("spatial", "identity")

    def __init__(
        self,
        horizon: Horizon | None = None,
        seed: int = 0,
        point: str = "router_input",
        shared: bool = False,
        wrap: bool = False,
        **kw: Any,
    ) -> None:
        kw.setdefault("hidden", 0)
        super().__init__(horizon or Horizon(layers_ahead=1), seed, **kw)
        if point not in HIDDEN_POINTS:
            raise ConfigError(f"HiddenProbe: point={point!r}, expected one of {HIDDEN_POINTS}")
        if not isinstance(wrap, bool):
            raise ConfigError(f"HiddenProbe: wrap={wrap!r}, expected true or false")
        if wrap and self.horizon.layers_ahead == 0:
            raise ConfigError("HiddenProbe: wrap=true needs a spatial horizon d >= 1")
        self.point, self.shared, self.wrap = point, bool(shared), wrap

    def describe(self) -> str:
        kind = "linear" if self.hidden == 0 else f"mlp{self.hidden}"
        return (
            f"probe({kind},{'shared' if self.shared else 'per-layer'}"
            f"{',resid' if self.point == 'residual' else ''}{',wrap' if self.wrap else ''})"
        )

    def config(self) -> dict[str, Any]:
        return {**super().config(), "point": self.point, "shared": self.shared, "wrap": self.wrap}

    @property
    def _groups(self) -> int:
        """Source layers with a map: all L with wrap, else the L - d that have a same-token target."""
        return self.num_layers if self.wrap else self.num_layers - self.horizon.layers_ahead

    def target_layers(self) -> list[int]:
        return list(range(self.num_layers)) if self.wrap else super().target_layers()

    def _source(self, layer: int) -> tuple[int, bool]:
        """(source layer, from the previous token?) of target `layer`."""
        src = layer - self.horizon.layers_ahead
        if src >= 0:
            return src, False
        if not self.wrap:
            raise PredictorError(
                f"{self.describe()}: target layer {layer} has no source layer (horizon"
                f" d={self.horizon.layers_ahead}, {self.num_layers} MoE layers; wrap=true maps"
                " the previous token's last layers)"
            )
        return src + self.num_layers, True

    def _setup(self, train: Trace) -> None:
        require_hidden(train, self.point, self.describe())
        h = train.hidden[self.point]
        missing = [i for i in range(self._groups) if h.shape[0] and not np.isfinite(h[:, i]).all()]
        if missing:
            raise PredictorError(
                f"{self.describe()}: hidden states {self.point!r} are missing (NaN) for source MoE"
                f" layers {missing}; retrace with `moelab trace ... --hidden-layers all`"
            )
        self.arch = {"d_model": int(train.hidden[self.point].shape[-1])}

    def _build(self) -> nn.Module:
        d = self.arch["d_model"]
        if self.shared:
            return _SharedProbe(self._groups, d, self.num_experts, self.hidden)
        return _PerLayerProbe(self._groups, d, self.num_experts, self.hidden)

    def available(self, trace: Trace, layer: int) -> np.ndarray:
        require_hidden(trace, self.point, self.describe())
        hi = hidden_index(trace)
        if self.wrap and layer < self.horizon.layers_ahead:
            self._check(trace, layer)
            prev = trace.prev_row()
            return (prev >= 0) & (hi[np.maximum(prev, 0)] >= 0)
        return super().available(trace, layer) & (hi >= 0)

    def _inputs(self, trace: Trace) -> tuple[dict[str, np.ndarray], np.ndarray]:
        require_hidden(trace, self.point, self.describe())
        hi = hidden_index(trace)
        h = trace.hidden[self.point][:, : self._groups].astype(np.float32)
        x = np.zeros((trace.num_tokens, *h.shape[1:]), np.float32)
        x[hi >= 0] = h[hi[hi >= 0]]
        return {"x": x}, hi >= 0

    def _targets(self, trace: Trace) -> np.ndarray:
        d = self.horizon.layers_ahead
        same = expert_multi_hot(trace.expert_ids[:, d:], self.num_experts)
        if not self.wrap:
            return same
        # the next token's first d layers; NaN (masked out of the loss) at a document's end
        prev = trace.prev_row()
        nxt = np.full(trace.num_tokens, -1, np.int64)
        nxt[prev[prev >= 0]] = np.flatnonzero(prev >= 0)
        first = expert_multi_hot(trace.expert_ids[np.maximum(nxt, 0), :d], self.num_experts)
        first[nxt < 0] = np.nan
        return np.concatenate([same, first], axis=1)

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.wrap:
            return super()._loss(out, y)
        known = ~torch.isnan(y)
        return nn.functional.binary_cross_entropy_with_logits(out[known], y[known])

    def _layer_slot(self, layer: int) -> int:
        return self._source(layer)[0]

    def live_scores(self, layer: int, hidden: Any) -> np.ndarray:
        """[E] scores at target MoE `layer` from one token's hidden vector (self.point) at the
        source layer: predict_step's answer without building a Trace, for the live prefetch
        path, where the generic step costs several times the map itself. With wrap, a target
        layer < d is the next token's and `hidden` is the current token's last-layer input."""
        return 1.0 / (1.0 + np.exp(-self.live_logits(layer, hidden)))

    def live_logits(self, layer: int, hidden: Any) -> np.ndarray:
        """live_scores before the sigmoid ([E] float32) for one numpy vector: two numpy calls
        for a linear probe (product, bias). The live prefetch path ranks live_logits_torch
        instead (the same logits, from the router input tensor as it is): in a decode each
        numpy call finds its code and data out of cache and costs 10-20 us (bench/RESULTS.md
        runs 29-30)."""
        src = self._live_source(layer)
        x = np.asarray(hidden, dtype=np.float32)  # no copy for a float32 array
        if x.ndim != 1:
            x = x.reshape(-1)
        maps = self._linear_maps()
        if maps is None:  # an MLP probe: torch's map (its GELU)
            return self._group_map(x.reshape(1, -1), src, probabilities=False)[0]
        w, b = maps[src]
        if x.shape[0] != w.shape[0]:
            raise PredictorError(
                f"{self.describe()}: hidden vector of size {x.shape[0]}, expected {w.shape[0]}"
            )
        z = x @ w
        z += b
        return z

    def live_logits_torch(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """live_logits for router inputs x [n, D] as a torch tensor ([n, E] float32), on the
        live path: a linear probe is one F.linear and an MLP its forward, the ops the model
        itself runs each layer. In a decode those stay warm in cache where numpy's do not: a
        live probe step took 70-90 us through torch against 135-180 us through numpy
        (bench/RESULTS.md run 30)."""
        src = self._live_source(layer)
        d = self.arch["d_model"]
        if x.ndim != 2 or x.shape[-1] != d:
            raise PredictorError(
                f"{self.describe()}: router inputs of shape {tuple(x.shape)}, expected [n, {d}]"
            )
        maps = self._torch_maps(x.device)
        if x.dtype != torch.float32:
            x = x.float()
        with torch.no_grad():
            if maps is None:  # an MLP probe: its own forward, on the model's device
                dev = next(self.model.parameters()).device
                return self.model.forward_group(x.to(dev), src).to(x.device)
            w, b = maps[src]
            return nn.functional.linear(x, w, b)

    def _live_source(self, layer: int) -> int:
        """Source layer of target `layer` for a live call; PredictorError before fit() or for a
        layer outside the model."""
        if self.model is None:
            raise PredictorError(f"{self.label}: live scores asked before fit() or load()")
        if not 0 <= layer < self.num_layers:
            raise PredictorError(
                f"{self.describe()}: target layer {layer} outside 0..{self.num_layers - 1}"
            )
        return self._source(layer)[0]

    def _torch_maps(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """_linear_maps as torch (W [E, D], b [E]) on `device` (cached per device), or None."""
        cache = getattr(self, "_t_maps", None)
        if cache is not None and cache[0] == (id(self.model), device):
            return cache[1]
        maps = self._linear_maps()
        out = None
        if maps is not None:
            out = [(torch.from_numpy(np.ascontiguousarray(w.T)).to(device),
                    torch.from_numpy(np.ascontiguousarray(b)).to(device)) for w, b in maps]  # fmt: skip
        self._t_maps = ((id(self.model), device), out)
        return out

    def _linear_maps(self) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """Per source layer (W [D, E], b [E]) of a linear probe as numpy arrays, or None for an
        MLP (live_logits' product; live_logits_torch's maps are made from these)."""
        if self.hidden != 0:
            return None
        key = id(self.model)
        cached = getattr(self, "_np_maps", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        assert self.model is not None
        with torch.no_grad():
            if self.shared:
                lin = self.model.f.net
                w = lin.weight.detach().cpu().numpy().T.astype(np.float32)
                bias = lin.bias.detach().cpu().numpy()
                lb = self.model.layer_bias.detach().cpu().numpy()
                maps = [(np.ascontiguousarray(w), (bias + lb[g]).astype(np.float32))
                        for g in range(lb.shape[0])]  # fmt: skip
            else:
                ws = self.model.f.w[0].detach().cpu().numpy().astype(np.float32)
                bs = self.model.f.b[0].detach().cpu().numpy().astype(np.float32)
                maps = [(np.ascontiguousarray(ws[g]), bs[g]) for g in range(ws.shape[0])]
        self._np_maps = (key, maps)
        return maps

    def _group_scores(self, x: np.ndarray, src: int) -> np.ndarray:
        """Sigmoid scores [B, E] of source layer src's map on x [B, D]."""
        return self._group_map(x, src, probabilities=True)

    def _group_map(self, x: np.ndarray, src: int, probabilities: bool) -> np.ndarray:
        """Source layer src's map on x [B, D] -> [B, E]: sigmoid scores, or the logits."""
        assert self.model is not None
        with _torch_threads(max(self.threads, 1), len(x)), torch.no_grad():
            xt = torch.as_tensor(x, dtype=torch.float32).to(self.device)
            out = self.model.forward_group(xt, src)
            return (torch.sigmoid(out) if probabilities else out).cpu().numpy()

    def _predict(self, trace: Trace, layer: int, avail: np.ndarray) -> np.ndarray:
        """Only the target layer's map, on the available rows (no other layer computed)."""
        assert self.model is not None
        rows = np.flatnonzero(avail)
        src, previous = self._source(layer)
        if previous:
            rows_src = trace.prev_row()[rows]
        else:
            rows_src = rows
        out = np.zeros((trace.num_tokens, self.num_experts), np.float32)
        out[rows] = self._group_scores(
            trace.hidden[self.point][hidden_index(trace)[rows_src], src], src
        )
        return out


class _PerLayerProbe(nn.Module):
    def __init__(self, groups: int, d: int, e: int, hidden: int) -> None:
        super().__init__()
        self.f = _PerLayerMLP(groups, d, e, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)

    def forward_group(self, x: torch.Tensor, g: int) -> torch.Tensor:
        return self.f.forward_group(x, g)


class _SharedProbe(nn.Module):
    def __init__(self, groups: int, d: int, e: int, hidden: int) -> None:
        super().__init__()
        self.f = _MLP(d, e, hidden)
        self.layer_bias = nn.Parameter(torch.zeros(groups, e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x) + self.layer_bias

    def forward_group(self, x: torch.Tensor, g: int) -> torch.Tensor:
        return self.f(x) + self.layer_bias[g]


# ------------------------------------------------------------------------- (c) temporal
class TemporalMLP(NeuralPredictor):
    """Source token's ids and its experts at every layer -> next token's experts at every layer."""

    name = "temporal-mlp"
    horizon_kinds = ("temporal",)

    def __init__(
        self,
        horizon: Horizon | None = None,
        seed: int = 0,
        n: int = 2,
        emb_dim: int = 32,
        **kw: Any,
    ) -> None:
        super().__init__(horizon or Horizon(tokens_ahead=1), seed, **kw)
        if n < 1 or emb_dim < 1:
            raise ConfigError(f"TemporalMLP: n={n} and emb_dim={emb_dim} must be >= 1")
        self.n, self.emb_dim = int(n), int(emb_dim)
        self.context_tokens = self.n

    def describe(self) -> str:
        return f"temporal-mlp(n={self.n})"

    def config(self) -> dict[str, Any]:
        return {**super().config(), "n": self.n, "emb_dim": self.emb_dim}

    def _setup(self, train: Trace) -> None:
        self.arch = {"vocab": int(train.token_id.max()) + 1}

    def _build(self) -> nn.Module:
        net = _TokenNet(
            self.arch["vocab"], self.n, self.emb_dim, self.hidden, self.num_layers, self.num_experts
        )
        d_in = self.n * self.emb_dim + self.num_layers * self.num_experts
        net.mlp = _MLP(d_in, self.num_layers * self.num_experts, self.hidden or 64)
        return net

    def _inputs(self, trace: Trace) -> tuple[dict[str, np.ndarray], np.ndarray]:
        src = source_rows(trace, self.horizon.tokens_ahead)
        ids = context_ids(trace, src, self.n, self.arch["vocab"])
        hot = expert_multi_hot(trace.expert_ids[np.maximum(src, 0)], self.num_experts)
        hot[src < 0] = 0.0
        return {"ids": ids, "hot": hot.reshape(trace.num_tokens, -1)}, src >= 0

    def _targets(self, trace: Trace) -> np.ndarray:
        return expert_multi_hot(trace.expert_ids, self.num_experts)
