"""Sort-based dispatch/combine for token-choice and expert-choice routing on CPU.

The MegaBlocks idea (Gale et al. 2022, "MegaBlocks: Efficient Sparse Training with Mixture-of-
Experts", §5: block-sparse = sort token slots by expert, no padding, no token dropping) and
ScatterMoE (Tan et al. 2024) without the GPU kernels: the computed (token, expert) slots are
sorted by expert, the token rows gathered once, each expert runs ONE matmul chain on its
contiguous slice, and the weighted outputs are scatter-added back:

    y[t] = sum_{j : slot (t, j) computed} weights[t, j] * expert_{ids[t, j]}(x[t])

A slot is skipped only where the RoutingResult marks it `dropped` (capacity overflow, or an
unused slot of expert-choice routing) or its token is padding (`mask` False): such slots add
0, so a dropped token passes through the block's residual connection unchanged.

Backends: "loop" (default, one `torch.mm` pair per expert through `experts.forward_one`, the
hook offloading replaces) and "grouped_mm" (`torch.nn.functional.grouped_mm` over the stacked
weights; needs an ExpertBank). For an unmodified ExpertBank the loop runs without autograd into
reused buffers at inference, and as one autograd node with a buffer-reusing backward
(`ExpertBank.forward_sorted`) in training; any other expert container (an offloading wrapper)
gets exactly one `forward_one(e, rows)` call per expert with tokens. For a handful of slots
(batch-1 decode) both backends skip the sort and run the chosen experts directly.

The steps (`computed_slots` -> `sort_slots` -> gather -> `run_sorted_experts` -> `combine`) are
public so that a `Dispatcher` other than the local one (the all-to-all expert-parallel one of
`moelab.parallel`) can put its token exchange between them (torchtitan's router -> token
reorderer -> grouped experts seam).
"""

from __future__ import annotations

from typing import Protocol

import torch

from moelab.errors import ConfigError, InputError
from moelab.layers.experts import ExpertBank
from moelab.layers.types import RoutingResult

BACKENDS = ("loop", "grouped_mm")
SMALL_SLOTS = 16  # at most this many computed slots: no sort, direct per-expert calls


class ExpertsLike(Protocol):
    """What dispatch needs from an expert container (ExpertBank, or an offloading wrapper)."""

    num_experts: int

    def forward_one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Run expert e on rows x [n, D] -> [n, D]."""
        ...


def _check(x: torch.Tensor, routing: RoutingResult, experts: ExpertsLike, backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"dispatch_combine: backend={backend!r}; expected one of {BACKENDS}")
    if x.dim() != 2:
        raise InputError(f"dispatch_combine: x must be [tokens, d_model], got {tuple(x.shape)}")
    ids = routing.expert_ids
    if ids.dim() != 2 or ids.shape[0] != x.shape[0] or routing.weights.shape != ids.shape:
        raise InputError(
            f"dispatch_combine: routing.expert_ids {tuple(ids.shape)} and weights "
            f"{tuple(routing.weights.shape)} must both be [T={x.shape[0]}, k]"
        )
    if routing.dropped is not None and routing.dropped.shape != ids.shape:
        raise InputError(
            f"dispatch_combine: routing.dropped {tuple(routing.dropped.shape)} must match "
            f"expert_ids {tuple(ids.shape)}"
        )
    E = experts.num_experts
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= E):
        lo, hi = int(ids.min()), int(ids.max())
        raise InputError(
            f"dispatch_combine: expert ids span [{lo}, {hi}] but the expert bank has {E} experts"
        )


def _needs_grad(x: torch.Tensor, routing: RoutingResult, experts: ExpertsLike) -> bool:
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad or routing.weights.requires_grad:
        return True
    return isinstance(experts, torch.nn.Module) and any(
        p.requires_grad for p in experts.parameters()
    )


def dispatch_combine(
    x: torch.Tensor,
    routing: RoutingResult,
    experts: ExpertsLike,
    backend: str = "loop",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) over computed slots; x is [T, D].

    `experts.forward_one(e, rows)` is called once per expert that has tokens (loop backend).
    `mask` [T] bool (False = padding) skips padding tokens (their output is 0).
    """
    _check(x, routing, experts, backend)
    k = routing.expert_ids.shape[1]
    slots = computed_slots(routing, mask)
    n_slots = routing.expert_ids.numel() if slots is None else int(slots.numel())
    flat_ids, flat_w = routing.expert_ids.reshape(-1), routing.weights.reshape(-1)
    if n_slots <= SMALL_SLOTS:  # decode: both backends take the direct per-expert path
        return _small(x, flat_ids, flat_w, slots, k, experts)
    tok_sorted, w_sorted, counts = sort_slots(routing, slots, experts.num_experts)
    xs = x.index_select(0, tok_sorted)
    ys = run_sorted_experts(xs, counts.tolist(), experts, backend, _needs_grad(x, routing, experts))
    return combine(x, tok_sorted, ys, w_sorted)


