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
    ap.add_argument(
        "--parts", default="ablation,sweep,distill", help="comma list: ablation, sweep, distill"
    )
    ap.add_argument(
        "--slow-layer", type=int, default=None,
        help="also time the one-removal-per-forward path on this MoE layer (same run) and "
        "compare its numbers with the batched path's",
    )  # fmt: skip
    ap.add_argument("--distill-steps", type=int, default=0, help="0 = skip distillation")
    ap.add_argument("--distill-batch", type=int, default=16)
    ap.add_argument("--distill-lr", type=float, default=3e-3, help="the demo training's peak lr")
    ap.add_argument("--distill-sample", type=int, default=16384, help="held-out tokens scored")
    ap.add_argument("--dense", type=Path, default=None, help="dense baseline model to score too")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    m = MoETransformer.load(args.model)
    tok = args.model / "tokenizer.json"
    seq = min(128, m.cfg.max_seq_len)
    test = load_sample(args.data, "test", args.sample, seq, m.cfg.vocab_size, tok)
    val = load_sample(args.data, "validation", args.sample, seq, m.cfg.vocab_size, tok)
    E, L = m.cfg.moe.num_experts, len(m.moe_layer_indices())
    out: dict = {"model": str(args.model), "threads": args.threads, "E": E, "moe_layers": L}
    if "ablation" in parts:
        out["ablation"] = _ablation_cost(m, test, args.repeats, args.slow_layer, E, L, args.threads)
    if "sweep" in parts:
        out["sweep"] = _sweep(m, val, test, E, args.out)
    if "distill" in parts and args.distill_steps > 0:
        out["distill"] = _distill(m, args, seq)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "bench_experts.json", out)
    print(json.dumps({"written": str(args.out / "bench_experts.json")}))


def _ablation_cost(m, test, repeats: int, slow_layer, E: int, L: int, threads: int) -> dict:
    """Full ablation (both modes, batched path) vs one plain forward, interleaved repeats; with
    `slow_layer`, that layer by the one-removal-per-forward path too, in the same run."""
    fwd, full = [], []
    res = None
    t0 = time.perf_counter()
    sequence_sums(m, test)
    fwd.append(time.perf_counter() - t0)
    for _ in range(repeats):  # interleaved: forward, ablation, forward, ...
        t0 = time.perf_counter()
        res = ablation_importance(m, test, show_progress=False)
        full.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sequence_sums(m, test)
        fwd.append(time.perf_counter() - t0)
    f_med, a_med = statistics.median(fwd), statistics.median(full)
    o = {
        "path": res.extra["path"],
        "sample_tokens": test.num_tokens, "sequences": test.num_sequences,
        "ablations": 2 * E * L, "forward_s": fwd, "forward_s_median": f_med,
        "ablate_all_s": full, "ablate_all_s_median": a_med,
        "ratio_to_one_forward": a_med / f_med,
        "max_se_all": {mode: float(res.se[mode][:, :, -1].max()) for mode in res.modes},
        "median_abs_delta_all": {
            mode: float(statistics.median(abs(x) for x in res.delta[mode][:, :, -1].ravel()))
            for mode in res.modes
        },
    }  # fmt: skip
    print(f"\nablating all {E} x {L} experts in 2 modes ({2 * E * L} ablations, {res.extra['path']}), "
          f"{test.num_tokens} tokens, {threads} threads, {repeats} ablation run(s) interleaved with {len(fwd)} forwards")  # fmt: skip
    print(f"{'what':34s} {'median s':>9s} {'min..max s':>14s} {'ratio':>7s}")
    print(
        f"{'one forward (reference)':34s} {f_med:9.2f} {min(fwd):6.2f}..{max(fwd):<6.2f} {1.0:7.2f}"
    )
    print(
        f"{'ablate every expert (batched)':34s} {a_med:9.2f} {min(full):6.2f}..{max(full):<6.2f} {a_med / f_med:7.1f}"
    )
    if slow_layer is not None:
        t0 = time.perf_counter()
        lay = ablation_importance(m, test, layers=[slow_layer], show_progress=False)
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        slow = ablation_importance(m, test, layers=[slow_layer], show_progress=False, batched=False)
        t_slow = time.perf_counter() - t0
        diff = max(
            float(abs(lay.delta[k][slow_layer] - slow.delta[k][slow_layer]).max())
            for k in slow.modes
        )
        o["one_layer"] = {
            "layer": slow_layer, "batched_s": t_fast, "one_per_forward_s": t_slow,
            "speedup": t_slow / t_fast, "max_abs_delta_difference": diff,
        }  # fmt: skip
        print(
            f"{f'MoE layer {slow_layer}, batched':34s} {t_fast:9.2f} {'':14s} {t_fast / f_med:7.1f}"
        )
        print(f"{f'MoE layer {slow_layer}, one per forward':34s} {t_slow:9.2f} {'':14s} {t_slow / f_med:7.1f}")  # fmt: skip
        print(f"  same numbers: largest |difference| of a loss change {diff:.2e} nats")
    for mode in res.modes:
        print(f"  {mode}: largest SE of the all-domain loss change {o['max_se_all'][mode]:.4f}"
              f" nats; median |change| {o['median_abs_delta_all'][mode]:.4f}")  # fmt: skip
    return o


