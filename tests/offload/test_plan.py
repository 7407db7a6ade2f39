"""Offload planner on a tiny testbed: output shape and order, same numbers as simulate, prefetch
verdicts, refusals, and live runs of planned configurations (exact at full precision)."""

import argparse
import math

import pytest
import torch

from moelab.errors import ConfigError, OffloadError
from moelab.offload.plan import (
    Hardware,
    ModelShape,
    decode_steps,
    parse_memory,
    policies,
    prefetch_limit,
    split_precision,
)
from moelab.offload.plan_commands import Context, make_plan, run_config
from moelab.offload.simulate import simulate
from moelab.offload.testbed import TINY_SHAPE, TINY_WIDEN, build_testbed


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("tbp")
    build_testbed(
        root,
        steps=2,
        shape=TINY_SHAPE,
        widen=TINY_WIDEN,
        corpus=argparse.__file__,
        max_bytes=None,
        heldout_windows=4,
        progress=False,
    )
    return Context(root, None)


@pytest.fixture(scope="module")
def rep(ctx):
    return make_plan(ctx.model_arg, ["50%", "75%"], bandwidth=1e7, layer_compute=1e-3, ctx=ctx)


def test_parse_memory():
    assert parse_memory("4GiB", 10) == 4 * 2**30
    assert parse_memory("512MB", 10) == 512_000_000
    assert parse_memory("25%", 1000) == 250
    assert parse_memory(1234, 10) == 1234
    for bad in ("4 parsecs", "-1GB", "0%", "abc"):
        with pytest.raises(ConfigError, match="--memory"):
            parse_memory(bad, 1000)


def test_plan_rows_best_first_with_commands(rep, ctx):
    tps = [r.tokens_per_s for r in rep.rows]
    assert len(tps) > 20 and all(math.isfinite(t) and t > 0 for t in tps)
    assert tps == sorted(tps, reverse=True)
    for r in rep.rows:
        assert r.command.startswith(
            f"moelab offload run --model {ctx.model_arg} --memory {r.memory_spec}"
        )
        assert (
            f"--precision {r.precision} --policy {r.policy} --predictor {r.predictor}" in r.command
        )
        assert 0 <= r.hit_rate <= 1 and r.bytes_per_token >= 0
    planned = {r.policy for r in rep.rows}
    refused = {s.split()[1].rstrip(":") for s in rep.skipped if s.startswith("policy ")}
    assert (
        planned | refused == set(policies()) and {"lru", "lfu"} <= planned
    )  # every registered one
    assert {r.precision for r in rep.rows} >= {"full", "int8", "int4", "full+int4"}
    assert {r.predictor for r in rep.rows} == {"none", "gate", "prev", "adaptive", "gate+prev"}
    # full+int4 at 50%: the int4 copies leave fewer than top_k full experts per layer
    assert any("full+int4 at 50%" in s for s in rep.skipped)
    assert len(rep.verdicts) == 6 and all(
        "perfect 1-layer-ahead prefetch" in v for v in rep.verdicts
    )
    # static tiers carry their held-out perplexity ratio; full precision is exactly 1
    assert rep.best(precision="full").ppl_change == 1.0
    assert 0.9 < rep.best(precision="int8").ppl_change < 1.1
    assert all(b["hit_rate"] >= 0 for b in rep.bounds)


def test_plan_numbers_are_simulate_numbers(rep, ctx):
    r = rep.best(precision="full", policy="lru", predictor="none", memory_spec="50%")
    _, ev = ctx.workload.split()
    steps, timed = decode_steps(ev)
    nb = ctx.shape.expert_bytes("full")
    hw = Hardware("x", bandwidth=1e7, latency=0.0, layer_compute=1e-3, expert_bytes=nb)
    sim = simulate(
        ev.expert_ids,
        ctx.shape.num_experts,
        r.slots,
        "lru",
        hw,
        None,
        True,
        steps,
        timed,
        expert_bytes=nb,
    )
    assert sim.tokens_per_s == pytest.approx(r.tokens_per_s, rel=1e-12)
    assert sim.hit_rate == pytest.approx(r.hit_rate, rel=1e-12)
    # int8 moves ~4x fewer bytes per token than full at the same memory and policy
    q = rep.best(precision="int8", policy="lru", predictor="none", memory_spec="50%")
    assert q.slots >= r.slots and q.tokens_per_s > r.tokens_per_s


def test_verdict_when_loads_dominate(ctx):
    slow = make_plan(ctx.model_arg, ["50%"], precisions=["full"], predictors=["none"],
                     policy_names=["lru"], bandwidth=1e4, layer_compute=1e-5, ctx=ctx)  # fmt: skip
    assert len(slow.verdicts) == 1 and "cannot pay" in slow.verdicts[0]
    assert "int8 / int4" in slow.verdicts[0]


