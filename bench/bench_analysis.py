"""Benchmark of the routing analyses (issue 5 targets).

Part A: analyses 1-7 (usage + balance + routing entropy, transitions (summary + E x E and
C(E,k)^2 matrices for every layer pair), co-activation (every layer), repeat rate, trajectories,
specialisation (domain, input/next vocabulary, token class), predictability + OpenMoE spread) over
a synthetic 1M-token x 32-layer x top-2-of-8 trace with router logits. Target: < 60 s on 2 cores,
peak RSS < 4 GiB. Reference measured in the same run: one plain numpy pass that bincounts every
layer's expert ids (the cheapest possible full read), so "ratio" = passes' worth of work.

Part B: DuckDB usage and transition counts straight over Parquet shards (TraceStore format) at
three sizes; time per million rows should stay flat (linear scaling), and the process's peak RSS
should not grow with the row count (DuckDB memory_limit fixed at 512 MB: it streams, so traces
larger than RAM work). Sizes reuse the shards of the largest store.

Part C (issue 18): every count-based analysis out of core over a store (DuckDB; Spark local
mode with --ooc-engines memory,duckdb,spark) against the in-memory path on the same store,
each in a fresh process (time, tokens/s, peak RSS); Spark's count tables are compared with
DuckDB's.

Usage: .venv/bin/python bench/bench_analysis.py [--tokens 1000000] [--layers 32] [--repeats 1]
       .venv/bin/python bench/bench_analysis.py --ooc-sizes 1000000,10000000 --memory-limit 1GiB
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from moelab.analysis import (
    coactivation,
    predictability,
    repeat,
    specialization,
    sql,
    trajectories,
    transitions,
    usage,
)
from moelab.analysis.synthetic import synthetic_trace
from moelab.trace.store import TraceWriter

console = Console()


class RssSampler:
    """Peak resident set size of this process and its children (Spark's JVM and Python
    workers), summed, sampled every 20 ms (psutil)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass  # exited meanwhile
            self.peak = max(self.peak, total)
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def reference_pass(tr) -> None:
    """One bincount per layer over all expert ids: the cheapest full read of the routing."""
    for layer in range(tr.meta.num_layers):
        np.bincount(
            tr.expert_ids[:, layer, :].ravel().astype(np.int64) + 1,
            minlength=tr.meta.num_experts + 1,
        )


