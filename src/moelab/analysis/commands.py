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
    ) -> None:
        """Analyse routing in a trace: usage, balance, transitions, co-activation, repeats,
        trajectories, specialisation, predictability (and saturation, projections)."""
        from moelab.analysis.run import analyze, check_analyze_options

        check_analyze_options(n, max_points, min_count)  # before reading or writing anything
        tr, _ = _load(trace)
        tok, tok_note = trace_tokenizer(trace, tr.meta, tokenizer)
        if tok_note:
            typer.echo(tok_note)
        cmp_trace = _load(compare)[0] if compare is not None else None
        nums = analyze(
            tr,
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
        typer.echo(
            f"wrote {out / 'report.html'} ({len(nums['files'])} files); skipped: {list(nums['skipped']) or 'none'}"
        )