def test_verdict_names_the_ceiling_of_two_layers_of_lead(ctx):
    # a load (1.5 ms) outlasts a layer (1 ms): the verdict also replays perfect predictions two
    # layers ahead (across tokens), the same figure the oracle:d=2 row of the plan shows
    rep = make_plan(ctx.model_arg, ["50%"], precisions=["full"],
                    predictors=["none", "oracle", "oracle:d=2"], policy_names=["lru"],
                    bandwidth=5e7, layer_compute=1e-3, ctx=ctx)  # fmt: skip
    (v,) = rep.verdicts
    lru = rep.best(precision="full", policy="lru", predictor="none").tokens_per_s
    one = rep.best(precision="full", policy="lru", predictor="oracle").tokens_per_s / lru
    two = rep.best(precision="full", policy="lru", predictor="oracle:d=2").tokens_per_s / lru
    said1 = float(v.split("prefetch would give ")[1].split("x")[0])
    said2 = float(v.split("Two layers ahead, a perfect predictor would give ")[1].split("x")[0])
    assert said1 == pytest.approx(one, abs=0.006) and said2 == pytest.approx(two, abs=0.006)
    assert two > one  # the longer lead hides more of each load
    # the oracle rows are bounds: never "the predictors here"
    assert "reach" not in v or "+ oracle" not in v
    # where a layer outlasts a load, one layer of lead hides it all: no second figure
    fast = make_plan(ctx.model_arg, ["50%"], precisions=["full"], predictors=["none"],
                     policy_names=["lru"], bandwidth=5e9, layer_compute=1e-3, ctx=ctx)  # fmt: skip
    assert "Two layers ahead" not in fast.verdicts[0]


@pytest.mark.parametrize("predictors", [["none", "gate", "prev"], ["none", "prev"]])
def test_verdict_says_what_the_predictors_at_hand_reach(ctx, predictors):
    # one load (1.5 ms) a little longer than one layer (1 ms): a perfect predictor pays
    rep = make_plan(ctx.model_arg, ["50%"], precisions=["full"], predictors=predictors,
                    policy_names=["lru", "lfu"], bandwidth=5e7, layer_compute=1e-3, ctx=ctx)  # fmt: skip
    (v,) = rep.verdicts
    lru = rep.best(precision="full", policy="lru", predictor="none").tokens_per_s
    best = max((r for r in rep.rows if r.predictor != "none"), key=lambda r: r.tokens_per_s)
    reach = best.tokens_per_s / lru
    bound = max(b["tokens_per_s"] for b in rep.bounds if b["predictor"] != "none") / lru
    gain = float(v.split("prefetch would give ")[1].split("x")[0])
    assert gain >= 1.15 and "cannot pay" not in v
    # the bound is the better of LRU's and the best other planned policy's eviction
    if "(with lfu's; " in v:
        assert float(v.split("(with lfu's; ")[1].split("x")[0]) < gain
    else:
        assert "(with LRU's eviction)" in v
    assert f"reach {reach:.2f}x (best: {best.policy} + {best.predictor}" in v
    assert f"{bound:.2f}x with Belady's eviction" in v
    if reach >= 1.15:
        assert "predictor-driven prefetch pays" in v
    elif bound >= 1.15:  # Belady's eviction with the same predictor pays: eviction limits
        assert "not by the predictors at hand" in v and "limits prefetch here is eviction" in v
    else:
        assert "not by the predictors at hand" in v and "predictor's accuracy" in v
    if predictors == ["none", "prev"]:  # the previous token's experts do not name the next layer's
        assert reach < 1.15


def test_prefetch_limit_names_eviction_or_the_predictor():
    assert prefetch_limit(1.2, (1.3, "gate")) == (
        " Loads can be hidden: predictor-driven prefetch pays.",
        "",
    )
    verdict, advice = prefetch_limit(1.09, (1.22, "gate"))  # run 6's full 25% row
    assert "not by the predictors at hand" in verdict
    assert "limits prefetch here is eviction" in advice and "with gate" in advice
    for bound in ((1.10, "gate"), None):
        assert "predictor's accuracy" in prefetch_limit(1.09, bound)[1]


