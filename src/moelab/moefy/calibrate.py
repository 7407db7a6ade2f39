"""Sequential calibration of a MoEfied model: layer-wise reconstruction on calibration tokens, the
way post-training pruning calibrates (SparseGPT, Frantar & Alistarh 2023; FLAP, An et al. 2024).

Layers are converted in order while calibration tokens flow through the model, so layer i sees the
inputs the already-MoEfied layers 0..i-1 produce (not the dense model's). At each layer the router
is fitted on those real inputs, then the down projections of all experts are refitted jointly by
ridge regression so that the sum of the top-k selected experts matches the dense FFN's output on
the same inputs (the gate/up projections stay as split). A held-out tail of the calibration tokens
is never fitted and gives the reported reconstruction error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moelab.errors import ConfigError
from moelab.layers.moe import MoEBlock
from moelab.models.transformer import MoETransformer, rotary_cos_sin


@dataclass
class LayerCalibration:
    """Held-out relative reconstruction error ||MoE(x) - FFN(x)||^2 / ||FFN(x)||^2 of one layer,
    with the split's down projections (before) and after the ridge refit (after)."""

    layer: int
    rel_err_before: float
    rel_err_after: float
    fitted_tokens: int
    heldout_tokens: int


class LayerWalker:
    """Carries calibration hidden states [B, S, D] through a model one block at a time."""

    def __init__(self, model: MoETransformer, blocks: list[torch.Tensor], batch: int = 8) -> None:
        self.ids = torch.stack(blocks)
        self.batch = batch
        S = self.ids.shape[1]
        dev = model.embed_tokens.weight.device
        self.cos, self.sin = rotary_cos_sin(
            torch.arange(S, device=dev), model.cfg.head_dim, model.cfg.rope_theta, torch.float32
        )
        with torch.no_grad():
            self.h = model.embed_tokens(self.ids)

    @torch.no_grad()
    def ffn_input(self, block) -> tuple[torch.Tensor, torch.Tensor]:
        """(h after attention [B, S, D], FFN input ffn_norm(h) flattened [B*S, D]) for `block`."""
        parts = []
        for s in range(0, self.h.shape[0], self.batch):
            h = self.h[s : s + self.batch]
            parts.append(h + block.attn(block.attn_norm(h), self.cos, self.sin, None, True, None))
        h_attn = torch.cat(parts)
        return h_attn, block.ffn_norm(h_attn).reshape(-1, h_attn.shape[-1])

    def advance(self, h_attn: torch.Tensor, ffn_out: torch.Tensor) -> None:
        """Residual add of the block's FFN output [B*S, D]: the hidden states after this block."""
        self.h = h_attn + ffn_out.reshape(h_attn.shape)


def expert_activations(moe: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU hidden activations of every expert for every token: [N, E, f]."""
    gu = moe.experts.gate_up_proj  # [E, 2f, D]
    f = gu.shape[1] // 2
    h = torch.einsum("nd,efd->nef", x, gu)
    return F.silu(h[..., :f]) * h[..., f:]


def selected_features(moe: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    """[N, E*f] activations of the experts the router selects for each token (0 elsewhere)."""
    r = moe.router(x)
    sel = torch.zeros(x.shape[0], moe.cfg.num_experts, dtype=x.dtype, device=x.device)
    sel.scatter_(1, r.expert_ids, r.weights.to(x.dtype))
    return (expert_activations(moe, x) * sel[..., None]).reshape(x.shape[0], -1)


@torch.no_grad()
def refit_down_proj(
    moe: MoEBlock,
    x: torch.Tensor,
    target: torch.Tensor,
    ridge: float = 5e-2,
    heldout: float = 0.1,
    chunk: int = 4096,
    layer: int = -1,
) -> LayerCalibration:
    """Ridge-refit every expert's down projection so the routed MoE output matches `target`.

    Solves min_W ||A W - Y||^2 + lam ||W - W0||^2 over the first (1 - heldout) share of tokens,
    where A [N, E*f] holds the selected experts' activations and W0 the current down weights;
    lam = ridge * mean(diag(A^T A)). Writes W into moe.experts.down_proj in place.
    """
    if not 0 < heldout < 1:
        raise ConfigError(f"refit_down_proj: heldout={heldout} must be in (0, 1)")
    n = x.shape[0]
    n_fit = n - max(1, int(n * heldout))
    if n_fit < 1:
        raise ConfigError(f"refit_down_proj: need at least 2 calibration tokens, got {n}")
    down = moe.experts.down_proj  # [E, D, f]
    E, D, f = down.shape
    w0 = down.permute(0, 2, 1).reshape(E * f, D).double()
    gram = torch.zeros(E * f, E * f, dtype=torch.float64, device=x.device)
    rhs = torch.zeros(E * f, D, dtype=torch.float64, device=x.device)
    for s in range(0, n_fit, chunk):  # float32 products per chunk, float64 running sums
        a = selected_features(moe, x[s : min(s + chunk, n_fit)]).float()
        gram += (a.t() @ a).double()
        rhs += (a.t() @ target[s : min(s + chunk, n_fit)].float()).double()
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    gram.diagonal().add_(lam)
    w = torch.linalg.solve(gram, rhs + lam * w0)
    a_ho = selected_features(moe, x[n_fit:])
    y_ho = target[n_fit:]
    denom = float(y_ho.pow(2).sum().clamp_min(1e-30))
    before = float((a_ho @ w0.float() - y_ho).pow(2).sum()) / denom
    after = float((a_ho @ w.float() - y_ho).pow(2).sum()) / denom
    down.copy_(w.float().reshape(E, f, D).permute(0, 2, 1))
    return LayerCalibration(layer, before, after, n_fit, n - n_fit)
