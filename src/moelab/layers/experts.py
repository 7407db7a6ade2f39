"""Expert banks: E feed-forward experts stored as stacked weights [E, ...] (SwiGLU or GELU).

Layout matches transformers v5 (`gate_up_proj [E, 2F, D]`, `down_proj [E, D, F]`) so weights
copy across without transposes. `forward_one(e, x)` runs a single expert on a slice of tokens;
dispatch and offloading both go through it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ExpertBank(nn.Module):
    """E experts; SwiGLU: down(silu(gate(x)) * up(x)); GELU: down(gelu(up(x)))."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, act: str = "swiglu") -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ff, self.act = num_experts, d_model, d_ff, act
        n_in = 2 * d_ff if act == "swiglu" else d_ff
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, n_in, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform per expert, as nn.Linear would initialise each one."""
        for w in (self.gate_up_proj, self.down_proj):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    def expert_params(self, e: int) -> dict[str, torch.Tensor]:
        """Views of expert e's weights (what an expert store saves and a cache holds)."""
        return {"gate_up_proj": self.gate_up_proj[e], "down_proj": self.down_proj[e]}

    def apply_params(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Run one expert given its weights on x [n, D] -> [n, D]."""
        h = x @ params["gate_up_proj"].t()
        if self.act == "swiglu":
            g, u = h.chunk(2, dim=-1)
            h = F.silu(g) * u
        else:
            h = F.gelu(h)
        return h @ params["down_proj"].t()

    def forward_one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Run expert e on x [n, D]."""
        return self.apply_params(self.expert_params(e), x)

    def expert_nbytes(self) -> int:
        """Bytes of one expert's weights."""
        return sum(p.numel() * p.element_size() for p in self.expert_params(0).values())
