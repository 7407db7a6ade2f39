"""CLI: `moelab train`, `moelab compare`, `moelab sweep` and `moelab topics`.

Every TrainConfig field is a flag of `train` and `compare` (``--d-model 64``, ``--no-tensorboard``,
...), generated from the pydantic model so the CLI and the config can never drift apart. Values
combine as: ``--quick`` preset < ``--config run.yaml`` < explicit flags.
"""

from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import typer

_RUN_FLAGS = ("config", "quick", "resume")


def _base_type(annotation: Any) -> type:
    """int / float / str / bool behind `X | None`, `Optional[X]` or `Literal[...]`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is Literal:
        return type(typing.get_args(annotation)[0])
    return annotation


def _config_parameters() -> list[inspect.Parameter]:
    """One keyword parameter (typer Option, default None = not given) per TrainConfig field."""
    from moelab.train.config import TrainConfig

    params = [
        inspect.Parameter(
            "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
            default=typer.Option(None, "--config", help="YAML file with TrainConfig fields"),
        ),
        inspect.Parameter(
            "quick", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
            default=typer.Option(False, "--quick", help="tiny model and data for a fast try-out"),
        ),
        inspect.Parameter(
            "resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
            default=typer.Option(True, "--resume/--no-resume", help="continue from the last checkpoint"),
        ),
    ]  # fmt: skip
    for name, field in TrainConfig.model_fields.items():
        base = _base_type(field.annotation)
        flag = name.replace("_", "-")
        choices = (
            typing.get_args(field.annotation)
            if typing.get_origin(field.annotation) is Literal
            else None
        )
        help_text = f"{field.description} [default: {field.default}]"
        if choices:
            help_text += f" (one of {', '.join(map(str, choices))})"
        decl = f"--{flag}/--no-{flag}" if base is bool else f"--{flag}"
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[base],
                default=typer.Option(None, decl, help=help_text, show_default=False),
            )
        )  # fmt: skip
    return params


def _with_config_flags(func: Any) -> Any:
    """Give `func(**kwargs)` a signature with every TrainConfig flag (for typer)."""
    params = _config_parameters()
    func.__signature__ = inspect.Signature(params)
    func.__annotations__ = {p.name: p.annotation for p in params}
    return func


def _config_from_flags(kwargs: dict[str, Any], default_out: str | None = None) -> Any:
    from moelab.train.config import load_train_config

    config, quick = kwargs.pop("config"), kwargs.pop("quick")
    kwargs.pop("resume", None)
    if default_out is not None and kwargs.get("out_dir") is None:
        kwargs["out_dir"] = default_out
    return load_train_config(config, quick=quick, **kwargs)


def print_train_summary(result: Any) -> None:
    """Table: perplexity vs unigram baseline and per-layer routing health."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"trained {result.steps} steps ({result.stopped}) -> {result.model_dir}")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("validation perplexity", f"{result.final_val_ppl:.2f}")
    t.add_row("unigram baseline perplexity", f"{result.unigram_ppl:.2f}")
    t.add_row(
        "total / active params",
        f"{result.stats['total_params']:,} / {result.stats['active_params']:,}",
    )
    if result.evals:
        e = result.evals[-1]
        t.add_row("tokens / training s", f"{e['tokens']:,} / {e['train_seconds']:.1f}")
    con.print(t)
    if result.warning:
        con.print(f"[bold red]WARNING[/bold red]: {result.warning}")
    if result.expert_load:
        lt = Table(title="expert load in the last logging window")
        for col in ("layer", "max load / uniform", "dead experts", "load per expert"):
            lt.add_column(col)
        el = result.expert_load
        for j, layer in enumerate(el["layers"]):
            loads = " ".join(f"{x:.2f}" for x in el["load"][j])
            lt.add_row(str(layer), f"{el['max_over_uniform'][j]:.2f}", str(el["dead"][j]), loads)
        con.print(lt)


