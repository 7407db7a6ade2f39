"""CLI: `moelab moefy` (split a dense LM's FFNs into experts) and `moelab upcycle`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def register(app: typer.Typer) -> None:
    """Add the moefy/upcycle commands."""

    @app.command("moefy")
    def moefy_cmd(
        model: Path = typer.Option(..., help="local dense model dir (Llama family)"),
        out: Path = typer.Option(..., help="output dir for the MoEfied moelab model"),
        gguf_file: str = typer.Option(None, help="GGUF file name inside --model"),
        experts: int = typer.Option(8, help="experts per FFN (must divide its size)"),
        top_k: int = typer.Option(2, help="experts used per token"),
        method: str = typer.Option("cluster", help="cluster | random | coactivation"),
        router_tokens: int = typer.Option(100_000, help="training tokens recorded for the routers"),
        corpus: str = typer.Option("default", help="corpus (built-in name or path)"),
        seq_len: int = typer.Option(256, help="tokens per block"),
        eval_tokens: int = typer.Option(2048, help="held-out tokens per domain for perplexity"),
        seed: int = typer.Option(0, help="random seed"),
        calibrate: bool = typer.Option(
            True,
            help="convert layer by layer on the MoEfied model's own hidden states and ridge-refit "
            "the experts' down projections for --top-k (--no-calibrate: routers only)",
        ),
        dense_layers: int = typer.Option(0, help="keep the first N FFNs dense (first_k_dense)"),
        ridge: float = typer.Option(5e-2, help="ridge strength of the calibration refit"),
        distill_steps: int = typer.Option(
            0, help="then train the experts to match the dense model for N steps (0 = no)"
        ),
        distill_minutes: float = typer.Option(None, help="wall-clock budget of distillation"),
    ) -> None:
        """MoEfy a dense SwiGLU LM: partition FFN neurons into experts, train routers, report quality."""
        from moelab.moefy.api import moefy

        check_experts(experts, top_k)
        s = moefy(
            model,
            out,
            gguf_file,
            experts,
            top_k,
            method,
            router_tokens,
            corpus,
            seq_len=seq_len,
            eval_tokens=eval_tokens,
            seed=seed,
            calibrate=calibrate,
            dense_layers=dense_layers,
            ridge=ridge,
            distill_steps=distill_steps,
            distill_minutes=distill_minutes,
        )
        print_quality(s)

    @app.command("upcycle")
    def upcycle_cmd(
        model: Path = typer.Option(..., help="local dense model dir (Llama family)"),
        out: Path = typer.Option(..., help="output dir"),
        gguf_file: str = typer.Option(None, help="GGUF file name inside --model"),
        experts: int = typer.Option(8, help="experts per FFN"),
        top_k: int = typer.Option(2, help="experts per token"),
        steps: int = typer.Option(50, help="training steps after upcycling"),
        lr: float = typer.Option(1e-4, help="peak learning rate"),
        max_minutes: float = typer.Option(None, help="wall-clock budget"),
        seed: int = typer.Option(0, help="random seed"),
    ) -> None:
        """Sparse upcycling: copy each FFN into E experts, add a router, continue training briefly."""
        from moelab.moefy.api import upcycle

        check_experts(experts, top_k)
        info = upcycle(
            model, out, gguf_file, experts, top_k, steps, lr, max_minutes=max_minutes, seed=seed
        )
        p = info["heldout_perplexity"]
        Console().print(
            f"upcycled {info['experts']} experts, {info['steps_done']} steps "
            f"({info['tokens_per_second']} tokens/s); held-out (test) perplexity: dense {p['dense']:.2f}, "
            f"step 0 {p['upcycled_step0']:.2f}, final {p['upcycled_final']:.2f}"
        )


def check_experts(experts: int, top_k: int) -> None:
    """--experts >= 1 and 1 <= --top-k <= --experts, checked before any model is loaded."""
    from moelab.errors import ConfigError

    if experts < 1:
        raise ConfigError(f"--experts {experts}: expected an integer >= 1 (experts per FFN)")
    if not 1 <= top_k <= experts:
        raise ConfigError(
            f"--top-k {top_k}: expected an integer in [1, --experts={experts}] (experts per token)"
        )


def print_quality(summary: dict) -> None:
    """Rich table of held-out perplexity per domain, dense vs MoEfied k."""
    q = summary["quality"]
    t = Table(title=f"held-out ({q['split']} split) perplexity, method={summary['method']}")
    cols = sorted({c for row in q["domains"].values() for c in row if c.startswith("k=")})
    for c in ["domain", "tokens", "dense", *cols]:
        t.add_column(c)
    for dom, row in q["domains"].items():
        t.add_row(
            dom,
            str(row["tokens"]),
            f"{row['dense']:.2f}",
            *[f"{row[c]:.2f} ({row[c] / row['dense'] - 1:+.0%})" for c in cols],
        )
    Console().print(t)
    Console().print(
        f"router held-out top-k recall (mean over layers): {summary['router_recall_mean']}"
    )
    Console().print(f"active FFN compute per token vs dense: {summary['ffn_compute_fraction']}")
    dis = summary.get("distilled")
    if dis:
        Console().print(
            f"distilled {dis['steps_done']} steps ({dis['tokens']} tokens, {dis['seconds']} s): "
            f"KL {dis['kl_first']:.3f} -> {dis['kl_last']:.3f}; the table is after distillation"
        )
    cal = summary.get("calibration_rel_err_mean")
    if cal:
        Console().print(
            f"calibration: mean relative FFN reconstruction error {cal['before']:.3f} -> "
            f"{cal['after']:.3f} ({cal['split']})"
        )
