"""Sort-based dispatch/combine (MegaBlocks/ScatterMoE idea on CPU): group token slots by expert,
run each expert once on a contiguous slice, scatter-add weighted outputs back. No padding; a
slot is dropped only if the RoutingResult says so (capacity)."""

from __future__ import annotations

import torch

from moelab.layers.types import RoutingResult


def dispatch_combine(x: torch.Tensor, routing: RoutingResult, experts) -> torch.Tensor:
    """y[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) over computed slots; x is [T, D]."""
    T, k = routing.expert_ids.shape
    flat_ids = routing.expert_ids.reshape(-1)
    flat_w = routing.weights.reshape(-1)
    token_of_slot = torch.arange(T, device=x.device).repeat_interleave(k)
    if routing.dropped is not None:
        keep = ~routing.dropped.reshape(-1)
        flat_ids, flat_w, token_of_slot = flat_ids[keep], flat_w[keep], token_of_slot[keep]
    order = torch.argsort(flat_ids, stable=True)
    sorted_ids = flat_ids[order]
    sorted_tok = token_of_slot[order]
    sorted_w = flat_w[order]
    counts = torch.bincount(sorted_ids, minlength=experts.num_experts).tolist()
    out = torch.zeros_like(x)
    xs = x[sorted_tok]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sl = slice(start, start + n)
        y = experts.forward_one(e, xs[sl])
        out.index_add_(0, sorted_tok[sl], y * sorted_w[sl, None].to(y.dtype))
        start += n
    return out
