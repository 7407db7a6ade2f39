"""The `moelab` command line (typer). Each stage's commands live in `moelab/<stage>/commands.py`
as a `register(app)` function; this module only assembles them."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="moelab",
    help="Mixture-of-Experts toolkit: layers, models, routing traces, analyses, predictors, offloading.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# One line per stage module; each defines register(app: typer.Typer) -> None.
COMMAND_MODULES = [
    "moelab.demo.commands",
    "moelab.moefy.commands",
    "moelab.layers.commands",
    "moelab.data.commands",
    "moelab.train.commands",
    "moelab.models.commands",
    "moelab.analysis.commands",
    "moelab.trace.commands",
    "moelab.offload.commands",
    "moelab.predict.commands",
    "moelab.explore.commands",
    "moelab.experts.commands",
]

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    """Entry point that turns MoelabError into a one-line message and exit code 2."""
    from moelab.errors import MoelabError

    try:
        app()
    except MoelabError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
