"""Tracer: forward hooks on an adapter's router sites that record, for one padded batch, the
top-k expert ids, weights, router logits and sampled hidden states of every real token.

Hooks only read tensors (no model edits); hidden states are taken at the router input (the MoE
block's input, i.e. the pre-router norm's output) and optionally at the block input (the
pre-attention residual stream). Non-finite router logits or weights (NaN/Inf) are refused with
the first layer that produced them: a NaN router still "selects" experts (top-k of NaN picks
fixed indices), so recording it would be a silently wrong trace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moelab.errors import ModelError
from moelab.trace.adapters import Adapter


@dataclass
class BatchRecord:
    """Routing of the n real tokens of one batch (rows in batch-flat order)."""

    expert_ids: np.ndarray  # [n, L, k] int
    weights: np.ndarray  # [n, L, k] float16
    logits: np.ndarray | None  # [n, L, E] float16 (or float32, see Tracer logits_dtype)
    dropped: np.ndarray | None = None  # [n, L, k] bool: over capacity, intended expert kept
    hidden: dict[str, np.ndarray] = field(default_factory=dict)  # point -> [m, Lh, D] float16


def check_finite(site: Any, li: int, logits: torch.Tensor | None, weights: torch.Tensor) -> None:
    """Raise ModelError naming the MoE layer if any real token's router logits/weights are NaN/Inf."""
    for what, t in (("logits", logits), ("weights", weights)):
        if t is None:
            continue
        bad = ~torch.isfinite(t.detach()).all(dim=-1)
        n_bad = int(bad.sum())
        if n_bad:
            raise ModelError(
                f"{site.name} (MoE layer {li}, transformer layer {site.layer_index}): router {what}"
                f" are not finite (NaN/Inf) for {n_bad} of {t.shape[0]} tokens; refusing to record"
                " routing decided by NaN. Check the model's weights for NaN/Inf (e.g. the router"
                " weight of this layer or anything before it), or trace in float32"
                " (--dtype float32) if float16 overflows"
            )


