"""CLI: `moelab corpora` lists the built-in corpora, their sizes here and how to install them."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add `corpora` to the moelab app."""

    @app.command("corpora")
    def corpora() -> None:
        """List built-in corpora: availability on this machine, size, domain and install hint."""
        from rich.console import Console
        from rich.table import Table

        from moelab.data.corpora import DEFAULT_MIX, list_corpora

        t = Table(title="built-in corpora (read from installed files, never downloaded)")
        for col in ("name", "domain", "available", "size", "in default (cap)", "install"):
            t.add_column(col)
        for c in list_corpora():
            cap = DEFAULT_MIX.get(c.name)
            t.add_row(
                c.name,
                c.domain,
                "[green]yes[/green]" if c.available else "[red]no[/red]",
                f"{c.size_bytes / 1e6:.1f} MB" if c.available else "-",
                f"{cap / 1e6:.1f} MB" if cap else "",
                "" if c.available else c.install_hint,
            )
        Console().print(t)
        typer.echo(
            "user corpora: pass a text file, a folder, JSONL/Parquet (--text-column) or a saved `datasets` folder"
        )
