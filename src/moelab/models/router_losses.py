"""Model-level router losses for MoETransformer, taken from the layer library (never re-derived).

Load balancing: Switch Transformer (Fedus et al. 2022, eq. 4-6) as transformers'
``load_balancing_loss_func``: for top-k softmax routers (Mixtral/Qwen semantics) the loss is
``moelab.layers.losses.load_balancing_loss`` over the router logits of all MoE layers pooled,
padding excluded -- the same number transformers' MixtralForCausalLM reports as ``aux_loss``.
Other routers report their own balancing terms in ``RoutingResult.aux`` (Switch/GShard
load_balancing, noisy top-k importance + load, DeepSeek-V3 seq_aux; none for hash, expert choice
and Sinkhorn); those are averaged over MoE layers.
Router z-loss: ST-MoE (Zoph et al. 2022, eq. 5), ``router_z_loss`` over all layers' logits of
routers with a learned gate (0 for hash routing).
"""

from __future__ import annotations

import torch

from moelab.layers.losses import load_balancing_loss, router_z_loss
from moelab.layers.types import RoutingResult

Z_KEYS = ("z_loss",)  # RoutingResult.aux keys that are z-losses, not balancing terms


def balance_loss(
    router: str, routings: list[RoutingResult], mask: torch.Tensor | None
) -> torch.Tensor:
    """Load-balancing loss over the MoE layers' routing results (all from the same MoEConfig)."""
    first = routings[0]
    if router == "topk":
        return load_balancing_loss(
            [r.logits for r in routings], first.num_experts, first.top_k, mask, pooled=True
        )
    zero = first.logits.new_zeros((), dtype=torch.float32)
    per_layer = [
        sum((v.float() for k, v in r.aux.items() if k not in Z_KEYS), zero) for r in routings
    ]
    return torch.stack(per_layer).mean()


def z_loss(
    has_gate: bool, routings: list[RoutingResult], mask: torch.Tensor | None
) -> torch.Tensor:
    """Router z-loss over the MoE layers (0 when the router has no learned logits)."""
    if not has_gate:
        return routings[0].logits.new_zeros((), dtype=torch.float32)
    return router_z_loss([r.logits for r in routings], mask)
