"""MoE vs dense at equal active compute (Artetxe et al. 2021, "Efficient Large Scale Language
Modeling with Mixtures of Experts", Sec. 4: compare at matched training FLOPs).

`compare` trains the configured MoE model and its dense baseline -- same architecture with one
dense FFN of hidden size k * expert hidden, i.e. the same active FFN FLOPs per token
(`moelab.models.dense_baseline`) -- on the same prepared data, for the same token budget and
seed, then reports validation perplexity against training FLOPs (6N-style accounting from
`model.stats()`: 3x forward FLOPs per token times tokens) and against training wall time.

With ``parallel=True`` the two models train at the same time in two spawned processes of one
torch thread each: on a small CPU machine two single-thread runs finish sooner than two
two-thread runs in turn (small matmuls scale poorly over threads), and the numbers depend only on
the seed, not on the machine's core count.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from moelab._io import atomic_write_json, atomic_write_with
from moelab.train.config import TrainConfig
from moelab.train.loop import TrainResult, train

__all__ = ["compare", "plot_compare"]


def plot_compare(
    runs: dict[str, TrainResult], unigram_ppl: float, path: str | os.PathLike[str]
) -> None:
    """PNG with validation perplexity vs training FLOPs (left) and vs wall time (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in runs.items():
        flops = [e["train_flops"] for e in r.evals]
        secs = [e["train_seconds"] for e in r.evals]
        ppl = [e["val_ppl"] for e in r.evals]
        a.plot(flops, ppl, marker="o", ms=3, label=name)
        b.plot(secs, ppl, marker="o", ms=3, label=name)
    for ax, xl in ((a, "training FLOPs"), (b, "training wall time [s]")):
        ax.axhline(unigram_ppl, color="gray", ls="--", lw=0.8, label="unigram baseline")
        ax.set_xlabel(xl)
        ax.set_ylabel("validation perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    a.set_title("perplexity vs compute")
    b.set_title("perplexity vs wall time")
    fig.tight_layout()
    atomic_write_with(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def _ppl_at(r: TrainResult, budget: float, key: str) -> float | None:
    """Validation perplexity at `budget` of `key` (FLOPs or seconds), interpolated linearly in
    log-perplexity between the evaluations around it; None if the run never reached `budget`
    or was not evaluated before it."""
    xs = [e[key] for e in r.evals]
    if not xs or budget < xs[0] * (1 - 1e-9) or budget > xs[-1] * (1 + 1e-9):
        return None
    logs = [math.log(e["val_ppl"]) for e in r.evals]
    return float(math.exp(np.interp(budget, xs, logs)))


def _train_quiet(cfg_dict: dict[str, Any], resume: bool) -> TrainResult:
    """Worker of the parallel compare: one model, one thread, no progress bar (two bars would
    interleave on one terminal)."""
    return train(TrainConfig(**cfg_dict), resume=resume, console=Console(quiet=True))


def compare(
    cfg: TrainConfig,
    out_dir: str | os.PathLike[str],
    console: Console | None = None,
    resume: bool = True,
    parallel: bool = False,
) -> dict[str, Any]:
    """Train MoE and equal-active-FLOPs dense models on the same data; write compare.json/.png.

    parallel: train both at once in two processes of one thread each (the data is prepared
    first, here, so that the two never tokenise the corpus at the same time)."""
    console = console or Console()
    out = Path(out_dir)
    data_dir = cfg.data_dir or str(out / "data")
    cfgs = {
        name: TrainConfig(
            **cfg.model_copy(
                update={"dense": dense, "out_dir": str(out / name), "data_dir": data_dir}
            ).model_dump()
        )
        for name, dense in (("moe", False), ("dense", True))
    }
    runs: dict[str, TrainResult] = {}
    if parallel:
        from moelab.data.prepare import prepare_data

        c = cfgs["moe"]
        with console.status(f"preparing data ({c.corpus}) in {c.data_path} ..."):
            prepare_data(
                c.corpus, c.data_path, vocab_size=c.vocab_size, seed=c.seed,
                max_bytes=c.max_bytes, text_column=c.text_column, tokenizer=c.tokenizer,
            )  # fmt: skip
        console.print(
            "[bold]training moe and dense at once[/bold] (two processes, one thread each) -> "
            + ", ".join(c.out_dir for c in cfgs.values())
        )
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
            futures = {
                name: pool.submit(
                    _train_quiet, c.model_copy(update={"threads": 1}).model_dump(), resume
                )
                for name, c in cfgs.items()
            }
            for name, fut in futures.items():
                runs[name] = fut.result()
                r = runs[name]
                console.print(
                    f"{name}: {r.steps}/{r.max_steps} steps, val ppl {r.final_val_ppl:.1f}"
                    + (f" [red]{r.warning}[/red]" if r.warning else "")
                )
    else:
        for name, run_cfg in cfgs.items():
            console.print(f"[bold]training {name}[/bold] -> {run_cfg.out_dir}")
            runs[name] = train(run_cfg, resume=resume, console=console)
    uni = runs["moe"].unigram_ppl
    plot_compare(runs, uni, out / "compare.png")
    # perplexity at the smaller of the two final FLOP / time budgets (a point both runs reached)
    flop_budget = min(r.evals[-1]["train_flops"] for r in runs.values())
    time_budget = min(r.evals[-1]["train_seconds"] for r in runs.values())
    rows = {}
    for name, r in runs.items():
        rows[name] = {
            "total_params": r.stats["total_params"],
            "active_params": r.stats["active_params"],
            "flops_per_token_train": r.stats["flops_per_token_train"],
            "steps": r.steps,
            "max_steps": r.max_steps,
            "stopped": r.stopped,
            "tokens": r.evals[-1]["tokens"],
            "train_seconds": r.evals[-1]["train_seconds"],
            "tokens_per_s": r.evals[-1]["tokens"] / max(r.evals[-1]["train_seconds"], 1e-9),
            "final_val_ppl": r.final_val_ppl,
            "val_ppl_at_equal_flops": _ppl_at(r, flop_budget, "train_flops"),
            "val_ppl_at_equal_time": _ppl_at(r, time_budget, "train_seconds"),
            "evals": r.evals,
        }
    warnings = [f"{name}: {r.warning}" for name, r in runs.items() if r.warning]
    result = {
        "warnings": warnings,
        "unigram_ppl": uni,
        "flop_budget": flop_budget,
        "time_budget_s": time_budget,
        "runs": rows,
    }
    atomic_write_json(out / "compare.json", result)

    table = Table(title=f"MoE vs dense (equal active FLOPs/token), unigram ppl {uni:.1f}")
    for col in (
        "model",
        "params",
        "active",
        "GFLOP/tok",
        "tokens",
        "tok/s",
        "val ppl",
        "ppl@FLOPs",
        "ppl@time",
    ):
        table.add_column(col, justify="right")

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for name, row in rows.items():
        table.add_row(
            name, f"{row['total_params']:,}", f"{row['active_params']:,}",
            f"{row['flops_per_token_train'] / 1e9:.4f}", f"{row['tokens']:,}", f"{row['tokens_per_s']:.0f}",
            fmt(row["final_val_ppl"]), fmt(row["val_ppl_at_equal_flops"]), fmt(row["val_ppl_at_equal_time"]),
        )  # fmt: skip
    console.print(table)
    for w in warnings:
        console.print(f"[bold red]WARNING[/bold red] {w}")
    console.print(f"plot: {out / 'compare.png'}  numbers: {out / 'compare.json'}")
    return result