def test_refusals(ctx):
    with pytest.raises(ConfigError, match="cannot hold one token's experts"):
        make_plan(ctx.model_arg, ["100B"], bandwidth=1e7, layer_compute=1e-3, ctx=ctx)
    with pytest.raises(ConfigError, match="precision 'int3'"):
        make_plan(ctx.model_arg, ["50%"], precisions=["int3"], ctx=ctx)
    with pytest.raises(ConfigError, match="precision"):
        split_precision("fp8")
    with pytest.raises(ConfigError, match="fewer than top_k"):
        run_config(ctx.model_arg, "20%", "full", "lru", "none", ctx=ctx)
    sh = ModelShape(2, 4, 2, {"gate_up_proj": (128, 32), "down_proj": (32, 64)})
    assert sh.slots(sh.full_bytes, "full") == 4 and sh.slots(sh.full_bytes // 2, "full") == 2


def test_run_full_precision_is_exact_and_int8_close(ctx):
    full = run_config(ctx.model_arg, "50%", "full", "lru", "gate", windows=1, ctx=ctx)
    assert full["identical_to_all_resident"] is True and full["ppl_ratio"] == 1.0
    assert full["config"]["slots_per_layer"] == 2 and full["tokens"] == TINY_SHAPE["seq_len"] - 1
    q = run_config(ctx.model_arg, "50%", "int8", "lru", "none", windows=1, ctx=ctx)
    assert 0.95 < q["ppl_ratio"] < 1.05 and q["agreement_with_all_resident"] > 0.8
    s = run_config(ctx.model_arg, "75%", "full+int4", "lru", "none", windows=1, ctx=ctx)
    assert s["standin_rate"] > 0 and math.isfinite(s["ppl_ratio"])


def test_plan_quality_is_the_live_runs_quality_with_its_standard_error(rep, ctx):
    """The plan scores each precision as `moelab offload run` does (teacher-forced decode of the
    same held-out windows): the same ratio and standard error, whatever the cache holds."""
    m = rep.machine
    _, ev = ctx.workload.split()
    n = len(ev.tokens)
    assert n >= 2 and f"{n} held-out windows" in m["heldout_scored"]
    assert m["ppl_ratio"]["full"] == 1.0 and m["ppl_ratio_se"]["full"] == 0.0
    assert m["routing_agreement"]["full"] == 1.0
    for prec in ("int8", "int4"):
        live = run_config(ctx.model_arg, "50%", prec, "lru", "none", windows=n, ctx=ctx)
        assert m["ppl_ratio"][prec] == pytest.approx(live["ppl_ratio"], rel=1e-9)
        assert m["ppl_ratio_se"][prec] == pytest.approx(live["ppl_ratio_se"], rel=1e-6)
        assert 0 < m["ppl_ratio_se"][prec] < 0.1 and 0.5 < m["routing_agreement"][prec] <= 1.0
        row = rep.best(precision=prec)
        assert (row.ppl_change, row.ppl_change_se) == (
            m["ppl_ratio"][prec],
            m["ppl_ratio_se"][prec],
        )
    assert m["routing_agreement"]["int4"] <= m["routing_agreement"]["int8"] + 0.05


def test_heldout_quality_refuses_without_a_full_precision_reference(ctx):
    from moelab.offload.measure import heldout_quality

    _, ev = ctx.workload.split()
    with pytest.raises(ConfigError, match="'full' store"):
        heldout_quality(ctx.load, ctx.stores(["int8"]), ev.tokens)
    with pytest.raises(ConfigError, match="no held-out windows"):
        heldout_quality(ctx.load, ctx.stores(["full"]), [])


def _cli(args, capsys, monkeypatch):
    from moelab.cli import main

    monkeypatch.setattr("sys.argv", ["moelab", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    cap = capsys.readouterr()
    return exc.value.code, cap.out + cap.err


def test_cli_plan_and_refusals(ctx, capsys, monkeypatch, tmp_path):
    base = ["offload", "plan", "--model", str(ctx.model_arg), "--bandwidth", "1e7",
            "--layer-compute", "1e-3", "--predictors", "none,prev", "--policies", "lru,lfu"]  # fmt: skip
    code, out = _cli([*base, "--memory", "50%", "--precisions", "full,int8", "--out", str(tmp_path)],
                     capsys, monkeypatch)  # fmt: skip
    assert code in (0, None), out
    assert "moelab offload run --model" in out and "perfect 1-layer-ahead prefetch" in out
    import json

    rows = json.loads((tmp_path / "plan.json").read_text())["rows"]
    assert len(rows) == 2 * 2 * 2 and rows == sorted(rows, key=lambda r: -r["tokens_per_s"])
    code, out = _cli([*base, "--memory", "100B"], capsys, monkeypatch)
    assert code == 2 and "cannot hold one token's experts" in out
    code, out = _cli([*base, "--memory", "50%", "--precisions", "fp8"], capsys, monkeypatch)
    assert code == 2 and "precision 'fp8'" in out


def test_threads_option_sets_the_count_records_it_and_carries_into_the_run_commands(
    ctx, capsys, monkeypatch, tmp_path
):
    import json

    import torch

    from moelab.offload.plan_commands import use_threads

    before = torch.get_num_threads()
    try:
        base = ["offload", "plan", "--model", str(ctx.model_arg), "--bandwidth", "1e7",
                "--layer-compute", "1e-3", "--predictors", "none", "--policies", "lru",
                "--precisions", "full", "--memory", "50%"]  # fmt: skip
        code, out = _cli([*base, "--threads", "1", "--out", str(tmp_path)], capsys, monkeypatch)
        assert code in (0, None), out
        assert torch.get_num_threads() == 1
        plan = json.loads((tmp_path / "plan.json").read_text())
        assert plan["machine"]["threads"] == 1
        assert all(r["command"].endswith(" --threads 1") for r in plan["rows"])
        res = run_config(ctx.model_arg, "50%", "full", "lru", "none", windows=1, ctx=ctx,
                         threads=1, compare=False)  # fmt: skip
        assert res["threads"] == 1
        # without --threads the commands say nothing, and 0 means every core again
        rep = make_plan(ctx.model_arg, ["50%"], precisions=["full"], predictors=["none"],
                        policy_names=["lru"], bandwidth=1e7, layer_compute=1e-3, ctx=ctx)  # fmt: skip
        assert "--threads" not in rep.rows[0].command and rep.machine["threads"] == 1
        assert use_threads(0) == torch.get_num_threads() >= 1
        with pytest.raises(ConfigError, match="--threads -1"):
            use_threads(-1)
        code, out = _cli([*base, "--threads", "-2"], capsys, monkeypatch)
        assert code == 2 and "--threads -2" in out
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- machine terms
def test_live_path_miss_and_fill_are_measured(ctx):
    from moelab.offload.measure import measure_fill_reads, measure_misses, measure_reads

    _, ev = ctx.workload.split()
    stores = ctx.stores(["full", "int8"])
    mm = measure_misses(ctx.load, stores, ev.tokens[0][:16], tier="ram", repeats=2)
    assert set(mm) == {"full", "int8"}
    for v in mm.values():
        # top_k slots per layer: most of a token's experts miss, each stalls a measurable time
        assert v["seconds_per_miss"] > 0 and v["layer_seconds"] > 0
        assert 0 < v["misses_per_token"] <= ctx.shape.num_layers * ctx.shape.top_k
    assert measure_fill_reads(stores["full"], "ram", reads=4) > 0
    assert measure_reads(stores["full"], "ram")[0] > 0
    with pytest.raises(ConfigError, match="repeats"):
        measure_misses(ctx.load, stores, ev.tokens[0][:16], repeats=0)
    with pytest.raises(ConfigError, match="reads"):
        measure_fill_reads(stores["full"], "ram", reads=0)


def _plan_lru(ctx, machine, slots):
    from moelab.offload.plan import plan_configs

    mem = slots * ctx.shape.num_layers * ctx.shape.expert_bytes("full")
    return plan_configs(ctx.shape, ctx.sites, machine, ctx.workload, [("m", mem)], ["full"],
                        ["none"], ["lru"])  # fmt: skip


def _lru(ctx, machine, slots):
    return _plan_lru(ctx, machine, slots).best(precision="full")


def test_miss_term_replaces_the_read_time_exactly(ctx):
    from moelab.offload.plan import Machine

    read, miss, comp = 2e-3, 3.5e-3, 1e-3
    plain = Machine({"full": read}, {"full": comp})
    live = Machine({"full": read}, {"full": comp}, seconds_per_miss={"full": miss})
    assert live.load_seconds("full") == miss and plain.load_seconds("full") == read
    a, b = _lru(ctx, plain, 2), _lru(ctx, live, 2)
    assert a.hit_rate == b.hit_rate < 1 and b.tokens_per_s < a.tokens_per_s
    # no prefetch: every demand load stalls serially, so the stall grows by exactly
    # (miss - read) per timed miss, and nothing else changes
    _, ev = ctx.workload.split()
    steps, timed = decode_steps(ev)
    nb = ctx.shape.expert_bytes("full")
    sims = [simulate(ev.expert_ids, ctx.shape.num_experts, 2, "lru", m.hardware("full", ctx.shape),
                     None, True, steps, timed, expert_bytes=nb) for m in (plain, live)]  # fmt: skip
    assert [s.tokens_per_s for s in sims] == pytest.approx([a.tokens_per_s, b.tokens_per_s])
    n_miss, n_tok = sims[0].misses, sims[0].tokens
    assert n_miss > 0 and sims[1].misses == n_miss
    extra = sims[1].seconds - sims[0].seconds
    assert extra == pytest.approx((miss - read) * n_miss, rel=1e-9)
    assert 1 / b.tokens_per_s - 1 / a.tokens_per_s == pytest.approx(extra / n_tok, rel=1e-9)


def test_loading_decode_compute_is_charged_only_where_experts_are_loaded(ctx):
    from moelab.offload.plan import Machine

    read, comp = 2e-3, 1e-3
    plain = Machine({"full": read}, {"full": comp})
    loading = Machine({"full": read}, {"full": comp}, loading_layer_compute={"full": 2.5 * comp})
    assert loading.compute_seconds("full") == 2.5 * comp
    assert loading.compute_seconds("full", loads=False) == comp == plain.compute_seconds("full")
    L, E = ctx.shape.num_layers, ctx.shape.num_experts
    a, b = _lru(ctx, plain, 2), _lru(ctx, loading, 2)
    assert a.hit_rate == b.hit_rate < 1
    # no prefetch: each decode token's time grows by exactly L x (2.5 - 1) x comp
    assert 1 / b.tokens_per_s - 1 / a.tokens_per_s == pytest.approx(L * 1.5 * comp, rel=1e-9)
    # every expert resident: nothing is loaded, the all-resident compute is charged
    assert _lru(ctx, loading, E).tokens_per_s == _lru(ctx, plain, E).tokens_per_s
    # stand-in modes keep the all-resident compute: no miss of theirs waits for a load
    mem = [("m", 3 * L * ctx.shape.expert_bytes("full"))]
    from moelab.offload.plan import plan_configs

    sa, sb = (plan_configs(ctx.shape, ctx.sites, m, ctx.workload, mem, ["full+int4"], ["none"],
                           ["lru"]).best(precision="full+int4") for m in (plain, loading))  # fmt: skip
    assert sa.tokens_per_s == sb.tokens_per_s and sa.standin_rate > 0
    # the verdict names the compute it charged
    assert f"one layer {2.5 * comp * 1e3:.2f} ms" in _plan_lru(ctx, loading, 2).verdicts[0]
    # the Hardware the replay gets: loading compute below every expert, all-resident at E
    assert loading.hardware("full", ctx.shape, slots=2).layer_compute == 2.5 * comp
    assert loading.hardware("full", ctx.shape, slots=E).layer_compute == comp
    assert loading.hardware("full+int4", ctx.shape, slots=2).layer_compute == comp


def test_fill_overhead_is_charged_once_per_free_slot():
    import numpy as np

    rng = np.random.default_rng(0)
    E, L, k, slots = 8, 3, 2, 4
    ids = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)])
                    for _ in range(40)])  # fmt: skip
    nb = 1000
    base = Hardware("x", bandwidth=1e6, latency=0.0, layer_compute=1e-3, expert_bytes=nb)
    f = 7e-3
    fill = Hardware("x", bandwidth=1e6, latency=0.0, layer_compute=1e-3, expert_bytes=nb,
                    fill_overhead=f)  # fmt: skip
    a = simulate(ids, E, slots, "lru", base, expert_bytes=nb)
    b = simulate(ids, E, slots, "lru", fill, expert_bytes=nb)
    # each layer's cache fills its free slots once (distinct experts, at most `slots` of them)
    fills = sum(min(slots, len(np.unique(ids[:, layer]))) for layer in range(L))
    assert fills == L * slots
    assert b.seconds - a.seconds == pytest.approx(f * fills, rel=1e-9)
    assert b.hit_rate == a.hit_rate and b.tokens_per_s < a.tokens_per_s


