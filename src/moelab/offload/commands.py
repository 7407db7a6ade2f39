"""CLI: `moelab offload simulate` (replay a trace against caches + prefetch on a hardware model)
and `moelab generate` (live offloaded generation with a resident-expert budget)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from moelab.errors import ConfigError


def _parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def register(app: typer.Typer) -> None:
    """Add `offload simulate` and `generate` to the moelab app."""
    offload = typer.Typer(help="Expert offloading: replay simulator.", no_args_is_help=True)
    app.add_typer(offload, name="offload")
    __import__("moelab.offload.plan_commands").offload.plan_commands.register_plan(offload)  # 17b

    @offload.command("simulate")
    def simulate_cmd(
        trace: Path = typer.Option(..., help="TraceStore directory of the test split to replay"),
        predictor: str = typer.Option("none", help="none | oracle | a saved predictor directory"),
        cache: str = typer.Option(
            "10%,25%,50%",
            help="cache sizes: percentages or counts of the experts the cache spans (a layer's E"
            " with --per-layer, all L x E with --no-per-layer); a percentage is raised to at"
            " least top_k experts (the fewest that hold one token's experts of a layer), so the"
            " defaults work on every model; a count must be >= top_k",
        ),
        hardware: str = typer.Option(
            "pcie4-mixtral", help="pcie4-mixtral | nvme-ram | this-machine"
        ),
        policies: str = typer.Option(
            "lru,lfu,lfru,static,belady",
            help="policies to compare (moelab.offload.POLICIES, parameters as name:key=value;"
            " 'auto' picks one by replaying --calibration)",
        ),
        per_layer: bool = typer.Option(True, help="cache per layer (else one global cache)"),
        calibration: Path | None = typer.Option(
            None,
            help="TraceStore of a train/validation split (never the scored test split): auto"
            " policy choice, --split calibrated and the static policy's experts",
        ),
        auto_candidates: str = typer.Option(
            "",
            help="policies --policies auto chooses among (default: moelab.offload.choose."
            "AUTO_CANDIDATES, the named policies with parameter variants)",
        ),
        split: str = typer.Option(
            "even",
            help="per-layer caches: even (every layer the --cache size) or calibrated (the same"
            " total split unevenly by --calibration hit curves; layers may be fully resident)",
        ),
        floor: int = typer.Option(
            0, help="global cache: experts each layer keeps resident (0 = none, else >= top_k)"
        ),
        staging: int = typer.Option(
            0, help="staging slots per cache group: prefetches enter the cache only when used"
        ),
        warm_from: Path | None = typer.Option(
            None, help="usage JSON (--save-usage) to warm-start every replay from"
        ),
        save_usage: Path | None = typer.Option(
            None, help="write the decayed usage counts of the first policy's replay here (JSON)"
        ),
        model: Path | None = typer.Option(None, help="model dir (this-machine: measure its speed)"),
        expert_bytes: int | None = typer.Option(None, help="override the expert size in bytes"),
        static_from: Path | None = typer.Option(
            None, help="trace whose usage picks static experts (default: --calibration)"
        ),
        budget: int | None = typer.Option(None, help="prefetch budget (experts per token)"),
        prefetch_chunk: int | None = typer.Option(
            None,
            help="bytes per piece of a prefetch read; a wrong one in transfer stops after"
            " its piece (default: the live prefetcher's 2 MiB; 0: whole, unstoppable reads)",
        ),
        tier: str = typer.Option("auto", help="store tier measured for this-machine"),
        out: Path | None = typer.Option(None, help="write offload_sim.json + hit-rate PNG here"),
        seed: int = typer.Option(0, help="random seed"),
    ) -> None:
        """Replay a trace against each policy and cache size, with predictor-driven prefetch."""
        from rich.console import Console
        from rich.table import Table

        from moelab.offload.cache import POLICIES, load_usage, parse_capacity, usage_counts
        from moelab.offload.choose import choose_policy, split_layers
        from moelab.offload.policies import parse_policy
        from moelab.offload.simulate import get_hardware, oracle_plan, plot_curves, simulate
        from moelab.trace.schema import check_same_model
        from moelab.trace.store import TraceStore

        tr = TraceStore.open(trace).load()
        m = tr.meta
        ids = tr.computed_expert_ids()  # capacity-dropped slots load nothing
        L, E, k = m.num_layers, m.num_experts, m.top_k
        span = E if per_layer else L * E
        specs = _parse_list(cache)
        if not specs:
            raise ConfigError(f"--cache {cache!r}: expected sizes like '10%,25%' or '2,4'")
        pols = _parse_list(policies)
        if not pols:
            raise ConfigError(f"--policies {policies!r}: expected names like 'lru,arc'")
        for pol in pols + _parse_list(auto_candidates):
            if pol != "auto":
                try:
                    parse_policy(pol)
                except ConfigError as exc:
                    raise ConfigError(f"--policies: {exc}") from None
        if split not in ("even", "calibrated"):
            raise ConfigError(f"--split {split!r}: expected even or calibrated")
        if split == "calibrated" and not per_layer:
            raise ConfigError("--split calibrated splits per-layer caches; drop --no-per-layer")
        if floor and per_layer:
            raise ConfigError("--floor is for a global cache (--no-per-layer)")
        if floor and floor < k:
            raise ConfigError(f"--floor {floor}: must be 0 or >= top_k={k}")
        calib = None
        if calibration is not None:
            calib = TraceStore.open(calibration).load()
            calib.expert_ids = calib.computed_expert_ids()
            cm = calib.meta
            check_same_model(
                cm.model_fingerprint, cm.model, f"--calibration {calibration}",
                m.model_fingerprint, m.model, f"--trace {trace}",
            )  # fmt: skip
            if (cm.num_layers, cm.num_experts, cm.top_k) != (L, E, k):
                raise ConfigError(
                    f"--calibration {calibration} has (L, E, k)="
                    f"{(cm.num_layers, cm.num_experts, cm.top_k)}, --trace {trace} has {(L, E, k)}"
                )
            if calib.meta.split and calib.meta.split == m.split and m.split == "test":
                raise ConfigError(
                    f"--calibration {calibration} is the test split, like --trace; calibrate on"
                    " a train/validation split so the scored split stays held out"
                )
        if ("auto" in pols or split == "calibrated") and calib is None:
            raise ConfigError(
                "--policies auto and --split calibrated need --calibration (a train/validation"
                " trace store)"
            )
        try:
            resolved = {c: parse_capacity(c, L, E, k, per_layer) for c in specs}
        except ConfigError as exc:
            raise ConfigError(f"--cache {cache!r}: {exc}") from None
        for c, n in resolved.items():
            if c.endswith("%") and n == k and round(float(c[:-1]) / 100 * span) < n:
                typer.echo(
                    f"note: cache {c} of {span} experts is fewer than top_k={k};"
                    f" using {n} experts (the fewest that hold one token's experts of a layer)"
                )
        caps = sorted(set(resolved.values()))
        calib_plan = None
        if predictor == "none":
            plan = None
        elif predictor == "oracle":
            plan = oracle_plan(ids, 1)
            calib_plan = oracle_plan(calib.expert_ids, 1) if calib is not None else None
        else:
            from moelab.offload.simulate import plan_from_predictor
            from moelab.predict.base import Predictor

            pred = Predictor.load(predictor)
            pred.check_model(tr.meta, f"--trace {trace}", str(predictor))
            plan = plan_from_predictor(pred, tr)
            calib_plan = plan_from_predictor(pred, calib) if calib is not None else None
        if hardware == "this-machine":
            hw = _measure_machine(model, tier, seed)
        else:
            hw = get_hardware(hardware, expert_bytes=expert_bytes)
        nb = expert_bytes or hw.expert_bytes
        if nb is None:
            raise ConfigError(
                "offload simulate: give --expert-bytes (the preset has no expert size)"
            )
        static_src = (
            TraceStore.open(static_from).load().computed_expert_ids()
            if static_from
            else (calib.expert_ids if calib is not None else ids)
        )
        static_counts = usage_counts(static_src, E)
        warm = load_usage(warm_from, L, E) if warm_from is not None else None
        table = Table(
            title=f"replay of {trace} ({tr.num_tokens} tokens) on {hw.name}, predictor {predictor}"
        )
        for col in ("policy", "cache", "hit", "timely", "MB/token", "stall ms/tok", "tok/s"):
            table.add_column(col)
        curves: dict[str, list[dict]] = {}
        choices: list[dict] = []
        opts = {"floor": floor, "staging": staging, "warm_counts": warm,
                "chunk_bytes": prefetch_chunk}  # fmt: skip
        for pol in pols:
            for c in caps:
                if pol.split(":")[0] == "static" and c <= k:
                    continue
                slots = (
                    split_layers(calib.expert_ids, E, c * L, floor=k + staging)
                    if split == "calibrated"
                    else None
                )
                used = pol
                if pol == "auto":
                    choice = choose_policy(
                        calib.expert_ids, E, c, _parse_list(auto_candidates) or None,
                        plan=calib_plan, hardware=hw,
                        per_layer=per_layer, expert_bytes=nb, static_counts=static_counts,
                        budget=budget, layer_slots=slots, calibration=str(calibration), **opts,
                    )  # fmt: skip
                    used = choice.policy
                    typer.echo(f"cache {c}/{span}: {choice.reason}")
                    choices.append({"cache": c, **choice.to_dict()})
                r = simulate(
                    ids, E, c, used, hw, plan, per_layer=per_layer, expert_bytes=nb,
                    static_counts=static_counts, budget=budget, predictor_name=predictor,
                    layer_slots=slots, **opts,
                ).to_dict()  # fmt: skip
                r["policy_used"] = used
                if save_usage is not None and not curves:
                    _save_replay_usage(ids, E, c, used, hw, plan, per_layer, nb, save_usage)
                curves.setdefault(pol, []).append(r)
                label = f"{c}/{span}" + (f" {slots}" if slots else "")
                table.add_row(
                    pol if pol == used else f"{pol} ({used})",
                    label,
                    f"{r['hit_rate']:.3f}",
                    f"{r['timely_hit_rate']:.3f}",
                    f"{r['bytes_per_token'] / 1e6:.2f}",
                    f"{r['stall_ms_per_token']:.2f}",
                    f"{r['tokens_per_s']:.2f}",
                )
        Console().print(table)
        if "belady" not in pols:
            typer.echo(f"(policies available: {', '.join(POLICIES)}, auto)")
        if out is not None:
            from moelab._io import atomic_write_json

            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(
                out / "offload_sim.json",
                {
                    "hardware": hw.to_dict(),
                    "curves": curves,
                    "per_layer": per_layer,
                    "span": span,
                    "auto": choices,
                    "calibration": str(calibration) if calibration else None,
                },
            )
            plot_curves(
                curves,
                span,
                out / "hit_rate_vs_cache.png",
                f"{predictor} prefetch, {hw.name}",
            )
            typer.echo(f"wrote {out / 'offload_sim.json'} and {out / 'hit_rate_vs_cache.png'}")

    @app.command("generate")
    def generate_cmd(
        model: Path = typer.Option(
            ..., help="moelab checkpoint or local transformers MoE model dir"
        ),
        prompt: str = typer.Option(..., help="prompt text"),
        max_new_tokens: int = typer.Option(32, help="tokens to generate (greedy)"),
        resident: str = typer.Option("25%", help="resident experts per layer: percentage or count"),
        policy: str = typer.Option(
            "lru", help="cache policy: any of moelab.offload.POLICIES except belady (replay only)"
        ),
        prefetch: str = typer.Option(
            "gate", help="none | gate | gate2 | prev | gate+prev | predictor dir"
        ),
        store: Path | None = typer.Option(
            None, help="expert store dir (default <model>/expert_store)"
        ),
        tier: str = typer.Option("auto", help="auto | direct | fadvise | throttle | ram"),
        bandwidth: float | None = typer.Option(None, help="throttle tier: bytes/s"),
        latency: float = typer.Option(0.0, help="throttle tier: seconds per read"),
        budget: int | None = typer.Option(None, help="prefetch budget (experts per token)"),
        prefetch_chunk: int | None = typer.Option(
            None, help="bytes per piece of a prefetch read (default 2 MiB; 0: whole reads)"
        ),
        loader: str = typer.Option(
            "auto",
            help="who reads prefetches: auto | thread | process (a helper process; file tiers)",
        ),
        tokenizer: Path | None = typer.Option(
            None, help="tokenizer file/dir (default: beside model)"
        ),
        compare: bool = typer.Option(
            True, help="also run all-resident: check equality, speed ratio"
        ),
        repeats: int = typer.Option(
            3, help="interleaved all-resident / offloaded repeats for the speed ratio"
        ),
        device: str = typer.Option("cpu", help="device"),
        seed: int = typer.Option(0, help="random seed"),
    ) -> None:
        """Generate with only `--resident` experts per layer in memory; report prefill and decode."""
        import torch

        from moelab.offload.live import generate_offloaded
        from moelab.trace.api import find_tokenizer, load_model, make_encoder

        torch.manual_seed(seed)
        tok = find_tokenizer(tokenizer or model)
        if tokenizer is not None and Path(tokenizer).is_file():
            from moelab.data.tokenizer import load_tokenizer

            tok = load_tokenizer(tokenizer)
        encode, bos, _ = make_encoder(tok)
        ids = ([bos] if bos is not None else []) + list(encode(prompt))
        x = torch.tensor([ids], dtype=torch.long, device=device)
        report = generate_offloaded(
            lambda: load_model(model, device=device),
            x,
            max_new_tokens,
            resident=resident,
            policy=policy,
            prefetch=prefetch,
            store_dir=store or Path(model) / "expert_store",
            tier=tier,
            bandwidth=bandwidth,
            latency=latency,
            budget=budget,
            compare=compare,
            repeats=repeats,
            prefetch_chunk=prefetch_chunk,
            loader=loader,
        )
        text = tok.decode(report.pop("output_ids")[len(ids) :])
        typer.echo(f"output: {text!r}")
        typer.echo(json.dumps(report, indent=1, default=float))
        if compare:
            from moelab.timing import RatioSummary

            speed = RatioSummary(tuple(report["speed_vs_all_resident_repeats"]), True)
            typer.echo(f"speed vs all-resident: {speed.text()}")


def _measure_machine(model: Path | None, tier: str, seed: int):
    """Hardware 'this-machine': store read speed and all-resident per-layer decode time."""
    import tempfile

    import torch

    from moelab.offload.live import measure_layer_compute
    from moelab.offload.simulate import measure_this_machine
    from moelab.offload.store import ExpertStore
    from moelab.trace.api import load_model

    if model is None:
        raise ConfigError("--hardware this-machine needs --model DIR to measure compute and reads")
    m = load_model(model)
    with tempfile.TemporaryDirectory() as d:
        ExpertStore.write(m, d)
        with ExpertStore(d, tier=tier) as st:
            g = torch.Generator().manual_seed(seed)
            x = torch.randint(0, 50, (1, 16), generator=g)
            per_layer, overhead = measure_layer_compute(m, x, 16)
            return measure_this_machine(st, per_layer, overhead, seed=seed)


def _save_replay_usage(ids, E, cap, policy, hw, plan, per_layer, nb, path) -> None:
    """Replay once more, keeping the cache, and save its decayed usage counts as JSON."""
    from moelab.offload.simulate import simulate

    made = []
    simulate(
        ids, E, cap, policy, hw, plan, per_layer=per_layer, expert_bytes=nb, on_cache=made.append
    )
    made[-1].save_usage(path)
    typer.echo(f"wrote decayed usage counts to {path}")
