"""Benchmark of moelab tracing (issue #4 targets).

1. Overhead: tokens/s of a Mixtral-shaped transformers model (random init, saved and loaded from
   a local dir) traced with ids + weights + logits (no hidden states) vs its plain forward on the
   same batches; variants interleaved, median over repeats. Target: ratio >= 0.95. Also the
   hooks alone, with the generic experts-module pre-hooks and with router-output hooks.
2. Storage: bytes per token per MoE layer before compression (routing columns: ids, weights,
   logits) vs the bound 4k + 2E, plus the whole row and the zstd-compressed size on disk.
3. Reading: a synthetic 1M-token x 32-layer store (E=8, k=2) is written, then opened and
   per-layer expert counts computed (TraceStore.expert_counts and DuckDB). Target: < 5 s.

Run: THP_MEM_ALLOC_ENABLE=1 .venv/bin/python bench/bench_trace.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moelab.trace.adapters import get_adapter  # noqa: E402
from moelab.trace.api import iter_batches, load_model, make_batch, plan_chunks  # noqa: E402
from moelab.trace.schema import TraceMeta  # noqa: E402
from moelab.trace.store import BASE_COLUMNS, TraceStore, TraceWriter  # noqa: E402
from moelab.trace.tracer import Tracer  # noqa: E402


def build_mixtral(path: Path, d: int, layers: int, E: int, k: int, seed: int) -> Path:
    """Random-init Mixtral-shaped model saved with save_pretrained."""
    import transformers

    cfg = transformers.MixtralConfig(
        vocab_size=4096,
        hidden_size=d,
        intermediate_size=2 * d,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=E,
        num_experts_per_tok=k,
        max_position_embeddings=1024,
    )
    torch.manual_seed(seed)
    transformers.MixtralForCausalLM(cfg).save_pretrained(str(path))
    return path


def bench_overhead(tmp: Path, args: argparse.Namespace) -> dict[str, float]:
    """Interleaved plain vs traced forward on the same batches."""
    mdir = build_mixtral(
        tmp / "mixtral", args.d_model, args.layers, args.experts, args.top_k, args.seed
    )
    model = load_model(mdir)
    adapter = get_adapter(model)
    rng = np.random.default_rng(args.seed)

    class Doc:
        def __init__(self, i: int) -> None:
            self.doc_id, self.domain = f"d{i}", "x"
            self.token_ids = rng.integers(3, 4096, args.seq_len - 1).tolist()

    docs = [Doc(i) for i in range(args.batches * args.batch_size)]
    plan = plan_chunks(docs, lambda t: [], 1, args.seq_len, None, 0, 1, ["x"], 4096)
    batches = [
        make_batch(b, torch.device("cpu")) for b in iter_batches(plan.chunks, args.batch_size)
    ]
    n_tok = sum(int(b[3].numel()) for b in batches)
    meta = TraceMeta(
        num_layers=len(adapter.sites), num_experts=adapter.num_experts, top_k=adapter.top_k
    )

    def plain() -> None:
        with torch.inference_mode():
            for ids, mask, _, _ in batches:
                adapter.run(ids, mask)

    def traced() -> None:
        from concurrent.futures import ThreadPoolExecutor

        out = tmp / "ovh"
        shutil.rmtree(out, ignore_errors=True)
        w = TraceWriter(
            out, TraceMeta(**{**meta.to_dict(), "extra": {}}), shard_tokens=16384, logits=True
        )
        with ThreadPoolExecutor(1) as pool, Tracer(adapter, logits=True) as tr:
            futs = []
            for ids, mask, rows, sel in batches:
                rec = tr.record(ids, mask, sel)
                futs.append(
                    pool.submit(
                        w.append,
                        **rows,
                        expert_ids=rec.expert_ids,
                        weights=rec.weights,
                        logits=rec.logits,
                    )
                )
            for f in futs:
                f.result()
            w.close()

    def hooks_only() -> None:
        with Tracer(adapter, logits=True) as tr:
            for ids, mask, _, sel in batches:
                tr.record(ids, mask, sel)

    from moelab.trace.adapters import HFAdapter

    router_adapter = HFAdapter(model)  # the pre-issue-15 path: router output hooks

    def hooks_router() -> None:
        with Tracer(router_adapter, logits=True) as tr:
            for ids, mask, _, sel in batches:
                tr.record(ids, mask, sel)

    variants = {"plain": plain, "hooks": hooks_only, "hooks_router": hooks_router, "traced": traced}
    for fn in variants.values():
        fn()  # warm up
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    tps = {k: n_tok / statistics.median(v) for k, v in times.items()}
    pair = statistics.median([a / b for a, b in zip(times["plain"], times["traced"], strict=True)])
    return {
        "tokens": n_tok,
        "plain_tps": tps["plain"],
        "hooks_tps": tps["hooks"],
        "traced_tps": tps["traced"],
        "ratio": tps["traced"] / tps["plain"],
        "hooks_ratio": tps["hooks"] / tps["plain"],
        "hooks_router_tps": tps["hooks_router"],
        "hooks_router_ratio": tps["hooks_router"] / tps["plain"],
        "ratio_median_pairwise": pair,
        "store": str(tmp / "ovh"),
    }


def bench_storage(store_dir: Path) -> dict[str, float]:
    """Bytes/token/layer of the store written by the overhead run."""
    st = TraceStore.open(store_dir)
    m = st.meta
    n, L, k, E = st.num_tokens, m.num_layers, m.top_k, m.num_experts
    routing = base = 0
    for pf in st._files:
        t = pf.read()
        for name in t.column_names:
            if name not in BASE_COLUMNS:
                routing += t[name].nbytes
            else:
                base += t[name].nbytes
    return {
        "k": k,
        "E": E,
        "bound": 4 * k + 2 * E,
        "routing_raw": routing / n / L,
        "row_raw": (routing + base) / n / L,
        "compressed": st.nbytes() / n / L,
    }


def bench_read(tmp: Path, n: int, L: int, E: int, k: int, seed: int) -> dict[str, float]:
    """Write a synthetic store, then time open + per-layer expert counts."""
    rng = np.random.default_rng(seed)
    meta = TraceMeta(num_layers=L, num_experts=E, top_k=k, layer_indices=list(range(L)))
    out = tmp / "synthetic"
    w = TraceWriter(out, meta, shard_tokens=1 << 17, logits=False)
    chunk = 1 << 17
    p = rng.dirichlet(np.ones(E) * 0.7, size=L)  # skewed, layer-specific usage
    t0 = time.perf_counter()
    for a in range(0, n, chunk):
        m = min(chunk, n - a)
        ids = np.empty((m, L, k), np.int64)
        for li in range(L):
            first = rng.choice(E, size=m, p=p[li])
            ids[:, li, 0] = first
            for j in range(1, k):
                ids[:, li, j] = (first + rng.integers(1, E, m)) % E if j == 1 else (first + j) % E
        rows = dict(
            doc_id=(a + np.arange(m)) // 512,
            position=((a + np.arange(m)) % 512).astype(np.int32),
            token_id=rng.integers(0, 32000, m).astype(np.int32),
            domain=np.zeros(m, np.int16),
            is_bos=((a + np.arange(m)) % 512) == 0,
            expert_ids=ids,
            weights=rng.random((m, L, k)).astype(np.float16),
        )
        w.append(**rows)
    w.close()
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    st = TraceStore.open(out)
    counts = st.expert_counts()
    t_np = time.perf_counter() - t0
    assert counts.sum() == n * L * k
    t0 = time.perf_counter()
    st2 = TraceStore.open(out)
    sel = " union all ".join(
        f"select {li} as l, e{li}_0 as e, count(*) as c from trace group by e{li}_0"
        for li in range(L)
    )
    res = st2.sql(sel).fetchall()
    t_sql = time.perf_counter() - t0
    assert sum(r[2] for r in res) == n * L
    # raw size before compression of one shard scaled to the store
    pf = st._files[0]
    t = pf.read()
    raw = t.nbytes / t.num_rows
    return {
        "n": n,
        "L": L,
        "write_s": t_write,
        "open_counts_s": t_np,
        "duckdb_slot0_s": t_sql,
        "disk_MB": st.nbytes() / 1e6,
        "raw_MB": raw * n / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--synthetic-tokens", type=int, default=1_000_000)
    ap.add_argument("--synthetic-layers", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small sizes to check the script runs")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.repeats, args.synthetic_tokens = 2, 3, 200_000
    torch.manual_seed(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="bench_trace_"))
    try:
        ov = bench_overhead(tmp, args)
        sto = bench_storage(Path(ov["store"]))
        rd = bench_read(tmp, args.synthetic_tokens, args.synthetic_layers, 8, 2, args.seed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"torch threads: {torch.get_num_threads()}")
    print("| measure | value | reference | ratio / target |")
    print("|---|---|---|---|")
    print(
        f"| traced tokens/s (ids+weights+logits, no hidden), Mixtral-shaped d{args.d_model} "
        f"L{args.layers} E{args.experts} k{args.top_k}, {ov['tokens']} tok x {args.repeats} | "
        f"{ov['traced_tps']:,.0f} | plain forward {ov['plain_tps']:,.0f} | "
        f"{ov['ratio']:.3f} (pairwise median {ov['ratio_median_pairwise']:.3f}); target >= 0.95 |"
    )
    print(
        f"| hooks + decode only (no Parquet writing) tokens/s | {ov['hooks_tps']:,.0f} | "
        f"plain forward {ov['plain_tps']:,.0f} | {ov['hooks_ratio']:.3f} |"
    )
    print(
        f"| same, router-output hooks (HFAdapter, the path before the experts-module"
        f" pre-hooks) | {ov['hooks_router_tps']:,.0f} | plain forward {ov['plain_tps']:,.0f} |"
        f" {ov['hooks_router_ratio']:.3f} |"
    )
    print(
        f"| routing bytes/token/layer before compression (k={sto['k']}, E={sto['E']}) | "
        f"{sto['routing_raw']:.1f} | bound 4k+2E = {sto['bound']} | "
        f"{sto['routing_raw'] / sto['bound']:.3f} of bound |"
    )
    print(
        f"| whole row bytes/token/layer before compression (incl. doc_id, position, ...) | "
        f"{sto['row_raw']:.1f} | {sto['bound']} | {sto['row_raw'] / sto['bound']:.3f} |"
    )
    print(
        f"| bytes/token/layer on disk (zstd Parquet) | {sto['compressed']:.1f} | raw {sto['row_raw']:.1f} | "
        f"{sto['compressed'] / sto['row_raw']:.3f} of raw |"
    )
    print(
        f"| open + per-layer expert counts, synthetic {rd['n']:,} tok x {rd['L']} layers "
        f"(E=8, k=2, no logits) | {rd['open_counts_s']:.2f} s | target 5 s | "
        f"{rd['open_counts_s'] / 5:.2f} of target |"
    )
    print(
        f"| same via DuckDB SQL (slot 0 of every layer, group by) | {rd['duckdb_slot0_s']:.2f} s | "
        f"target 5 s | {rd['duckdb_slot0_s'] / 5:.2f} of target |"
    )
    print(
        f"| synthetic store size | {rd['disk_MB']:.0f} MB on disk | {rd['raw_MB']:.0f} MB raw | "
        f"{rd['disk_MB'] / rd['raw_MB']:.2f} (written in {rd['write_s']:.1f} s) |"
    )


if __name__ == "__main__":
    main()
