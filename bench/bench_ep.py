"""Benchmark expert parallelism on this machine: tokens/s of EP=2 (two gloo processes) against
one process on the same cores, and the communication volume per training step.

Run:  .venv/bin/python bench/bench_ep.py [--repeats 3] [--steps 8] [--write]

Both variants train a small MoE LM (L2 d64 E8 k2 expert hidden 64, seq 64, global batch 16,
vocab 1024: the --quick model with 8 experts) on the same random token batches with the same
optimizer step (`moelab.parallel.TrainParallel`: objective, gradient averaging, clipping):
one process with 1 and with 2 torch threads, and EP=2 (experts 0-3 / 4-7 on two processes with
1 thread each, 8 blocks per process). Repeats interleave the variants; medians and the
per-repeat range of each ratio are reported (`moelab.timing.RatioSummary`). On 2 idle CPU cores
the expected EP=2 / one-process-2-threads ratio is about 1x (the point is correctness and the
communication figure, not speed); on a machine shared with other jobs a 2-thread process loses
more to oversubscription than two 1-thread processes, which the 1-thread reference shows. Bytes are those
each process sends to the other (all-to-all of slot counts and token rows, forward and
backward; gradient all-reduce payload), counted by `moelab.parallel.CommStats`.
`--write` replaces the "## Expert parallelism (bench_ep.py)" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from _results import RESULTS, write_section  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from moelab.models import MoETransformer  # noqa: E402
from moelab.parallel import TrainParallel, make_groups  # noqa: E402
from moelab.timing import RatioSummary  # noqa: E402
from moelab.train.config import TrainConfig, quick_overrides  # noqa: E402

SECTION = "## Expert parallelism (bench_ep.py)"


def _setup(cfg: TrainConfig, par: TrainParallel, steps: int, seed: int):
    model = MoETransformer(cfg.build_model_config(cfg.vocab_size, 0, 4, 1), seed=seed)
    model.train()
    par.shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    batches = [
        torch.randint(5, cfg.vocab_size, (cfg.batch_size, cfg.seq_len), generator=g)
        for _ in range(steps + 2)
    ]
    return model, opt, batches


def _step(model, opt, par: TrainParallel, x: torch.Tensor) -> float:
    xl = par.shard_batch(x)
    out = model(xl, labels=xl)
    opt.zero_grad(set_to_none=True)
    loss, logs = par.objective(out, xl, model)
    loss.backward()
    par.sync_grads(model)
    par.clip_grad_norm(model, 1.0)
    opt.step()
    par.end_step()
    return logs["lm_loss"]


def _timed(cfg: TrainConfig, par: TrainParallel, steps: int, seed: int) -> dict:
    model, opt, batches = _setup(cfg, par, steps, seed)
    for x in batches[:2]:  # warm-up: allocator, AdamW state
        _step(model, opt, par, x)
    par.step_bytes.clear()
    par.step_kinds.clear()
    par.barrier()
    t0 = time.perf_counter()
    losses = [_step(model, opt, par, x) for x in batches[2:]]
    par.barrier()
    dt = time.perf_counter() - t0
    return {
        "seconds": dt,
        "tokens_per_s": steps * cfg.batch_size * cfg.seq_len / dt,
        "losses": losses,
        "bytes_per_step": {k: v / steps for k, v in par.step_kinds.items()},
    }


def _ep_worker(rank: int, init: str, out: str, cfg_json: str, steps: int, seed: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        cfg = TrainConfig(**json.loads(cfg_json))
        res = _timed(cfg, TrainParallel(make_groups(2)), steps, seed)
        Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def run_ep(cfg: TrainConfig, steps: int, seed: int) -> dict:
    """One EP=2 measurement in two fresh processes; rank 0's timing, both ranks' bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        args = (str(Path(tmp, "init")), tmp, cfg.model_dump_json(), steps, seed)
        mp.spawn(_ep_worker, args=args, nprocs=2)
        r0, r1 = (json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in (0, 1))
    r0["bytes_per_step_rank1"] = r1["bytes_per_step"]
    return r0


