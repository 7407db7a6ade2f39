"""CLI: `moelab demo` (the whole pipeline on the built-in default)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the demo command."""

    @app.command("demo")
    def demo(
        quick: bool = typer.Option(
            False, "--quick", help="tiny sizes: whole chain in about 3 minutes"
        ),
        out: str = typer.Option(
            "runs/demo", help="folder for every stage's outputs (cached, resumable)"
        ),
        model: str = typer.Option(
            "default", help="'default' (train a small MoE LM) or 'smollm2-moe'"
        ),
        seed: int = typer.Option(0, help="random seed"),
        force: bool = typer.Option(False, "--force", help="redo every stage even if done"),
        train_minutes: float = typer.Option(None, help="override: minutes of training per model"),
    ) -> None:
        """Run the whole chain: corpora -> tokenizer -> train MoE (+ dense) -> trace -> analyses ->
        predictors -> offload replay + live offloaded generation -> report.html + summary.json."""
        from moelab.demo.pipeline import DemoConfig, run_demo

        cfg = DemoConfig.make(quick=quick, out=out, seed=seed, train_minutes=train_minutes)
        if model == "smollm2-moe":
            from moelab.demo.smollm2 import run_smollm2_demo

            run_smollm2_demo(cfg, force=force)
            return
        if model != "default":
            from moelab.errors import ConfigError

            raise ConfigError(f"--model {model!r}: expected 'default' or 'smollm2-moe'")
        run_demo(cfg, force=force)
