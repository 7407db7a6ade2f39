"""Expert parallelism for MoEBlock: experts sharded over processes, tokens moved by all-to-all.

GShard (Lepikhin et al. 2020, Sec. 2.3) / Switch Transformers (Fedus et al. 2021, Sec. 5.6)
expert parallelism, in the torchtitan arrangement (router -> token reorderer -> grouped
experts, the reorderer swappable): `AllToAllDispatcher` replaces the `LocalDispatcher` of an
MoEBlock whose `experts` holds only this process's E/P experts (`shard_experts`). Per layer:

1. route locally; sort this process's computed slots by expert (as the local dispatcher does);
2. exchange the slot counts [P, E/P] with one all-to-all (counts first), then the token rows
   with a second one (each process receives the rows for its own experts);
3. reorder the received rows by local expert, run the local experts (the same sorted-experts
   kernels as one process), restore the arrival order and send the outputs back;
4. combine with the routing weights on the token's home process.

Both exchanges are differentiable (`moelab.parallel.comm.all_to_all`), so the gradient of an
expert's weights sums every process's tokens and the routing/input gradients return home:
outputs and gradients equal those of one process running the whole batch, up to float
rounding of the row order (tests/parallel checks 1e-6).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moelab.errors import ConfigError, InputError
from moelab.layers.dispatch import (
    BACKENDS,
    ExpertsLike,
    _needs_grad,
    combine,
    computed_slots,
    run_sorted_experts,
    sort_slots,
)
from moelab.layers.experts import ExpertBank
from moelab.layers.moe import MoEBlock
from moelab.layers.types import RoutingResult
from moelab.parallel.comm import CommStats, all_to_all, exchange_counts
from moelab.parallel.groups import ParallelGroups

__all__ = [
    "AllToAllDispatcher",
    "shard_experts",
    "sharded_blocks",
    "gather_expert_tensor",
    "shard_expert_tensor",
]


class AllToAllDispatcher:
    """Dispatcher of an MoEBlock whose experts are sharded over the processes of `group`."""

    def __init__(
        self,
        num_experts: int,
        group: dist.ProcessGroup | None,
        stats: CommStats | None = None,
    ) -> None:
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.size:
            raise ConfigError(
                f"expert parallelism: num_experts={num_experts} must be divisible by the "
                f"expert-parallel size {self.size}"
            )
        self.num_experts, self.group, self.stats = num_experts, group, stats
        self.local = num_experts // self.size

    def __repr__(self) -> str:
        return (
            f"AllToAllDispatcher(experts {self.rank * self.local}..{(self.rank + 1) * self.local - 1}"
            f" of {self.num_experts} on process {self.rank}/{self.size})"
        )

    def __call__(
        self,
        x: torch.Tensor,
        routing: RoutingResult,
        experts: ExpertsLike,
        backend: str = "loop",
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """y [T, D] for this process's tokens x [T, D]; every process of the group must call."""
        if backend not in BACKENDS:
            raise ConfigError(
                f"AllToAllDispatcher: backend={backend!r}; expected one of {BACKENDS}"
            )
        ids = routing.expert_ids
        if x.dim() != 2 or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
            raise InputError(
                f"AllToAllDispatcher: x {tuple(x.shape)} must be [T, D] and expert_ids "
                f"{tuple(ids.shape)} [T, k]"
            )
        if experts.num_experts != self.local:
            raise InputError(
                f"AllToAllDispatcher: the local expert bank has {experts.num_experts} experts, "
                f"expected {self.local} (= {self.num_experts} / {self.size} processes)"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_experts):
            raise InputError(
                f"AllToAllDispatcher: expert ids span [{int(ids.min())}, {int(ids.max())}], "
                f"expected [0, {self.num_experts})"
            )
        P, L = self.size, self.local
        slots = computed_slots(routing, mask)
        tok_sorted, w_sorted, counts = sort_slots(routing, slots, self.num_experts)
        send_counts = counts.view(P, L)
        recv_counts = exchange_counts(send_counts, self.group, self.stats)  # counts first
        send = send_counts.sum(1).tolist()
        recv = recv_counts.sum(1).tolist()
        xs = x.index_select(0, tok_sorted)
        xr = all_to_all(xs, send, recv, self.group, self.stats)  # then the tokens
        # arrival order is (source process, local expert): regroup by local expert
        local_ids = torch.arange(L, device=x.device).repeat(P)
        row_expert = torch.repeat_interleave(local_ids, recv_counts.reshape(-1))
        perm = torch.sort(row_expert, stable=True).indices
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        needs_grad = _needs_grad(x, routing, experts) or xr.requires_grad
        ys_local = run_sorted_experts(
            xr.index_select(0, perm), recv_counts.sum(0).tolist(), experts, backend, needs_grad
        )
        ys = all_to_all(ys_local.index_select(0, inv), recv, send, self.group, self.stats)
        return combine(x, tok_sorted, ys, w_sorted)


def sharded_blocks(model: nn.Module) -> list[tuple[str, MoEBlock]]:
    """(name, block) of every MoEBlock of `model` whose experts are sharded (all-to-all)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, MoEBlock) and isinstance(m.dispatcher, AllToAllDispatcher)
    ]


def shard_expert_tensor(full: torch.Tensor, ep_rank: int, ep: int) -> torch.Tensor:
    """This process's rows [E/ep, ...] of a stacked expert tensor [E, ...] (a copy)."""
    if full.shape[0] % ep:
        raise InputError(
            f"shard_expert_tensor: {full.shape[0]} experts cannot be split over {ep} processes"
        )
    n = full.shape[0] // ep
    return full[ep_rank * n : (ep_rank + 1) * n].clone()


def gather_expert_tensor(local: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """The full [E, ...] tensor from every EP process's [E/ep, ...] shard (collective)."""
    if groups.ep == 1:
        return local.detach().clone()
    parts = [torch.empty_like(local) for _ in range(groups.ep)]
    dist.all_gather(parts, local.detach().contiguous(), group=groups.ep_group)
    return torch.cat(parts, 0)


def shard_experts(
    model: nn.Module, groups: ParallelGroups, stats: CommStats | None = None
) -> list[str]:
    """Keep only this process's experts in every MoEBlock of `model` and route through
    all-to-all; returns the names of the sharded parameters. No-op when groups.ep == 1."""
    if groups.ep == 1:
        return []
    names: list[str] = []
    for name, block in [(n, m) for n, m in model.named_modules() if isinstance(m, MoEBlock)]:
        bank = block.experts
        if not isinstance(bank, ExpertBank):
            raise ConfigError(
                f"shard_experts: {name or 'the block'}.experts is {type(bank).__name__}; "
                "expert parallelism needs an ExpertBank"
            )
        E = bank.num_experts
        if E % groups.ep:
            raise ConfigError(
                f"expert_parallel={groups.ep}: {name}.experts has {E} experts; the number of "
                "experts must be divisible by the expert-parallel size"
            )
        p = bank.gate_up_proj
        local = ExpertBank(
            E // groups.ep, bank.d_model, bank.d_ff, bank.act, device=p.device, dtype=p.dtype
        )
        with torch.no_grad():
            local.gate_up_proj.copy_(
                shard_expert_tensor(bank.gate_up_proj, groups.ep_rank, groups.ep)
            )
            local.down_proj.copy_(shard_expert_tensor(bank.down_proj, groups.ep_rank, groups.ep))
        block.experts = local
        block.dispatcher = AllToAllDispatcher(E, groups.ep_group, stats)
        prefix = f"{name}.experts" if name else "experts"
        names += [f"{prefix}.gate_up_proj", f"{prefix}.down_proj"]
    return names