def main() -> int:
    """Interleave single-process and EP=2 runs, print the table, optionally write RESULTS.md."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per repeat")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help="replace the section in bench/RESULTS.md")
    a = p.parse_args()
    cfg = TrainConfig(
        **{**quick_overrides(), "num_experts": 8, "batch_size": 16},
        progress=False,
        tensorboard=False,
    )
    singles, ones, eps = [], [], []
    for _ in range(a.repeats):
        torch.set_num_threads(1)
        ones.append(_timed(cfg, TrainParallel(None), a.steps, a.seed))
        torch.set_num_threads(2)
        singles.append(_timed(cfg, TrainParallel(None), a.steps, a.seed))
        eps.append(run_ep(cfg, a.steps, a.seed))
    ratio = RatioSummary(
        tuple(e["tokens_per_s"] / s["tokens_per_s"] for s, e in zip(singles, eps, strict=True))
    )
    ratio1 = RatioSummary(
        tuple(e["tokens_per_s"] / s["tokens_per_s"] for s, e in zip(ones, eps, strict=True))
    )
    tok_1 = statistics.median(s["tokens_per_s"] for s in ones)
    loss_gap = max(
        abs(x - y) / abs(y)
        for s, e in zip(singles, eps, strict=True)
        for x, y in zip(e["losses"], s["losses"], strict=True)
    )
    b = eps[-1]["bytes_per_step"]
    tok_s = statistics.median(s["tokens_per_s"] for s in singles)
    tok_e = statistics.median(e["tokens_per_s"] for e in eps)
    con = Console()
    t = Table(title=f"EP=2 vs one process, {a.repeats} interleaved repeats x {a.steps} steps")
    for col in ("variant", "tokens/s (median)", "ratio"):
        t.add_column(col, justify="right")
    t.add_row("1 process, 1 thread", f"{tok_1:,.0f}", "")
    t.add_row("1 process, 2 threads", f"{tok_s:,.0f}", "")
    t.add_row("EP=2 / (1 process, 2 threads)", f"{tok_e:,.0f}", ratio.text())
    t.add_row("EP=2 / (1 process, 1 thread)", "", ratio1.text())
    con.print(t)
    mb = {k: v / 1e6 for k, v in sorted(b.items())}
    con.print(
        "bytes sent per step by rank 0: " + ", ".join(f"{k} {v:.3f} MB" for k, v in mb.items())
    )
    con.print(
        f"max relative loss difference EP=2 vs one process over the timed steps: {loss_gap:.2e}"
    )
    if a.write:
        rows = "\n".join(f"| {k} | {v:,.0f} | {v / 1e6:.3f} |" for k, v in sorted(b.items()))
        body = f"""{SECTION}

Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/bench_ep.py --repeats {a.repeats} --steps {a.steps} --write`
(2 shared CPU cores, other jobs running on the machine; gloo on CPU. NCCL on GPU is the same
code path but was not run here.)

Small MoE LM (L2 d64 E8 k2 expert hidden 64, seq 64, vocab 1024, global batch 16 = 1,024
tokens per step), training steps (forward, backward, gradient averaging, clipping, AdamW).

| variant | tokens/s (median) | EP=2 tokens/s over this variant's (per repeat) |
|---|---:|---|
| 1 process, 1 thread | {tok_1:,.0f} | {ratio1.text()} |
| 1 process, 2 threads | {tok_s:,.0f} | {ratio.text()} |
| EP=2: 2 processes x 1 thread (experts 0-3 / 4-7) | {tok_e:,.0f} | - |

Bytes rank 0 sent to rank 1 per training step:

| kind | bytes | MB |
|---|---:|---:|
{rows}

Loss of every timed step, EP=2 vs one process: max relative difference {loss_gap:.1e}.
"""
        write_section(RESULTS, SECTION, body)
        con.print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
