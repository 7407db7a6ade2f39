"""Experts benchmark on a trained model (default: the demo's MoE): the cost of ablating every
expert with the default sample, pruning to E/2 by importance vs by index (and the other
criteria, merging) on held-out text, and distillation into a dense student of the active size.

Cost is reported as a ratio against one plain forward pass over the same sample, measured in
the same run as interleaved repeats (median); absolute seconds are for the machine it ran on.

    PYTHONPATH=src python bench/bench_experts.py --model runs/demo/train/moe/model \
        --data runs/demo/train/data --threads 2 --out runs/bench_experts
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from moelab._io import atomic_write_json
from moelab.experts.ablate import ablation_importance
from moelab.experts.heldout import load_sample, sequence_sums
from moelab.experts.shrink import plot_sweep, shrink_sweep
from moelab.models import MoETransformer


def main() -> None:
    """Run the three measurements and print their tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_experts"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sample", type=int, default=8192, help="the ablate command's default")
    ap.add_argument("--repeats", type=int, default=1, help="full ablations (forwards: +1)")
    ap.add_argument("--distill-steps", type=int, default=0, help="0 = skip distillation")
    ap.add_argument("--distill-batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = MoETransformer.load(args.model)
    tok = args.model / "tokenizer.json"
    seq = min(128, m.cfg.max_seq_len)
    test = load_sample(args.data, "test", args.sample, seq, m.cfg.vocab_size, tok)
    val = load_sample(args.data, "validation", args.sample, seq, m.cfg.vocab_size, tok)
    E, L = m.cfg.moe.num_experts, len(m.moe_layer_indices())
    out: dict = {"model": str(args.model), "threads": args.threads, "E": E, "moe_layers": L}

    # 1. ablation cost: full ablation (both modes) vs one forward pass, interleaved repeats
    fwd, full = [], []
    res = None
    t0 = time.perf_counter()
    sequence_sums(m, test)
    fwd.append(time.perf_counter() - t0)
    for _ in range(args.repeats):  # interleaved: forward, ablation, forward, ...
        t0 = time.perf_counter()
        res = ablation_importance(m, test, show_progress=False)
        full.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sequence_sums(m, test)
        fwd.append(time.perf_counter() - t0)
    cpu0 = time.process_time()
    ablation_importance(m, test, modes=("zero",), layers=[0], show_progress=False)
    cpu_one_layer = time.process_time() - cpu0
    f_med, a_med = statistics.median(fwd), statistics.median(full)
    out["ablation"] = {
        "sample_tokens": test.num_tokens, "sequences": test.num_sequences,
        "ablations": 2 * E * L, "forward_s_median": f_med, "ablate_all_s_median": a_med,
        "ablate_all_s_range": [min(full), max(full)], "ratio_to_one_forward": a_med / f_med,
        "cpu_s_one_mode_one_layer": cpu_one_layer,
        "max_se_all": {mode: float(res.se[mode][:, :, -1].max()) for mode in res.modes},
        "median_abs_delta_all": {
            mode: float(statistics.median(abs(x) for x in res.delta[mode][:, :, -1].ravel()))
            for mode in res.modes
        },
    }  # fmt: skip
    print(f"\nablating all {E} x {L} experts in 2 modes ({2 * E * L} ablations), "
          f"{test.num_tokens} tokens, {args.threads} threads, {args.repeats} ablation run(s) interleaved with {len(fwd)} forwards")  # fmt: skip
    print(f"{'what':28s} {'median s':>9s} {'min..max s':>14s} {'ratio':>7s}")
    print(
        f"{'one forward (reference)':28s} {f_med:9.2f} {min(fwd):6.2f}..{max(fwd):<6.2f} {1.0:7.2f}"
    )
    print(
        f"{'ablate every expert':28s} {a_med:9.2f} {min(full):6.2f}..{max(full):<6.2f} {a_med / f_med:7.1f}"
    )
    for mode in res.modes:
        print(f"  {mode}: largest SE of the all-domain loss change {out['ablation']['max_se_all'][mode]:.4f}"
              f" nats; median |change| {out['ablation']['median_abs_delta_all'][mode]:.4f}")  # fmt: skip

    # 2. prune / merge sweep: selection on validation, perplexity on test
    imp = ablation_importance(m, val, modes=("reroute",), show_progress=False).importance("reroute")
    sizes = sorted({E * 3 // 4, E // 2, E // 4}, reverse=True)
    sw = shrink_sweep(m, val, test, sizes, importance=imp)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_sweep(sw, args.out / "sweep.png")
    out["sweep"] = {
        k: v for k, v in sw.items() if k not in ("frequency", "gate_mass", "importance")
    }
    print(f"\nheld-out ({sw['eval_split']}) perplexity vs experts per layer; full model "
          f"{sw['full_ppl']:.3f}; selection on {sw['calibration_split']}")  # fmt: skip
    print(f"{'method':12s} {'experts':>7s} {'ppl':>8s} {'ratio':>7s} {'d loss':>8s} {'SE':>7s}")
    for r in sw["rows"]:
        print(f"{r['method']:12s} {r['experts']:7d} {r['ppl']:8.3f} {r['ppl_ratio']:7.3f} "
              f"{r['delta_loss']:8.4f} {r['delta_loss_se']:7.4f}")  # fmt: skip

    # 3. distillation into a dense student of the active size
    if args.distill_steps > 0:
        from moelab.data.dataset import pack_blocks
        from moelab.data.prepare import load_prepared
        from moelab.experts.distill import distill_to_dense

        blocks = pack_blocks(load_prepared(args.data).streams["train"], seq)
        d = distill_to_dense(
            m, blocks, test, args.out / "distill", steps=args.distill_steps,
            batch_size=args.distill_batch, lr=3e-3,
        )  # fmt: skip
        out["distill"] = d
        print(f"\ndistillation, {d['tokens_trained']:,} training tokens per student ({d['split']})")
        for k in ("teacher", "alone", "distilled"):
            kl = d["kl_to_teacher"].get(k, 0.0)
            print(
                f"{k:10s} loss {d['loss'][k]['all']:.4f} ppl {math.exp(d['loss'][k]['all']):8.3f} KL {kl:.4f}"
            )
        print(f"share of the MoE-over-dense gain kept: {d['surviving_share']:.3f} "
              f"(bootstrap 95% {d['surviving_share_bootstrap_95']})")  # fmt: skip
    atomic_write_json(args.out / "bench_experts.json", out)
    print(json.dumps({"written": str(args.out / "bench_experts.json")}))


if __name__ == "__main__":
    main()
