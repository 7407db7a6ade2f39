"""Expert-parallel MoEBlock on 2 and 4 CPU processes (gloo) equals one process to 1e-6:
outputs, input gradients, router gradients (summed over processes) and each process's expert
gradients (the matching rows of the single-process expert gradients). Errors are
max |ep - one| / max(1, max |one|) per tensor (float32: 1e-6; float64: 1e-12)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moelab.layers.config import MoEConfig
from moelab.layers.moe import MoEBlock

CASES = {
    "topk-swiglu": dict(d_model=32, d_ff=16, num_experts=8, top_k=2),
    "topk-gelu-shared": dict(
        d_model=32, d_ff=16, num_experts=8, top_k=3, expert_act="gelu", num_shared_experts=1
    ),
    "switch-capacity": dict(
        d_model=32, d_ff=16, num_experts=4, top_k=1, router="switch", capacity_factor=1.0
    ),  # fmt: skip
}


def _errors(rank: int, world: int, name: str, kw: dict, dtype: torch.dtype) -> dict[str, float]:
    from moelab.parallel import make_groups, shard_experts

    torch.manual_seed(0)
    block = MoEBlock(MoEConfig(**kw)).to(dtype)
    ref = copy.deepcopy(block)
    T = 24  # tokens per process
    g = torch.Generator().manual_seed(1)
    X = torch.randn(world, 2, T // 2, kw["d_model"], generator=g, dtype=dtype)  # [W, B, S, D]
    G = torch.randn(X.shape, generator=g, dtype=dtype)
    mask = torch.rand(world, 2, T // 2, generator=g) > 0.15  # some padding tokens
    # one process: each process's batch through the whole block (capacity is per batch)
    Xr = X.clone().requires_grad_(True)
    ys = [ref(Xr[w], mask=mask[w])[0] for w in range(world)]
    sum((y * G[w]).sum() for w, y in enumerate(ys)).backward()
    # expert parallel: this process's batch, experts sharded over all processes
    names = shard_experts(block, make_groups(world))
    assert names == ["experts.gate_up_proj", "experts.down_proj"]
    x = X[rank].clone().requires_grad_(True)
    y, _ = block(x, mask=mask[rank])
    (y * G[rank]).sum().backward()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:  # max |a - b| / max(1, max |b|)
        return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()

    err = {
        "y": rel(y, ys[rank]),
        "dx": rel(x.grad, Xr.grad[rank]),
        "scale_y": ys[rank].abs().max().item(),
    }
    n = kw["num_experts"] // world
    for pname in ("gate_up_proj", "down_proj"):
        local = getattr(block.experts, pname).grad
        full = getattr(ref.experts, pname).grad[rank * n : (rank + 1) * n]
        err[f"d{pname}"] = rel(local, full)
    for (pn, p), (_, pr) in zip(block.named_parameters(), ref.named_parameters(), strict=True):
        if pn.startswith("experts."):
            continue
        gsum = p.grad.clone()
        dist.all_reduce(gsum)
        err[f"d{pn}"] = rel(gsum, pr.grad)
    return err


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        res = {}
        for name, kw in CASES.items():
            if kw["num_experts"] % world:
                continue
            for dtype in (torch.float32, torch.float64):
                res[f"{name}/{dtype}"] = _errors(rank, world, name, kw, dtype)
        Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_block_equals_one_process(tmp_path: Path, world: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # fork: the workers need not import torch again (seconds each on a loaded machine)
    mp.start_processes(
        _worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
        start_method="fork",
    )  # fmt: skip
    for r in range(world):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert len(res) == 2 * sum(kw["num_experts"] % world == 0 for kw in CASES.values())
        for case, err in res.items():
            assert err["scale_y"] > 1e-2, case  # the block did produce output
            tol = 1e-6 if "float32" in case else 1e-12
            for key, v in err.items():
                if key != "scale_y":
                    assert v <= tol, (case, r, key, v)
