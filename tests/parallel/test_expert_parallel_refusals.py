"""Expert-parallel set-ups that cannot work are refused with one clear line, before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moelab.errors import ConfigError, InputError
from moelab.layers.config import MoEConfig
from moelab.layers.experts import ExpertBank
from moelab.layers.moe import MoEBlock
from moelab.layers.types import RoutingResult
from moelab.parallel import AllToAllDispatcher, TrainParallel, make_groups, shard_expert_tensor
from moelab.train.config import TrainConfig
from moelab.train.loop import train


def test_one_process_asks_for_torchrun(tiny, monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node 2"):
        train(TrainConfig(**{**tiny, "expert_parallel": 2}))
    assert TrainParallel.setup(1, "cpu", 4, 4, False).world == 1


def test_bad_layouts_in_a_process_group(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun would: checked before joining a group
    with pytest.raises(ConfigError, match="must divide the 2 processes"):
        TrainParallel.setup(3, "cpu", 4, 4, False)
    with pytest.raises(ConfigError, match="batch_size=3 is the global batch"):
        TrainParallel.setup(2, "cpu", 3, 4, False)
    with pytest.raises(ConfigError, match="num_experts=3"):
        TrainParallel.setup(2, "cpu", 4, 3, False)
    with pytest.raises(ConfigError, match="dense model has no experts"):
        TrainParallel.setup(2, "cpu", 4, 4, True)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match="not initialised"):
        make_groups(2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with pytest.raises(ConfigError, match="positive divisor of the 1 processes"):
            make_groups(2)
        d = AllToAllDispatcher(4, None)  # a 1-process "EP group" holding all 4 experts
        block = MoEBlock(MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2))
        x = torch.randn(6, 16)
        y_local, r = block(x)
        block.dispatcher = d
        torch.testing.assert_close(block(x)[0], y_local, rtol=0, atol=1e-6)
        with pytest.raises(InputError, match="has 2 experts, expected 4"):
            d(x, r, ExpertBank(2, 16, 8))
        with pytest.raises(InputError, match="expert ids span"):
            bad = RoutingResult(r.expert_ids + 4, r.weights, r.logits)
            d(x, bad, block.experts)
        with pytest.raises(InputError, match="3 experts cannot be split over 2"):
            shard_expert_tensor(torch.zeros(3, 2), 0, 2)
    finally:
        dist.destroy_process_group()
