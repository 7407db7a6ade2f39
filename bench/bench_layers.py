"""Benchmark the moelab MoE block against transformers' MixtralSparseMoeBlock (and lucidrains'
`mixture-of-experts` when installed) on a Mixtral-shaped block, fp32 on CPU.

Run:  THP_MEM_ALLOC_ENABLE=1 .venv/bin/python bench/bench_layers.py [--write]

Measures, in one interleaved run (every repeat times every variant once; medians reported):
forward (no grad) and forward+backward at T tokens, and batch-1 decode latency (1 token).
GFLOP/s count the active-expert FLOPs 2*T*k*3*d*d_ff (x3 for forward+backward) and are
compared with a same-run fp32 2048x2048 matmul. All variants share the same weights, so they
route identically. `--write` replaces the "## Layers (bench_layers.py)" section of
bench/RESULTS.md (other sections are left alone).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # must precede torch's first allocation
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from _results import RESULTS, write_section  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import track  # noqa: E402
from rich.table import Table  # noqa: E402

from moelab.layers.config import MoEConfig  # noqa: E402
from moelab.layers.experts import grouped_mm_available  # noqa: E402
from moelab.layers.moe import MoEBlock  # noqa: E402

SECTION = "## Layers (bench_layers.py)"


def timed(fn) -> float:
    """Seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def build_variants(args, seed: int):
    """Return (forward callables, forward+backward callables, decode callables, notes)."""
    torch.manual_seed(seed)
    d, f, E, k, T = args.d_model, args.d_ff, args.experts, args.top_k, args.tokens
    cfg = MoEConfig(d_model=d, d_ff=f, num_experts=E, top_k=k)
    ours = MoEBlock(cfg, backend="loop")
    with torch.no_grad():
        ours.router.gate.weight.normal_(0, 0.02)
    x = torch.randn(1, T, d)
    x1 = torch.randn(1, 1, d)
    gout = torch.randn(1, T, d)
    notes: list[str] = []
    fwd: dict = {}
    fb: dict = {}
    dec: dict = {}

    def add(name, module, call):
        def f_fwd():
            with torch.no_grad():
                call(module, x)

        def f_fb():
            module.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            (call(module, xi) * gout).sum().backward()

        def f_dec():
            with torch.no_grad():
                for _ in range(args.decode_calls):
                    call(module, x1)

        fwd[name], fb[name], dec[name] = f_fwd, f_fb, f_dec

    add("moelab loop", ours, lambda m, z: m(z)[0])
    if grouped_mm_available():
        ours_g = MoEBlock(cfg, backend="grouped_mm")
        ours_g.load_state_dict(ours.state_dict())
        add("moelab grouped_mm", ours_g, lambda m, z: m(z)[0])
    else:
        notes.append("moelab grouped_mm skipped: this torch has no grouped_mm")

    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        for impl in ("eager", "grouped_mm"):
            hc = MixtralConfig(
                hidden_size=d,
                intermediate_size=f,
                num_local_experts=E,
                num_experts_per_tok=k,
                experts_implementation=impl,
            )
            hf = MixtralSparseMoeBlock(hc)
            with torch.no_grad():
                hf.gate.weight.copy_(ours.router.gate.weight)
                hf.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
                hf.experts.down_proj.copy_(ours.experts.down_proj)
            add(f"transformers {impl}", hf, lambda m, z: m(z))
    except ImportError as exc:
        notes.append(f"transformers skipped: {exc}")

    try:
        from mixture_of_experts import MoE as LucidMoE

        # two-matrix GELU experts with hidden 1.5*d_ff: the same FLOPs per (token, expert) as a
        # 3-matrix SwiGLU expert of d_ff; top-2 with GShard capacity (eval factor 2), policy "all"
        luc = LucidMoE(
            dim=d,
            num_experts=E,
            hidden_dim=f * 3 // 2,
            activation=torch.nn.GELU,
            second_policy_train="all",
            second_policy_eval="all",
        )
        luc.eval()
        add("lucidrains mixture-of-experts", luc, lambda m, z: m(z)[0])
        notes.append(
            "lucidrains mixture-of-experts 0.2.3: GELU experts of hidden 1.5*d_ff (same expert "
            "FLOPs), GShard top-2 with capacity factor 2 (may drop tokens), dense einsum dispatch"
        )
    except ImportError:
        notes.append(
            "lucidrains mixture-of-experts skipped: not installed (pip install mixture-of-experts)"
        )
    return fwd, fb, dec, notes


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, optionally write bench/RESULTS.md."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1408)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--decode-calls", type=int, default=50, help="1-token calls per decode sample")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help="write the table to bench/RESULTS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=220)

    fwd, fb, dec, notes = build_variants(args, args.seed)
    a, b, c = torch.randn(2048, 2048), torch.randn(2048, 2048), torch.empty(2048, 2048)
    mm = {"matmul 2048² fp32": lambda: torch.mm(a, b, out=c)}
    for fn in [*mm.values(), *fwd.values(), *fb.values(), *dec.values()]:
        fn()  # warm up
    t_fwd = {n: [] for n in [*mm, *fwd]}
    t_fb = {n: [] for n in fb}
    t_dec = {n: [] for n in dec}
    for _ in track(range(args.repeats), description="interleaved repeats", console=console):
        for n, fn in [*mm.items(), *fwd.items()]:
            t_fwd[n].append(timed(fn))
        for n, fn in fb.items():
            t_fb[n].append(timed(fn))
        for n, fn in dec.items():
            t_dec[n].append(timed(fn) / args.decode_calls)
    med = {n: statistics.median(v) for n, v in t_fwd.items()}
    med_fb = {n: statistics.median(v) for n, v in t_fb.items()}
    med_dec = {n: statistics.median(v) for n, v in t_dec.items()}

    T, k, d, f = args.tokens, args.top_k, args.d_model, args.d_ff
    flops = 2 * T * k * 3 * d * f
    mm_rate = 2 * 2048**3 / med["matmul 2048² fp32"] / 1e9
    ref = "transformers eager"
    rows = []
    for n in fwd:
        g = flops / med[n] / 1e9
        g_fb = 3 * flops / med_fb[n] / 1e9
        rows.append(
            (
                n,
                f"{med[n] * 1e3:.1f}",
                f"{g:.1f}",
                f"{g / mm_rate:.2f}",
                f"{med[ref] / med[n]:.2f}" if ref in med else "-",
                f"{med_fb[n] * 1e3:.1f}",
                f"{g_fb:.1f}",
                f"{med_fb[ref] / med_fb[n]:.2f}" if ref in med_fb else "-",
                f"{med_dec[n] * 1e6:.0f}",
                f"{med_dec[ref] / med_dec[n]:.2f}" if ref in med_dec else "-",
            )
        )
    header = (
        "variant",
        "fwd ms",
        "fwd GFLOP/s",
        "fwd / matmul",
        "fwd speedup vs HF eager",
        "fwd+bwd ms",
        "fwd+bwd GFLOP/s",
        "fwd+bwd speedup vs HF eager",
        "decode µs (1 token)",
        "decode speedup vs HF eager",
    )
    table = Table(
        title=f"MoE block d={d} d_ff={f} E={args.experts} k={k} T={T} fp32, "
        f"{args.threads} threads; matmul 2048² = {mm_rate:.1f} GFLOP/s"
    )
    for h in header:
        table.add_column(h, justify="left" if h == "variant" else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    for n in notes:
        console.print(f"[dim]note: {n}[/dim]")

    if args.write:
        cmd = "THP_MEM_ALLOC_ENABLE=1 .venv/bin/python bench/bench_layers.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        quiet = mm_rate >= 120  # a quiet 2-core Zen 4 machine gives about 190 GFLOP/s
        lines = [
            SECTION,
            "",
            *(
                []
                if quiet
                else [
                    f"**Provisional: measured under heavy contention (same-run 2048² matmul "
                    f"{mm_rate:.1f} GFLOP/s against about 190 on a quiet machine of this kind): "
                    "ratios are distorted by scheduling; rerun on a quiet machine.**",
                    "",
                ]
            ),
            f"Command: `{cmd.strip()}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"torch {torch.__version__}, {args.repeats} interleaved repeats, medians).",
            "",
            f"Block d_model={d}, d_ff={f}, E={args.experts}, k={k}, {T} tokens, fp32, "
            f"{args.threads} threads. GFLOP/s on active-expert FLOPs 2·T·k·3·d·d_ff "
            f"({flops / 1e9:.1f} GFLOP forward; ×3 for forward+backward). Same-run fp32 2048² "
            f"matmul: {mm_rate:.1f} GFLOP/s. Targets: fwd/matmul ≥ 0.85, fwd speedup ≥ 1.10, "
            "decode speedup ≥ 1.00.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows),
            "",
            *(f"- {n}" for n in notes),
            "",
        ]
        write_section(RESULTS, SECTION, "\n".join(lines))
        console.print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
