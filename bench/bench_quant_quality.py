"""Where a quantised expert tier's perplexity change comes from (issue 17): the quantised weights,
the weight-only kernels' bf16 arithmetic, or the evaluation path.

For each store precision, on the held-out windows of `moelab offload plan` (the test split's
second half), four scorings against full precision, paired per window (ratio ± standard error
over windows) with the fraction of (token, layer) pairs routed to the same experts as full
precision scored the same way:
  kernel, teacher-forced   - what `moelab offload plan` and `run` report (the live path);
  kernel, full-sequence    - one forward per window (what the plan used to report);
  exact, teacher-forced    - dequantised weights in fp32 (quant.exact_arithmetic): the weights' cost;
  exact, full-sequence.
"paths agree" is the fraction of (token, layer) pairs that the two evaluation paths of one
arithmetic route alike: 1.0 up to ties at full precision, and how far below it bf16 rounding
alone moves a model's routing.

Usage: .venv/bin/python bench/bench_quant_quality.py --model runs/smol-testbed/smollm2-moe/moefy/model
         --trace runs/smol-testbed/smollm2-moe/trace/test [--windows 4] [--threads 2]
       .venv/bin/python bench/bench_quant_quality.py --model runs/offload-testbed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch

from moelab.offload.measure import paired_change, routing_agreement, window_losses
from moelab.offload.plan_commands import Context, use_threads
from moelab.offload.quant import exact_arithmetic

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="testbed or model folder")
    ap.add_argument("--trace", type=Path, default=None, help="held-out routing (non-testbed model)")
    ap.add_argument("--windows", type=int, default=0, help="held-out windows scored (0 = all)")
    ap.add_argument("--precisions", default="int8,int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench_quant_quality.json")
    args = ap.parse_args()
    use_threads(args.threads)
    ctx = Context(args.model, args.trace)
    _, ev = ctx.workload.split()
    wins = ev.tokens[: args.windows or None]
    precs = [p.strip() for p in args.precisions.split(",") if p.strip()]
    stores = ctx.stores(["full", *precs])
    t0 = time.perf_counter()
    got: dict[tuple[str, str, str], tuple] = {}
    for arith in ("kernel", "exact"):
        for path in ("teacher-forced", "full-sequence"):
            for p in ["full", *precs]:
                if arith == "exact" and p == "full":
                    continue  # no kernel at full precision: the kernel rows are the reference
                with exact_arithmetic() if arith == "exact" else contextlib.nullcontext():
                    r = window_losses(ctx.load, stores[p], wins, path == "full-sequence")
                got[(arith, path, p)] = r
                print(f"  scored {arith:6} {path:15} {p:5} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)  # fmt: skip
    n_tok = int(got[("kernel", "teacher-forced", "full")][1].sum())
    print(f"\n{len(wins)} held-out windows ({n_tok} scored tokens), {ctx.workload.source}, "
          f"{torch.get_num_threads()} threads; full-precision ppl "
          f"{math.exp(got[('kernel', 'teacher-forced', 'full')][0].sum() / n_tok):.2f} (teacher-"
          f"forced), {math.exp(got[('kernel', 'full-sequence', 'full')][0].sum() / n_tok):.2f} "
          "(full-sequence)\n")  # fmt: skip
    print(
        "| precision | arithmetic | scored by | ppl ratio ± SE | routing kept vs full | paths agree |"
    )
    print("|---|---|---|---|---|---|")
    rows = []
    for p in ["full", *precs]:
        for arith in ("kernel", "exact"):
            if arith == "exact" and p == "full":
                continue
            tf, fs = got[(arith, "teacher-forced", p)], got[(arith, "full-sequence", p)]
            paths = routing_agreement(tf[2], fs[2])
            for path, r in (("teacher-forced", tf), ("full-sequence", fs)):
                base = got[("kernel", path, "full")]
                d, se = paired_change(r[0], base[0], r[1])
                row = {"precision": p, "arithmetic": arith, "scored_by": path,
                       "ppl_ratio": math.exp(d), "ppl_ratio_se": math.exp(d) * se,
                       "routing_kept": routing_agreement(r[2], base[2]), "paths_agree": paths}  # fmt: skip
                rows.append(row)
                print(f"| {p} | {arith} | {path} | {row['ppl_ratio']:.4f}±{row['ppl_ratio_se']:.4f} | "
                      f"{row['routing_kept']:.3f} | {paths:.3f} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"windows": len(wins), "tokens": n_tok, "rows": rows,
                                    "threads": torch.get_num_threads()}, indent=1))  # fmt: skip
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
