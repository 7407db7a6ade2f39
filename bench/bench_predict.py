"""Benchmark expert predictors against the targets of issue 6 on held-out documents.

Run:  THP_MEM_ALLOC_ENABLE=1 .venv/bin/python bench/bench_predict.py [--trace DIR] [--write]

Data: a trace written by `moelab trace` (--trace; gate lookahead needs gates.safetensors and a
hidden side store), or by default a synthetic routing trace (moelab.predict.synthetic: Markov
token stream, residual stream drifting over layers, correlated routers; 6 MoE layers, E=8, k=2,
d_model 128). 20% of the documents are held out (seeded) and never shown to fit.
For d = 1, 2, 3 and t+1 every predictor of the default suite (plus the set variants) is fitted
on the train documents and scored on the held-out ones (same rows for all predictors of a
horizon). Targets printed: (1) every learned predictor vs the frequency prior and the
previous-layer (spatial) / previous-token (temporal) baseline; (2) the best predictor vs gate
lookahead at each spatial horizon; (3) the cost of the chosen (best learned) predictor per token
and target layer vs one MoE layer's forward µs/token at the default model size (d_model 128,
d_ff 256, E 8, k 2), measured in the same run, interleaved, medians, torch on --threads
threads (default 1: on 2 shared cores, 2 threads oversubscribe and slow the layer ~10x). `--write` replaces the
"## Predictors (bench_predict.py)" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(
        _v, "1"
    )  # numpy/torch on one thread: no oversubscription of 2 shared cores

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _results import RESULTS, write_section  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from moelab.layers.config import MoEConfig  # noqa: E402
from moelab.layers.moe import MoEBlock  # noqa: E402
from moelab.predict import Horizon, compare, default_suite, make_predictor, split_by_document  # noqa: E402
from moelab.predict.synthetic import make_synthetic_trace  # noqa: E402

SECTION = "## Predictors (bench_predict.py)"
BASELINES = {"prior", "prev-layer", "prev-token", "gate-lookahead", "gate-lookahead(residual)"}


def load_data(args):
    """(train, test, gates, description)."""
    if args.trace:
        from moelab.trace.store import TraceStore

        store = TraceStore.open(args.trace)
        full = store.load()
        gates = store.gates() if (Path(args.trace) / "gates.safetensors").exists() else None
        desc = f"trace {args.trace} ({full.num_tokens} tokens, L={full.meta.num_layers}, E={full.meta.num_experts}, k={full.meta.top_k})"
    else:
        full, gates = make_synthetic_trace(
            num_docs=args.docs,
            doc_len=args.doc_len,
            num_layers=6,
            num_experts=8,
            top_k=2,
            d_model=128,
            vocab=args.vocab,
            hidden_rate=1.0,
            residual=True,
            seed=args.seed,
            context_weight=args.context_weight,
        )
        desc = f"synthetic trace ({full.num_tokens} tokens, {args.docs} docs, L=6, E=8, k=2, d_model=128, context weight {args.context_weight})"
    parts = split_by_document(full, {"train": 0.8, "test": 0.2}, seed=args.seed)
    return parts["train"], parts["test"], gates, desc


def moe_layer_us(tokens: int, seed: int) -> callable:
    """A callable timing one MoE layer forward over `tokens` tokens (seconds)."""
    torch.manual_seed(seed)
    block = MoEBlock(MoEConfig(d_model=128, d_ff=256, num_experts=8, top_k=2)).eval()
    x = torch.randn(tokens, 128)

    def run() -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            block(x)
            return time.perf_counter() - t0

    run()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--trace", type=Path, default=None)
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--doc-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench_predict_out"))
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 avoids oversubscription)"
    )
    ap.add_argument(
        "--context-weight", type=float, default=0.6, help="synthetic: weight of the context"
    )
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--append", action="store_true", help="with --write: append to the section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(record=True, width=220)
    train, test, gates, desc = load_data(args)
    console.print(
        f"[bold]data[/]: {desc}; train {train.num_tokens} rows, held-out test {test.num_tokens} rows"
    )
    points = tuple(train.hidden) if train.hidden else ()
    horizons = [Horizon(layers_ahead=d) for d in (1, 2, 3) if d < train.meta.num_layers]
    horizons.append(Horizon(tokens_ahead=1))
    all_res, fitted = [], {}
    t_start = time.perf_counter()
    for h in horizons:
        names = default_suite(
            h, has_hidden=bool(train.hidden), has_gates=gates is not None, points=points
        )
        names += ["ngram-set", "token-mlp-sets"]
        ps = []
        for name in names:
            kw = {"epochs": args.epochs} if "mlp" in name or "probe" in name else {}
            t0 = time.perf_counter()
            p = make_predictor(name, h, gates=gates, seed=args.seed, **kw).fit(train)
            p.fit_info["fit_seconds"] = round(time.perf_counter() - t0, 2)
            ps.append(p)
            console.print(f"  fitted {p.label:38s} in {p.fit_info['fit_seconds']:6.2f} s")
        res = compare(
            ps,
            test,
            train=train,
            split_name="test (20% of documents, held out)",
            out_dir=args.out / str(h).replace("=", "").replace("+", ""),
            show=False,
        )
        res.print(console)
        all_res.append((h, ps, res))
        fitted[str(h)] = ps
    console.print(f"fit + evaluation time {time.perf_counter() - t_start:.0f} s")

    # ---------------------------------------------------------------- targets
    sample = test.select(np.arange(min(test.num_tokens, 2048)))
    moe = moe_layer_us(sample.num_tokens, args.seed)
    tgt = Table(title="Issue-6 targets (held-out recall@k; learned = markov, n-gram, neural)")
    for col in (
        "horizon",
        "best learned",
        "recall@k",
        "prior",
        "baseline",
        "worst learned",
        "gate lookahead",
        "best - gate",
    ):
        tgt.add_column(
            col, justify="right" if col not in ("horizon", "best learned", "baseline") else "left"
        )
    summary_rows = []
    for h, _ps, res in all_res:
        held = {r["predictor"]: r for r in res.results if not r["in_sample"]}
        learned = {k: v["overall"]["recall@k"] for k, v in held.items() if k not in BASELINES}
        best = max(learned, key=learned.get)
        worst = min(learned, key=learned.get)
        base_name = "prev-token" if h.kind == "temporal" else "prev-layer"
        gate = held.get("gate-lookahead", {}).get("overall", {}).get("recall@k", float("nan"))
        gate_res = (
            held.get("gate-lookahead(residual)", {})
            .get("overall", {})
            .get("recall@k", float("nan"))
        )
        g = (
            np.nanmax([gate, gate_res])
            if not (np.isnan(gate) and np.isnan(gate_res))
            else float("nan")
        )
        prior = held["prior"]["overall"]["recall@k"]
        base = held[base_name]["overall"]["recall@k"]
        tgt.add_row(
            str(h),
            best,
            f"{learned[best]:.3f}",
            f"{prior:.3f}",
            f"{base_name} {base:.3f}",
            f"{worst} {learned[worst]:.3f}",
            f"{g:.3f}",
            f"{learned[best] - g:+.3f}",
        )
        summary_rows.append((h, best, learned, prior, base_name, base, g))
    console.print(tgt)

    # cost: every learned predictor and gate lookahead, interleaved repeats, medians
    timed_ps = {
        (str(h), p.describe()): p
        for h, ps, _ in all_res
        for p in ps
        if p.describe() not in BASELINES - {"gate-lookahead", "gate-lookahead(residual)"}
    }
    times = {k: [] for k in timed_ps}
    moe_t = []
    for _ in range(args.repeats):
        moe_t.append(moe())
        for k, p in timed_ps.items():
            layers = p.target_layers()
            p.clear_cache()
            t0 = time.perf_counter()
            for layer in layers:
                p.predict_scores(sample, layer)
            times[k].append((time.perf_counter() - t0) / len(layers))
    moe_us = statistics.median(moe_t) * 1e6 / sample.num_tokens
    us = {k: statistics.median(v) * 1e6 / sample.num_tokens for k, v in times.items()}
    cost = Table(
        title=f"Prediction cost vs one MoE layer forward ({moe_us:.2f} µs/token at d128 d_ff256 E8 k2,"
        f" {sample.num_tokens} tokens, {args.threads} thread(s))"
    )
    for col in (
        "horizon",
        "predictor",
        "role",
        "recall@k",
        "params",
        "bytes",
        "µs/token/layer",
        "% of MoE layer",
        "step µs",
    ):
        cost.add_column(col, justify="left" if col in ("horizon", "predictor", "role") else "right")
    for h, _ps, res in all_res:
        held = {r["predictor"]: r["overall"]["recall@k"] for r in res.results if not r["in_sample"]}
        cands = [(held[n], n) for (hz, n) in us if hz == str(h) and n not in BASELINES]
        best = max(cands)[1]
        within = [c for c in cands if us[(str(h), c[1])] < 0.02 * moe_us]
        rows = [(best, "best learned")]
        if within:
            rows.append((max(within)[1], "best learned < 2%"))
        rows += [
            (n, "baseline")
            for n in ("gate-lookahead", "gate-lookahead(residual)")
            if (str(h), n) in us
        ]
        for name, role in rows:
            p = timed_ps[(str(h), name)]
            c = p.cost(sample, repeats=1, steps=10)
            u = us[(str(h), name)]
            cost.add_row(
                str(h),
                name,
                role,
                f"{held[name]:.3f}",
                str(c.params),
                str(c.bytes),
                f"{u:.3f}",
                f"{100 * u / moe_us:.2f}%",
                f"{c.us_per_step:.0f}",
            )
    console.print(cost)
    console.print(
        "notes: '% of MoE layer' = batched prediction time per token for one target layer / one MoE"
        " layer forward time per token (batched, same run). 'step µs' = one live predict_step call"
        " (generic Python path: builds a small Trace each call)."
    )
    for h, best, learned, prior, base_name, base, g in summary_rows:
        beat = [n for n, v in learned.items() if v > prior and v > base]
        console.print(
            f"{h}: {len(beat)}/{len(learned)} learned predictors beat prior and {base_name}; best {best}"
            f" {learned[best]:.3f} vs prior {prior:.3f} ({learned[best] - prior:+.3f}), {base_name}"
            f" {base:.3f} ({learned[best] - base:+.3f})"
            + ("" if np.isnan(g) else f", gate lookahead {g:.3f} ({learned[best] - g:+.3f})")
        )
    if args.write:
        text = console.export_text()
        body = f"{SECTION}\n\nCommand: `python bench/bench_predict.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`\n\n```\n{text.strip()}\n```\n"
        write_section(RESULTS, SECTION, body, append=args.append)
        console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
