"""`analyze(trace, out_dir)`: run every routing analysis of the registry
(moelab.analysis.steps), write numbers (JSON + CSV), figures (PNG + interactive plotly HTML)
and a self-contained report.html with captions that say what each figure shows and what
chance looks like.

`trace` is an in-memory Trace or a StoreSource (a trace store on DuckDB or Spark: the
count-based analyses run out of core, the sample-based ones on a seeded document sample).
Analyses that cannot run on a trace (no logits, k=1, one document, no tokenizer) are skipped with
the reason recorded in numbers.json["skipped"] and shown in the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.progress import Progress

from moelab._io import atomic_write_json
from moelab.analysis import specialization
from moelab.analysis._common import check_trace
from moelab.analysis.output import Out, finite
from moelab.analysis.sources import StoreSource, TraceSource
from moelab.analysis.steps import Context, analyses
from moelab.errors import AnalysisError, ConfigError
from moelab.report import Report
from moelab.trace.schema import Trace

MIN_POINTS = 10  # projections need at least this many tokens (5-NN with cross-validation)


def check_analyze_options(n: int = 1, max_points: int = 2000, min_count: int = 10) -> None:
    """ConfigError (naming the CLI flag) for analysis options no trace can satisfy."""
    if n < 1:
        raise ConfigError(
            f"--n {n}: expected a layer distance >= 1 (transitions go from MoE layer l to l+n);"
            " nothing was written"
        )
    if max_points < MIN_POINTS:
        raise ConfigError(
            f"--max-points {max_points}: expected an integer >= {MIN_POINTS} (tokens sampled for"
            " the projections; use --no-projections to skip them); nothing was written"
        )
    if min_count < 1:
        raise ConfigError(
            f"--min-count {min_count}: expected an integer >= 1 (minimum occurrences of a token);"
            " nothing was written"
        )


def check_store(src: StoreSource, what: str) -> None:
    """AnalysisError if the store has no tokens or no layers (check_trace for a store)."""
    m = src.meta
    if m.num_layers == 0 or m.top_k == 0:
        raise AnalysisError(
            f"{what}: the trace has {m.num_layers} MoE layers and k={m.top_k};"
            " expected at least one layer and one slot"
        )
    if src.num_tokens == 0:
        raise AnalysisError(f"{what}: the trace is empty (0 tokens); trace some text first")


def analyze(
    trace: Trace | TraceSource | StoreSource,
    out_dir: str | Path,
    tokenizer: Any = None,
    compare: Trace | StoreSource | None = None,
    token_ids: list[int] | None = None,
    context: list[int] | None = None,
    n: int = 1,
    min_count: int = 10,
    text_doc: int | None = None,
    max_points: int = 2000,
    do_projections: bool = True,
    write_report: bool = True,
    figures: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Run every analysis on `trace`; write numbers.json, CSVs, figures/ and report.html to
    `out_dir`; return the numbers. `compare` = the same text traced at an earlier checkpoint
    (router saturation); `token_ids` = ids for per-token usage; `context` = previous ids for the
    first of `token_ids` (e.g. "I" before "can"); `figures=False` writes numbers and tables only.
    `trace` may be a StoreSource (a store on a DuckDB or Spark engine): the count-based
    analyses then run out of core and the sample-based ones on its seeded document sample."""
    src = trace if isinstance(trace, TraceSource | StoreSource) else TraceSource(trace)
    if isinstance(src, TraceSource):
        check_trace(src.trace, "analyze")
    else:
        check_store(src, "analyze")
    check_analyze_options(n, max_points, min_count)
    if text_doc is not None and not src.has_doc(text_doc):
        lo, hi = src.doc_range()
        raise ConfigError(
            f"--doc {text_doc}: document id not in the trace (it holds doc ids"
            f" {lo}..{hi}); nothing was written"
        )
    out = Path(out_dir)
    meta = src.meta
    num_l, num_e, k = meta.num_layers, meta.num_experts, meta.top_k
    decode = specialization.make_decoder(tokenizer) if tokenizer is not None else None
    rep = (
        Report(
            f"moelab routing analysis — {meta.model or 'trace'}",
            f"{src.num_tokens} tokens, {num_l} MoE layers, top-{k} of {num_e} experts"
            f"{', with router logits' if src.has_logits else ', no router logits'}."
            " Every number is per MoE layer and comes with what uniform random routing would give"
            " (chance) and a shuffle baseline (the same statistic after breaking the relation by"
            " permutation), so finite-sample effects are visible.",
        )
        if write_report
        else None
    )
    o = Out(out, rep, figures)
    o.numbers["meta"] = meta.to_dict()
    o.numbers["n_tokens"] = src.num_tokens
    o.numbers["engine"] = getattr(getattr(src, "eng", None), "name", "memory")
    ctx = Context(
        src=src,
        o=o,
        meta=meta,
        seed=seed,
        n=n,
        min_count=min_count,
        token_ids=token_ids,
        context=context,
        decode=decode,
        text_doc=text_doc,
        max_points=max_points,
        compare=compare,
    )
    have = {"projections"} if do_projections else set()
    if compare is not None:
        have.add("compare")
    todo = [a for a in analyses() if a.applies(have)]
    with Progress(transient=True) as prog:
        for a in todo:  # one progress bar per analysis (per layer where it loops over layers)
            total = num_l if (a.per_layer and src.kind == "store") else 1
            task = prog.add_task(a.name, total=total)
            src.tick = lambda task=task: prog.advance(task)
            try:
                a.run(ctx)
            except AnalysisError as exc:
                ctx.skip(a.name, exc)
            prog.update(task, completed=total)
        src.tick = lambda: None
    if src.sample_info is not None:
        o.numbers["sample"] = src.sample_info
    summary = ctx.summary

    o.numbers["summary"] = summary
    if rep is not None:
        rep.add_summary(summary)
        if o.numbers["skipped"]:
            sec = rep.section(
                "Skipped analyses", "Analyses that could not run on this trace, and why."
            )
            sec.table([{"analysis": a, "reason": r} for a, r in o.numbers["skipped"].items()])
        rep.write(out / "report.html")
        o.files.append("report.html")
        from moelab.report.persist import save_sections

        save_sections(rep, out / "sections.json")  # lets a later report (moelab demo) reuse them
        o.files.append("sections.json")
    o.csv("summary", summary)
    o.numbers["files"] = o.files
    numbers = finite(o.numbers)
    atomic_write_json(out / "numbers.json", numbers)
    return numbers
