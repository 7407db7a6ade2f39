"""CLI: `moelab trace` (record router decisions into a TraceStore; runs under torchrun),
`moelab trace-verify` (full integrity check of a store) and `moelab trace-export`
(MoE-Infinity expert activation matrices)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer


def _int_list(text: str | None) -> list[int] | None:
    """Parse "0,2,5" or "0-3" into a list of ints (None/"all" = every layer)."""
    from moelab.errors import ConfigError

    if text is None or text.strip().lower() in ("", "all"):
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ConfigError(
            f"--hidden-layers={text!r}: expected MoE layer numbers like '0,3,5' or '0-7'"
        ) from None
    return out


SPLIT_CHOICES = ("train", "validation", "test", "all")


def select_split(docs: list, split: str, corpus: str, seed: int) -> list:
    """The documents of `split` ("all" = every document); ConfigError if it selects none."""
    from moelab.data import split_documents
    from moelab.errors import ConfigError

    if split not in SPLIT_CHOICES:
        raise ConfigError(f"--split {split!r}: expected one of {', '.join(SPLIT_CHOICES)}")
    if split == "all":
        return list(docs)
    parts = split_documents(docs, seed=seed)
    if not parts[split]:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in parts.items())
        raise ConfigError(
            f"--split {split}: selects no documents: corpus {corpus!r} has {len(docs)}"
            f" document(s), split by document (80/10/10 by a seeded hash of each id, seed {seed})"
            f" into {sizes}. Pass --split all to trace every document (or another split,"
            " or a larger corpus); nothing was traced"
        )
    return parts[split]


def _summary(store: object, elapsed: float, tokens_before: int) -> None:
    """Print the end-of-run table."""
    from rich.console import Console
    from rich.table import Table

    m = store.meta  # type: ignore[attr-defined]
    n = store.num_tokens  # type: ignore[attr-defined]
    nbytes = store.nbytes()  # type: ignore[attr-defined]
    t = Table(title=f"trace written to {store.path}")  # type: ignore[attr-defined]
    t.add_column("quantity")
    t.add_column("value", justify="right")
    rows = [
        ("model family", m.family),
        ("MoE layers x experts x k", f"{m.num_layers} x {m.num_experts} x {m.top_k}"),
        ("tokens", f"{n:,}"),
        ("documents", f"{m.extra.get('run', {}).get('num_docs', '?')}"),
        ("shards", f"{len(store.shards)}"),  # type: ignore[attr-defined]
        ("logits recorded", str(store.has_logits)),  # type: ignore[attr-defined]
        ("hidden side store", ", ".join(m.extra.get("hidden_points", [])) or "no"),
        ("size on disk", f"{nbytes / 1e6:.2f} MB"),
        ("bytes / token / layer (compressed)", f"{nbytes / max(n, 1) / max(m.num_layers, 1):.2f}"),
        ("elapsed", f"{elapsed:.1f} s"),
        ("tokens / s (this run)", f"{(n - tokens_before) / max(elapsed, 1e-9):,.0f}"),
    ]
    for a, b in rows:
        t.add_row(a, b)
    Console().print(t)


def register(app: typer.Typer) -> None:
    """Add `trace`, `trace-verify` and `trace-export` to the moelab app."""

    @app.command("trace")
    def trace(
        model: Path = typer.Option(
            ..., "--model", help="local moelab checkpoint dir or transformers model dir"
        ),
        out: Path = typer.Option(..., "--out", help="trace store directory (resumed if it exists)"),
        corpus: str = typer.Option("default", help="built-in corpus name or a file/folder path"),
        split: str = typer.Option(
            "test",
            help="document split: train, validation, test (80/10/10 by document, seeded) or all"
            " (every document, e.g. for a user corpus)",
        ),
        text_column: str = typer.Option(
            "text", "--text-column", help="text field of JSONL/Parquet/datasets corpora"
        ),
        max_tokens: int = typer.Option(None, "--max-tokens", help="stop after this many tokens"),
        max_bytes: int = typer.Option(None, "--max-bytes", help="cap on corpus bytes read"),
        tokenizer: Path = typer.Option(
            None, help="tokenizer.json or HF tokenizer dir (default: the model's)"
        ),
        logits: bool = typer.Option(
            False, "--logits/--no-logits", help="record full router logits"
        ),
        hidden_layers: str = typer.Option(
            None, "--hidden-layers", help="MoE layers for hidden states, e.g. 0,4-7"
        ),
        hidden_rate: float = typer.Option(
            0.0, "--hidden-rate", help="fraction of tokens whose hidden states are kept"
        ),
        hidden_points: str = typer.Option(
            "router_input", help="router_input and/or residual, comma separated"
        ),
        seq_len: int = typer.Option(
            None, "--seq-len", help="context length; longer documents are chunked"
        ),
        batch_size: int = typer.Option(8, "--batch-size", help="sequences per forward pass"),
        shard_tokens: int = typer.Option(65536, "--shard-tokens", help="rows per Parquet shard"),
        device: str = typer.Option("cpu", help="torch device"),
        dtype: str = typer.Option("auto", help="float32, bfloat16, float16 or auto (as saved)"),
        seed: int = typer.Option(0, help="seed for splits and hidden-state sampling"),
        model_class: str = typer.Option(
            None,
            "--model-class",
            help="transformers class to load the model with (default: config.architectures,"
            " else the auto class of its model_type), e.g. Qwen3MoeForCausalLM",
        ),
        logits_dtype: str = typer.Option(
            "float16",
            "--logits-dtype",
            help="float16 (default; rounds logits by up to ~1e-3 relative) or float32 (exact)",
        ),
    ) -> None:
        """Run an MoE model over a corpus split and record every router decision (resumable;
        under torchrun each process traces a disjoint share of the documents)."""
        opts = {k: v for k, v in locals().items() if v is not None}
        import torch

        from moelab.data import load_corpus, load_tokenizer
        from moelab.errors import ConfigError, ModelError
        from moelab.trace.api import check_trace_options, find_tokenizer, trace_model
        from moelab.trace.store import rows_on_disk

        # validate everything cheap before reading the corpus or writing anything
        check_trace_options(seq_len, max_tokens, batch_size, shard_tokens, hidden_rate)
        if max_bytes is not None and max_bytes < 1:
            raise ConfigError(f"--max-bytes {max_bytes}: expected an integer >= 1 (bytes)")
        if split not in SPLIT_CHOICES:
            raise ConfigError(f"--split {split!r}: expected one of {', '.join(SPLIT_CHOICES)}")
        if logits_dtype not in ("float16", "float32"):
            raise ConfigError(
                f"--logits-dtype {logits_dtype}: expected float16 or float32; nothing was traced"
            )
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo" if device == "cpu" else "nccl")
        docs = load_corpus(corpus, max_bytes=max_bytes, seed=seed, text_column=text_column)
        selected = select_split(docs, split, corpus, seed)
        if not model.exists():
            raise ModelError(
                f"--model {model}: model path does not exist (expected a moelab checkpoint dir"
                " or a local transformers model dir)"
            )
        tok = load_tokenizer(tokenizer) if tokenizer is not None else find_tokenizer(model)
        before = rows_on_disk(out)  # tolerant: a damaged store is repaired by this run
        t0 = time.perf_counter()
        store = trace_model(
            model,
            selected,
            tok,
            out,
            split=split,
            logits=logits,
            hidden_layers=_int_list(hidden_layers),
            hidden_rate=hidden_rate,
            hidden_points=tuple(p.strip() for p in hidden_points.split(",") if p.strip()),
            device=device,
            dtype=dtype,
            seq_len=seq_len,
            batch_size=batch_size,
            max_tokens=max_tokens,
            shard_tokens=shard_tokens,
            corpus=corpus,
            seed=seed,
            model_class=model_class,
            logits_dtype=logits_dtype,
            command="moelab trace "
            + " ".join(
                (
                    f"--{k.replace('_', '-')}"
                    if v is True
                    else f"--no-{k.replace('_', '-')}"
                    if v is False
                    else f"--{k.replace('_', '-')} {v}"
                )
                for k, v in opts.items()
            ),
        )
        if int(os.environ.get("RANK", "0")) == 0:
            _summary(store, time.perf_counter() - t0, before)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    @app.command("trace-verify")
    def trace_verify(
        store: Path = typer.Argument(..., help="trace store directory"),
    ) -> None:
        """Check a trace store completely (every shard and row, done markers, documents, hidden
        files): exit 0 with a summary, or exit 2 listing what is wrong and what to do."""
        from moelab.trace.store import verify_store

        rep = verify_store(store)
        if not rep.ok:
            typer.echo(f"{store}: {len(rep.problems)} problem(s)", err=True)
            for prob in rep.problems:
                typer.echo(f"error: {prob}", err=True)
            raise typer.Exit(2)
        s = rep.summary
        typer.echo(
            f"{store}: ok: {s['tokens']:,} tokens in {s['shards']} shards, {s['documents']}"
            f" documents, {s['layers x experts x k']} (MoE layers x experts x k), logits"
            f" {s['logits']}, hidden {s['hidden']}, model {s['model']} (fingerprint"
            f" {s['model fingerprint']})"
        )

    @app.command("trace-export")
    def trace_export(
        store: Path = typer.Argument(..., help="trace store directory"),
        out: Path = typer.Option(
            ..., "--out", help="output .npy (MoE-Infinity expert activation matrices)"
        ),
        layer_axis: str = typer.Option(None, help="'model' (all transformer layers) or 'moe'"),
    ) -> None:
        """Export per-document expert activation counts in MoE-Infinity's .npy format."""
        from moelab.trace.export import export_moe_infinity

        path = export_moe_infinity(store, out, layer_axis)
        typer.echo(f"wrote {path}")
