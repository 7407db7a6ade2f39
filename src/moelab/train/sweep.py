"""`moelab sweep`: loss over the number of experts at equal active compute, and its scaling law.

For every dense size (d_model, hence N) and every expert count E, one MoE language model is
trained with moelab's training loop at top-1 routing (Switch router, dropless): each token runs
one expert of the same hidden size whatever E, so forward FLOPs per token are equal across E up
to the router projection (2 d_model E per layer, listed per run), and every run trains on the
same number of tokens from the same prepared data. E = 1 is the dense model. The held-out loss
is the mean token cross-entropy of the final model on the *test* split (never seen in
training). The law of Clark et al. 2022 (`moelab.train.scaling`) is fitted to all runs, and
again without one expert count (`holdout`) whose losses it then predicts, with intervals.

Each run lives in its own folder (<out>/d{d_model}-E{E}) with its own checkpoints; a finished
run (sweep_run.json matching its config) is skipped, an interrupted one resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from moelab._io import atomic_write_json, atomic_write_with
from moelab.data.dataset import pack_blocks
from moelab.data.prepare import load_prepared
from moelab.errors import ConfigError
from moelab.models import MoETransformer
from moelab.train.config import TrainConfig, make_train_config
from moelab.train.loop import evaluate, train
from moelab.train.scaling import fit_scaling_law

__all__ = ["sweep_configs", "sweep", "dense_params", "QUICK", "DEFAULTS"]

RUN_FILE = "sweep_run.json"
TEST_SPLIT = "test"

# the default sweep: two sizes, 2 layers, top-1 over E experts of hidden 2*d_model
DEFAULTS: dict[str, Any] = {
    "corpus": "default", "max_bytes": 400_000, "vocab_size": 1024, "n_layers": 2,
    "seq_len": 64, "batch_size": 16, "lr": 3e-3, "router": "switch", "top_k": 1,
    "expert_act": "swiglu", "eval_batches": 8, "log_every": 50, "keep_checkpoints": 1,
    "tensorboard": False,
}  # fmt: skip
# --quick: tiny models and data for tests
QUICK: dict[str, Any] = {
    **DEFAULTS, "corpus": "python-code", "max_bytes": 60_000, "vocab_size": 512, "seq_len": 32,
    "batch_size": 4, "eval_batches": 2, "log_every": 5,
}  # fmt: skip


def sweep_configs(
    experts: list[int],
    sizes: list[int],
    budget: int,
    out_dir: str | os.PathLike[str],
    base: dict[str, Any],
) -> list[TrainConfig]:
    """One TrainConfig per (d_model, E): same tokens (budget // tokens per step), same data."""
    if not experts or any(not isinstance(e, int) or e < 1 for e in experts):
        raise ConfigError(f"sweep: --experts {experts!r} must be positive ints")
    if len(set(sizes)) < 2 or any(s < 8 for s in sizes):
        raise ConfigError(
            f"sweep: --sizes {sizes!r} needs at least two distinct d_model values >= 8 "
            "(the law's N term needs two model sizes)"
        )
    out = Path(out_dir)
    tokens_per_step = base["batch_size"] * base["seq_len"]
    steps = budget // tokens_per_step
    if steps < 4:
        raise ConfigError(
            f"sweep: --budget {budget} tokens is {steps} steps of {tokens_per_step} tokens; "
            "need at least 4 steps"
        )
    cfgs = []
    for d in sizes:
        for e in experts:
            cfgs.append(
                make_train_config(
                    {
                        **base,
                        "d_model": d,
                        "d_ff": 2 * d,
                        "n_heads": max(1, d // 16),
                        "num_experts": e,
                        "max_steps": steps,
                        "warmup_steps": max(1, steps // 10),
                        "eval_every": max(1, steps // 4),
                        "checkpoint_every": max(1, steps // 4),
                        "out_dir": str(out / f"d{d}-E{e}"),
                        "data_dir": str(out / "data"),
                        "progress": False,
                    },  # fmt: skip
                    source=f"sweep d_model={d} E={e}",
                )
            )
    return cfgs


def dense_params(cfg: TrainConfig, vocab: int) -> int:
    """N: non-embedding parameters of the dense model (one FFN of the expert's size)."""
    dense = cfg.model_copy(update={"dense": True})
    model = MoETransformer(dense.build_model_config(vocab, 0, None, None), seed=0)
    st = model.stats(cfg.seq_len)
    return int(st.total_params - st.embedding_params)


def _config_hash(cfg: TrainConfig) -> str:
    keep = {k: v for k, v in cfg.model_dump().items() if k not in ("progress", "threads", "device")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _run_one(cfg: TrainConfig, test_blocks: int, resume: bool, console: Console) -> dict[str, Any]:
    run_dir = Path(cfg.out_dir)
    marker = run_dir / RUN_FILE
    h = _config_hash(cfg)
    if resume and marker.is_file():
        done = json.loads(marker.read_text(encoding="utf-8"))
        if done.get("config_hash") == h:
            console.print(f"skip {run_dir.name} (done)")
            return done
    console.print(f"[bold]train {run_dir.name}[/bold]: {cfg.max_steps} steps")
    res = train(cfg, resume=resume, console=console)
    data = load_prepared(cfg.data_path)
    vocab = data.tokenizer.get_vocab_size()
    if TEST_SPLIT not in data.streams or data.streams[TEST_SPLIT].ids.size <= cfg.seq_len:
        raise ConfigError(
            f"sweep: the prepared data in {cfg.data_path} has no usable '{TEST_SPLIT}' split "
            "for the held-out loss; use a corpus with more documents"
        )
    blocks = pack_blocks(data.streams[TEST_SPLIT], cfg.seq_len, max_blocks=test_blocks)
    model = MoETransformer.load(res.model_dir, device=cfg.device)
    x = blocks.input_ids
    test_loss, n_tok = evaluate(model, x, x, cfg.batch_size, torch.device(cfg.device))
    rec = {
        "config_hash": h, "d_model": cfg.d_model, "experts": cfg.num_experts,
        "dense_params": dense_params(cfg, vocab), "total_params": res.stats["total_params"],
        "active_params": res.stats["active_params"],
        "flops_per_token_fwd": res.stats["flops_per_token_fwd"],
        "router_flops_per_token": res.stats["router_flops_per_token"],
        "train_tokens": res.evals[-1]["tokens"] if res.evals else 0, "steps": res.steps,
        "stopped": res.stopped, "val_loss": res.evals[-1]["val_loss"] if res.evals else None,
        "heldout_split": TEST_SPLIT, "heldout_loss": test_loss, "heldout_tokens": n_tok,
        "train_seconds": res.evals[-1]["train_seconds"] if res.evals else None,
    }  # fmt: skip
    atomic_write_json(marker, rec)
    return rec


def _fit_block(runs: list[dict[str, Any]]) -> dict[str, Any]:
    fit = fit_scaling_law(
        [r["dense_params"] for r in runs], [r["experts"] for r in runs], [r["heldout_loss"] for r in runs]
    )  # fmt: skip
    return {"fit": fit, "dict": fit.to_dict()}


def sweep(
    experts: list[int],
    sizes: list[int],
    budget: int,
    out_dir: str | os.PathLike[str],
    holdout: int | None = None,
    base: dict[str, Any] | None = None,
    test_blocks: int = 64,
    resume: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train every (size, E) run (resumable), fit the law, predict the held-out E, plot."""
    console = console or Console()
    base = dict(DEFAULTS if base is None else base)
    out = Path(out_dir)
    if holdout is not None and holdout not in experts:
        raise ConfigError(f"sweep: --holdout {holdout} is not one of --experts {experts}")
    cfgs = sweep_configs(experts, sizes, budget, out, base)
    runs = [_run_one(c, test_blocks, resume, console) for c in cfgs]
    result: dict[str, Any] = {
        "experts": experts, "sizes_d_model": sizes, "budget_tokens": budget,
        "tokens_per_run": runs[0]["train_tokens"], "heldout_split": TEST_SPLIT,
        "loss": "mean token cross-entropy (nats) on the test split",
        "law": "log L = a log N + b log E + c log N log E + d (natural logs; N dense params)",
        "runs": runs,
    }  # fmt: skip
    warnings = [f"{r['d_model']}/E{r['experts']}: stopped by {r['stopped']}" for r in runs if r["stopped"] != "max_steps"]  # fmt: skip
    result["warnings"] = warnings
    full = _fit_block(runs)
    result["fit_all"] = full["dict"]
    held = None
    if holdout is not None:
        fit_runs = [r for r in runs if r["experts"] != holdout]
        part = _fit_block(fit_runs)
        preds = []
        for r in runs:
            if r["experts"] != holdout:
                continue
            p = part["fit"].predict(r["dense_params"], holdout)
            err = math.log(r["heldout_loss"]) - p["log_loss"]
            preds.append(
                {
                    "d_model": r["d_model"],
                    "dense_params": r["dense_params"],
                    "experts": holdout,
                    "observed": r["heldout_loss"],
                    **p,
                    "log_error": err,
                    "within_interval": abs(err) <= p["log_halfwidth"],
                }  # fmt: skip
            )
        held = {"holdout_experts": holdout, "fit": part["dict"], "predictions": preds}
        result["holdout"] = held
    atomic_write_json(out / "sweep.json", result)
    plot_sweep(result, out / "sweep.png")
    _print(result, console)
    return result


def plot_sweep(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Held-out loss vs E per size, the fitted law, and the held-out prediction with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from moelab.train.scaling import ScalingFit

    held = result.get("holdout")
    fit = ScalingFit(**(held["fit"] if held else result["fit_all"]))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    es = sorted(result["experts"])
    grid = np.exp(np.linspace(math.log(es[0]), math.log(es[-1]), 50))
    for i, d in enumerate(result["sizes_d_model"]):
        rs = sorted((r for r in result["runs"] if r["d_model"] == d), key=lambda r: r["experts"])
        col = f"C{i}"
        n = rs[0]["dense_params"]
        fitted = [r for r in rs if not held or r["experts"] != held["holdout_experts"]]
        ax.plot([r["experts"] for r in fitted], [r["heldout_loss"] for r in fitted], "o", color=col,
                label=f"d_model {d} (N={n:,})")  # fmt: skip
        ax.plot(grid, [fit.predict(n, e)["loss"] for e in grid], "-", color=col, lw=1)
    if held:
        for p in held["predictions"]:
            i = result["sizes_d_model"].index(p["d_model"])
            ax.errorbar([p["experts"]], [p["loss"]], yerr=[[p["loss"] - p["loss_lo"]], [p["loss_hi"] - p["loss"]]],
                        fmt="s", mfc="none", color=f"C{i}", capsize=4)  # fmt: skip
            ax.plot([p["experts"]], [p["observed"]], "x", color=f"C{i}", ms=9)
        ax.set_title(
            f"held out E={held['holdout_experts']}: x observed, square predicted (95% interval)",
            fontsize=9,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
    ax.set_xlabel("experts E (top-1, equal active FLOPs per token)")
    ax.set_ylabel(f"{result['heldout_split']} loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_with(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def _print(result: dict[str, Any], console: Console) -> None:
    t = Table(
        title=f"sweep: {result['tokens_per_run']:,} training tokens per run, loss on the {result['heldout_split']} split"
    )
    for col in (
        "d_model",
        "N (dense)",
        "E",
        "total params",
        "GFLOP/tok fwd",
        "router FLOP/tok",
        "test loss",
    ):
        t.add_column(col, justify="right")
    for r in result["runs"]:
        t.add_row(str(r["d_model"]), f"{r['dense_params']:,}", str(r["experts"]), f"{r['total_params']:,}",
                  f"{r['flops_per_token_fwd'] / 1e9:.5f}", f"{r['router_flops_per_token']:,}", f"{r['heldout_loss']:.4f}")  # fmt: skip
    console.print(t)
    f = result["fit_all"]
    coef = ", ".join(f"{k}={f['coef'][k]:+.4f}±{f['stderr'][k]:.4f}" for k in ("a", "b", "c", "d"))
    console.print(
        f"law (all {f['n_points']} runs, dof {f['dof']}): {coef}; residual sd {f['resid_std']:.4f} (in-sample)"
    )
    held = result.get("holdout")
    if held:
        for p in held["predictions"]:
            console.print(
                f"held-out E={p['experts']} d_model={p['d_model']}: predicted {p['loss']:.4f} "
                f"[{p['loss_lo']:.4f}, {p['loss_hi']:.4f}] (95%), observed {p['observed']:.4f} -> "
                + ("within" if p["within_interval"] else "OUTSIDE")
            )
    for w in result["warnings"]:
        console.print(f"[bold red]WARNING[/bold red] {w}")