def test_machine_fill_overhead_is_the_measured_difference(ctx):
    from moelab.offload.plan import Machine

    m = Machine({"full": 2e-3}, {"full": 1e-3}, seconds_per_fresh_read={"full": 5e-3})
    assert m.fill_overhead("full") == pytest.approx(3e-3)
    assert m.hardware("full", ctx.shape).fill_overhead == pytest.approx(3e-3)
    assert Machine({"full": 2e-3}, {"full": 1e-3}).fill_overhead("full") == 0.0
    # a fresh read measured faster than a recycled one (noise) charges nothing, never a credit
    assert Machine({"full": 2e-3}, {"full": 1e-3},
                   seconds_per_fresh_read={"full": 1e-3}).fill_overhead("full") == 0.0  # fmt: skip


@pytest.mark.parametrize("tier,loader", [("ram", "thread"), ("fadvise", "process")])
def test_layer_cadence_loads_one_prefetch_per_moe_layer(ctx, tier, loader):
    from moelab.offload.measure import LayerCadenceLoads, teacher_forced

    _, ev = ctx.workload.split()
    stores = ctx.stores(["full"])
    m = ctx.load()
    L = ctx.shape.num_layers
    loads = LayerCadenceLoads(m, stores["full"], tier, loader)
    assert loads.pf.loader == loader
    teacher_forced(m, ev.tokens[0][:5], None)  # 5 steps x L layers routed
    st = loads.pf.stats  # one warm-up load before the decode (the loader is up)
    assert loads.i == 5 * L and st.requested == 5 * L + 1
    loads.pf.drain()
    loaded, skipped = st.loaded, st.skipped_resident + st.dropped_full
    n = loads.close(alone=L + 1)
    assert 0 < n == loaded - 1 <= 5 * L
    # each load is one of those asked, so a cached one was skipped rather than read again
    assert n + skipped == 5 * L
    # the reference: L + 1 reads one at a time after the decode, none of them a resident expert
    assert st.loaded == loaded + L + 1 and st.skipped_resident + st.dropped_full == skipped
    assert 0 < loads.alone_seconds < 1.0 and 0 < loads.read_seconds < 1.0
    teacher_forced(m, ev.tokens[0][:2], None)  # hooks removed: nothing more is asked
    assert loads.i == 5 * L


