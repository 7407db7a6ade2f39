"""CLI: `moelab explore TRACE [--port 8765] [--host 127.0.0.1]` serves the explorer page."""

from __future__ import annotations

from pathlib import Path

import typer

DEFAULT_HOST = "127.0.0.1"  # local only unless told otherwise
DEFAULT_PORT = 8765


def register(app: typer.Typer) -> None:
    """Add the `explore` command to the moelab app."""

    @app.command("explore")
    def explore_cmd(
        trace: Path = typer.Argument(..., help="TraceStore directory (meta.json + shards/)"),
        port: int = typer.Option(DEFAULT_PORT, help="TCP port of the local server"),
        host: str = typer.Option(DEFAULT_HOST, help="address to bind (default: this machine only)"),
        cache: Path = typer.Option(
            None, help="folder for the per-token cache (default: TRACE/cache/explore)"
        ),
        tokenizer: Path = typer.Option(
            None, help="tokenizer.json to decode tokens (default: the trace's own)"
        ),
        holdout: float = typer.Option(
            0.2, help="share of documents held out to score the predictor hit rate"
        ),
        seed: int = typer.Option(0, help="seed of the held-out document split"),
        threads: int = typer.Option(None, help="DuckDB threads (default: all cores)"),
    ) -> None:
        """Serve a local page to look at a trace's routing token by token."""
        from rich.console import Console

        from moelab.errors import ConfigError
        from moelab.explore.app import create_app
        from moelab.explore.queries import open_explorer

        if not 0 < port < 65536:
            raise ConfigError(f"--port {port}: expected a TCP port in 1..65535")
        console = Console(stderr=True)
        with console.status(f"opening {trace} (building the per-token cache on first use)"):
            ex = open_explorer(trace, cache, tokenizer, holdout, seed, threads)
        import uvicorn

        console.print(
            f"{ex.num_rows} tokens, cache {ex.cache_path}; serving on http://{host}:{port}/"
            " (Ctrl+C stops)"
        )
        uvicorn.run(create_app(ex), host=host, port=port, log_level="warning")
