"""CLI commands of the layer library (the layers demo until later stages extend `moelab demo`)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the layer-library commands to the moelab app."""

    @app.command("layers-demo")
    def layers_demo(
        tokens: int = typer.Option(512, help="random tokens per block"),
        d_model: int = typer.Option(64, help="hidden size"),
        experts: int = typer.Option(8, help="number of experts E"),
        top_k: int = typer.Option(2, help="experts per token k"),
        seed: int = typer.Option(0, help="random seed"),
    ) -> None:
        """Build an MoE block of every router type, run forward/backward on random tokens and
        print routing statistics and losses per router."""
        from moelab.layers.demo import run_layers_demo

        run_layers_demo(tokens=tokens, d_model=d_model, experts=experts, top_k=top_k, seed=seed)
