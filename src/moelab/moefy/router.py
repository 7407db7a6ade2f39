"""Train a MoEfication router (Zhang et al. 2022, §3.2): a per-layer linear map from the FFN input
to scores over the E neuron groups, fitted so its softmax matches each group's share of the FFN
output norm on recorded tokens (soft cross-entropy). Top-k of the scores picks the groups whose
contribution is largest; router accuracy = overlap with the true top-k groups by output norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moelab.errors import InputError


def group_output_norms(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """[n, D] FFN inputs -> [n, E] L2 norm of each expert's (neuron group's) output."""
    E, two_f, _ = gate_up.shape
    f = two_f // 2
    out = torch.empty(x.shape[0], E, dtype=torch.float32)
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            xs = x[s : s + chunk].float()
            for e in range(E):
                h = xs @ gate_up[e].t()
                a = F.silu(h[:, :f]) * h[:, f:]
                out[s : s + chunk, e] = (a @ down[e].t()).norm(dim=-1)
    return out


@dataclass
class RouterFit:
    """A fitted linear router and its held-out accuracy."""

    weight: torch.Tensor  # [E, D]
    bias: torch.Tensor  # [E]
    topk_recall: dict[
        int, float
    ]  # k -> share of true top-k groups inside predicted top-k (held out)
    train_tokens: int
    heldout_tokens: int


def topk_recall(scores: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Share of the true top-k (by target) that are in the predicted top-k (by scores)."""
    p = scores.topk(k, dim=-1).indices
    t = target.topk(k, dim=-1).indices
    hit = (p.unsqueeze(-1) == t.unsqueeze(-2)).any(-1).float().sum(-1)
    return float(hit.mean() / k)


def fit_router(
    x: torch.Tensor,
    norms: torch.Tensor,
    epochs: int = 30,
    lr: float = 1e-2,
    heldout: float = 0.1,
    seed: int = 0,
    ks: tuple[int, ...] = (1, 2, 4),
) -> RouterFit:
    """Fit softmax(xW^T + b) to norms / norms.sum() by soft cross-entropy (full-batch Adam).

    The last `heldout` share of rows is never trained on and gives the reported recall.
    """
    if x.ndim != 2 or norms.ndim != 2 or x.shape[0] != norms.shape[0]:
        raise InputError(
            f"fit_router: expected x [n, D] and norms [n, E] with equal n, got {tuple(x.shape)}, {tuple(norms.shape)}"
        )
    n = x.shape[0]
    n_ho = max(1, int(n * heldout))
    if n - n_ho < 2:
        raise InputError(f"fit_router: need more recorded tokens than {n}")
    g = torch.Generator().manual_seed(seed)
    xf = x.float()
    mu, sd = xf[: n - n_ho].mean(0), xf[: n - n_ho].std(0).clamp_min(1e-6)
    xs = (xf - mu) / sd
    target = norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)
    E, D = norms.shape[1], x.shape[1]
    w = (torch.randn(E, D, generator=g) * 0.01).requires_grad_()
    b = torch.zeros(E, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    xtr, ttr = xs[: n - n_ho], target[: n - n_ho]
    bs = 8192
    for _ in range(epochs):
        perm = torch.randperm(xtr.shape[0], generator=g)
        for s in range(0, xtr.shape[0], bs):
            i = perm[s : s + bs]
            logits = xtr[i] @ w.t() + b
            loss = -(ttr[i] * F.log_softmax(logits, -1)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        # fold the input standardisation into the weights: router works on raw FFN inputs
        w_raw = w / sd
        b_raw = b - (w_raw * mu).sum(-1)
        scores = xf[n - n_ho :] @ w_raw.t() + b_raw
        rec = {k: topk_recall(scores, norms[n - n_ho :], k) for k in ks if k <= E}
    return RouterFit(w_raw.detach(), b_raw.detach(), rec, n - n_ho, n_ho)
