"""Benchmark of `moelab explore` (issue 19 target: responses < 1 s for a frequent token on a
10M-token store).

Builds a synthetic trace store (moelab.analysis.synthetic, written in 1M-token chunks with one
seed per chunk, Zipf token ids over a 32k vocabulary), or takes an existing one (--store; its
folder is only read, the cache goes to --cache), opens it with the explorer (the per-token
cache is built once and timed), then times every endpoint through FastAPI's TestClient
(request + DuckDB + JSON), wall and process CPU time, for the most frequent token, the same
after its most frequent previous token, the median token (the one holding the median
occurrence) and a rare token (the median of the distinct tokens by rank). Cold: the first
request of a view in a freshly opened explorer (new DuckDB connection, cache on disk, OS page
cache warm), one per (case, view). Warm: the median of --repeats interleaved repeats after it.
Reference measured in the same run: one plain DuckDB `count(*)` of the token's rows straight
over the shards (no cache); "ratio" = warm endpoint time / reference.

Usage: .venv/bin/python bench/bench_explore.py [--tokens 10000000] [--layers 8] [--repeats 5]
       .venv/bin/python bench/bench_explore.py --store /work/stores/syn10m --cache runs/c10m
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


def pick_cases(con) -> list[tuple[str, dict[str, int]]]:
    """The timed cases: (label, filters) of the frequent, frequent-after-previous, median and
    rare token."""
    counts = con.execute(
        "SELECT token_id, count(*) n FROM tok GROUP BY token_id ORDER BY n DESC, token_id"
    ).fetchnumpy()
    ids, n = np.asarray(counts["token_id"]), np.asarray(counts["n"])
    cum = np.cumsum(n)
    med = int(np.searchsorted(cum, cum[-1] / 2))
    rare = ids.size // 2
    top = int(ids[0])
    prev = con.execute(
        "SELECT prev_id, count(*) n FROM tok WHERE token_id = ? GROUP BY prev_id"
        " ORDER BY n DESC, prev_id LIMIT 1",
        [top],
    ).fetchone()
    return [
        (f"most frequent token ({n[0]} occ.)", {"token": top}),
        (f"most frequent after its top previous ({prev[1]} occ.)", {"token": top, "prev": prev[0]}),
        (f"median token, rank {med + 1} ({n[med]} occ.)", {"token": int(ids[med])}),
        (f"rare token, rank {rare + 1} of {ids.size} ({n[rare]} occ.)", {"token": int(ids[rare])}),
    ]


def timed(client, url: str, params: dict) -> tuple[float, float]:
    """(wall s, process CPU s) of one request; exits on a non-200 answer."""
    t0, c0 = time.perf_counter(), time.process_time()
    r = client.get(url, params=params)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    if r.status_code != 200:
        raise SystemExit(f"{url} {params}: HTTP {r.status_code} {r.text[:200]}")
    return dt, dc


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
    ap.add_argument("--store", type=Path, help="an existing store to time (only read)")
    ap.add_argument("--cache", type=Path, help="cache folder (default WORKDIR/cache)")
    ap.add_argument("--keep-cache", action="store_true", help="reuse a valid cache")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    ap.add_argument("--append", action="store_true", help="add to the section, not replace it")
    args = ap.parse_args()

    import duckdb
    from fastapi.testclient import TestClient

    from moelab.explore.app import create_app
    from moelab.explore.queries import open_explorer

    gen_s = None
    if args.store is not None:
        root = args.store
    else:
        root = args.workdir / "store"
        if not (args.keep and (root / "meta.json").exists()):
            shutil.rmtree(root, ignore_errors=True)
            console.print(f"writing a {args.tokens / 1e6:.0f}M-token store to {root}")
            gen_s = build(root, args.tokens, args.layers, args.experts, args.top_k, args.seed)
    cache = args.cache if args.cache is not None else args.workdir / "cache"
    if not args.keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    load0 = os.getloadavg()
    key_file = cache / "key.json"
    key_before = key_file.stat().st_mtime_ns if key_file.exists() else None
    t0 = time.perf_counter()
    ex = open_explorer(root, cache_dir=cache, threads=args.threads)
    cache_s = time.perf_counter() - t0
    built = key_file.stat().st_mtime_ns != key_before
    mib = sum(f.stat().st_size for f in cache.glob("*.parquet")) / 2**20
    console.print(f"cache ready in {cache_s:.1f} s ({mib:.0f} MiB)")
    meta = ex.meta
    cases = pick_cases(ex.cursor())
    ex.con.close()

    def fresh() -> tuple[object, float]:
        t0 = time.perf_counter()
        e = open_explorer(root, cache_dir=cache, threads=args.threads)
        return e, time.perf_counter() - t0

    # cold: a freshly opened explorer per (case, view), its first request
    cold: dict[tuple[int, str], tuple[float, float]] = {}
    open_s = []
    for ci, (_, params) in enumerate(cases):
        for name, url, extra in ENDPOINTS:
            e, dt = fresh()
            open_s.append(dt)
            cold[(ci, name)] = timed(TestClient(create_app(e)), url, {**params, **extra})
            e.con.close()
    ex, _ = fresh()
    client = TestClient(create_app(ex))
    t0 = time.perf_counter()
    client.get("/api/info")
    info_s = time.perf_counter() - t0

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
                dt, dc = timed(client, url, {**params, **extra})
                times.setdefault((ci, name), []).append(dt)
                cpu.setdefault((ci, name), []).append(dc)
            t0 = time.perf_counter()
            for _name, url, extra in ENDPOINTS:  # what the page asks for one view
                client.get(url, params={**params, **extra})
            times.setdefault((ci, "all five"), []).append(time.perf_counter() - t0)
    load1 = os.getloadavg()

    views = [e[0] for e in ENDPOINTS]
    med = statistics.median
    hdr = "| case | " + " | ".join(views) + " |"
    sep = "|---|" + "---|" * len(views)
    warm_md = [
        "| case | reference | " + " | ".join(views) + " | all five |",
        "|---|" + "---|" * (len(views) + 2),
    ]
    cold_md = [hdr, sep]
    worst = {"cold wall": 0.0, "cold cpu": 0.0, "warm wall": 0.0, "warm cpu": 0.0}
    table = Table(title=f"explore: wall / CPU ms, cold and warm (median of {args.repeats})")
    table.add_column("case")
    for v in views:
        table.add_column(v, justify="right")
    for ci, (label, _) in enumerate(cases):
        ref = med(times[(ci, "reference")])
        wcells, ccells, tcells = [], [], []
        for v in views:
            ww, wc = med(times[(ci, v)]), med(cpu[(ci, v)])
            cw, cc = cold[(ci, v)]
            worst["warm wall"] = max(worst["warm wall"], ww)
            worst["warm cpu"] = max(worst["warm cpu"], wc)
            worst["cold wall"] = max(worst["cold wall"], cw)
            worst["cold cpu"] = max(worst["cold cpu"], cc)
            wcells.append(f"{1e3 * ww:.0f} / {1e3 * wc:.0f} ({ww / ref:.2f}x)")
            ccells.append(f"{1e3 * cw:.0f} / {1e3 * cc:.0f}")
            tcells.append(f"{1e3 * cw:.0f}/{1e3 * cc:.0f} -> {1e3 * ww:.0f}/{1e3 * wc:.0f}")
        allf = med(times[(ci, "all five")])
        warm_md.append(
            f"| {label} | {1e3 * ref:.0f} | " + " | ".join(wcells) + f" | {1e3 * allf:.0f} |"
        )
        cold_md.append(f"| {label} | " + " | ".join(ccells) + " |")
        table.add_row(label, *tcells)
    console.print(table)
    verdict = "met" if max(worst["warm wall"], worst["cold wall"]) < 1.0 else "MISSED"
    summary = (
        f"slowest view: cold {1e3 * worst['cold wall']:.0f} ms wall / {1e3 * worst['cold cpu']:.0f}"
        f" ms CPU, warm {1e3 * worst['warm wall']:.0f} ms wall / {1e3 * worst['warm cpu']:.0f} ms"
        f" CPU: target < 1 s {verdict}"
    )
    console.print(summary)
    src = (
        f"`--store {root}` ({meta.num_layers} MoE layers, top-{meta.top_k} of"
        f" {meta.num_experts} experts; {ex.num_rows} non-BOS tokens)"
        if args.store is not None
        else f"a synthetic store: {args.tokens / 1e6:.0f}M tokens, {args.layers} MoE layers,"
        f" top-{args.top_k} of {args.experts} experts, Zipf token ids over 32k ids, documents"
        " of 512 tokens" + (f", written in {gen_s:.0f} s" if gen_s is not None else "")
    )
    cmd = (
        "PYTHONPATH=src .venv/bin/python bench/bench_explore.py "
        + (
            f"--store {root} --cache {cache}"
            if args.store is not None
            else f"--tokens {args.tokens} --layers {args.layers} --experts {args.experts}"
            f" --top-k {args.top_k}"
        )
        + f" --repeats {args.repeats} --threads {args.threads}"
        + (" --keep" if args.keep else "")
        + (" --keep-cache" if args.keep_cache else "")
    )
    body = [
        "## moelab explore (issue 19)",
        "",
        f"`{cmd}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average"
        f" {', '.join(f'{x:.2f}' for x in load0)} before, {', '.join(f'{x:.2f}' for x in load1)}"
        f" after (1, 5, 15 min) on {os.cpu_count()} cores). Store: {src}. Cache (rows sorted"
        f" by token id + the per-token fit / heatmap tables, {mib:.0f} MiB) "
        + (f"built in {cache_s:.1f} s" if built else "reused from an earlier run")
        + " (once; reused while the store is unchanged); opening the explorer on a built cache"
        f" {med(open_s):.2f} s, /api/info {info_s:.2f} s. DuckDB threads {args.threads}.",
        "",
        "Cold: first request of the view in a freshly opened explorer, wall ms / process CPU"
        " ms (all threads):",
        "",
        *cold_md,
        "",
        f"Warm: median of {args.repeats} interleaved repeats, wall ms / CPU ms (ratio of wall"
        " to the reference, a plain DuckDB count of the token's rows straight over the shards,"
        " in ms in the second column); all five: the page's five requests one after another:",
        "",
        *warm_md,
        "",
        summary[0].upper() + summary[1:] + ".",
    ]
    print("\n".join(body))
    if args.no_write:
        return
    write_section(RESULTS, body[0], "\n".join(body) + "\n", append=args.append)
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
