"""GateSet: the routers of every MoE layer as plain arrays, saved with a trace (gates.safetensors),
so gate-lookahead prediction (apply layer l+d's router to layer l's hidden state) needs no model.

Keys in gates.safetensors: `layer.{l}.weight` [E, D] (logits = h @ W.T + bias), optional
`layer.{l}.bias` [E], `layer.{l}.selection_bias` [E] (DeepSeek-V3: added to scores for
selection only), `layer.{l}.norm_weight` [D] (the RMSNorm that turns the residual stream into the
router input, for the residual-stream variant), optional `layer.{l}.norm_bias` [D] (LayerNorm
models such as PhiMoE). Metadata: score_fn, norm_eps, top_k, norm_kind ("rms" | "layer").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from moelab._io import atomic_write_with
from moelab.errors import TraceError


@dataclass
class GateSet:
    """Per-MoE-layer linear routers (weights [E, D]) with the score function they use."""

    weights: list[np.ndarray]
    biases: list[np.ndarray | None] = field(default_factory=list)
    selection_bias: list[np.ndarray | None] = field(default_factory=list)
    norm_weight: list[np.ndarray | None] = field(default_factory=list)
    score_fn: str = "softmax"
    norm_eps: float = 1e-6
    top_k: int = 2
    norm_bias: list[np.ndarray | None] = field(default_factory=list)
    norm_kind: str = "rms"  # "rms" (RMSNorm, T5 LayerNorm) or "layer" (nn.LayerNorm, PhiMoE)

    def __post_init__(self) -> None:
        n = len(self.weights)
        for name in ("biases", "selection_bias", "norm_weight", "norm_bias"):
            lst = getattr(self, name)
            if not lst:
                setattr(self, name, [None] * n)
            elif len(lst) != n:
                raise TraceError(f"GateSet.{name}: {len(lst)} entries for {n} layers")
        if self.score_fn not in ("softmax", "sigmoid"):
            raise TraceError(f"GateSet.score_fn={self.score_fn!r}: expected 'softmax' or 'sigmoid'")
        if self.norm_kind not in ("rms", "layer"):
            raise TraceError(f"GateSet.norm_kind={self.norm_kind!r}: expected 'rms' or 'layer'")

    @property
    def num_layers(self) -> int:
        """L."""
        return len(self.weights)

    def logits(self, layer: int, h: np.ndarray) -> np.ndarray:
        """Router logits of MoE layer `layer` for router inputs h [n, D] -> [n, E] float32."""
        w = self.weights[layer].astype(np.float32)
        out = h.astype(np.float32) @ w.T
        if self.biases[layer] is not None:
            out = out + self.biases[layer].astype(np.float32)
        return out

    def normalize(self, layer: int, residual: np.ndarray) -> np.ndarray:
        """Apply layer's pre-router norm (RMSNorm, or LayerNorm if norm_kind="layer") to [n, D]."""
        r = residual.astype(np.float32)
        if self.norm_kind == "layer":
            r = r - r.mean(-1, keepdims=True)
        r = r / np.sqrt((r * r).mean(-1, keepdims=True) + self.norm_eps)
        nw = self.norm_weight[layer]
        r = r * nw.astype(np.float32) if nw is not None else r
        nb = self.norm_bias[layer]
        return r + nb.astype(np.float32) if nb is not None else r

    def scores(self, layer: int, h: np.ndarray) -> np.ndarray:
        """Selection scores [n, E]: softmax/sigmoid of logits, plus selection bias if any."""
        lg = self.logits(layer, h)
        if self.score_fn == "softmax":
            lg = lg - lg.max(-1, keepdims=True)
            s = np.exp(lg)
            s /= s.sum(-1, keepdims=True)
        else:
            s = 1.0 / (1.0 + np.exp(-lg))
        if self.selection_bias[layer] is not None:
            s = s + self.selection_bias[layer].astype(np.float32)
        return s

    def save(self, path: str | Path) -> None:
        """Write gates.safetensors atomically."""
        tensors: dict[str, np.ndarray] = {}
        for i, w in enumerate(self.weights):
            tensors[f"layer.{i}.weight"] = np.ascontiguousarray(w, dtype=np.float32)
            for name, lst in (
                ("bias", self.biases),
                ("selection_bias", self.selection_bias),
                ("norm_weight", self.norm_weight),
                ("norm_bias", self.norm_bias),
            ):
                if lst[i] is not None:
                    tensors[f"layer.{i}.{name}"] = np.ascontiguousarray(lst[i], dtype=np.float32)
        meta = {
            "score_fn": self.score_fn,
            "norm_eps": repr(self.norm_eps),
            "top_k": str(self.top_k),
            "num_layers": str(len(self.weights)),
            "norm_kind": self.norm_kind,
        }
        atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> GateSet:
        """Read gates.safetensors; clear error if missing or malformed."""
        path = Path(path)
        if not path.exists():
            raise TraceError(f"{path}: gates file not found (retrace with gates saved)")
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
            n = int(meta["num_layers"])
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise TraceError(f"{path}: not a valid gates.safetensors ({exc})") from exc

        def get(i: int, name: str) -> np.ndarray | None:
            return tensors.get(f"layer.{i}.{name}")

        return cls(
            weights=[tensors[f"layer.{i}.weight"] for i in range(n)],
            biases=[get(i, "bias") for i in range(n)],
            selection_bias=[get(i, "selection_bias") for i in range(n)],
            norm_weight=[get(i, "norm_weight") for i in range(n)],
            norm_bias=[get(i, "norm_bias") for i in range(n)],
            norm_kind=meta.get("norm_kind", "rms"),
            score_fn=meta.get("score_fn", "softmax"),
            norm_eps=float(meta.get("norm_eps", "1e-6")),
            top_k=int(meta.get("top_k", "2")),
        )