def test_background_load_overhead_measured_and_charged_per_finished_prefetch(ctx):
    import numpy as np

    from moelab.offload.measure import measure_background

    _, ev = ctx.workload.split()
    stores = ctx.stores(["full"])
    for tier, loader in (("ram", "auto"), ("fadvise", "process")):
        cost, read, beside = measure_background(ctx.load, stores["full"], ev.tokens[0][:16],
                                                tier, 1, loader=loader)  # fmt: skip
        assert cost >= 0.0 and 0.0 < read < 1.0  # seconds of one (tiny) expert read
        assert math.isfinite(beside) and beside > 0  # over a read alone of the same repeat
    with pytest.raises(ConfigError, match="repeats"):
        measure_background(ctx.load, stores["full"], ev.tokens[0][:16], "ram", 0)
    # replay: every finished prefetch adds exactly background_overhead of foreground time
    rng = np.random.default_rng(1)
    E, L, k, nb = 8, 3, 2, 1000
    ids = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)])
                    for _ in range(30)])  # fmt: skip
    from moelab.offload.simulate import oracle_plan

    plan = oracle_plan(ids, 1)
    kw = dict(bandwidth=1e7, latency=0.0, layer_compute=1e-3, expert_bytes=nb)
    a = simulate(ids, E, 4, "lru", Hardware("x", **kw), plan, expert_bytes=nb)
    o = 2e-4
    b = simulate(ids, E, 4, "lru", Hardware("x", background_overhead=o, **kw), plan,
                 expert_bytes=nb)  # fmt: skip
    loads = a.cache["prefetch_loads"]
    assert loads > 0 and b.cache["prefetch_loads"] == loads and b.hit_rate == a.hit_rate
    # loads finish 0.1 ms after issue, well within a layer: each completes before it is needed
    assert a.late == 0
    assert b.seconds - a.seconds == pytest.approx(o * loads, rel=1e-9)


