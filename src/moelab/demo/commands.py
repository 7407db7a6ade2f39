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
        max_steps: int = typer.Option(
            None, help="override: training steps per model (the work budget)"
        ),
        time_cap_minutes: float = typer.Option(
            None,
            help="override: wall-clock safety cap per trained model; a run it stops is flagged "
            "as not comparable",
        ),
    ) -> None:
        """Run the whole chain: corpora -> tokenizer -> train MoE (+ dense) -> trace -> analyses ->
        predictors -> offload replay + live offloaded generation -> report.html + summary.json."""
        from moelab.demo.pipeline import DemoConfig, run_demo

        cfg = DemoConfig.make(
            quick=quick, out=out, seed=seed, max_steps=max_steps, time_cap_minutes=time_cap_minutes
        )
        if model == "smollm2-moe":
            from moelab.demo.smollm2 import run_smollm2_demo

            run_smollm2_demo(cfg, force=force)
            return
        if model != "default":
            from moelab.errors import ConfigError

            raise ConfigError(f"--model {model!r}: expected 'default' or 'smollm2-moe'")
        run_demo(cfg, force=force)
