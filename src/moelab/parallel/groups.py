"""Process groups of expert parallelism (EP) with data parallelism (DP) across EP groups.

World = dp x ep processes, rank = dp_rank * ep + ep_rank (as Megatron-Core and torchtitan lay
out EP inside DP). The ep processes of one EP group hold disjoint shards of every MoE layer's
experts and exchange tokens with all-to-all; the dp processes with the same ep_rank hold the same
shard and all-reduce its gradients. Every process sees its own slice of the global batch, so
non-expert parameters (attention, router, norms, embeddings) all-reduce over the whole world.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from moelab.errors import ConfigError

__all__ = ["ParallelGroups", "make_groups"]


@dataclass
class ParallelGroups:
    """This process's place in the world and the groups it belongs to (None = world / absent)."""

    rank: int
    world: int
    ep: int  # processes per expert-parallel group
    ep_group: dist.ProcessGroup | None  # the EP group of this process
    dp_group: dist.ProcessGroup | None  # processes holding the same expert shard

    @property
    def dp(self) -> int:
        """Number of EP groups (data-parallel replicas of each expert shard)."""
        return self.world // self.ep

    @property
    def ep_rank(self) -> int:
        """Index of this process inside its EP group (which expert shard it holds)."""
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        """Index of this process's EP group."""
        return self.rank // self.ep


def make_groups(ep: int) -> ParallelGroups:
    """Groups for `ep`-way expert parallelism in the initialised default process group.

    Every process must call this (torch.distributed.new_group is collective).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError(
            f"expert_parallel={ep}: torch.distributed is not initialised; run under "
            f"torchrun --nproc_per_node {ep} (or call init_process_group first)"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if not isinstance(ep, int) or ep < 1 or world % ep:
        raise ConfigError(
            f"expert_parallel={ep!r}: must be a positive divisor of the {world} processes "
            "(world = data-parallel groups x expert-parallel size)"
        )
    dp = world // ep
    ep_group = dp_group = None
    for g in range(dp):  # new_group is collective: every process creates every group
        grp = dist.new_group(list(range(g * ep, (g + 1) * ep))) if ep > 1 else None
        if g == rank // ep:
            ep_group = grp
    for e in range(ep):
        grp = dist.new_group(list(range(e, world, ep))) if dp > 1 else None
        if e == rank % ep:
            dp_group = grp
    return ParallelGroups(rank=rank, world=world, ep=ep, ep_group=ep_group, dp_group=dp_group)
