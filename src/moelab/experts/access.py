"""Uniform access to the routed experts and routers of moelab and transformers MoE models.

Both store experts in the transformers-v5 layout: ``gate_up_proj [E, 2F, D]`` (gate rows, then
up rows) and ``down_proj [E, D, F]``, with the router projection ``weight [E, D]``. For
transformers models the experts module is the `experts` sibling of the router module the
tracing adapter found (Mixtral, Qwen2/Qwen3-MoE, OLMoE and the families built the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moelab.errors import ModelError

__all__ = ["LayerExperts", "layer_experts", "expert_forward", "capture_router_inputs"]


@dataclass
class LayerExperts:
    """The experts of one MoE layer (views of the model's parameters, not copies)."""

    layer: int  # transformer layer index
    gate_up: torch.Tensor  # [E, n_in, D]
    down: torch.Tensor  # [E, D, F]
    act: str  # "swiglu", "gelu" or "relu"
    router_weight: torch.Tensor | None  # [E, D]
    router_bias: torch.Tensor | None  # [E] or None

    @property
    def num_experts(self) -> int:
        """E."""
        return int(self.gate_up.shape[0])

    @property
    def d_ff(self) -> int:
        """Hidden neurons per expert."""
        return int(self.down.shape[2])


def _hf_experts_module(model: nn.Module, site: Any) -> nn.Module:
    parent_name = site.name.rsplit(".", 1)[0]
    parent = model.get_submodule(parent_name)
    exp = getattr(parent, "experts", None)
    if exp is None or not hasattr(exp, "gate_up_proj") or not hasattr(exp, "down_proj"):
        raise ModelError(
            f"{parent_name}: no `experts` module with gate_up_proj/down_proj (transformers v5 "
            "stacked experts); this family's experts are not supported here"
        )
    return exp


def layer_experts(model: nn.Module) -> list[LayerExperts]:
    """LayerExperts of every MoE layer, in forward order."""
    from moelab.trace.adapters import get_adapter

    ad = get_adapter(model)
    out = []
    for s in ad.sites:
        if ad.family == "moelab":
            bank = s.module.experts
            if not hasattr(bank, "gate_up_proj"):
                raise ModelError(f"{s.name}: experts are offloaded; load the model normally")
            gate = getattr(s.module.router, "gate", None)
            out.append(
                LayerExperts(
                    s.layer_index,
                    bank.gate_up_proj,
                    bank.down_proj,
                    bank.act,
                    gate.weight if isinstance(gate, nn.Linear) else None,
                    gate.bias if isinstance(gate, nn.Linear) else None,
                )
            )
        else:
            exp = _hf_experts_module(model, s)
            act = str(getattr(model.config, "hidden_act", "silu"))
            if act not in ("silu", "swish"):
                raise ModelError(f"hidden_act={act!r}: only SwiGLU (silu) experts are supported")
            w = getattr(s.gate, "weight", None)
            b = getattr(s.gate, "bias", None)
            out.append(
                LayerExperts(
                    s.layer_index,
                    exp.gate_up_proj,
                    exp.down_proj,
                    "swiglu",
                    w if isinstance(w, torch.Tensor) else None,
                    b if isinstance(b, torch.Tensor) else None,
                )
            )
    return out


def expert_forward(
    gate_up: torch.Tensor, down: torch.Tensor, act: str, x: torch.Tensor
) -> torch.Tensor:
    """One expert's output on x [T, D] from its weights gate_up [n_in, D], down [D, F]."""
    h = x @ gate_up.t()
    if act == "swiglu":
        g, u = h.chunk(2, dim=-1)
        a = F.silu(g) * u
    elif act == "gelu":
        a = F.gelu(h)
    else:
        a = F.relu(h)
    return a @ down.t()


@torch.no_grad()
def capture_router_inputs(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int = 16
) -> list[torch.Tensor]:
    """The hidden states each MoE layer routes (its experts' input), [T, D] per layer."""
    from moelab.experts.heldout import forward_logits
    from moelab.trace.adapters import get_adapter

    ad = get_adapter(model)
    got: list[list[torch.Tensor]] = [[] for _ in ad.sites]
    handles = []
    for li, s in enumerate(ad.sites):

        def hook(_m, args, kwargs, li=li):
            got[li].append(ad.router_input(args, kwargs).detach().float().cpu())

        handles.append(s.module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        model.eval()
        for i in range(0, input_ids.shape[0], batch_size):
            forward_logits(model, input_ids[i : i + batch_size])
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(g) for g in got]