def analyses(tr, seed: int) -> dict[str, callable]:
    """The analyses 1-7, each as a no-argument callable."""
    num_l = tr.meta.num_layers
    strings = [" the", ",", " 42", "foo_bar", " ", "x", "\n", "camelCase"]

    def decode(i: int) -> str:
        return strings[i % len(strings)]

    def do_usage():
        usage.usage(tr, "slots"), usage.usage(tr, "tokens"), usage.usage(tr, "slots", weighted=True)
        usage.usage(
            tr, "tokens", token_id=int(tr.token_id[1]), prev_ids=[int(tr.token_id[0])], seed=seed
        )
        usage.balance(tr, seed=seed)

    def do_transitions():
        transitions.transition_summary(tr, 1, seed=seed)
        for layer in range(num_l - 1):
            transitions.expert_transitions(tr, layer, 1, seed=seed)
            transitions.set_transitions(tr, layer, 1, seed=seed)

    def do_coact():
        for layer in range(num_l):
            coactivation.coactivation(tr, layer, seed=seed)

    def do_spec():
        specialization.by_domain(tr, seed=seed)
        v = specialization.by_vocab(tr, "input", 10, seed=seed)
        specialization.by_vocab(tr, "next", 10, seed=seed)
        specialization.top_tokens(v, num_l // 2, decode=decode)
        specialization.by_token_class(tr, decode, seed=seed)

    def do_pred():
        predictability.predictability(tr, min_count=10, seed=seed)
        predictability.spread_token_vs_position(tr, min_count=10, seed=seed)

    return {
        "1 usage + balance": do_usage,
        "1 routing entropy (logits)": lambda: usage.routing_entropy(tr),
        "2 transitions (all l->l+1)": do_transitions,
        "3 co-activation (all layers)": do_coact,
        "4 repeat rate": lambda: repeat.repeat_rate(tr, seed=seed),
        "5 trajectories": lambda: trajectories.trajectories(tr, "set", seed=seed),
        "6 specialisation": do_spec,
        "7 predictability + spread": do_pred,
    }


def part_a(n_tokens: int, num_layers: int, repeats: int, seed: int) -> dict:
    t0 = time.perf_counter()
    tr = synthetic_trace(
        n_tokens, num_layers, 8, 2, vocab=32000, doc_len=512, n_domains=4, logits=True, seed=seed
    )
    gen_s = time.perf_counter() - t0
    data_gib = (tr.expert_ids.nbytes + tr.weights.nbytes + tr.logits.nbytes) / 2**30
    console.print(
        f"generated {n_tokens:,} x {num_layers} x top-2/8 trace in {gen_s:.1f} s ({data_gib:.2f} GiB arrays)"
    )
    fns = analyses(tr, seed)
    times: dict[str, list[float]] = {name: [] for name in ["reference pass", *fns]}
    with RssSampler() as rss:
        base_rss = rss.peak
        for _ in range(repeats):
            for name in times:  # interleave variants across repeats
                fn = fns.get(name) or partial(reference_pass, tr)
                gc.collect()
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["reference pass"]
    total = sum(v for k, v in med.items() if k != "reference pass")
    table = Table(
        title=f"Analyses 1-7: {n_tokens:,} tokens x {num_layers} layers x top-2 of 8 (median of {repeats})"
    )
    for col in ("analysis", "seconds", "ratio vs reference pass"):
        table.add_column(col, justify="right" if col != "analysis" else "left")
    for k, v in med.items():
        table.add_row(k, f"{v:.2f}", f"{v / ref:.1f}")
    table.add_row("TOTAL 1-7", f"{total:.2f}", f"{total / ref:.1f}")
    console.print(table)
    peak_gib = max(rss.peak, base_rss) / 2**30
    ru_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    console.print(
        f"peak RSS during analyses {peak_gib:.2f} GiB (process max incl. generation {ru_gib:.2f} GiB);"
        f" target < 60 s: {'OK' if total < 60 else 'MISSED'}, < 4 GiB: {'OK' if ru_gib < 4 else 'MISSED'}"
    )
    return {
        "seconds": med,
        "total_s": total,
        "peak_rss_gib": peak_gib,
        "max_rss_gib": ru_gib,
        "gen_s": gen_s,
    }


def part_b(sizes: list[int], num_layers: int, repeats: int, seed: int, workdir: Path) -> dict:
    chunk = 250_000
    big = workdir / "store_big"
    meta = None
    t0 = time.perf_counter()
    for i in range(int(np.ceil(max(sizes) / chunk))):
        tr = synthetic_trace(
            chunk, num_layers, 8, 2, vocab=32000, doc_len=512, logits=False, seed=seed + i
        )
        if meta is None:
            meta = tr.meta
            w = TraceWriter(big, meta, shard_tokens=chunk, logits=False)
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
    w.close()
    shards = sorted((big / "shards").glob("*.parquet"))
    console.print(
        f"wrote {len(shards)} shards ({sum(s.stat().st_size for s in shards) / 2**20:.0f} MiB) in"
        f" {time.perf_counter() - t0:.1f} s"
    )
    stores = {}
    for n in sizes:
        d = workdir / f"store_{n}"
        (d / "shards").mkdir(parents=True)
        shutil.copy(big / "meta.json", d / "meta.json")
        for s in shards[: n // chunk]:
            os.symlink(s, d / "shards" / s.name)
        stores[n] = d
    times: dict[tuple[int, str], list[float]] = {}
    peaks: dict[int, int] = {}
    for _ in range(repeats):
        for n, d in stores.items():
            with RssSampler() as rss:
                for what, fn in (
                    ("usage", lambda d=d: sql.usage_counts_sql(d, memory_limit="512MB", threads=2)),
                    (
                        "transitions",
                        lambda d=d: sql.transition_counts_sql(
                            d, 1, memory_limit="512MB", threads=2
                        ),
                    ),
                ):
                    t = time.perf_counter()
                    fn()
                    times.setdefault((n, what), []).append(time.perf_counter() - t)
            peaks[n] = max(peaks.get(n, 0), rss.peak)
    med = {k: statistics.median(v) for k, v in times.items()}
    table = Table(
        title=f"DuckDB over Parquet shards ({num_layers} layers, top-2 of 8; memory_limit 512MB;"
        f" median of {repeats})"
    )
    for col in ("rows", "query", "seconds", "s per M rows", "ratio vs smallest", "peak RSS GiB"):
        table.add_column(col, justify="right")
    out = {}
    for what in ("usage", "transitions"):
        base = med[(sizes[0], what)] / sizes[0]
        for n in sizes:
            per = med[(n, what)] / n
            table.add_row(
                f"{n:,}",
                what,
                f"{med[(n, what)]:.2f}",
                f"{per * 1e6:.2f}",
                f"{per / base:.2f}",
                f"{peaks[n] / 2**30:.2f}",
            )
            out[f"peak_rss_gib_{n}"] = peaks[n] / 2**30
            out[f"{what}_{n}"] = med[(n, what)]
    console.print(table)
    return out


def count_analyses(src, seed: int, decode) -> dict[str, callable]:
    """Every count-based analysis through a source (TraceSource = in memory, StoreSource = out
    of core): usage (3 normalisations) + balance, transitions (summary, E x E and set matrices
    for every l -> l+1), co-activation (every layer), repeat rate, specialisation (domain,
    input and next token, token class), predictability + spread."""
    num_l = src.meta.num_layers

    def do_usage():
        src.usage("slots", seed=seed), src.usage("tokens", seed=seed)
        src.usage("slots", weighted=True, seed=seed), src.balance(seed=seed)

    def do_transitions():
        src.transition_summary(1, seed)
        for layer in range(num_l - 1):
            src.expert_transitions(layer, 1, seed)
            src.set_transitions(layer, 1, seed)

    def do_spec():
        src.by_domain(seed), src.by_vocab("input", 10, seed), src.by_vocab("next", 10, seed)
        src.by_token_class(decode, seed)

    return {
        "usage + balance": do_usage,
        "transitions (all l->l+1)": do_transitions,
        "co-activation (all layers)": lambda: [src.coactivation(x, seed) for x in range(num_l)],
        "repeat rate": lambda: src.repeat_rate(seed),
        "specialisation": do_spec,
        "predictability + spread": lambda: (src.predictability(10, seed), src.spread(10, seed)),
    }


def write_synthetic_store(path: Path, n_tokens: int, num_layers: int, seed: int) -> float:
    """A synthetic store of n_tokens (chunks of 250k from the generator, documents of 512)."""
    chunk = 250_000
    t0 = time.perf_counter()
    w = None
    for i in range(int(np.ceil(n_tokens / chunk))):
        m = min(chunk, n_tokens - i * chunk)
        tr = synthetic_trace(
            m, num_layers, 8, 2, vocab=32000, doc_len=512, n_domains=4, logits=False, seed=seed + i
        )
        if w is None:
            w = TraceWriter(path, tr.meta, shard_tokens=chunk, logits=False)
        docs = tr.doc_id + i * (chunk // 512 + 1)
        w.append(docs, tr.position, tr.token_id, tr.domain, tr.is_bos, tr.expert_ids, tr.weights)
        del tr
    w.close()
    return time.perf_counter() - t0


def replicate_store(src: Path, dst: Path, copies: int) -> None:
    """A store of `copies` copies of src's shards, each copy's document ids shifted past the
    previous copy's (the same rows repeated: counts scale exactly with copies)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = json.loads((src / "meta.json").read_text())
    shards = sorted((src / "shards").glob("*.parquet"))
    span = max(pq.read_table(str(s), columns=["doc_id"])["doc_id"].to_numpy().max() for s in shards)
    (dst / "shards").mkdir(parents=True)
    i = 0
    for c in range(copies):
        for s in shards:
            t = pq.read_table(str(s))
            doc = t["doc_id"].to_numpy() + c * (int(span) + 1)
            t = t.set_column(0, "doc_id", pa.array(doc))
            pq.write_table(
                t, str(dst / "shards" / f"part-r000-{i:06d}.parquet"), compression="zstd"
            )
            i += 1
    meta.setdefault("extra", {}).setdefault("run", {}).pop("total_tokens", None)
    (dst / "meta.json").write_text(json.dumps(meta))
    rows = sum(pq.ParquetFile(str(f)).metadata.num_rows for f in (dst / "shards").iterdir())
    (dst / "done-r000.json").write_text(json.dumps({"rank": 0, "rows": rows, "shards": i}))


def child(args) -> None:
    """One measured run in a fresh process: engine over a store, JSON of times + peak RSS."""
    import sys

    from moelab.analysis.engines import open_engine
    from moelab.analysis.sources import StoreSource, TraceSource
    from moelab.trace.store import TraceStore

    strings = [" the", ",", " 42", "foo_bar", " ", "x", "\n", "camelCase"]

    def decode(i: int) -> str:
        return strings[i % len(strings)]

    with RssSampler() as rss:
        t0 = time.perf_counter()
        if args.child_engine == "memory":
            src = TraceSource(TraceStore.open(args.child).load())
        else:
            eng = open_engine(
                args.child,
                args.child_engine,
                memory_limit=args.memory_limit,
                master="local[2]" if args.child_engine == "spark" else None,
                threads=2 if args.child_engine == "duckdb" else None,
            )
            src = StoreSource(eng)
        load_s = time.perf_counter() - t0
        times = {}
        for name, fn in count_analyses(src, 0, decode).items():
            t = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - t
            rss_now = rss.peak / 2**30
            print(
                f"PROGRESS {name}: {times[name]:.2f} s (peak RSS so far {rss_now:.2f} GiB)",
                file=sys.stderr,
                flush=True,
            )
        counts = [s.count.tolist() for s in src.sc.states()] if hasattr(src, "sc") else None
        src.close()
    print(
        "RESULT "
        + json.dumps(
            {
                "load_s": load_s,
                "seconds": times,
                "total_s": load_s + sum(times.values()),
                "peak_rss_gib": rss.peak / 2**30,
                "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "states": counts,
            }
        )
    )


def run_child(store: Path, engine: str, memory_limit: str) -> dict:
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--child", str(store), "--child-engine", engine]
    cmd += ["--memory-limit", memory_limit]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        raise RuntimeError(f"{engine} run failed: {out.stderr[-2000:]}")
    return json.loads(line[0][7:])


def part_c(
    sizes: list[int],
    num_layers: int,
    seed: int,
    workdir: Path,
    engines: list[str],
    memory_limit: str,
    replicate: bool = False,
) -> dict:
    """Every count-based analysis out of core (DuckDB, optionally Spark) vs in memory."""
    res: dict = {}
    table = Table(
        title=f"Count-based analyses over a store ({num_layers} layers, top-2 of 8;"
        f" memory_limit {memory_limit}; each run in a fresh process)"
    )
    for col in ("tokens", "engine", "seconds", "tokens/s", "ratio vs memory", "peak RSS GiB"):
        table.add_column(col, justify="right")
    base = None
    for n in sizes:
        store = workdir / f"store_{n}"
        if (store / "meta.json").exists():
            console.print(f"reusing {store}")
        elif replicate and base is not None and n % base[0] == 0:
            t0 = time.perf_counter()
            replicate_store(base[1], store, n // base[0])
            console.print(
                f"built the {n:,}-token store from {n // base[0]} copies of the {base[0]:,}-token"
                f" one (document ids shifted) in {time.perf_counter() - t0:.0f} s"
            )
        else:
            gen = write_synthetic_store(store, n, num_layers, seed)
            console.print(f"wrote {n:,}-token store in {gen:.0f} s")
        if base is None:
            base = (n, store)
        runs = {}
        for eng in engines:
            if eng == "memory" and n > 2_000_000:
                continue  # the in-memory path is the reference at the smaller size only
            r = run_child(store, eng, memory_limit)
            runs[eng] = r
            console.print(f"{n:,} {eng}: {r['total_s']:.1f} s, {r['peak_rss_gib']:.2f} GiB")
            console.print({k: round(v, 2) for k, v in r["seconds"].items()})
        if "spark" in runs and "duckdb" in runs:
            runs["spark_counts_equal_duckdb"] = runs["spark"]["states"] == runs["duckdb"]["states"]
        ref = runs.get("memory", {}).get("total_s")
        for eng, r in runs.items():
            if not isinstance(r, dict):
                continue
            table.add_row(
                f"{n:,}",
                eng,
                f"{r['total_s']:.1f}",
                f"{n / r['total_s']:,.0f}",
                f"{r['total_s'] / ref:.2f}" if ref else "-",
                f"{r['peak_rss_gib']:.2f}",
            )
            r.pop("states", None)
        res[n] = runs
    console.print(table)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--sql-sizes", type=str, default="250000,500000,1000000")
    ap.add_argument("--sql-repeats", type=int, default=3)
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ooc-sizes", type=str, default="", help="part C sizes, e.g. 1000000,10000000")
    ap.add_argument("--ooc-engines", type=str, default="memory,duckdb")
    ap.add_argument("--memory-limit", type=str, default="1GiB")
    ap.add_argument("--store-dir", type=str, default="", help="keep/reuse part C stores here")
    ap.add_argument(
        "--replicate",
        action="store_true",
        help="build larger part C stores from copies of the first size's store",
    )
    ap.add_argument("--child", type=str, default="")
    ap.add_argument("--child-engine", type=str, default="duckdb")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    res = {}
    if args.ooc_sizes:
        keep = bool(args.store_dir)
        work = Path(args.store_dir) if keep else Path(tempfile.mkdtemp(prefix="moelab-bench-ooc-"))
        try:
            res["out_of_core"] = part_c(
                [int(s) for s in args.ooc_sizes.split(",")],
                args.layers,
                args.seed,
                work,
                args.ooc_engines.split(","),
                args.memory_limit,
                args.replicate,
            )
        finally:
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
        console.print_json(json.dumps(res, default=float))
        return
    if not args.skip_a:
        res["analyses"] = part_a(args.tokens, args.layers, args.repeats, args.seed)
    if not args.skip_b:
        work = Path(tempfile.mkdtemp(prefix="moelab-bench-sql-"))
        try:
            res["duckdb"] = part_b(
                [int(s) for s in args.sql_sizes.split(",")],
                args.layers,
                args.sql_repeats,
                args.seed,
                work,
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    console.print_json(json.dumps(res, default=float))


if __name__ == "__main__":
    main()
