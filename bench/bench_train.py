"""Benchmark training of the default small MoE LM against its dense equal-active-FLOPs model.

Run:  THP_MEM_ALLOC_ENABLE=1 .venv/bin/python bench/bench_train.py [--minutes 10] [--write]

Part 1 (step time): one optimizer step (forward + backward + AdamW) of the default MoE LM
(TrainConfig defaults: L4 d128 E8 k2 expert hidden 256, seq 128, batch 16, vocab 4096) and of
its dense baseline (one FFN of hidden k*256: same active FLOPs per token), on the same random
token batches; variants interleaved in every repeat, medians reported, target MoE step time
<= 1.3x dense.
Part 2 (short run): `moelab train` with the default config on the default corpus for a wall-clock
budget; prints validation perplexity against the unigram baseline and routing-collapse checks
(per MoE layer: max expert load / uniform <= 3, no dead expert). `--write` replaces the
"## Training (bench_train.py)" section of bench/RESULTS.md (other sections are left alone).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # must precede torch's first allocation
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from _results import RESULTS, write_section  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from moelab.models import MoETransformer  # noqa: E402
from moelab.train.config import TrainConfig  # noqa: E402
from moelab.train.loop import set_threads, train  # noqa: E402

SECTION = "## Training (bench_train.py)"
MAX_LOAD = 3.0  # collapse threshold: an expert above 3x uniform load


def step_times(cfg: TrainConfig, repeats: int, steps: int, seed: int) -> dict[str, list[float]]:
    """Seconds per optimizer step of MoE and dense, interleaved (one block of `steps` per repeat)."""
    variants = {}
    for name, dense in (("moe", False), ("dense", True)):
        c = cfg.model_copy(update={"dense": dense})
        model = MoETransformer(c.build_model_config(cfg.vocab_size, 0, 4, 1), seed=seed)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        variants[name] = (model, opt)
    g = torch.Generator().manual_seed(seed)
    batches = [
        torch.randint(5, cfg.vocab_size, (cfg.batch_size, cfg.seq_len), generator=g)
        for _ in range(steps)
    ]

    def one(model: MoETransformer, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
        out = model(x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for model, opt in variants.values():  # warm-up (allocator, AdamW state)
        for x in batches[:2]:
            one(model, opt, x)
    times: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(repeats):
        for name, (model, opt) in variants.items():
            t0 = time.perf_counter()
            for x in batches:
                one(model, opt, x)
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def main() -> int:
    """Run both parts, print tables, optionally write bench/RESULTS.md."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--repeats", type=int, default=5, help="interleaved repeats of the step-time test"
    )
    p.add_argument("--steps", type=int, default=4, help="steps per variant per repeat")
    p.add_argument(
        "--minutes", type=float, default=10.0, help="wall-clock budget of the short run (0 = skip)"
    )
    p.add_argument("--corpus", default="default", help="corpus of the short run")
    p.add_argument(
        "--out", default=None, help="run folder of the short run (default: a temp folder)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--write", action="store_true", help="write the tables to bench/RESULTS.md")
    args = p.parse_args()
    con = Console()
    threads = set_threads(args.threads)
    cfg = TrainConfig(seed=args.seed, threads=args.threads)
    con.print(f"torch {torch.__version__}, {threads} threads, default config: L{cfg.n_layers} d{cfg.d_model} "
              f"E{cfg.num_experts} k{cfg.top_k} d_ff {cfg.d_ff} seq {cfg.seq_len} batch {cfg.batch_size} vocab {cfg.vocab_size}")  # fmt: skip

    times = step_times(cfg, args.repeats, args.steps, args.seed)
    med = {n: statistics.median(v) for n, v in times.items()}
    tok = cfg.batch_size * cfg.seq_len
    ratio = med["moe"] / med["dense"]
    t1 = Table(
        title="training step time (forward + backward + AdamW), medians of interleaved repeats"
    )
    for col in ("model", "step ms (median)", "min..max ms", "tokens/s", "vs dense"):
        t1.add_column(col, justify="right")
    for n in ("moe", "dense"):
        t1.add_row(n, f"{med[n] * 1e3:.1f}", f"{min(times[n]) * 1e3:.0f}..{max(times[n]) * 1e3:.0f}",
                   f"{tok / med[n]:,.0f}", f"{med[n] / med['dense']:.2f}x")  # fmt: skip
    con.print(t1)
    verdict = "PASS" if ratio <= 1.3 else "FAIL"
    con.print(f"MoE / dense step time = {ratio:.2f} (target <= 1.30): {verdict}")
    lines = [
        SECTION,
        "",
        f"Default small MoE LM (L{cfg.n_layers} d{cfg.d_model} E{cfg.num_experts} top-{cfg.top_k} expert hidden "
        f"{cfg.d_ff}, seq {cfg.seq_len}, batch {cfg.batch_size}, vocab {cfg.vocab_size}) vs its dense model with the "
        f"same active FLOPs (FFN hidden {cfg.top_k * cfg.d_ff}); fp32, {threads} threads, torch {torch.__version__}; "
        f"{args.repeats} interleaved repeats x {args.steps} steps, medians.",
        "",
        "| model | step ms | tokens/s | vs dense |",
        "|---|---:|---:|---:|",
        *[
            f"| {n} | {med[n] * 1e3:.1f} | {tok / med[n]:,.0f} | {med[n] / med['dense']:.2f}x |"
            for n in ("moe", "dense")
        ],
        "",
        f"MoE / dense step time: **{ratio:.2f}** (target <= 1.3: {verdict}).",
    ]

    if args.minutes > 0:
        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="moelab-bench-train-"))
        run_cfg = cfg.model_copy(update={"corpus": args.corpus, "out_dir": str(out), "max_minutes": args.minutes,
                                         "max_steps": 100_000 if args.minutes else cfg.max_steps,
                                         "eval_every": 100, "checkpoint_every": 500, "tensorboard": False})  # fmt: skip
        # the cosine schedule should end with the budget: size max_steps from the measured step time
        est = int(args.minutes * 60 / med["moe"])
        run_cfg = TrainConfig(
            **{
                **run_cfg.model_dump(),
                "max_steps": max(200, est),
                "warmup_steps": min(100, est // 10),
            }
        )
        r = train(run_cfg, resume=False, console=con)
        el = r.expert_load or {"layers": [], "max_over_uniform": [], "dead": []}
        collapsed = [
            layer
            for layer, m, d in zip(el["layers"], el["max_over_uniform"], el["dead"], strict=True)
            if m > MAX_LOAD or d > 0
        ]
        verdict_collapse = (
            "no routing statistics"
            if not el["layers"]
            else f"layers {collapsed}"
            if collapsed
            else "none"
        )
        t2 = Table(
            title=f"short run: {r.steps} steps, {r.evals[-1]['tokens']:,} tokens, {r.evals[-1]['train_seconds']:.0f} s training"
        )
        t2.add_column("quantity")
        t2.add_column("value", justify="right")
        t2.add_row("validation perplexity (MoE)", f"{r.final_val_ppl:.2f}")
        t2.add_row("unigram baseline perplexity", f"{r.unigram_ppl:.2f}")
        beats = r.final_val_ppl < r.unigram_ppl
        t2.add_row(
            "ratio model / unigram",
            f"{r.final_val_ppl / r.unigram_ppl:.3f} ({'below' if beats else 'NOT below'} unigram)",
        )
        for j, layer in enumerate(el["layers"]):
            t2.add_row(
                f"layer {layer}: max load / uniform, dead",
                f"{el['max_over_uniform'][j]:.2f}, {el['dead'][j]}",
            )
        t2.add_row(
            "routing collapse (max > 3x uniform or dead experts)",
            verdict_collapse,
        )
        con.print(t2)
        lines += [
            "",
            f"Short run on the `{args.corpus}` corpus, budget {args.minutes:g} min ({r.steps} steps, "
            f"{r.evals[-1]['tokens']:,} tokens, stopped by {r.stopped}):",
            "",
            "| quantity | value |",
            "|---|---:|",
            f"| validation perplexity | {r.final_val_ppl:.2f} |",
            f"| unigram baseline perplexity | {r.unigram_ppl:.2f} |",
            *[f"| layer {layer}: max load / uniform, dead experts | {el['max_over_uniform'][j]:.2f}, {el['dead'][j]} |"
              for j, layer in enumerate(el["layers"])],
            f"| model / unigram perplexity | {r.final_val_ppl / r.unigram_ppl:.3f} |",
            f"| routing collapse (max > 3x uniform or dead experts) | {verdict_collapse} |",
        ]  # fmt: skip
    if args.write:
        write_section(RESULTS, SECTION, "\n".join(lines))
        con.print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
