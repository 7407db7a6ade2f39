"""CLI: `moelab analyze TRACE --out DIR` runs every routing analysis and writes report.html."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def _load(path: Path):  # noqa: ANN202 - returns (Trace, TraceStore)
    try:
        from moelab.trace.store import TraceStore
    except ImportError as exc:  # the store lands with the tracing stage
        from moelab.errors import TraceError

        raise TraceError(
            f"cannot read {path}: moelab.trace.store is not available ({exc})"
        ) from exc
    store = TraceStore.open(path)
    return store.load(), store


def loaded_bytes(meta: Any, logits: bool) -> int:
    """Bytes per token of a loaded Trace (ids int16, weights and logits float32, base columns)."""
    per = meta.num_layers * meta.top_k * (2 + 4) + 23
    return per + (meta.num_layers * meta.num_experts * 4 if logits else 0)


def open_source(
    path: Path,
    compare: Path | None,
    engine: str,
    master: str | None,
    memory_limit: str | None,
    sample_tokens: int,
    seed: int,
) -> tuple[Any, Any]:
    """(source for analyze, compare source or Trace) for the CLI's engine options."""
    from moelab.analysis.engines import ENGINES, open_engine, parse_bytes
    from moelab.analysis.sources import StoreSource, TraceSource
    from moelab.errors import ConfigError
    from moelab.trace.store import TraceStore

    limit = parse_bytes(memory_limit)
    if sample_tokens < 1:
        raise ConfigError(f"--sample-tokens {sample_tokens}: expected >= 1; nothing was written")
    if engine == "memory":
        if master:
            raise ConfigError("--master is a Spark option; use it with --engine spark")
        store = TraceStore.open(path)
        need = store.num_tokens * loaded_bytes(store.meta, store.has_logits)
        if limit and need > limit:
            raise ConfigError(
                f"--engine memory would load {need / 2**30:.2f} GiB ({store.num_tokens} tokens)"
                f" but --memory-limit is {limit / 2**30:.2f} GiB; use --engine duckdb (out of"
                " core) or raise the limit"
            )
        tr = store.load()
        cmp_tr = TraceStore.open(compare).load() if compare is not None else None
        return TraceSource(tr), cmp_tr
    if engine not in ENGINES:
        raise ConfigError(f"--engine {engine!r}: expected duckdb, spark or memory")
    TraceStore.open(path)  # the store's invariants, before any query
    eng = open_engine(path, engine, memory_limit=limit, master=master)
    if limit:  # the sample is loaded in memory: keep it within a quarter of the limit
        per = loaded_bytes(eng.meta, bool(eng.meta.extra.get("logits", False)))
        sample_tokens = max(1, min(sample_tokens, limit // 4 // per))
    src = StoreSource(eng, sample_tokens=sample_tokens, seed=seed)
    cmp_src = None
    if compare is not None:
        TraceStore.open(compare)
        from moelab.analysis.engines import DuckDBEngine

        cmp_src = StoreSource(DuckDBEngine(compare, limit), sample_tokens, seed)
    return src, cmp_src


def trace_tokenizer(store: Path, meta: Any, tokenizer: Path | None) -> tuple[Any, str]:
    """(tokenizers.Tokenizer or None, a note when none could be loaded).

    --tokenizer wins (a tokenizer.json, or a dir holding one); else the copy `moelab trace`
    keeps in the store; else meta.tokenizer when it names an existing file or dir."""
    from tokenizers import Tokenizer

    from moelab.errors import DataError

    def load(p: Path) -> Any:
        f = p / "tokenizer.json" if p.is_dir() else p
        try:
            return Tokenizer.from_file(str(f))
        except Exception as exc:  # noqa: BLE001 - any parse failure is one clear error
            raise DataError(
                f"tokenizer {f}: cannot be read as a tokenizer.json ({str(exc)[:120]})"
            ) from None

    if tokenizer is not None:
        f = tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
        if not f.is_file():
            raise DataError(f"--tokenizer {tokenizer}: file not found; expected a tokenizer.json")
        return load(f), ""
    cands = [Path(store) / "tokenizer.json"]
    if meta.tokenizer:
        cands.append(Path(meta.tokenizer))
    for c in cands:
        if (c / "tokenizer.json" if c.is_dir() else c).is_file():
            return load(c), ""
    return None, (
        f"note: no tokenizer could be loaded for this trace (meta.json says"
        f" {meta.tokenizer or 'nothing'!r}; no tokenizer.json in {store}): expert top tokens"
        " show raw token ids and token classes are skipped. Pass --tokenizer PATH/tokenizer.json."
    )


def register(app: typer.Typer) -> None:
    """Add the `analyze` command to the moelab app."""

    @app.command("analyze")
    def analyze_cmd(
        trace: Path = typer.Argument(..., help="TraceStore directory (meta.json + shards/)"),
        out: Path = typer.Option(
            ..., "--out", help="output directory for numbers, figures and report.html"
        ),
        tokenizer: Path = typer.Option(
            None, help="tokenizer.json to decode tokens (default: the trace's own)"
        ),
        compare: Path = typer.Option(
            None, help="trace of an earlier checkpoint on the same text (saturation)"
        ),
        token: list[int] = typer.Option(None, help="token id(s) for per-token usage (repeatable)"),
        context: list[int] = typer.Option(
            None, help="previous id(s) before the first --token, oldest first"
        ),
        n: int = typer.Option(1, help="layer distance for transitions (l -> l+n)"),
        min_count: int = typer.Option(10, help="minimum occurrences for per-token ratios"),
        doc: int = typer.Option(
            None, help="document id for the token x layer grid (default: first)"
        ),
        max_points: int = typer.Option(2000, help="tokens sampled for projections"),
        no_projections: bool = typer.Option(False, help="skip PCA/t-SNE/UMAP"),
        no_figures: bool = typer.Option(
            False, help="write numbers and tables only (no PNG/plotly)"
        ),
        seed: int = typer.Option(0, help="random seed"),
        engine: str = typer.Option(
            "duckdb",
            help="duckdb | spark: count-based analyses out of core over the shards;"
            " memory: load the whole trace (the reference path)",
        ),
        master: str = typer.Option(
            None, help="Spark master URL (default local[1]; e.g. spark://host:7077)"
        ),
        memory_limit: str = typer.Option(
            None, help="memory for the engine and the sample, e.g. 4GiB (DuckDB spills beyond it)"
        ),
        sample_tokens: int = typer.Option(
            200_000,
            help="tokens (whole documents, stratified by domain) for the sample-based analyses"
            " (trajectories, projections, token grid, saturation) with --engine duckdb|spark",
        ),
    ) -> None:
        """Analyse routing in a trace: usage, balance, transitions, co-activation, repeats,
        trajectories, specialisation, predictability (and saturation, projections)."""
        from moelab.analysis.run import analyze, check_analyze_options

        check_analyze_options(n, max_points, min_count)  # before reading or writing anything
        src, cmp_trace = open_source(
            trace, compare, engine, master, memory_limit, sample_tokens, seed
        )
        tok, tok_note = trace_tokenizer(trace, src.meta, tokenizer)
        if tok_note:
            typer.echo(tok_note)
        nums = analyze(
            src,
            out,
            tokenizer=tok,
            compare=cmp_trace,
            token_ids=token or None,
            context=context or None,
            n=n,
            min_count=min_count,
            text_doc=doc,
            max_points=max_points,
            do_projections=not no_projections,
            figures=not no_figures,
            seed=seed,
        )
        src.close()
        if cmp_trace is not None and hasattr(cmp_trace, "close"):
            cmp_trace.close()
        typer.echo(
            f"wrote {out / 'report.html'} ({len(nums['files'])} files); skipped: {list(nums['skipped']) or 'none'}"
        )
