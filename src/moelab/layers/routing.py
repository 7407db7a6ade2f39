"""Routers: map token hidden states [T, D] to a RoutingResult (which experts, which weights).

TopKRouter follows Mixtral/Qwen-MoE/OLMoE (transformers `MixtralTopKRouter`): softmax over all
E experts in float32, top-k, optional renormalisation of the k probabilities.
Other routers (Shazeer 2017 noisy top-k, Switch, GShard, expert choice, hash, Sinkhorn-BASE,
DeepSeek-V3) are registered in ROUTERS and built with `build_router(cfg)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelab.errors import ConfigError, InputError
from moelab.layers.config import MoEConfig
from moelab.layers.types import RoutingResult


def check_router_input(x: torch.Tensor, d_model: int, where: str) -> None:
    """Raise InputError unless x is a float [T, d_model] tensor."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[-1] != d_model:
        raise InputError(
            f"{where}: expected hidden states of shape [tokens, d_model={d_model}], got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise InputError(f"{where}: hidden states must be floating point, got {x.dtype}")


def check_logits_finite(logits: torch.Tensor, where: str) -> None:
    """Raise InputError if router logits contain NaN/inf (usually a diverged model or bad input)."""
    if not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).any(dim=-1).nonzero().flatten()[:5].tolist()
        raise InputError(
            f"{where}: router logits contain NaN or inf (first bad token rows: {bad}); "
            "check the input hidden states and the router weights"
        )


class Router(nn.Module):
    """Base class: `forward(x [T, D], token_ids=None, mask=None) -> RoutingResult`.

    `mask` [T] bool marks real tokens (False = padding); padding never counts in aux losses.
    Subclasses set `self.gate` (nn.Linear D->E) when they have a learned linear router.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.d_model = cfg.d_model
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        """Multiplicative uniform jitter in training (Switch/Mixtral); returns a new tensor."""
        if self.training and self.cfg.jitter_noise > 0:
            eps = self.cfg.jitter_noise
            return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        return x


class TopKRouter(Router):
    """Softmax top-k router (Mixtral, Qwen2/3-MoE, OLMoE)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        self.gate = nn.Linear(cfg.d_model, cfg.num_experts, bias=cfg.router_bias)

    def forward(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> RoutingResult:
        check_router_input(x, self.d_model, type(self).__name__)
        logits = self.gate(self.jitter(x))
        check_logits_finite(logits, type(self).__name__)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.cfg.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return RoutingResult(
            expert_ids=top_i, weights=top_w.to(x.dtype), logits=logits, scores=probs
        )


ROUTERS: dict[str, type[Router]] = {"topk": TopKRouter}


def build_router(cfg: MoEConfig) -> Router:
    """Instantiate the router named by cfg.router."""
    try:
        cls = ROUTERS[cfg.router]
    except KeyError:
        raise ConfigError(
            f"MoEConfig.router={cfg.router!r} has no implementation; available: {sorted(ROUTERS)}"
        ) from None
    return cls(cfg)
