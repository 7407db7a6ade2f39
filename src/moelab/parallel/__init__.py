"""Expert parallelism on torch.distributed: experts sharded over processes, all-to-all dispatch.

`shard_experts(model, make_groups(ep))` turns every MoEBlock of a model into its expert-parallel
form (this process's E/ep experts, `AllToAllDispatcher`); `TrainParallel` is what `moelab train`
uses under torchrun (`--expert-parallel N`, data parallelism across EP groups).
"""

from moelab.parallel.comm import CommStats, all_to_all, exchange_counts
from moelab.parallel.expert import (
    AllToAllDispatcher,
    gather_expert_tensor,
    shard_expert_tensor,
    shard_experts,
    sharded_blocks,
)
from moelab.parallel.groups import ParallelGroups, make_groups
from moelab.parallel.training import TrainParallel

__all__ = [
    "AllToAllDispatcher",
    "CommStats",
    "ParallelGroups",
    "TrainParallel",
    "all_to_all",
    "exchange_counts",
    "gather_expert_tensor",
    "make_groups",
    "shard_expert_tensor",
    "shard_experts",
    "sharded_blocks",
]
