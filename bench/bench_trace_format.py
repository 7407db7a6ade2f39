"""Bytes per token per MoE layer of the trace store format, schema 1 (float16 weights/logits,
unreadable by Spark 4) against schema 2 (float32), zstd-compressed Parquet as TraceWriter
writes it, with and without router logits.

Values: a synthetic trace (moelab.analysis.synthetic) whose weights and logits are rounded to
float16 first, as the tracer records them today (moelab.trace.tracer casts to float16), and
the same with full float32 values (what a float32 tracer would store).

Usage: .venv/bin/python bench/bench_trace_format.py [--tokens 200000] [--layers 8]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from moelab.analysis.synthetic import synthetic_trace
from moelab.trace.store import TraceStore, write_trace

console = Console()


def write(path: Path, tr, version: int, logits: bool) -> int:
    meta = copy.deepcopy(tr.meta)
    meta.schema_version = version
    meta.extra = {}
    write_trace(dataclasses.replace(tr, meta=meta), path, shard_tokens=65536, logits=logits)
    return TraceStore.open(path).nbytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    args = ap.parse_args()
    tr = synthetic_trace(
        args.tokens, args.layers, args.experts, args.top_k, vocab=32000, doc_len=512, seed=0
    )
    f16 = copy.copy(tr)
    f16.weights = tr.weights.astype(np.float16).astype(np.float32)
    f16.logits = tr.logits.astype(np.float16).astype(np.float32)
    n, num_l = args.tokens, args.layers
    table = Table(
        title=f"Trace store bytes per token per MoE layer ({n:,} tokens, {num_l} layers,"
        f" top-{args.top_k} of {args.experts}, zstd Parquet)"
    )
    for c in ("values", "logits", "schema 1 (float16)", "schema 2 (float32)", "ratio 2/1"):
        table.add_column(c, justify="right")
    work = Path(tempfile.mkdtemp(prefix="moelab-format-"))
    try:
        for name, t in (("float16-rounded (tracer today)", f16), ("full float32", tr)):
            for logits in (False, True):
                sizes = {}
                for v in (1, 2):
                    d = work / f"{v}-{logits}-{name[:4]}"
                    sizes[v] = write(d, t, v, logits) / n / num_l
                    shutil.rmtree(d)
                table.add_row(
                    name,
                    "yes" if logits else "no",
                    f"{sizes[1]:.2f}",
                    f"{sizes[2]:.2f}",
                    f"{sizes[2] / sizes[1]:.2f}",
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    k, e = args.top_k, args.experts
    console.print(table)
    console.print(
        f"uncompressed per token and layer: schema 1 {3 * k} B (+{2 * e} B logits),"
        f" schema 2 {5 * k} B (+{4 * e} B logits)"
    )


if __name__ == "__main__":
    main()