def computed_slots(routing: RoutingResult, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Flat indices t*k + j of the computed slots (not dropped, token not padding); None = all."""
    k = routing.expert_ids.shape[1]
    keep = None
    if routing.dropped is not None:
        keep = ~routing.dropped.reshape(-1)
    if mask is not None:
        tok_keep = mask.reshape(-1).to(torch.bool).repeat_interleave(k)
        keep = tok_keep if keep is None else keep & tok_keep
    return keep.nonzero().squeeze(1) if keep is not None else None


def sort_slots(
    routing: RoutingResult, slots: torch.Tensor | None, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token of each slot, its weight, slots per expert [E]) with slots stably sorted by expert."""
    k = routing.expert_ids.shape[1]
    flat_ids = routing.expert_ids.reshape(-1)
    if slots is None:
        sorted_ids, slot_sorted = torch.sort(flat_ids, stable=True)
    else:
        sorted_ids, order = torch.sort(flat_ids[slots], stable=True)
        slot_sorted = slots[order]
    tok_sorted = torch.div(slot_sorted, k, rounding_mode="floor")
    w_sorted = routing.weights.reshape(-1)[slot_sorted]
    counts = torch.bincount(sorted_ids, minlength=num_experts)
    return tok_sorted, w_sorted, counts


def run_sorted_experts(
    xs: torch.Tensor, counts: list[int], experts: ExpertsLike, backend: str, needs_grad: bool
) -> torch.Tensor:
    """Expert e on its `counts[e]` consecutive rows of xs (rows sorted by expert) -> [S, D]."""
    if backend == "grouped_mm":
        if not isinstance(experts, ExpertBank):
            raise ConfigError(
                f"dispatch_combine: backend='grouped_mm' needs an ExpertBank with stacked weights, "
                f"got {type(experts).__name__}; use backend='loop'"
            )
        offsets = torch.cumsum(torch.tensor(counts, device=xs.device), 0, dtype=torch.int32)
        return experts.forward_grouped(xs, offsets)
    if isinstance(experts, ExpertBank) and not needs_grad:
        return _loop_inference(xs, counts, experts)
    if isinstance(experts, ExpertBank) and type(experts).forward_one is ExpertBank.forward_one:
        return experts.forward_sorted(xs, counts)
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n:
            outs.append(experts.forward_one(e, xs[start : start + n]))
            start += n
    return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[1])


def combine(
    x: torch.Tensor, tok_sorted: torch.Tensor, ys: torch.Tensor, w_sorted: torch.Tensor
) -> torch.Tensor:
    """out[t] = sum of w * y over the sorted slots of token t (zeros where no slot is computed)."""
    out = torch.zeros_like(x)
    if not ys.requires_grad and not w_sorted.requires_grad:
        ys.mul_(w_sorted.unsqueeze(1).to(ys.dtype))
        return out.index_add_(0, tok_sorted, ys)
    return out.index_add(0, tok_sorted, ys * w_sorted.unsqueeze(1).to(ys.dtype))


class Dispatcher(Protocol):
    """The seam between router and experts (torchtitan's token reorderer): where tokens go to
    their experts and come back. `LocalDispatcher` runs them in this process;
    `moelab.parallel.AllToAllDispatcher` sends them to the process holding each expert."""

    def __call__(
        self,
        x: torch.Tensor,
        routing: RoutingResult,
        experts: ExpertsLike,
        backend: str = "loop",
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """y [T, D] = weighted sum of the chosen experts' outputs for each token of x [T, D]."""
        ...


class LocalDispatcher:
    """All experts in this process: the sort-based `dispatch_combine`."""

    def __call__(
        self,
        x: torch.Tensor,
        routing: RoutingResult,
        experts: ExpertsLike,
        backend: str = "loop",
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See `dispatch_combine`."""
        return dispatch_combine(x, routing, experts, backend=backend, mask=mask)

    def __repr__(self) -> str:
        return "LocalDispatcher()"


def _loop_inference(xs: torch.Tensor, counts: list[int], experts: ExpertBank) -> torch.Tensor:
    """No-grad loop: each expert writes into one output buffer, sharing one workspace."""
    ys = torch.empty_like(xs)
    workspace = xs.new_empty(max(counts), experts.n_in) if counts and max(counts) else None
    start = 0
    for e, n in enumerate(counts):
        if n:
            sl = slice(start, start + n)
            experts.forward_one(e, xs[sl], out=ys[sl], workspace=workspace)
            start += n
    return ys


def _small(
    x: torch.Tensor,
    flat_ids: torch.Tensor,
    flat_w: torch.Tensor,
    slots: torch.Tensor | None,
    k: int,
    experts: ExpertsLike,
) -> torch.Tensor:
    """Few slots (decode): group them by expert in Python, no sort/gather kernels."""
    slot_list = range(flat_ids.numel()) if slots is None else slots.tolist()
    ids = flat_ids.tolist()
    by_expert: dict[int, list[int]] = {}
    for s in slot_list:
        by_expert.setdefault(ids[s], []).append(s)
    if x.shape[0] == 1:  # one token: a weighted sum of the chosen experts, no scatter
        acc = None
        for e, ss in by_expert.items():
            w = flat_w[ss[0]] if len(ss) == 1 else flat_w[ss].sum()
            y = experts.forward_one(e, x) * w.to(x.dtype)
            acc = y if acc is None else acc + y
        return acc if acc is not None else torch.zeros_like(x)
    out = torch.zeros_like(x)
    for e, ss in by_expert.items():
        s_idx = torch.tensor(ss, device=x.device)
        tok = torch.div(s_idx, k, rounding_mode="floor")
        y = experts.forward_one(e, x.index_select(0, tok))
        out = out.index_add(0, tok, y * flat_w[s_idx].unsqueeze(1).to(y.dtype))
    return out