def register(app: typer.Typer) -> None:
    """Add `train`, `compare`, `sweep` and `topics` to the moelab app."""

    def train_cmd(**kwargs: Any) -> None:
        """Train an MoE (or dense) language model: causal LM or MLM, resumable, logged."""
        import os

        from moelab.train.loop import train

        resume = kwargs["resume"]
        cfg = _config_from_flags(kwargs)
        result = train(cfg, resume=resume)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
            print_train_summary(result)

    app.command("train")(_with_config_flags(train_cmd))

    def compare_cmd(**kwargs: Any) -> None:
        """Train MoE and its equal-active-FLOPs dense model; plot perplexity vs FLOPs and time."""
        from moelab.train.compare import compare

        resume = kwargs["resume"]
        cfg = _config_from_flags(kwargs, default_out="runs/compare")
        compare(cfg, cfg.out_dir, resume=resume)

    app.command("compare")(_with_config_flags(compare_cmd))

    @app.command("sweep")
    def sweep_cmd(
        experts: Optional[str] = typer.Option(
            None, help="expert counts E, comma-separated [default: 1,2,4,8,16; --quick 1,2,4,8]"
        ),
        sizes: Optional[str] = typer.Option(
            None,
            help="dense sizes (d_model), comma-separated, >= 2 [default: 32,64; --quick 16,32]",
        ),
        budget: Optional[int] = typer.Option(
            None,
            help="training tokens per run, the same for every run [default: 400000; --quick 1280]",
        ),
        holdout: Optional[int] = typer.Option(
            4, help="expert count left out of the fit and predicted (0 = none)"
        ),
        out_dir: Path = typer.Option(
            Path("runs/sweep"), help="sweep folder (one sub-folder per run)"
        ),
        quick: bool = typer.Option(False, "--quick", help="tiny models and data (tests)"),
        corpus: Optional[str] = typer.Option(None, help="corpus (default: the sweep's own)"),
        n_layers: Optional[int] = typer.Option(None, help="transformer layers"),
        seq_len: Optional[int] = typer.Option(None, help="tokens per block"),
        batch_size: Optional[int] = typer.Option(None, help="blocks per step"),
        router: Optional[str] = typer.Option(None, help="top-1 router (default switch)"),
        lr: Optional[float] = typer.Option(None, help="peak learning rate"),
        test_blocks: int = typer.Option(64, help="test-split blocks for the held-out loss"),
        threads: int = typer.Option(1, help="torch threads"),
        device: str = typer.Option("cpu", help="torch device"),
        seed: int = typer.Option(0, help="random seed"),
        resume: bool = typer.Option(True, "--resume/--no-resume", help="skip finished runs"),
    ) -> None:
        """Loss over the number of experts at equal active FLOPs and tokens; Clark et al. law."""
        from moelab.errors import ConfigError
        from moelab.train.sweep import DEFAULTS, QUICK, sweep

        def ints(text: str, name: str) -> list[int]:
            try:
                return [int(v) for v in text.split(",") if v.strip()]
            except ValueError:
                raise ConfigError(f"--{name} {text!r}: expected comma-separated ints") from None

        experts = experts or ("1,2,4,8" if quick else "1,2,4,8,16")
        sizes = sizes or ("16,32" if quick else "32,64")
        budget = budget or (1280 if quick else 400_000)
        base = dict(QUICK if quick else DEFAULTS)
        given = {"corpus": corpus, "n_layers": n_layers, "seq_len": seq_len, "batch_size": batch_size,
                 "router": router, "lr": lr}  # fmt: skip
        base.update({k: v for k, v in given.items() if v is not None})
        base.update({"threads": threads, "device": device, "seed": seed})
        sweep(
            ints(experts, "experts"), ints(sizes, "sizes"), budget, out_dir,
            holdout=holdout or None, base=base, test_blocks=test_blocks, resume=resume,
        )  # fmt: skip

    @app.command("topics")
    def topics_cmd(
        run_dir: Path = typer.Argument(..., help="folder of a `moelab train` run"),
        split: str = typer.Option("validation", help="data split: train, validation or test"),
        max_blocks: int = typer.Option(256, help="blocks of seq_len tokens to route"),
        batch_size: int = typer.Option(16, help="blocks per forward pass"),
        out: Optional[Path] = typer.Option(None, help="output folder (default: RUN_DIR/topics)"),
        device: str = typer.Option("cpu", help="torch device"),
    ) -> None:
        """Expert activation share per domain and MoE layer (PNG histograms + JSON)."""
        import yaml

        from moelab.data.dataset import pack_blocks
        from moelab.data.prepare import load_prepared
        from moelab.errors import DataError
        from moelab.models import MoETransformer
        from moelab.train.topics import topic_histograms

        cfg_path = run_dir / "train_config.yaml"
        if not cfg_path.is_file():
            raise DataError(f"{run_dir} is not a training run folder (no train_config.yaml)")
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        data = load_prepared(cfg.get("data_dir") or run_dir / "data")
        if split not in data.streams:
            raise DataError(
                f"split {split!r} not found in {data.root}; have {sorted(data.streams)}"
            )
        model = MoETransformer.load(run_dir / "model", device=device)
        blocks = pack_blocks(data.streams[split], model.cfg.max_seq_len, max_blocks=max_blocks)
        res = topic_histograms(
            model, blocks, out or run_dir / "topics", batch_size=batch_size, device=device
        )
        typer.echo(f"wrote {(out or run_dir / 'topics')}/topic_histograms.png and topics.json")
        for d, name in enumerate(res["domains"]):
            tv = ", ".join(f"{v:.2f}" for v in res["tv_from_overall"][d])
            typer.echo(f"  {name:>22}: TV distance from overall expert mix per layer: {tv}")