def test_recorded_routing_names_the_next_layers_true_experts():
    import numpy as np

    from moelab.offload.prefetch import RecordedRouting

    ids = np.arange(3 * 2 * 2).reshape(3, 2, 2) % 8
    ids[1, 1, 1] = -1  # an unused slot is never named
    x, e = torch.zeros(1, 4), torch.zeros(1, 2, dtype=torch.long)
    plain, wrap = RecordedRouting(ids), RecordedRouting(ids, wrap=True)
    assert plain.on_layer(1, 0, x, e) == [(1, 1, [ids[1, 1, 0]])]
    assert plain.on_layer(1, 1, x, e) == []  # the last layer names nothing without wrap
    assert wrap.on_layer(1, 1, x, e) == [(2, 0, ids[2, 0].tolist())]
    assert wrap.on_layer(2, 1, x, e) == []  # past the window
    with pytest.raises(ConfigError, match="steps, L, k"):
        RecordedRouting(ids[0])
    with pytest.raises(ConfigError, match="2 layers for a model with 3"):
        plain.bind([object()] * 3)


def test_oracle_with_a_longer_lead_names_the_layer_that_many_positions_later():
    import numpy as np

    from moelab.offload.plan import is_bound_predictor
    from moelab.offload.prefetch import RecordedRouting, make_live_predictor, oracle_lead

    ids = np.arange(3 * 2 * 2).reshape(3, 2, 2)  # [steps 3, L 2, k 2]
    x, e = torch.zeros(1, 4), torch.zeros(1, 2, dtype=torch.long)
    two, three = RecordedRouting(ids, ahead=2), RecordedRouting(ids, ahead=3)
    assert two.name == "oracle:d=2" and RecordedRouting(ids).name == "oracle"
    assert two.on_layer(0, 0, x, e) == [(1, 0, ids[1, 0].tolist())]  # same layer, next token
    assert two.on_layer(0, 1, x, e) == [(1, 1, ids[1, 1].tolist())]
    assert three.on_layer(0, 1, x, e) == [(2, 0, ids[2, 0].tolist())]  # two tokens on
    assert three.on_layer(1, 1, x, e) == [] and two.on_layer(2, 0, x, e) == []  # past the window
    assert [oracle_lead(s) for s in ("oracle", "oracle:d=1", "oracle:d=4", "gate", "prev")] == [
        1, 1, 4, None, None
    ]  # fmt: skip
    assert is_bound_predictor("oracle:d=2") and not is_bound_predictor("gate+prev")
    for bad in ("oracle:d=0", "oracle:x=2", "oracle:d=two"):
        with pytest.raises(ConfigError, match="oracle:d=N"):
            oracle_lead(bad)
    with pytest.raises(ConfigError, match="ahead=0"):
        RecordedRouting(ids, ahead=0)
    with pytest.raises(ConfigError, match="'oracle:d=2' needs the routing"):
        make_live_predictor("oracle:d=2")


def test_oracle_two_layers_ahead_live_and_in_the_replay(ctx):
    from moelab.offload.measure import run_live
    from moelab.offload.plan import predictor_plan

    _, ev = ctx.workload.split()
    stores = ctx.stores(["full"])
    wins = [w[:12] for w in ev.tokens[:2]]
    E, k, L = ctx.shape.num_experts, ctx.shape.top_k, ctx.shape.num_layers
    rec = run_live(ctx.load, stores, wins, "full", "lru", "none", E, "ram")
    s = run_live(ctx.load, stores, wins, "full", "lru", "oracle:d=2", k, "ram", None,
                 rec["predictions"], rec["routing"])  # fmt: skip
    assert s["identical"] and s["predictor"] == "oracle:d=2"
    assert s["prefetch"]["aborted"] == 0 and s["prefetch"]["requested"] > 0
    # the replay's plan: after (row, layer), the true experts 2 positions later in the same window
    plan, cost = predictor_plan("oracle:d=2", ctx.sites, ev)
    assert cost == 0.0
    targets = []
    for a, b in ev.bounds:
        for n in range(a, b):
            for layer in range(L):
                q, t = divmod((n - a) * L + layer + 2, L)
                want = [(a + q, t, ev.expert_ids[a + q, t].tolist())] if a + q < b else None
                assert plan.get((n, layer)) == want
                targets += [(a + q, t)] if want else []
    assert (
        len(targets)
        == len(set(targets))
        == sum(b - a for a, b in ev.bounds) * L - 2 * len(ev.bounds)
    )  # every position but each window's first two named once
    out = run_config(ctx.model_arg, "50%", "full", "lru", "oracle:d=2", windows=1, ctx=ctx)
    assert out["identical_to_all_resident"] and out["config"]["predictor"] == "oracle:d=2"