class Tracer:
    """Context manager: `with Tracer(adapter, ...) as t: rec = t.record(ids, mask, sel, hsel)`."""

    def __init__(
        self,
        adapter: Adapter,
        logits: bool = True,
        hidden_points: tuple[str, ...] = (),
        hidden_layers: list[int] | None = None,
        logits_dtype: torch.dtype = torch.float16,
    ) -> None:
        self.adapter = adapter
        self.logits = logits
        self.logits_dtype = logits_dtype
        self._experts_mode = getattr(adapter, "capture", "output") == "experts"
        self._calls = [0] * len(adapter.sites)
        self.hidden_points = hidden_points
        L = len(adapter.sites)
        self.hidden_layers = list(range(L)) if hidden_layers is None else list(hidden_layers)
        for h in self.hidden_layers:
            if not 0 <= h < L:
                raise ModelError(
                    f"hidden layer {h} out of range: the model has {L} MoE layers (0..{L - 1})"
                )
        self._hpos = {layer: i for i, layer in enumerate(self.hidden_layers)}
        self._handles: list[Any] = []
        self._out: list[Any] = [None] * L
        self._hid: dict[str, list[Any]] = {
            p: [None] * len(self.hidden_layers) for p in hidden_points
        }
        self._hsel: torch.Tensor | None = None

    def __enter__(self) -> Tracer:
        for li, site in enumerate(self.adapter.sites):
            if self._experts_mode:
                self._handles.append(
                    site.module.register_forward_pre_hook(self._experts_hook(li), with_kwargs=True)
                )
                router = getattr(site, "router", None)
                if router is not None:
                    self._handles.append(
                        router.register_forward_hook(self._logits_hook(li), with_kwargs=True)
                    )
            else:
                self._handles.append(
                    site.module.register_forward_hook(self._router_hook(li), with_kwargs=True)
                )
            if "residual" in self.hidden_points and li in self._hpos:
                if site.block is None:
                    raise ModelError(
                        f"{site.name}: no transformer block known for residual capture"
                    )
                self._handles.append(
                    site.block.register_forward_pre_hook(self._block_hook(li), with_kwargs=True)
                )
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _want_router_input(self, li: int) -> bool:
        return "router_input" in self.hidden_points and li in self._hpos

    def _experts_hook(self, li: int) -> Any:
        """Pre-hook on an experts module: the ids and weights it is about to run with."""
        from_here = self._want_router_input(li) and (
            getattr(self.adapter.sites[li], "router", None) is None
        )

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self._calls[li] += 1
            cap = self._out[li] if isinstance(self._out[li], dict) else {}
            cap["experts"] = (args, kwargs)
            self._out[li] = cap
            if from_here and self._hsel is not None:
                x = self.adapter.router_input(args, kwargs)
                self._hid["router_input"][self._hpos[li]] = x[self._hsel].to(torch.float16)

        return hook

    def _logits_hook(self, li: int) -> Any:
        """Forward hook on the router beside an experts module: its logits (and its input)."""
        want_h = self._want_router_input(li)

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            cap = self._out[li] if isinstance(self._out[li], dict) else {}
            cap["router"] = output
            self._out[li] = cap
            if want_h and self._hsel is not None:
                x = self.adapter.router_input(args, kwargs)
                self._hid["router_input"][self._hpos[li]] = x[self._hsel].to(torch.float16)

        return hook

    def _router_hook(self, li: int) -> Any:
        want_h = self._want_router_input(li)

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            # keep references only; decoding happens once per batch after the forward
            self._calls[li] += 1
            self._out[li] = {"output": (args, output)}
            if want_h and self._hsel is not None:
                x = self.adapter.router_input(args, kwargs)
                self._hid["router_input"][self._hpos[li]] = x[self._hsel].to(torch.float16)

        return hook

    def _block_hook(self, li: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if self._hsel is None:
                return
            x = args[0] if args else kwargs["hidden_states"]
            x = x.reshape(-1, x.shape[-1])
            self._hid["residual"][self._hpos[li]] = x[self._hsel].to(torch.float16)

        return hook

    def decode_all(self) -> list[Any]:
        """Decode what the hooks saw in the last forward pass (one Decoded per MoE layer)."""
        out = []
        for li, site in enumerate(self.adapter.sites):
            if self._calls[li] != 1 or self._out[li] is None:
                raise ModelError(
                    f"{site.name} (MoE layer {li}): routing hook fired {self._calls[li]} times in"
                    " one forward pass, expected once; this layer's routing cannot be recorded"
                    " one row per token, so the model is refused"
                )
            out.append(self.adapter.decode_capture(site, self._out[li]))
        self._out = [None] * len(self.adapter.sites)
        return out

    @torch.inference_mode()
    def record(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        sel: torch.Tensor,
        hidden_sel: torch.Tensor | None = None,
    ) -> BatchRecord:
        """Run the model on one batch; return routing of the flat positions `sel` (real tokens)."""
        self._out = [None] * len(self.adapter.sites)
        self._calls = [0] * len(self.adapter.sites)
        self._hsel = (
            hidden_sel
            if (self.hidden_points and hidden_sel is not None and hidden_sel.numel())
            else None
        )
        self.adapter.run(input_ids, attention_mask)
        decoded = self.decode_all()
        ids, ws, lgs, drop = [], [], [], []
        for li, (site, d) in enumerate(zip(self.adapter.sites, decoded, strict=True)):
            if self.logits and d.logits is None:
                raise ModelError(f"{site.name}: no router logits recorded for this layer")
            check_finite(site, li, None if d.logits is None else d.logits[sel], d.weights[sel])
            ids.append(d.expert_ids[sel])
            ws.append(d.weights[sel])
            if self.logits:
                lgs.append(d.logits[sel].to(self.logits_dtype))
            if d.dropped is not None:
                drop.append(d.dropped[sel])
        if drop and len(drop) != len(ids):  # some layers cannot drop: flag nothing there
            drop = [
                torch.zeros_like(i, dtype=torch.bool) if d.dropped is None else d.dropped[sel]
                for i, d in zip(ids, decoded, strict=True)
            ]
        rec = BatchRecord(
            expert_ids=torch.stack(ids, 1).cpu().numpy(),
            weights=torch.stack(ws, 1).to(torch.float16).cpu().numpy(),
            logits=torch.stack(lgs, 1).cpu().numpy() if self.logits else None,
            dropped=torch.stack(drop, 1).cpu().numpy() if drop else None,
        )
        if self._hsel is not None:
            for p, lst in self._hid.items():
                rec.hidden[p] = torch.stack(lst, 1).cpu().numpy()
                self._hid[p] = [None] * len(self.hidden_layers)
        self._hsel = None
        return rec
