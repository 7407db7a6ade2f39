"""MoEBlock: router + routed expert bank + optional always-on shared experts (DESIGN.md §3).

y = sum_{e in TopK(x)} g_e(x) E_e(x) + [sigmoid(w_s . x)] * S(x)

Routed part: Shazeer et al. (2017) sparsely-gated MoE, with the router chosen by
`MoEConfig.router` (Mixtral/Qwen top-k, Switch, GShard, expert choice, hash, Sinkhorn-BASE,
DeepSeek-V3). Shared experts: DeepSeekMoE (Dai et al. 2024, Eq. 9: K_s always-on experts added
to the routed sum), optionally gated by a sigmoid of a linear function of the token as in
Qwen2-MoE (`shared_expert_gate`). Fine-grained segmentation (DeepSeekMoE Eq. 6-8: m*E experts
of d_ff/m, m*k active) is `MoEConfig.fine_grained(m)`; `expert_flops_per_token` shows it keeps
the compute.
"""

from __future__ import annotations

import torch
from torch import nn

from moelab.errors import ConfigError, InputError
from moelab.layers.config import MoEConfig
from moelab.layers.dispatch import BACKENDS, Dispatcher, LocalDispatcher
from moelab.layers.experts import ExpertBank
from moelab.layers.masks import resolve_mask
from moelab.layers.routing import build_router
from moelab.layers.types import RoutingResult


def expert_flops_per_token(cfg: MoEConfig) -> int:
    """Forward multiply-add FLOPs per token of the active routed + shared experts (no router)."""
    n_mats = 3 if cfg.expert_act == "swiglu" else 2
    routed = cfg.top_k * n_mats * 2 * cfg.d_model * cfg.d_ff
    shared = n_mats * 2 * cfg.d_model * cfg.shared_hidden
    return routed + shared


class MoEBlock(nn.Module):
    """forward(x [..., D], token_ids=None, mask=None) -> (y [..., D], RoutingResult over flat tokens).

    Masks: `mask` (True = real token, taken as is) or, by keyword, `padding_mask=` (True =
    padding, Megatron-Core) / `attention_mask=` (1 = real token, transformers), refused when
    they look inverted (`moelab.layers.masks`; `padding_side="left"` for left-padded rows).
    A [B, S, D] input tells the router its B rows (per-row capacity, per-sequence losses).
    `backend` ("loop" | "grouped_mm") overrides `cfg.dispatch_backend`. `dispatcher` moves
    tokens to their experts and back: `LocalDispatcher` (default, every expert here) or
    `moelab.parallel.AllToAllDispatcher` (experts sharded over processes; `shard_experts`).
    """

    def __init__(self, cfg: MoEConfig, backend: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backend = backend if backend is not None else cfg.dispatch_backend
        if self.backend not in BACKENDS:
            raise ConfigError(f"MoEBlock: backend={self.backend!r}; expected one of {BACKENDS}")
        self.router = build_router(cfg)
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.experts = ExpertBank(cfg.num_experts, cfg.d_model, cfg.d_ff, cfg.expert_act)
        self.shared_experts = (
            ExpertBank(1, cfg.d_model, cfg.shared_hidden, cfg.expert_act)
            if cfg.num_shared_experts > 0
            else None
        )
        self.shared_gate = (
            nn.Linear(cfg.d_model, 1, bias=False)
            if self.shared_experts is not None and cfg.shared_gate
            else None
        )

    def __setattr__(self, name: str, value: object) -> None:
        # offloading swaps `experts` for any object with `num_experts` and `forward_one`
        if name == "experts" and not isinstance(value, nn.Module) and "_modules" in self.__dict__:
            if not (
                hasattr(value, "num_experts") and callable(getattr(value, "forward_one", None))
            ):
                raise InputError(
                    f"MoEBlock.experts: {type(value).__name__} needs `num_experts` and "
                    "`forward_one(e, x)`"
                )
            self._modules.pop("experts", None)
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def forward(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        padding_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        padding_side: str = "right",
    ) -> tuple[torch.Tensor, RoutingResult]:
        """Route, run the chosen experts (+ shared experts) and return (y, routing)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.cfg.d_model:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(
                f"MoEBlock: input must be [..., d_model={self.cfg.d_model}], got {shape}"
            )
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        n = flat.shape[0]
        tid = token_ids.reshape(-1) if token_ids is not None else None
        rows = int(shape[0]) if x.dim() >= 3 and n > 0 else None
        if padding_mask is not None or attention_mask is not None:
            mask = resolve_mask(
                n,
                "MoEBlock",
                mask=mask,
                padding_mask=padding_mask,
                attention_mask=attention_mask,
                rows=rows,
                padding_side=padding_side,
            )
        m = mask.reshape(-1).to(torch.bool) if mask is not None else None
        for name, t in (("token_ids", tid), ("mask", m)):
            if t is not None and t.numel() != n:
                raise InputError(
                    f"MoEBlock: {name} has {t.numel()} entries but the input has {n} tokens "
                    f"(shape {tuple(shape)})"
                )
        routing = self.router(flat, token_ids=tid, mask=m, rows=rows)
        y = self.dispatcher(flat, routing, self.experts, backend=self.backend, mask=m)
        if self.shared_experts is not None:
            s = self.shared_experts.forward_one(0, flat)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(flat)) * s
            y = y + s
        return y.reshape(shape), routing

    def flops_per_token(self) -> int:
        """Forward FLOPs per token: active experts plus the router projection."""
        return expert_flops_per_token(self.cfg) + 2 * self.cfg.d_model * self.cfg.num_experts
