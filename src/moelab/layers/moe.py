"""MoEBlock: router + routed expert bank + optional always-on shared experts (DESIGN.md §3)."""

from __future__ import annotations

import torch
from torch import nn

from moelab.errors import InputError
from moelab.layers.config import MoEConfig
from moelab.layers.dispatch import dispatch_combine
from moelab.layers.experts import ExpertBank
from moelab.layers.routing import build_router
from moelab.layers.types import RoutingResult


class MoEBlock(nn.Module):
    """forward(x [..., D], token_ids=None, mask=None) -> (y [..., D], RoutingResult over flat tokens)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = build_router(cfg)
        self.experts = ExpertBank(cfg.num_experts, cfg.d_model, cfg.d_ff, cfg.expert_act)
        self.shared_experts = (
            ExpertBank(1, cfg.d_model, cfg.shared_hidden, cfg.expert_act)
            if cfg.num_shared_experts > 0
            else None
        )
        self.shared_gate = (
            nn.Linear(cfg.d_model, 1, bias=False) if self.shared_experts is not None and cfg.shared_gate else None
        )

    def forward(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RoutingResult]:
        if x.shape[-1] != self.cfg.d_model:
            raise InputError(
                f"MoEBlock: last dim of input must be d_model={self.cfg.d_model}, got shape {tuple(x.shape)}"
            )
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        tid = token_ids.reshape(-1) if token_ids is not None else None
        m = mask.reshape(-1).bool() if mask is not None else None
        routing = self.router(flat, token_ids=tid, mask=m)
        y = dispatch_combine(flat, routing, self.experts)
        if self.shared_experts is not None:
            s = self.shared_experts.forward_one(0, flat)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(flat)) * s
            y = y + s
        return y.reshape(shape), routing