def _sweep(m, val, test, E: int, out_dir: Path) -> dict:
    # 2. prune / merge sweep: selection on validation, perplexity on test
    imp = ablation_importance(m, val, modes=("reroute",), show_progress=False).importance("reroute")
    sizes = sorted({E * 3 // 4, E // 2, E // 4}, reverse=True)
    sw = shrink_sweep(m, val, test, sizes, importance=imp)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_sweep(sw, out_dir / "sweep.png")
    print(f"\nheld-out ({sw['eval_split']}) perplexity vs experts per layer; full model "
          f"{sw['full_ppl']:.3f}; selection on {sw['calibration_split']}")  # fmt: skip
    print(f"{'method':12s} {'experts':>7s} {'ppl':>8s} {'ratio':>7s} {'d loss':>8s} {'SE':>7s}")
    for r in sw["rows"]:
        print(f"{r['method']:12s} {r['experts']:7d} {r['ppl']:8.3f} {r['ppl_ratio']:7.3f} "
              f"{r['delta_loss']:8.4f} {r['delta_loss_se']:7.4f}")  # fmt: skip
    return {k: v for k, v in sw.items() if k not in ("frequency", "gate_mass", "importance")}


def _distill(m, args, seq: int) -> dict:
    """Distil into a dense student of the active size vs the same student alone (same tokens);
    with --dense, the trained dense baseline is scored on the same held-out sample too."""
    from moelab.data.dataset import pack_blocks
    from moelab.data.prepare import load_prepared
    from moelab.experts.distill import distill_to_dense
    from moelab.experts.heldout import domain_loss

    tok = args.model / "tokenizer.json"
    evals = load_sample(args.data, "test", args.distill_sample, seq, m.cfg.vocab_size, tok)
    blocks = pack_blocks(load_prepared(args.data).streams["train"], seq)
    t0 = time.perf_counter()
    d = distill_to_dense(
        m, blocks, evals, args.out / "distill", steps=args.distill_steps,
        batch_size=args.distill_batch, lr=args.distill_lr,
    )  # fmt: skip
    d["seconds"] = time.perf_counter() - t0
    print(f"\ndistillation, {d['tokens_trained']:,} training tokens per student ({d['split']}, "
          f"{evals.num_tokens} tokens), {d['seconds']:.0f} s")  # fmt: skip
    rows = ["teacher", "alone", "distilled"]
    if args.dense is not None:
        dense = MoETransformer.load(args.dense)
        s, c = sequence_sums(dense, evals)
        dl = domain_loss(s, c, evals.domains)
        d["loss"]["dense_baseline"], d["loss_se"]["dense_baseline"] = dl.value, dl.se
        d["ppl"]["dense_baseline"] = math.exp(dl.value["all"])
        lb, lt, ld = (d["loss"][k]["all"] for k in ("dense_baseline", "teacher", "distilled"))
        d["share_vs_dense_baseline"] = (lb - ld) / (lb - lt) if lb > lt else float("nan")
        rows.insert(1, "dense_baseline")
    for k in rows:
        kl = d["kl_to_teacher"].get(k, 0.0)
        print(f"{k:15s} loss {d['loss'][k]['all']:.4f} ± {d['loss_se'][k]['all']:.4f} "
              f"ppl {d['ppl'][k]:8.3f} KL {kl:.4f}")  # fmt: skip
    print(f"share of the MoE-over-dense gain kept (vs the student alone, same tokens): "
          f"{d['surviving_share']:.3f} (bootstrap 95% {d['surviving_share_bootstrap_95']})")  # fmt: skip
    if "share_vs_dense_baseline" in d:
        print(f"share vs the trained dense baseline: {d['share_vs_dense_baseline']:.3f}")
    return d


if __name__ == "__main__":
    main()
