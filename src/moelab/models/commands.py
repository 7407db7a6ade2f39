"""CLI commands of the models stage: `moelab calc` (scaling calculator) and `moelab export`."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add `calc` and `export` to the moelab app."""

    @app.command("calc")
    def calc(
        preset: str = typer.Option(None, help="preset name, e.g. Mixtral-8x7B (see --list)"),
        config: Path = typer.Option(
            None, help="JSON/YAML ArchSpec or MoETransformerConfig, or a model directory"
        ),
        memory_gb: float = typer.Option(
            None,
            "--memory-gb",
            help="accelerator memory in GiB: how many KV tokens fit beside the weights",
        ),
        dtype: str = typer.Option(
            "bf16", help="weight precision for the memory fit: fp32|bf16|fp8|int4"
        ),
        kv_dtype: str = typer.Option("bf16", help="KV cache precision: fp32|bf16|fp8"),
        seq_len: int = typer.Option(
            4096, help="context length for attention FLOPs and sequences that fit"
        ),
        list_presets: bool = typer.Option(False, "--list", help="list the presets and exit"),
        as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    ) -> None:
        """Total vs active parameters, FLOPs per token, weight memory per precision, KV cache per
        token and KV tokens that fit in --memory-gb (Yun et al. 2024, inference-optimal MoE)."""
        from rich.console import Console
        from rich.table import Table

        from moelab.errors import InputError
        from moelab.models.calc import GIB, PRESETS, calculate, get_preset, load_spec

        console = Console()
        if list_presets:
            for name, spec in PRESETS.items():
                console.print(f"{name:18s} {spec.source}")
            return
        if (preset is None) == (config is None):
            raise InputError("calc: give exactly one of --preset NAME or --config FILE (or --list)")
        spec = get_preset(preset) if preset is not None else load_spec(config)
        r = calculate(
            spec, seq_len=seq_len, memory_gib=memory_gb, weight_dtype=dtype, kv_dtype=kv_dtype
        )
        if as_json:
            typer.echo(json.dumps(r.to_dict(), indent=2))
            return
        t = Table(title=f"{r.name}" + (f"  ({spec.source})" if spec.source else ""))
        t.add_column("quantity")
        t.add_column("value", justify="right")
        t.add_row("total parameters", f"{r.total_params / 1e9:,.3f} B")
        if spec.published_total:
            t.add_row("  published total", f"{spec.published_total / 1e9:,.3f} B")
        t.add_row("active parameters / token", f"{r.active_params / 1e9:,.3f} B")
        if spec.published_active:
            t.add_row("  published active", f"{spec.published_active / 1e9:,.3f} B")
        t.add_row("active fraction", f"{100 * r.active_params / r.total_params:.1f} %")
        t.add_row("routed expert parameters", f"{r.expert_params / 1e9:,.3f} B")
        t.add_row(
            f"forward FLOPs / token (seq {r.seq_len})", f"{r.flops_per_token_fwd / 1e9:,.2f} G"
        )
        t.add_row("training FLOPs / token (3x)", f"{r.flops_per_token_train / 1e9:,.2f} G")
        for d, b in r.weight_bytes.items():
            t.add_row(f"weights {d}", f"{b / GIB:,.2f} GiB")
        t.add_row(f"KV cache / token ({r.kv_dtype})", f"{r.kv_bytes_per_token / 1024:,.1f} KiB")
        if r.memory_gib is not None:
            t.add_row(
                f"KV tokens in {r.memory_gib:g} GiB ({r.weight_dtype} weights)",
                f"{r.kv_tokens_fit:,}",
            )
            t.add_row(f"sequences of {r.seq_len} that fit", f"{r.sequences_fit:,}")
        console.print(t)

    @app.command("export")
    def export(
        model_dir: Path = typer.Argument(
            ..., help="moelab model directory (written by MoETransformer.save)"
        ),
        out_dir: Path = typer.Argument(
            ..., help="output directory for the transformers checkpoint"
        ),
        check: bool = typer.Option(True, help="reload with transformers and compare logits"),
        seed: int = typer.Option(0, help="seed of the random tokens used by --check"),
    ) -> None:
        """Export to transformers format (Mixtral, Qwen2-MoE or Llama) and verify the logits."""
        import torch

        from moelab.errors import ModelError
        from moelab.models.export import export_hf
        from moelab.models.transformer import MoETransformer

        model = MoETransformer.load(model_dir)
        out = export_hf(model, out_dir)
        typer.echo(f"wrote {out}")
        if check:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(out).eval()
            g = torch.Generator().manual_seed(seed)
            x = torch.randint(
                0, model.cfg.vocab_size, (2, min(16, model.cfg.max_seq_len)), generator=g
            )
            with torch.no_grad():
                diff = (model(x).logits - hf(x).logits).abs().max().item()
            typer.echo(f"{type(hf).__name__}: max |logit difference| = {diff:.2e}")
            if diff > 1e-4:
                raise ModelError(f"export check failed: logits differ by {diff:.2e} (> 1e-4)")
