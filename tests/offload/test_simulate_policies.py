"""Invariants of every cache policy under moelab's access model (a token-layer's k experts locked
together), the Belady bound, auto policy choice from a calibration split, and the CLI."""

import json
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.cli import main
from moelab.offload.cache import POLICIES, ExpertCache, usage_counts
from moelab.offload.choose import choose_policy
from moelab.offload.simulate import Hardware, demand_sequence, oracle_plan, simulate
from moelab.trace.schema import TraceMeta
from moelab.trace.store import TraceWriter

RUNNABLE = [p for p in POLICIES if p not in ("static", "belady")]


def hw():
    return Hardware("t", bandwidth=2e7, latency=0.0, layer_compute=1e-3, expert_bytes=10_000)


def routing(n, L, E, k, stay, seed):
    """Sticky routing: each layer keeps its experts with probability `stay`."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, L, k), dtype=np.int16)
    cur = np.stack([rng.choice(E, k, replace=False) for _ in range(L)])
    for i in range(n):
        for layer in range(L):
            if rng.random() >= stay:
                cur[layer] = rng.choice(E, k, replace=False)
            ids[i, layer] = cur[layer]
    return ids


def drive(ids, cap, policy, per_layer, **kw):
    """Replay with the cache alone, checking capacity and locks at every step; -> hits."""
    N, L, k = ids.shape
    seq = demand_sequence(ids, [np.array([i]) for i in range(N)])
    c = ExpertCache(
        cap, policy, per_layer, num_layers=L, num_experts=8, top_k=k,
        future=seq if policy.split(":")[0] == "belady" else None, **kw,
    )  # fmt: skip

    def on_evict(key):
        assert key not in c._locked, f"{policy} evicted locked {key}"

    c.evict_listener = on_evict
    for i in range(N):
        for layer in range(L):
            keys = [(layer, int(e)) for e in sorted(set(ids[i, layer].tolist()))]
            c.at(i, layer)
            c.lock(keys)
            for r, key in enumerate(keys):
                hit, _ = c.access(key, rank=r)
                if not hit:
                    assert c.insert(key), f"{policy}: no room for a needed expert"
                for g in range(len(c._policies)):
                    assert c._used(g) <= c._limit(g)
                    assert len(c._stage[g]) <= c.staging
            assert all(key in c for key in keys)  # the first expert survived the second's load
            if layer + 1 < L:  # a hint as a predictor would give it
                c.hint(i, layer + 1, [int(e) for e in ids[i, layer + 1]])
            c.unlock()
    k_ = c.counters
    assert k_.hits + k_.misses == k_.accesses == len(seq)
    return k_.hits


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    stay=st.floats(0.0, 0.9),
    per_layer=st.booleans(),
    extra=st.integers(0, 3),
)
def test_invariants_and_belady_bound(seed, stay, per_layer, extra):
    ids = routing(60, 3, 8, 2, stay, seed)
    cap = 2 + extra if per_layer else 2 + 2 * extra
    opt = drive(ids, cap, "belady", per_layer)
    for pol in RUNNABLE:
        assert drive(ids, cap, pol, per_layer) <= opt, pol
    # Foresight over the whole trace is Belady itself; a 1-token horizon is not better.
    assert drive(ids, cap, "belady:horizon=60", per_layer) == opt
    assert drive(ids, cap, "belady:horizon=1", per_layer) <= opt


def test_staging_and_floor_invariants():
    ids = routing(80, 3, 8, 2, 0.5, 3)
    for pol in RUNNABLE:
        drive(ids, 4, pol, True, staging=1)
        drive(ids, 7, pol, False, floor=2)


def test_simulate_with_prefetch_counts_and_bound():
    ids = routing(120, 3, 8, 2, 0.6, 5)
    plan = oracle_plan(ids, 1)
    seq_len = len(demand_sequence(ids, [np.array([i]) for i in range(ids.shape[0])]))
    bel = simulate(ids, 8, 3, "belady", hw(), plan).hit_rate
    for pol in RUNNABLE:
        for staging in (0, 1):
            r = simulate(ids, 8, 3 + staging, pol, hw(), plan, staging=staging)
            assert r.timely + r.late + r.misses == r.needed == seq_len
            c = r.cache
            assert c["hits"] + c["misses"] == seq_len
            if staging == 0:
                assert r.hit_rate <= bel + 0.02, pol  # Belady with the same prefetch: the bound


def test_auto_chooses_by_calibration_and_says_why():
    calib = routing(150, 3, 8, 2, 0.7, 11)
    ch = choose_policy(calib, 8, 6, ["lru", "lfu", "least-stale"], hardware=hw(), per_layer=False)
    direct = {p: simulate(calib, 8, 6, p, hw(), per_layer=False).hit_rate for p in ch.scores}
    assert ch.scores == pytest.approx(direct)
    assert ch.policy == max(direct, key=direct.get)
    assert ch.policy in ch.reason and "calibration split" in ch.reason and "runner-up" in ch.reason


def test_record_steps_adds_up_to_the_totals():
    ids = routing(40, 3, 8, 2, 0.6, 2)
    timed = [i % 3 != 0 for i in range(40)]
    r = simulate(ids, 8, 3, "lru", hw(), oracle_plan(ids, 1), timed=timed, record_steps=True)
    assert len(r.step_hits) == len(r.step_needed) == sum(timed)
    assert sum(r.step_hits) == r.timely + r.late and sum(r.step_needed) == r.needed
    assert all(0 <= h <= n == 6 for h, n in zip(r.step_hits, r.step_needed, strict=True))
    plain = simulate(ids, 8, 3, "lru", hw(), oracle_plan(ids, 1), timed=timed)
    assert plain.hit_rate == r.hit_rate and "step_hits" not in plain.to_dict()


def test_auto_scores_static_out_of_sample():
    # The first half uses expert 0 most, the second expert 1. Pins counted on the whole routing
    # would score `static` in-sample (pin 0: 7 of 12 hits); cross-fitted, pins from one half score
    # the other (3 of 6 each way), which ties LRU, so the earlier candidate wins.
    calib = np.array([0, 0, 0, 0, 5, 6, 1, 1, 1, 1, 5, 6], dtype=np.int16).reshape(12, 1, 1)
    in_sample = simulate(calib, 8, 2, "static", hw()).hit_rate
    assert in_sample == pytest.approx(7 / 12)
    ch = choose_policy(calib, 8, 2, ["lru", "static"], hardware=hw())
    assert ch.scores == pytest.approx({"lru": 0.5, "static": 0.5}) and ch.policy == "lru"
    # Pins from another trace are out of sample already: scored on the whole routing.
    other = usage_counts(np.array([[[1]], [[1]], [[2]]]), 8)
    ch = choose_policy(calib, 8, 2, ["lru", "static"], hardware=hw(), static_counts=other)
    direct = simulate(calib, 8, 2, "static", hw(), static_counts=other).hit_rate
    assert ch.scores["static"] == pytest.approx(direct)


def write_store(path, ids, split):
    n = ids.shape[0]
    L, k = ids.shape[1], ids.shape[2]
    meta = TraceMeta(num_layers=L, num_experts=8, top_k=k, domains=["x"], split=split)
    w = TraceWriter(path, meta, logits=False)
    w.append(
        doc_id=np.repeat(np.arange(2), n // 2),
        position=np.tile(np.arange(n // 2), 2).astype(np.int32),
        token_id=np.zeros(n, np.int32),
        domain=np.zeros(n, np.int16),
        is_bos=np.tile(np.arange(n // 2) == 0, 2),
        expert_ids=ids.astype(np.int64),
        weights=np.full(ids.shape, 1.0 / k, np.float16),
    )
    w.close()
    return path


def run(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["moelab", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    cap = capsys.readouterr()
    return (0 if exc.value.code is None else int(exc.value.code)), cap.out + cap.err


def test_cli_global_percentage_auto_and_usage(tmp_path, capsys, monkeypatch):
    test = write_store(tmp_path / "test", routing(60, 4, 8, 2, 0.7, 1), "test")
    cal = write_store(tmp_path / "val", routing(60, 4, 8, 2, 0.7, 2), "validation")
    out = tmp_path / "o"
    args = ["offload", "simulate", "--trace", str(test), "--no-per-layer", "--cache", "25%"]
    code, text = run(
        args + ["--policies", "lru,auto,belady", "--calibration", str(cal), "--out", str(out),
                "--auto-candidates", "lru,least-stale,predict:coact=1",
                "--expert-bytes", "1000", "--save-usage", str(tmp_path / "u.json")],
        capsys, monkeypatch,
    )  # fmt: skip
    assert code == 0, text
    assert "8/32" in text and "16/8" not in text  # 25% of all 4 x 8 experts
    res = json.loads((out / "offload_sim.json").read_text())
    assert res["span"] == 32 and res["curves"]["lru"][0]["capacity"] == 8
    assert res["curves"]["lru"][0]["hit_rate"] > 0.3
    assert res["auto"][0]["policy"] == res["curves"]["auto"][0]["policy_used"]
    assert set(res["auto"][0]["scores"]) == {"lru", "least-stale", "predict:coact=1"}
    assert f"cache 8/32: auto -> {res['auto'][0]['policy']}" in text
    code, text = run(
        args + ["--policies", "lru", "--warm-from", str(tmp_path / "u.json"),
                "--expert-bytes", "1000"],
        capsys, monkeypatch,
    )  # fmt: skip
    assert code == 0, text
    code, text = run(
        args + ["--policies", "auto", "--calibration", str(test), "--expert-bytes", "1000"],
        capsys, monkeypatch,
    )  # fmt: skip
    assert code == 2 and "is the test split" in text
    split = ["offload", "simulate", "--trace", str(test), "--cache", "50%", "--split",
             "calibrated", "--staging", "1", "--calibration", str(cal), "--policies", "predict",
             "--expert-bytes", "1000", "--out", str(tmp_path / "s")]  # fmt: skip
    code, text = run(split, capsys, monkeypatch)
    assert code == 0, text
    r = json.loads((tmp_path / "s" / "offload_sim.json").read_text())["curves"]["predict"][0]
    slots = r["cache"]["layer_slots"]  # 4 per layer split unevenly, minus 1 staging slot each
    assert sum(slots) == 16 - 4 and all(1 <= x <= 7 for x in slots)
    assert r["cache"]["staging"] == 1
    code, text = run(args + ["--policies", "auto", "--expert-bytes", "1000"], capsys, monkeypatch)
    assert code == 2 and "need --calibration" in text
    code, text = run(args + ["--policies", "fifo", "--expert-bytes", "1000"], capsys, monkeypatch)
    assert code == 2 and "cache policy 'fifo'" in text
    bad = args + ["--policies", "lru", "--expert-bytes", "1000", "--prefetch-chunk", "-1"]
    code, text = run(bad, capsys, monkeypatch)
    assert code == 2 and "chunk_bytes=-1" in text