def test_oracle_prefetch_live_matches_the_replays_perfect_predictor(ctx):
    import numpy as np

    from moelab.offload.measure import run_live
    from moelab.offload.plan import predictor_plan
    from moelab.offload.simulate import oracle_plan

    _, ev = ctx.workload.split()
    stores = ctx.stores(["full"])
    wins = [w[:12] for w in ev.tokens[:2]]
    E, k = ctx.shape.num_experts, ctx.shape.top_k
    rec = run_live(ctx.load, stores, wins, "full", "lru", "none", E, "ram")
    routing = rec["routing"]
    assert [r.shape for r in routing] == [(12, ctx.shape.num_layers, k)] * 2
    s = run_live(ctx.load, stores, wins, "full", "lru", "oracle", k, "ram", None, rec["predictions"],
                 routing)  # fmt: skip
    assert s["identical"] and s["predictor"] == "oracle"
    # every load it starts is one the decode needs: none is ever stopped as a wrong guess
    assert s["prefetch"]["aborted"] == 0 and s["prefetch"]["requested"] > 0
    # the replay's oracle row is oracle_plan
    plan, cost = predictor_plan("oracle", ctx.sites, ev)
    assert cost == 0.0 and plan == oracle_plan(ev.expert_ids, 1)
    from moelab.offload.prefetch import make_live_predictor

    with pytest.raises(ConfigError, match="offload run --predictor oracle"):
        make_live_predictor("oracle")  # generation cannot know the routing
    with pytest.raises(ConfigError, match="routing of every window"):
        run_live(ctx.load, stores, wins, "full", "lru", "oracle", k, "ram")
    other = [np.roll(r, 1, axis=0) for r in routing]  # another decode's routing: refused
    with pytest.raises(OffloadError, match="routed differently"):
        run_live(ctx.load, stores, wins, "full", "lru", "oracle", k, "ram", None, None, other)
    # `offload run --predictor oracle` records the routing first; stand-ins cannot have one
    out = run_config(ctx.model_arg, "50%", "full", "lru", "oracle", windows=1, ctx=ctx)
    assert out["identical_to_all_resident"] and out["config"]["predictor"] == "oracle"
    with pytest.raises(ConfigError, match="stand-in"):
        run_config(ctx.model_arg, "75%", "full+int4", "lru", "oracle", windows=1, ctx=ctx)


def test_chunk_overhead_measured_and_passed_to_the_replay(ctx):
    from moelab.offload.measure import measure_chunk_overhead
    from moelab.offload.plan import Machine

    stores = ctx.stores(["full"])
    nb = ctx.shape.expert_bytes("full")
    assert measure_chunk_overhead(stores["full"], "ram", chunk=4096, reads=2) >= 0.0
    assert measure_chunk_overhead(stores["full"], "ram", chunk=nb) == 0.0  # one piece
    with pytest.raises(ConfigError, match="reads"):
        measure_chunk_overhead(stores["full"], "ram", reads=0)
    m = Machine({"full": 2e-3}, {"full": 1e-3}, chunk_overhead={"full": 3e-4})
    assert m.hardware("full", ctx.shape).chunk_overhead == pytest.approx(3e-4)
    assert Machine({"full": 2e-3}, {"full": 1e-3}).hardware("full", ctx.shape).chunk_overhead == 0


def test_policy_bookkeeping_is_timed_and_charged_beyond_lru():
    import numpy as np

    from moelab.offload.plan import charge_policy_cpu
    from moelab.offload.simulate import SimResult

    rng = np.random.default_rng(3)
    ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(3)])
                    for _ in range(40)])  # fmt: skip
    h = Hardware("x", bandwidth=1e7, latency=0.0, layer_compute=1e-3, expert_bytes=1000)
    plain = simulate(ids, 8, 4, "predict:steps=4", h, expert_bytes=1000)
    timed = simulate(ids, 8, 4, "predict:steps=4", h, expert_bytes=1000, time_policy=True)
    # timing changes nothing modelled; it only measures
    assert (timed.timely, timed.misses, timed.seconds) == (
        plain.timely,
        plain.misses,
        plain.seconds,
    )
    assert plain.policy_seconds is None and timed.policy_seconds > 0
    assert timed.layer_visits == 40 * 3 and "policy_seconds" not in plain.to_dict()

    def res(pol, secs):
        return SimResult(pol, 4, True, "x", "none", tokens=20, seconds=1.0, policy_seconds=secs,
                         layer_visits=100)  # fmt: skip

    runs = {"lru": res("lru", 1.0), "slow": res("slow", 3.0), "cheap": res("cheap", 0.5)}
    charge_policy_cpu(runs, 4)
    # (3.0 - 1.0) / 100 per visit, for 20 counted tokens x 4 layers
    assert runs["slow"].seconds == pytest.approx(1.0 + 0.02 * 80)
    assert runs["lru"].seconds == 1.0 and runs["cheap"].seconds == 1.0  # never a credit
    untimed = {"lru": res("lru", None), "slow": res("slow", 3.0)}
    charge_policy_cpu(untimed, 4)  # no LRU measurement: nothing to charge against
    assert untimed["slow"].seconds == 1.0


