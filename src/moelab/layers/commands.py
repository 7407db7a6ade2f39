"""CLI commands of the layer library (the layers demo until later stages extend `moelab demo`)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the layer-library commands to the moelab app."""

    @app.command("layers-demo")
    def layers_demo(
        tokens: int = typer.Option(512, min=1, help="random tokens per block"),
        d_model: int = typer.Option(64, min=1, help="hidden size"),
        experts: int = typer.Option(8, min=1, help="number of experts E"),
        top_k: int = typer.Option(2, min=1, help="experts per token k (at most --experts)"),
        seed: int = typer.Option(0, help="random seed"),
    ) -> None:
        """Build an MoE block of every router type, run forward/backward on random tokens and
        print routing statistics and losses per router."""
        from moelab.errors import ConfigError
        from moelab.layers.demo import run_layers_demo

        if top_k > experts:
            raise ConfigError(
                f"--top-k {top_k} is larger than --experts {experts}: each token picks k of the"
                " E experts, so k must be <= E"
            )
        run_layers_demo(tokens=tokens, d_model=d_model, experts=experts, top_k=top_k, seed=seed)
