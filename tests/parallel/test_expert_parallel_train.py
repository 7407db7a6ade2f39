"""`moelab train --expert-parallel N` on 2 and 4 CPU processes (gloo): the loss curve equals the
single-process run; checkpoints written with EP=2 resume with one process and with EP=4.
The processes are forked workers with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
...) running the CLI, or joining one gloo group and calling `train`."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moelab.models import MoETransformer
from moelab.train.config import TrainConfig
from moelab.train.loop import train


def _argv(values: dict[str, Any], ep: int) -> list[str]:
    flags = ["train"]
    for k, v in values.items():
        name = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(name if v else f"--no-{k.replace('_', '-')}")
        else:
            flags += [name, str(v)]
    return [*flags, "--expert-parallel", str(ep)]


def _cli_worker(rank: int, nproc: int, port: int, argv: list[str]) -> None:
    # what torchrun gives each worker: the env:// rendezvous variables
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
         "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )  # fmt: skip
    from moelab.cli import app

    app(argv, standalone_mode=False)


def _torchrun_like(nproc: int, values: dict[str, Any], ep: int) -> None:
    """`moelab train ... --expert-parallel ep` in nproc forked workers with torchrun's
    environment (the launcher itself is left out: it re-imports torch per process, tens of
    seconds on a loaded 2-core machine; `torchrun --standalone` was checked by hand)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _cli_worker, args=(nproc, port, _argv(values, ep)), nprocs=nproc, start_method="fork"
    )


def _train_worker(rank: int, nproc: int, init: str, values: dict[str, Any]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=nproc)
    try:
        train(TrainConfig(**values))
    finally:
        dist.destroy_process_group()


def _forked(nproc: int, values: dict[str, Any], tmp: Path) -> None:
    """`train` in `nproc` forked processes of one gloo group (what torchrun's workers run)."""
    init = tmp / f"init-{nproc}-{len(list(tmp.iterdir()))}"
    mp.start_processes(
        _train_worker, args=(nproc, str(init), values), nprocs=nproc, start_method="fork"
    )


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for ln in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(ln)
        if "lm_loss" in rec:
            out[rec["step"]] = rec["lm_loss"]
    return out


def test_ep2_matches_single_process_and_checkpoints_cross_process_counts(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    values = {**tiny, "keep_checkpoints": 3}
    single = train(TrainConfig(**{**values, "out_dir": str(tmp_path / "single")}))
    ep_dir = tmp_path / "ep2"
    _torchrun_like(2, {**values, "out_dir": str(ep_dir)}, ep=2)

    # the same loss curve (every step) and validation losses as one process
    ep = _losses(ep_dir)
    assert sorted(ep) == list(range(1, values["max_steps"] + 1))
    np.testing.assert_allclose([ep[s] for s in sorted(ep)], single.losses, rtol=2e-5)
    summary = json.loads((ep_dir / "summary.json").read_text())
    np.testing.assert_allclose(
        [e["val_loss"] for e in summary["evals"]], [e["val_loss"] for e in single.evals], rtol=2e-5
    )
    par = summary["parallel"]
    assert (par["world"], par["expert_parallel"], par["data_parallel"]) == (2, 2, 1)
    kinds = par["bytes_per_step_rank0"]
    # counts: one [2, 2] int64 exchange per MoE layer per forward, the half for the peer leaves
    assert kinds["all_to_all_counts"] == values["n_layers"] * 2 * 8
    assert kinds["all_to_all_tokens"] > 0 and par["tokens_per_s"] > 0
    assert kinds["all_reduce"] >= 4 * (
        single.stats["total_params"] - single.stats["routed_expert_params"]
    )

    # the saved model is the single-process layout: loads in one process, same logits
    a = MoETransformer.load(ep_dir / "model")
    b = MoETransformer.load(single.model_dir)
    assert a.blocks[0].ffn.experts.num_experts == values["num_experts"]
    x = torch.randint(0, a.cfg.vocab_size, (2, 16))
    torch.testing.assert_close(a(x).logits, b(x).logits, rtol=1e-4, atol=1e-5)

    # resume the EP=2 checkpoint of step 8 with one process and with EP=4: steps 9..12 match,
    # and with 4 processes as 2 EP groups of 2 (data parallelism across groups)
    for name, nproc, ep in (("resume1", 1, 1), ("resume4", 4, 4), ("resume2x2", 4, 2)):
        run = tmp_path / name
        shutil.copytree(ep_dir, run)
        shutil.rmtree(run / "checkpoints" / "step-0000012")
        (run / "checkpoints" / "latest").write_text("step-0000008\n")
        shutil.rmtree(run / "model")
        (run / "summary.json").unlink()
        if nproc == 1:
            res = train(TrainConfig(**{**values, "out_dir": str(run)}))
            assert res.resumed_from == 8
        else:
            _forked(nproc, {**values, "out_dir": str(run), "expert_parallel": ep}, tmp_path)
            par = json.loads((run / "summary.json").read_text())["parallel"]
            assert (par["world"], par["expert_parallel"], par["data_parallel"]) == (4, ep, 4 // ep)
        got = _losses(run)
        np.testing.assert_allclose(
            [got[s] for s in range(9, 13)], single.losses[8:12], rtol=5e-5, err_msg=name
        )
