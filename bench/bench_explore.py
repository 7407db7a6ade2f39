"""Benchmark of `moelab explore` (issue 19 target: responses < 1 s for a frequent token on a
10M-token store).

Builds a synthetic trace store (moelab.analysis.synthetic, written in 1M-token chunks with one
seed per chunk, Zipf token ids over a 32k vocabulary), opens it with the explorer (the
per-token cache is built once and timed), then times every endpoint through FastAPI's
TestClient (request + DuckDB + JSON) for the most frequent token, a token of rank 50, and the
most frequent token after its most frequent previous token. Repeats are interleaved; medians
are reported. Reference measured in the same run: one plain DuckDB `count(*)` of the token's
rows straight over the shards (no cache), the cheapest full-scan answer; "ratio" = endpoint
time / reference.

Usage: .venv/bin/python bench/bench_explore.py [--tokens 10000000] [--layers 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from _results import RESULTS, write_section
from rich.console import Console
from rich.table import Table

from moelab.analysis.synthetic import synthetic_trace
from moelab.trace.store import TraceWriter

console = Console()
ENDPOINTS = [
    ("heatmap", "/api/heatmap", {}),
    ("trajectories", "/api/trajectories", {"top": 10}),
    ("cooccurrence", "/api/cooccurrence", {"la": 0, "lb": 1, "norm": "row", "min_count": 5}),
    ("predictor", "/api/predictor", {"min_fit": 5}),
    ("contexts", "/api/contexts", {"limit": 8, "width": 8}),
]


def build(root: Path, tokens: int, layers: int, experts: int, k: int, seed: int) -> float:
    """Write the synthetic store; returns seconds."""
    chunk = 1_000_000
    t0 = time.perf_counter()
    w = None
    for i in range(int(np.ceil(tokens / chunk))):
        n = min(chunk, tokens - i * chunk)
        tr = synthetic_trace(
            n, layers, experts, k, vocab=32000, doc_len=512, logits=False, seed=seed + i
        )
        if w is None:
            w = TraceWriter(root, tr.meta, shard_tokens=chunk, logits=False)
        w.append(
            tr.doc_id + i * chunk,
            tr.position,
            tr.token_id,
            tr.domain,
            tr.is_bos,
            tr.expert_ids,
            tr.weights,
        )
        del tr
        console.print(f"  chunk {i + 1}: {(i + 1) * chunk / 1e6:.0f}M tokens")
    w.close()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=10_000_000)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench_explore"))
    ap.add_argument("--keep", action="store_true", help="reuse the store if it exists")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args()

    import duckdb
    from fastapi.testclient import TestClient

    from moelab.explore.app import create_app
    from moelab.explore.queries import open_explorer

    root = args.workdir / "store"
    gen_s = None
    if not (args.keep and (root / "meta.json").exists()):
        shutil.rmtree(root, ignore_errors=True)
        console.print(f"writing a {args.tokens / 1e6:.0f}M-token store to {root}")
        gen_s = build(root, args.tokens, args.layers, args.experts, args.top_k, args.seed)
    shutil.rmtree(root / "cache", ignore_errors=True)
    t0 = time.perf_counter()
    ex = open_explorer(root, threads=args.threads)
    cache_s = time.perf_counter() - t0
    console.print(
        f"cache built in {cache_s:.1f} s ({ex.cache_path.stat().st_size / 2**20:.0f} MiB)"
    )
    t0 = time.perf_counter()
    client = TestClient(create_app(ex))
    client.get("/api/info")
    info_s = time.perf_counter() - t0

    con = ex.cursor()
    top = con.execute(
        "SELECT token_id, count(*) n FROM tok GROUP BY token_id ORDER BY n DESC, token_id LIMIT 50"
    ).fetchall()
    frequent, rank50 = top[0], top[-1]
    prev = con.execute(
        "SELECT prev_id, count(*) n FROM tok WHERE token_id = ? GROUP BY prev_id"
        " ORDER BY n DESC, prev_id LIMIT 1",
        [frequent[0]],
    ).fetchone()
    n_prev = con.execute(
        "SELECT count(*) FROM tok WHERE token_id = ? AND prev_id = ?", [frequent[0], prev[0]]
    ).fetchone()[0]
    cases = [
        (f"most frequent token ({frequent[1]} occ.)", {"token": frequent[0]}),
        (f"rank-50 token ({rank50[1]} occ.)", {"token": rank50[0]}),
        (
            f"most frequent token after its top previous ({n_prev} occ.)",
            {"token": frequent[0], "prev": prev[0]},
        ),
    ]
    ref_con = duckdb.connect()
    ref_con.execute(f"SET threads={int(args.threads)}")
    glob = str(root / "shards" / "*.parquet")

    def reference(tok: int) -> None:
        ref_con.execute(
            "SELECT count(*) FROM read_parquet(?) WHERE token_id = ? AND NOT is_bos", [glob, tok]
        ).fetchone()

    times: dict[tuple[int, str], list[float]] = {}
    cpu: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.repeats):
        for ci, (_, params) in enumerate(cases):
            t0 = time.perf_counter()
            reference(params["token"])
            times.setdefault((ci, "reference"), []).append(time.perf_counter() - t0)
            for name, url, extra in ENDPOINTS:
                t0, c0 = time.perf_counter(), time.process_time()
                r = client.get(url, params={**params, **extra})
                dt = time.perf_counter() - t0
                cpu.setdefault((ci, name), []).append(time.process_time() - c0)
                if r.status_code != 200:
                    raise SystemExit(f"{url} {params}: HTTP {r.status_code} {r.text[:200]}")
                times.setdefault((ci, name), []).append(dt)
            t0 = time.perf_counter()
            for _name, url, extra in ENDPOINTS:  # what the page asks for one view
                client.get(url, params={**params, **extra})
            times.setdefault((ci, "all five"), []).append(time.perf_counter() - t0)

    names = ["reference", *[e[0] for e in ENDPOINTS], "all five"]
    table = Table(title=f"explore response times, median of {args.repeats} (ms)")
    table.add_column("case")
    for nme in names:
        table.add_column(nme, justify="right")
    md = [
        "| case | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    worst = worst_cpu = 0.0
    cpu_md = [
        "| case | " + " | ".join(e[0] for e in ENDPOINTS) + " |",
        "|---|" + "---|" * len(ENDPOINTS),
    ]
    for ci, (label, _) in enumerate(cases):
        ref = statistics.median(times[(ci, "reference")])
        cells = []
        for nme in names:
            med = statistics.median(times[(ci, nme)])
            if nme not in ("reference", "all five"):
                worst = max(worst, med)
            cells.append(
                f"{1e3 * med:.0f}" + ("" if nme == "reference" else f" ({med / ref:.2f}x)")
            )
        table.add_row(label, *cells)
        md.append(f"| {label} | " + " | ".join(cells) + " |")
        cpu_cells = [f"{1e3 * statistics.median(cpu[(ci, e[0])]):.0f}" for e in ENDPOINTS]
        cpu_md.append(f"| {label} | " + " | ".join(cpu_cells) + " |")
        worst_cpu = max(worst_cpu, *(statistics.median(cpu[(ci, e[0])]) for e in ENDPOINTS))
    console.print(table)
    verdict = "met" if worst < 1.0 else "MISSED"
    console.print(f"slowest endpoint median {worst * 1e3:.0f} ms: target < 1 s {verdict}")
    console.print("process CPU time per request (ms, all threads):\n" + "\n".join(cpu_md))
    if args.no_write:
        return
    cmd = (
        f"PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python bench/bench_explore.py --tokens"
        f" {args.tokens} --layers {args.layers} --experts {args.experts} --top-k {args.top_k}"
        f" --repeats {args.repeats} --threads {args.threads}"
    )
    body = [
        "## moelab explore (issue 19)",
        "",
        f"`{cmd}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; 2 cores shared with"
        " other jobs running at the same time, so times are upper bounds). Synthetic store:"
        f" {args.tokens / 1e6:.0f}M tokens, {args.layers} MoE layers, top-{args.top_k} of"
        f" {args.experts} experts, Zipf token ids over 32k ids, documents of 512 tokens"
        + (f", written in {gen_s:.0f} s" if gen_s is not None else "")
        + f". The per-token cache (one Parquet file sorted by token id, {ex.cache_path.stat().st_size / 2**20:.0f} MiB,"
        f" under STORE/cache/explore) was built in {cache_s:.1f} s at startup (once; reused"
        f" while the shards are unchanged); app start + /api/info {info_s:.2f} s. DuckDB threads"
        f" {args.threads}.",
        "",
        f"Median response time in ms of {args.repeats} interleaved repeats through FastAPI's"
        " TestClient (request, DuckDB, JSON); in brackets the ratio to the reference, a plain"
        " DuckDB count of the token's rows straight over the shards (no cache) in the same run:",
        "",
        *md,
        "",
        f"Slowest endpoint median: {worst * 1e3:.0f} ms wall; target < 1 s per response for a"
        f" frequent token: {verdict} in wall time on this shared machine.",
        "",
        "Process CPU time per request in ms (median; all DuckDB threads summed, so on an idle"
        " machine the wall time is at most about this), less sensitive to the other jobs:",
        "",
        *cpu_md,
        "",
        f"Slowest endpoint CPU time: {worst_cpu * 1e3:.0f} ms"
        f" ({'under' if worst_cpu < 1 else 'over'} 1 s). Load average at the end of the run:"
        f" {', '.join(f'{x:.1f}' for x in os.getloadavg())} (1, 5, 15 min) on {os.cpu_count()}"
        " cores.",
    ]
    write_section(RESULTS, body[0], "\n".join(body) + "\n")
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