def test_predictor_plan_passes_each_window_prefix_to_token_predictors(ctx, monkeypatch):
    # a saved `moelab predict` predictor (TracePredictorLive) reads the tokens so far; the
    # planner's replay must hand them over row by row as OffloadedModel does live
    import moelab.offload.plan as plan_mod

    seen: list[list[int]] = []

    class Recorder:
        name = "rec"

        def bind(self, sites):
            self.L = len(sites)

        def set_tokens(self, toks):
            seen.append(list(toks))

        def on_layer(self, step, layer, x, ids):
            if layer == 0:  # name the next layer's experts from the tokens seen so far
                assert len(seen[-1]) == step + 1
                return [(step, 1, [int(seen[-1][-1]) % 4])]
            return []

    monkeypatch.setattr(plan_mod, "make_live_predictor", lambda spec: Recorder())
    _, ev = ctx.workload.split()
    plan, per_call = plan_mod.predictor_plan("rec", ctx.sites, ev)
    windows = [list(map(int, t)) for t in ev.tokens]
    assert seen == [w[: i + 1] for w in windows for i in range(len(w))]
    a, _ = ev.bounds[0]
    assert plan[(a + 2, 0)] == [(a + 2, 1, [windows[0][2] % 4])] and per_call >= 0


def test_live_predictor_cost_measured_and_charged(ctx, monkeypatch):
    import dataclasses

    from moelab.offload.measure import measure_predictors
    from moelab.offload.plan import Machine, plan_configs

    _, ev = ctx.workload.split()
    stores = ctx.stores(["full"])
    got = measure_predictors(ctx.load, stores["full"], ev.tokens[0][:8], ["none", "gate"], "ram")
    assert set(got) == {"gate"} and got["gate"] > 0
    from moelab.offload.store import ExpertStore

    reads = []
    orig = ExpertStore.read
    monkeypatch.setattr(
        ExpertStore, "read", lambda self, *a, **k: reads.append(a) or orig(self, *a, **k)
    )
    measure_predictors(ctx.load, stores["full"], ev.tokens[0][:8], ["gate"], "ram")
    # a quarter of the experts resident: the decode loads while the predictor runs
    assert len(reads) > ctx.shape.num_layers * max(ctx.shape.top_k, ctx.shape.num_experts // 4)
    with pytest.raises(ConfigError, match="slots=1"):
        measure_predictors(ctx.load, stores["full"], ev.tokens[0][:8], ["gate"], "ram", slots=1)
    nb = ctx.shape.expert_bytes("full")
    mem = [("m", 2 * ctx.shape.num_layers * nb)]
    base = Machine({"full": 2e-3}, {"full": 1e-3})
    slow = dataclasses.replace(base, predictor_seconds={"gate": 5e-3})
    a = plan_configs(ctx.shape, ctx.sites, base, ctx.workload, mem, ["full"], ["gate"], ["lru"])
    b = plan_configs(ctx.shape, ctx.sites, slow, ctx.workload, mem, ["full"], ["gate"], ["lru"])
    ra, rb = a.best(precision="full"), b.best(precision="full")
    # 5 ms per call, far above the replay's own timing of the gate: every layer pays it (the
    # timeline shifts, so which prefetches arrive in time shifts too)
    assert rb.tokens_per_s < 0.5 * ra.tokens_per_s
    assert 1 / rb.tokens_per_s - 1 / ra.tokens_per_s >= 0.8 * 5e-3 * ctx.shape.num_layers


def test_measure_machine_fills_every_term(ctx, rep):
    from moelab.offload.measure import measure_machine
    from moelab.offload.plan import Machine

    _, ev = ctx.workload.split()
    stores = ctx.stores(["full", "int8"])
    m = measure_machine(ctx.load, stores, ev.tokens[0][:16], "ram", ["none", "gate"],
                        {"prev": 1e-4})  # fmt: skip
    assert not m.given and m.tier == "ram"
    for term in (m.seconds_per_expert, m.seconds_per_fresh_read, m.layer_compute,
                 m.seconds_per_miss, m.loading_layer_compute):  # fmt: skip
        assert set(term) == {"full", "int8"} and all(v > 0 for v in term.values())
    assert set(m.chunk_overhead) == {"full", "int8"} and min(m.chunk_overhead.values()) >= 0
    assert m.background_overhead >= 0 and m.prefetch_slowdown >= 1.0
    slow = Machine({"full": 2e-3}, {"full": 1e-3}, prefetch_slowdown=1.3)
    assert slow.hardware("full", ctx.shape).prefetch_slowdown == 1.3
    assert (
        Machine({"full": 2e-3}, {"full": 1e-3}).hardware("full", ctx.shape).prefetch_slowdown == 1
    )
    # measured predictors join the given ones; "none" costs nothing and is not listed
    assert set(m.predictor_seconds) == {"gate", "prev"}
    assert m.predictor_seconds["prev"] == 1e-4 and m.predictor_seconds["gate"] > 0
    with pytest.raises(ConfigError, match="no expert store"):
        measure_machine(ctx.load, {}, ev.tokens[0][:16], "ram")
    # given bandwidth and compute: nothing measured, no background or predictor cost charged
    g = rep.machine
    assert g["given"] and g["background_overhead"] == 0.0 and g["predictor_seconds"] == {}
    assert g["seconds_per_miss"] == {} and set(g["layer_compute"]) == set(g["seconds_per_expert"])
    assert g["loading_layer_compute"] == {}
    assert all(v == 1e-3 for v in g["layer_compute"].values())
