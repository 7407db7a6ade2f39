"""Benchmark the moelab MoETransformer against transformers' MixtralForCausalLM with the same
weights (exported with `moelab.models.export.export_hf`), fp32 on CPU.

Run:  THP_MEM_ALLOC_ENABLE=1 .venv/bin/python bench/bench_models.py [--write]

One interleaved run (every repeat times every variant once; medians): full forward of a batch
(no grad), forward+backward with the training loss, and greedy generation of N tokens with the
KV cache, without it, and transformers' `generate` (greedy, cache). GFLOP/s use
`model.stats()` (forward FLOPs per token at the batch's sequence length; x3 for training).
`--write` replaces the "## Models (bench_models.py)" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # must precede torch's first allocation
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from _results import RESULTS, write_section  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import track  # noqa: E402
from rich.table import Table  # noqa: E402

from moelab.layers.config import MoEConfig  # noqa: E402
from moelab.models import MoETransformer, MoETransformerConfig  # noqa: E402
from moelab.models.export import export_hf  # noqa: E402

SECTION = "## Models (bench_models.py)"


def timed(fn) -> float:
    """Seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Build both models, time the variants interleaved, print (and optionally write) the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help="write the table to bench/RESULTS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()
    from transformers import AutoModelForCausalLM

    cfg = MoETransformerConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.d_model // 64,
        d_ff=args.d_ff * args.top_k,
        max_seq_len=args.seq + args.new_tokens,
        moe=MoEConfig(
            d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, top_k=args.top_k
        ),
    )
    ours = MoETransformer(cfg, seed=args.seed).eval()
    tmp = tempfile.mkdtemp(prefix="bench_models_")
    hf = AutoModelForCausalLM.from_pretrained(export_hf(ours, Path(tmp) / "hf")).eval()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    prompt = torch.randint(0, args.vocab, (1, 16), generator=g)
    n_new = args.new_tokens
    with torch.no_grad():
        diff = (ours(x).logits - hf(x).logits).abs().max().item()

    def ours_train() -> None:
        ours.zero_grad(set_to_none=True)
        ours(x, labels=x).loss.backward()

    def hf_train() -> None:
        hf.zero_grad(set_to_none=True)
        hf(x, labels=x, output_router_logits=True).loss.backward()

    def no_grad(fn):
        def run() -> None:
            with torch.no_grad():
                fn()

        return run

    variants = {
        "forward": {"moelab": no_grad(lambda: ours(x)), "transformers": no_grad(lambda: hf(x))},
        "forward+backward": {"moelab": ours_train, "transformers": hf_train},
        "generate": {
            "moelab (KV cache)": lambda: ours.generate(prompt, n_new, use_cache=True),
            "moelab (no cache)": lambda: ours.generate(prompt, n_new, use_cache=False),
            "transformers (cache)": no_grad(
                lambda: hf.generate(
                    prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False
                )
            ),
        },
    }
    same = torch.equal(
        ours.generate(prompt, n_new),
        hf.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False),
    )
    for group in variants.values():
        for fn in group.values():
            fn()  # warm up
    times = {(gname, v): [] for gname, group in variants.items() for v in group}
    for _ in track(range(args.repeats), description="interleaved repeats", console=console):
        for gname, group in variants.items():
            for v, fn in group.items():
                times[(gname, v)].append(timed(fn))
    med = {key: statistics.median(ts) for key, ts in times.items()}
    stats = ours.stats(seq_len=args.seq)
    tokens = args.batch * args.seq
    rows = []
    for (gname, v), t in med.items():
        ref = (
            med[(gname, "transformers")]
            if gname != "generate"
            else med[(gname, "transformers (cache)")]
        )
        if gname == "generate":
            rate = f"{n_new / t:,.0f} tok/s"
        else:
            flops = stats.flops_per_token_fwd * tokens * (3 if gname == "forward+backward" else 1)
            rate = f"{flops / t / 1e9:.1f} GFLOP/s"
        rows.append([gname, v, f"{1000 * t:.1f}", rate, f"{ref / t:.2f}"])
    table = Table(title=f"MoETransformer vs MixtralForCausalLM (max |Δlogit| {diff:.1e})")
    header = ["what", "variant", "median ms", "rate", "speed vs transformers"]
    for h in header:
        table.add_column(h)
    for r in rows:
        table.add_row(*r)
    console.print(table)
    console.print(f"greedy tokens identical to transformers: {same}")
    if args.write:
        cmd = "python bench/bench_models.py " + " ".join(sys.argv[1:])
        lines = [
            SECTION,
            "",
            f"Command: `{cmd.strip()}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"torch {torch.__version__}, {args.repeats} interleaved repeats, medians, "
            f"{args.threads} threads).",
            "",
            f"Model: {args.layers} layers, d_model {args.d_model}, E={args.experts}, k={args.top_k}, "
            f"expert d_ff {args.d_ff}, vocab {args.vocab}; forward/backward on {args.batch}×{args.seq} "
            f"tokens; generate {n_new} tokens after a 16-token prompt (batch 1). Max |Δlogit| vs "
            f"transformers {diff:.1e}; greedy tokens identical: {same}.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows),
            "",
        ]
        write_section(RESULTS, SECTION, "\n".join(lines))
        console.print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
