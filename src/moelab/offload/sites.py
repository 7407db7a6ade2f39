"""Where a model keeps its routed experts: one `ExpertSite` per MoE layer, for moelab models and
transformers v5 MoE families whose experts module stores 3-D `gate_up_proj [E, 2F, D]` /
`down_proj [E, D, F]` (Mixtral, Qwen2/3-MoE, OLMoE). Offloading swaps `site.parent.<attr>`.

Detection is done directly on the module tree (not through the trace adapters), so it works for
any model following either layout; shared experts are not sites and stay resident.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch
from torch import nn

from moelab.errors import ModelError

EXPERT_TENSORS = ("gate_up_proj", "down_proj")


@dataclass
class ExpertSite:
    """One MoE layer: its experts module, router module and where the experts module hangs."""

    layer: int  # MoE layer ordinal 0..L-1
    transformer_layer: int  # index of the transformer block holding it
    kind: str  # "moelab" | "hf"
    parent: nn.Module  # module whose attribute `attr` is the experts module
    attr: str
    experts: nn.Module
    router: nn.Module
    num_experts: int
    top_k: int

    def expert_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of one expert's tensors (from the stacked weights)."""
        return {n: tuple(getattr(self.experts, n).shape[1:]) for n in EXPERT_TENSORS}

    def dtype(self) -> torch.dtype:
        """Dtype of the expert weights."""
        return self.experts.gate_up_proj.dtype

    def router_weight(self) -> torch.Tensor:
        """The router's [E, D] projection (moelab `router.gate.weight`, HF `gate.weight`)."""
        if hasattr(self.router, "gate") and isinstance(self.router.gate, nn.Linear):
            return self.router.gate.weight
        if isinstance(getattr(self.router, "weight", None), torch.Tensor):
            return self.router.weight
        raise ModelError(
            f"MoE layer {self.layer}: router {type(self.router).__name__} has no linear projection"
        )

    def router_fingerprint(self) -> str:
        """sha256 of the router weights: identifies the checkpoint an expert store belongs to."""
        try:
            w = self.router_weight().detach().to("cpu").contiguous()
        except ModelError:
            return ""
        return hashlib.sha256(w.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def _is_expert_bank(m: nn.Module) -> bool:
    gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return (
        isinstance(gu, torch.Tensor)
        and isinstance(dn, torch.Tensor)
        and gu.dim() == 3
        and dn.dim() == 3
        and gu.shape[0] == dn.shape[0]
    )


def _check_hf_layout(name: str, m: nn.Module) -> None:
    """Only the transformers v5 Mixtral layout is offloaded: gate_up [E, 2F, D], down [E, D, F],
    no biases (GPT-OSS-style transposed/biased banks would be computed wrongly)."""
    gu, dn = m.gate_up_proj, m.down_proj
    D, F = dn.shape[1], dn.shape[2]
    ok = gu.shape[2] == D and gu.shape[1] in (F, 2 * F)
    biases = [n for n, _ in m.named_parameters() if "bias" in n]
    if not ok or biases:
        raise ModelError(
            f"{name}: experts module {type(m).__name__} has gate_up_proj {tuple(gu.shape)}, down_proj "
            f"{tuple(dn.shape)}{', biases ' + str(biases) if biases else ''}; offloading supports the "
            "Mixtral layout gate_up_proj [E, 2F, D], down_proj [E, D, F] without biases"
        )


def find_expert_sites(model: nn.Module) -> list[ExpertSite]:
    """List the routed-expert sites of a moelab MoETransformer / MoEBlock or an HF v5 MoE model."""
    from moelab.layers.moe import MoEBlock

    sites: list[ExpertSite] = []
    blocks = getattr(model, "blocks", None)
    if isinstance(model, MoEBlock):
        candidates = [(0, model)]
    elif blocks is not None:
        candidates = [(i, getattr(b, "ffn", None)) for i, b in enumerate(blocks)]
    else:
        candidates = []
    for i, ffn in candidates:
        if isinstance(ffn, MoEBlock):
            sites.append(
                ExpertSite(
                    layer=len(sites),
                    transformer_layer=i,
                    kind="moelab",
                    parent=ffn,
                    attr="experts",
                    experts=ffn.experts,
                    router=ffn.router,
                    num_experts=ffn.cfg.num_experts,
                    top_k=ffn.cfg.top_k,
                )
            )
    if sites or isinstance(model, MoEBlock) or blocks is not None:
        return sites
    # transformers v5: a module with `.experts` (3-D stacked weights) and a sibling router.
    for name, mod in model.named_modules():
        exp = getattr(mod, "experts", None)
        if not isinstance(exp, nn.Module) or not _is_expert_bank(exp):
            continue
        _check_hf_layout(name, exp)
        router = getattr(mod, "gate", None) or getattr(mod, "router", None)
        if router is None:
            raise ModelError(f"{name}: experts module found but no sibling `gate`/`router` module")
        m = re.search(r"layers\.(\d+)", name)
        top_k = getattr(mod, "top_k", None) or getattr(router, "top_k", None)
        if top_k is None:
            raise ModelError(f"{name}: cannot tell top_k (no `top_k` on the block or router)")
        sites.append(
            ExpertSite(
                layer=len(sites),
                transformer_layer=int(m.group(1)) if m else len(sites),
                kind="hf",
                parent=mod,
                attr="experts",
                experts=exp,
                router=router,
                num_experts=int(exp.gate_up_proj.shape[0]),
                top_k=int(top_k),
            )
        )
    return sites


def require_sites(model: nn.Module) -> list[ExpertSite]:
    """find_expert_sites, raising ModelError if the model has no routed experts."""
    sites = find_expert_sites(model)
    if not sites:
        raise ModelError(
            f"{type(model).__name__}: no MoE layers with stacked experts found (expected a moelab "
            "MoETransformer or a transformers v5 Mixtral/Qwen-MoE/OLMoE model)"
        )
    return sites
