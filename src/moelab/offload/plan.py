"""Offload planner: for a model and a memory budget, predict decode tokens/s, hit rate and bytes
per token of every (precision, policy, predictor, budget) by replaying held-out routing through
the same ExpertCache + link model as `moelab offload simulate` (simulate.simulate), on this
machine's measured tier bandwidth and per-layer compute (moelab.offload.measure measures them
and runs any configuration live to check the prediction).

Precisions: "full" (exact), "int8", "int4" (weight-only, moelab.offload.quant), and stand-in
modes "full+int4" / "full+int8": every expert resident at low precision serving misses while the
full-precision expert is fetched for later tokens (HOBBIT, Tang et al. 2024, arXiv:2411.01433),
replayed by `simulate_standin` (same ExpertCache and link as simulate). Whether prefetch can pay
follows from an oracle-prefetch replay: one layer of lookahead hides at most one layer's compute
per load (Eliseev & Mazur 2023, arXiv:2312.17238); when loads dominate it cannot.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab.errors import ConfigError, OffloadError
from moelab.offload import cache as cache_mod
from moelab.offload.cache import ExpertCache, static_keys_from_counts, usage_counts
from moelab.offload.prefetch import (
    PREFETCH_CHUNK_BYTES,
    RecordedRouting,
    make_live_predictor,
    oracle_lead,
)
from moelab.offload.quant import DEFAULT_GROUP, PRECISIONS, pick_group
from moelab.offload.quant import expert_nbytes as quant_expert_nbytes
from moelab.offload.simulate import Hardware, Plan, SimResult, _Link, simulate

STANDIN_MODES = ("full+int4", "full+int8")
PLAN_PRECISIONS = (*PRECISIONS, *STANDIN_MODES)
PLAN_PREDICTORS = ("none", "gate", "prev", "adaptive", "gate+prev")
BOUND_POLICIES = ("belady",)  # replay-only bounds, not runnable live


def is_bound_predictor(spec: str) -> bool:
    """Perfect predictions ('oracle', 'oracle:d=N'): upper bounds, not predictors at hand."""
    return oracle_lead(spec) is not None


# Parameter variants the planner tries beside every registered policy's defaults.
PLAN_POLICY_VARIANTS = ("predict:steps=16",)


def policies() -> list[str]:
    """Runnable policies registered in offload/cache.py (new ones appear here automatically),
    plus PLAN_POLICY_VARIANTS."""
    reg = getattr(cache_mod, "POLICY_REGISTRY", None) or cache_mod.POLICIES
    names = list(reg.keys()) if isinstance(reg, dict) else list(reg)
    return [p for p in names if p not in BOUND_POLICIES and p != "auto"] + list(
        PLAN_POLICY_VARIANTS
    )


def split_precision(precision: str) -> tuple[str, str | None]:
    """'full+int4' -> ('full', 'int4'); 'int8' -> ('int8', None); unknown raises ConfigError."""
    if precision not in PLAN_PRECISIONS:
        raise ConfigError(f"precision {precision!r}: expected one of {PLAN_PRECISIONS}")
    main, _, low = precision.partition("+")
    return main, (low or None)


# --------------------------------------------------------------------------- memory
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_memory(spec: str | int | float, full_expert_bytes: int) -> int:
    """'4GiB' / '512MB' / '25%' (of all experts at full precision) / bytes -> bytes."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        n = float(spec)
    else:
        s = str(spec).strip()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", s)
        if m:
            n = float(m.group(1)) / 100.0 * full_expert_bytes
        else:
            m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", s)
            if not m or m.group(2).upper() not in _UNITS:
                raise ConfigError(
                    f"--memory {spec!r}: expected bytes with a unit (4GiB, 512MB) or a percentage of"
                    " the full-precision expert bytes (25%)"
                )
            n = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not n > 0 or not math.isfinite(n):
        raise ConfigError(f"--memory {spec!r}: must be > 0")
    return int(n)


@dataclass
class ModelShape:
    """What the planner needs of a model: layers, experts, k, expert shapes and dtype size."""

    num_layers: int
    num_experts: int
    top_k: int
    shapes: dict[str, tuple[int, ...]]
    itemsize: int = 4

    def expert_bytes(self, precision: str) -> int:
        """Bytes of one expert at a store precision ('full', 'int8', 'int4')."""
        group = pick_group(self.shapes) if precision == "int4" else DEFAULT_GROUP
        return quant_expert_nbytes(self.shapes, precision, self.itemsize, group)

    @property
    def full_bytes(self) -> int:
        """All routed experts at full precision."""
        return self.num_layers * self.num_experts * self.expert_bytes("full")

    def slots(self, memory: int, precision: str) -> int:
        """Experts per layer that `memory` bytes hold at `precision` (stand-ins paid first)."""
        main, low = split_precision(precision)
        left = memory - (self.num_layers * self.num_experts * self.expert_bytes(low) if low else 0)
        per = self.num_layers * self.expert_bytes(main)
        return max(0, min(self.num_experts, int(left // per))) if left > 0 else 0


def model_shape(model: torch.nn.Module) -> ModelShape:
    """ModelShape of a moelab or transformers MoE model."""
    from moelab.offload.sites import require_sites

    sites = require_sites(model)
    s = sites[0]
    return ModelShape(
        len(sites), max(x.num_experts for x in sites), max(x.top_k for x in sites),
        s.expert_shapes(), s.dtype().itemsize,
    )  # fmt: skip


def check_memory(shape: ModelShape, memory: int, spec: str = "") -> None:
    """Refuse budgets that cannot hold one token's experts even at the smallest precision."""
    need = min(
        shape.num_layers * shape.top_k * shape.expert_bytes(p) for p in ("full", "int8", "int4")
    )
    if memory < need:
        raise ConfigError(
            f"--memory {spec or memory}: {memory} bytes cannot hold one token's experts "
            f"(top_k={shape.top_k} in each of {shape.num_layers} layers needs {need} bytes even at "
            "int4); give more memory"
        )


# --------------------------------------------------------------------------- workload
@dataclass
class Workload:
    """Held-out routing to replay: windows of tokens, their routing and router inputs."""

    tokens: list[np.ndarray]  # one array per window (sequence), decoded from its first token
    expert_ids: np.ndarray  # [N, L, k], rows of all windows in order
    router_input: np.ndarray | None  # [N, L, D] or None (then gate predictors are unavailable)
    source: str
    calib_fraction: float = 0.5  # share of windows split() gives the calibration part

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """(first row, end row) of each window."""
        out, r = [], 0
        for t in self.tokens:
            out.append((r, r + len(t)))
            r += len(t)
        return out

    def split(self, calib_fraction: float | None = None) -> tuple[Workload, Workload]:
        """(calibration, evaluation) by windows: the first part picks static sets, the rest is
        replayed and decoded live (held out from the calibration)."""
        if calib_fraction is None:
            calib_fraction = self.calib_fraction
        n = len(self.tokens)
        if n < 2:
            raise OffloadError(
                f"{self.source}: {n} held-out window(s); need >= 2 (calibration + evaluation)"
            )
        c = max(1, min(n - 1, int(round(calib_fraction * n))))
        b = self.bounds
        return self.subset(range(c), b), self.subset(range(c, n), b)

    def subset(self, idx: Sequence[int], bounds: list[tuple[int, int]] | None = None) -> Workload:
        """The windows `idx`."""
        b = bounds or self.bounds
        rows = np.concatenate([np.arange(*b[i]) for i in idx])
        return Workload(
            [self.tokens[i] for i in idx],
            self.expert_ids[rows],
            None if self.router_input is None else self.router_input[rows],
            self.source,
            self.calib_fraction,
        )


def workload_from_testbed(tb: Any) -> Workload:
    """The testbed's held-out windows (test split)."""
    S = tb.tokens.shape[1]
    if tb.expert_ids.shape[0] != tb.tokens.size:
        raise OffloadError(f"{tb.root}/heldout.npz: routing rows do not match the windows")
    toks = [tb.tokens[i] for i in range(tb.tokens.shape[0])]
    return Workload(toks, tb.expert_ids, tb.router_input.astype(np.float32),
                    f"{tb.root} (test split, {len(toks)} windows x {S})")  # fmt: skip


def workload_from_trace(path: str | Path, max_len: int = 128) -> Workload:
    """Documents of a TraceStore (cut into windows of max_len); router inputs when traced."""
    from moelab.trace.store import TraceStore

    tr = TraceStore.open(path).load()
    hid = None
    if "router_input" in tr.hidden and tr.hidden_rows is not None:
        if len(tr.hidden_rows) == tr.num_tokens and not np.isnan(tr.hidden["router_input"]).any():
            hid = np.empty_like(tr.hidden["router_input"], dtype=np.float32)
            hid[tr.hidden_rows] = tr.hidden["router_input"]
    toks, rows = [], []
    for d in np.unique(tr.doc_id):
        r = np.flatnonzero(tr.doc_id == d)
        for s in range(0, len(r), max_len):
            if len(r[s : s + max_len]) >= 2:
                toks.append(tr.token_id[r[s : s + max_len]].astype(np.int64))
                rows.append(r[s : s + max_len])
    if not toks:
        raise OffloadError(f"{path}: no document with >= 2 tokens to replay")
    idx = np.concatenate(rows)
    return Workload(toks, tr.computed_expert_ids()[idx], None if hid is None else hid[idx],
                    f"trace {path} (split {tr.meta.split if hasattr(tr.meta, 'split') else '?'})")  # fmt: skip


def decode_steps(w: Workload) -> tuple[list[np.ndarray], list[bool]]:
    """One replay step per row; each window's first token is its (untimed) prefill."""
    steps, timed = [], []
    for a, b in w.bounds:
        for r in range(a, b):
            steps.append(np.array([r]))
            timed.append(r > a)
    return steps, timed


# --------------------------------------------------------------------------- predictor plans
def predictor_plan(spec: str, sites: list[Any], w: Workload) -> tuple[Plan | None, float]:
    """Run a live predictor row by row over recorded router inputs -> (replay plan, seconds per
    on_layer call). The same objects `moelab generate --prefetch` uses; "oracle" / "oracle:d=N":
    the true experts 1 / N layers ahead in each window (RecordedRouting, charged no call cost),
    what run_live's oracle prefetches ("oracle" equals oracle_plan(ids, 1))."""
    if spec == "none":
        return None, 0.0
    lead = oracle_lead(spec)
    if w.router_input is None and any(p in spec for p in ("gate", "adaptive")):
        raise OffloadError(
            f"predictor {spec!r} needs router inputs; the workload {w.source} has none (trace with"
            " --hidden-rate 1 or use a testbed)"
        )
    plan: Plan = {}
    calls, secs = 0, 0.0
    L = w.expert_ids.shape[1]
    x = (
        torch.from_numpy(np.asarray(w.router_input, dtype=np.float32))
        if w.router_input is not None
        else None
    )
    for wi, (a, b) in enumerate(w.bounds):
        pred = (
            make_live_predictor(spec)
            if lead is None
            else RecordedRouting(w.expert_ids[a:b], ahead=lead)  # this window's known routing
        )
        pred.bind(sites)
        toks = [int(t) for t in w.tokens[wi]]
        for n in range(a, b):
            if hasattr(pred, "set_tokens"):  # the sequence so far, as OffloadedModel passes it
                pred.set_tokens(toks[: n - a + 1])
            for layer in range(L):
                ids = torch.from_numpy(w.expert_ids[n : n + 1, layer].astype(np.int64))
                xin = x[n : n + 1, layer] if x is not None else torch.zeros(1, 1)
                t0 = time.perf_counter()
                out = pred.on_layer(n - a, layer, xin, ids)
                secs += time.perf_counter() - t0
                calls += 1
                for t_step, t_layer, ex in out:
                    row = a + t_step
                    if a <= row < b:
                        plan.setdefault((n, layer), []).append((row, t_layer, list(ex)))
    return plan, (0.0 if lead is not None else secs / max(calls, 1))


# --------------------------------------------------------------------------- replay
def make_cache(policy: str, slots: int, shape: ModelShape, nbytes: int, counts: np.ndarray | None,
               future: Sequence | None = None) -> ExpertCache:  # fmt: skip
    """The per-layer ExpertCache of a planned configuration (`static`: the calibration's most
    used experts pinned, `future`: Belady's known accesses), as the replay and live runs use it."""
    static = None
    if policy == "static":
        if counts is None:
            raise ConfigError("policy 'static' needs calibration usage counts")
        static = static_keys_from_counts(counts, max(slots - shape.top_k, 0), True)
    return ExpertCache(
        slots, policy, True, num_layers=shape.num_layers, num_experts=shape.num_experts,
        expert_bytes=nbytes, top_k=shape.top_k, static_keys=static, future=future,
    )  # fmt: skip


def simulate_standin(
    expert_ids: np.ndarray,
    shape: ModelShape,
    slots: int,
    policy: str,
    hw: Hardware,
    plan: Plan | None,
    steps: Sequence[np.ndarray],
    timed: Sequence[bool],
    nbytes: int,
    counts: np.ndarray | None = None,
    time_policy: bool = False,
) -> SimResult:
    """simulate() with a resident low-precision copy of every expert: a miss costs no stall (it
    is computed with the copy) and queues the full-precision load on the link for later tokens.
    Same ExpertCache and link model as simulate; `timely` counts full-precision hits, `late`
    waits on loads already in flight, `misses` counts stand-in computations."""
    from moelab.offload.simulate import _time_calls, demand_sequence

    cache = make_cache(policy, slots, shape, nbytes, counts,
                        demand_sequence(expert_ids, steps) if policy == "belady" else None)  # fmt: skip
    spent = _time_calls(cache) if time_policy else None
    link = _Link(hw, PREFETCH_CHUNK_BYTES)
    for key in cache.pinned:
        cache.preload(key)
    res = SimResult(policy, slots, True, hw.name, "standin")
    t, tc, plan = 0.0, hw.layer_compute + hw.predict_overhead, plan or {}
    for si, rows in enumerate(steps):
        t_step, count = t, timed[si]
        for layer in range(expert_ids.shape[1]):
            keys = [
                (layer, e)
                for e in sorted({int(e) for e in expert_ids[rows, layer].reshape(-1) if e >= 0})
            ]
            for tr in link.advance(t):
                cache.insert(tr.key, prefetched=True)
                t += hw.background_overhead  # the background read shared the cores
            cache.lock(keys)
            for key in link.stale((si, layer)):
                link.drop(key)
                res.cancelled += 1
            n_stopped, shared = link.abort((si, layer), keys, t)
            res.aborted += n_stopped
            t += shared  # the parts read shared the cores too
            ready = t
            for key in keys:
                if key in cache:
                    kind = "timely"
                    cache.access(key)
                elif key in link.inflight:
                    kind = "late"  # already on the link: wait for it (as the live prefetcher does)
                    tr = link.inflight.pop(key)
                    cache.insert(key, prefetched=True)
                    cache.access(key)
                    ready = max(ready, tr.end + hw.background_overhead)
                else:
                    kind = "miss"
                    cache.access(key)
                    if not link.busy(key):
                        link.prefetch(key, t, nbytes, (si + 1, layer), cache.has_room(key, True))
                if count:
                    res.needed += 1
                    res.timely += kind == "timely"
                    res.late += kind == "late"
                    res.misses += kind == "miss"
            if count:
                res.stall_seconds += ready - t
            t = ready
            for t_row, t_layer, experts in plan.get((si, layer), []):
                for e in list(experts)[: cache.slots]:
                    key = (t_layer, int(e))
                    if key not in cache and not link.busy(key) and len(link.pending) < 64:
                        link.prefetch(key, t, nbytes, (t_row, t_layer), cache.has_room(key, True))
            t += tc
            cache.unlock()
        t += hw.token_overhead
        if count:
            res.tokens += len(rows)
            res.seconds += t - t_step
    cache.finish()
    res.layer_visits = len(steps) * expert_ids.shape[1]
    if spent is not None:
        res.policy_seconds = spent[0]
    res.cache = cache.summary()
    res.bytes_loaded = cache.counters.bytes_loaded
    return res


@dataclass
class Machine:
    """Measured (or given) link and compute per store precision."""

    seconds_per_expert: dict[str, float]  # precision -> one expert read from the tier
    layer_compute: dict[str, float]  # precision -> seconds per MoE layer per decode token
    tier: str = "direct"
    given: bool = False
    # precision -> seconds one demand miss stalls a live decode (measure_misses); when given, the
    # replay's link moves an expert in this time instead of seconds_per_expert
    seconds_per_miss: dict[str, float] = field(default_factory=dict)
    # precision -> one expert read into memory not used before (measure_fill_reads): a load
    # that fills a free cache slot pays the difference to seconds_per_expert (first touch)
    seconds_per_fresh_read: dict[str, float] = field(default_factory=dict)
    # foreground seconds one background (prefetch) load costs the decode (measure_background)
    background_overhead: float = 0.0
    # precision -> extra seconds per chunk of a chunked (abortable) prefetch read over one whole
    # read (measure_chunk_overhead)
    chunk_overhead: dict[str, float] = field(default_factory=dict)
    # predictor spec -> seconds per live call (measure_predictors); the replay charges the larger
    # of this and its own timing of the predictor alone
    predictor_seconds: dict[str, float] = field(default_factory=dict)
    # precision -> seconds per MoE layer per decode token outside load stalls in a decode that
    # loads experts (measure_misses); charged instead of layer_compute where a configuration
    # cannot hold every expert: such a decode computes about 1.2x slower than an all-resident
    # one on this machine (bench/RESULTS.md, run 17)
    loading_layer_compute: dict[str, float] = field(default_factory=dict)
    # one prefetch read beside a decode's compute over one read alone through the same loader,
    # paired within a repeat (measure_background): the replay's link moves prefetches this much
    # slower than demand loads (load_seconds)
    prefetch_slowdown: float = 1.0

    def compute_seconds(self, precision: str, loads: bool = True) -> float:
        """Seconds per MoE layer per decode token: the loading decode's time when `loads` and it
        was measured, else the all-resident one."""
        if loads and precision in self.loading_layer_compute:
            return self.loading_layer_compute[precision]
        return self.layer_compute[precision]

    def fill_overhead(self, precision: str) -> float:
        """Extra seconds of a load into a free cache slot (fresh memory) over a recycled one."""
        if precision not in self.seconds_per_fresh_read:
            return 0.0
        return max(0.0, self.seconds_per_fresh_read[precision] - self.seconds_per_expert[precision])

    def load_seconds(self, precision: str) -> float:
        """Seconds the replay's link takes per expert of a store precision: the live-path miss
        cost when measured, else the tier's back-to-back read."""
        return self.seconds_per_miss.get(precision, self.seconds_per_expert[precision])

    def hardware(
        self,
        precision: str,
        shape: ModelShape,
        predict_overhead: float = 0.0,
        slots: int | None = None,
    ) -> Hardware:
        """Hardware model of `precision` (stand-in modes: full-precision link and compute) with
        `slots` experts per layer resident (None: fewer than all). A decode that loads experts
        (slots < num_experts) is charged the loading decode's compute; stand-in modes keep the
        all-resident compute, since no miss of theirs waits for a load (a resident low-precision
        copy computes it): it planned them within 1% in run 17, where the loading decode's time
        under-planned them by 31% (run 18)."""
        main, low = split_precision(precision)
        loads = low is None and (slots is None or slots < shape.num_experts)
        nb = shape.expert_bytes(main)
        return Hardware(
            f"this-machine/{self.tier}", bandwidth=nb / self.load_seconds(main), latency=0.0,
            layer_compute=self.compute_seconds(main, loads), predict_overhead=predict_overhead,
            expert_bytes=nb, description="measured" if not self.given else "given",
            fill_overhead=self.fill_overhead(main), background_overhead=self.background_overhead,
            chunk_overhead=self.chunk_overhead.get(main, 0.0),
            prefetch_slowdown=self.prefetch_slowdown,
        )  # fmt: skip


@dataclass
class PlanRow:
    """One configuration's prediction."""

    precision: str
    policy: str
    predictor: str
    memory: int
    memory_spec: str
    slots: int
    tokens_per_s: float
    hit_rate: float
    timely_hit_rate: float
    bytes_per_token: float
    stall_ms_per_token: float
    standin_rate: float = 0.0
    ppl_change: float | None = None  # held-out perplexity ratio vs full precision (static tiers)
    ppl_change_se: float | None = None  # its standard error over the held-out windows
    command: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)


@dataclass
class PlanReport:
    """Every configuration best first, the bounds and the prefetch verdict per precision/budget."""

    rows: list[PlanRow]
    bounds: list[dict[str, Any]] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    workload: str = ""

    def best(self, **where: Any) -> PlanRow:
        """Best row matching field values (e.g. precision='full', predictor='none')."""
        for r in self.rows:
            if all(getattr(r, k) == v for k, v in where.items()):
                return r
        raise OffloadError(f"no planned configuration matches {where}")


def plan_configs(
    shape: ModelShape,
    sites: list[Any],
    machine: Machine,
    workload: Workload,
    memories: Sequence[tuple[str, int]],
    precisions: Sequence[str] = PLAN_PRECISIONS,
    predictors: Sequence[str] = PLAN_PREDICTORS,
    policy_names: Sequence[str] | None = None,
    ppl: dict[str, tuple[float, float]] | None = None,
    command: Callable[[PlanRow], str] | None = None,
) -> PlanReport:
    """Replay every (precision, policy, predictor, memory) on the evaluation windows; `ppl`
    gives each store precision's held-out (perplexity ratio, its standard error)."""
    for p in precisions:
        split_precision(p)
    for m_spec, m in memories:
        check_memory(shape, m, m_spec)
    pols = list(policy_names or policies())
    calib, ev = workload.split()
    counts = usage_counts(calib.expert_ids, shape.num_experts)
    steps, timed = decode_steps(ev)
    rep = PlanReport([], machine=asdict(machine), workload=ev.source)
    plans: dict[str, tuple[Plan | None, float]] = {}
    for pred in predictors:
        try:
            plans[pred] = predictor_plan(pred, sites, ev)
        except OffloadError as exc:
            rep.skipped.append(f"predictor {pred}: {exc}")
    oracle = predictor_plan("oracle", sites, ev)[0]
    # the same with two layers of lead (across tokens): what a longer-lead predictor would buy
    oracle2 = predictor_plan("oracle:d=2", sites, ev)[0] if shape.num_layers > 1 else None
    for m_spec, mem in memories:
        for prec in precisions:
            main, low = split_precision(prec)
            slots = shape.slots(mem, prec)
            if slots < shape.top_k:
                rep.skipped.append(
                    f"{prec} at {m_spec}: {slots} experts per layer fit, fewer than top_k="
                    f"{shape.top_k}" + (" after the stand-in copies" if low else "")
                )
                continue
            nb = shape.expert_bytes(main)
            for pred, (plan, overhead) in plans.items():
                overhead = max(overhead, machine.predictor_seconds.get(pred, 0.0))
                hw = machine.hardware(prec, shape, overhead, slots)
                runs: dict[str, SimResult] = {}
                for pol in pols:
                    try:
                        runs[pol] = _replay(ev, shape, slots, pol, hw, plan, steps, timed, nb,
                                            counts, low, time_policy=not machine.given)  # fmt: skip
                    except ConfigError as exc:
                        rep.skipped.append(f"policy {pol}: {exc}")
                if not machine.given:
                    charge_policy_cpu(runs, shape.num_layers)
                for pol, r in runs.items():
                    row = PlanRow(
                        prec, pol, pred, mem, m_spec, slots, r.tokens_per_s, r.hit_rate,
                        r.timely_hit_rate, r.bytes_loaded / max(r.tokens, 1),
                        1e3 * r.stall_seconds / max(r.tokens, 1),
                        (r.misses / r.needed) if low and r.needed else 0.0,
                        *((None, None) if low or main not in (ppl or {}) else ppl[main]),  # type: ignore[index]
                    )  # fmt: skip
                    row.command = command(row) if command else ""
                    rep.rows.append(row)
                b = _replay(ev, shape, slots, "belady", hw, plan, steps, timed, nb, counts, low)
                rep.bounds.append({"precision": prec, "memory": m_spec, "predictor": pred,
                                   "policy": "belady", "tokens_per_s": b.tokens_per_s,
                                   "hit_rate": b.hit_rate})  # fmt: skip
            if not low:
                rep.verdicts.append(_verdict(ev, shape, slots, machine, prec, m_spec, (oracle, oracle2),
                                             steps, timed, nb, counts, rep))  # fmt: skip
    rep.skipped = list(dict.fromkeys(rep.skipped))
    rep.rows.sort(key=lambda r: -r.tokens_per_s if math.isfinite(r.tokens_per_s) else 0.0)
    return rep


PREFETCH_PAYS = 1.15  # the gain over LRU below which the planner says prefetch does not pay


def _replay(ev, shape, slots, pol, hw, plan, steps, timed, nb, counts, low,
            time_policy: bool = False) -> SimResult:  # fmt: skip
    if low:
        return simulate_standin(
            ev.expert_ids, shape, slots, pol, hw, plan, steps, timed, nb, counts, time_policy
        )
    return simulate(
        ev.expert_ids, shape.num_experts, slots, pol, hw, plan, True, steps, timed,
        expert_bytes=nb, static_counts=counts, time_policy=time_policy,
    )  # fmt: skip


def charge_policy_cpu(runs: dict[str, SimResult], num_layers: int) -> None:
    """Add to each replay's time what its policy's bookkeeping costs beyond LRU's (measured by
    time_policy in the same conditions): per layer visit, (policy - lru) seconds, >= 0, for
    every counted token's num_layers visits. The live decode pays it on the same cores (the
    per-layer compute measurement already includes LRU's)."""
    base = runs.get("lru")
    if base is None or base.policy_seconds is None:
        return
    per_lru = base.policy_seconds / max(base.layer_visits, 1)
    for pol, r in runs.items():
        if pol == "lru" or r.policy_seconds is None:
            continue
        extra = max(0.0, r.policy_seconds / max(r.layer_visits, 1) - per_lru)
        r.seconds += extra * r.tokens * num_layers


def _verdict(
    ev, shape, slots, machine, prec, m_spec, oracles, steps, timed, nb, counts, rep
) -> str:
    """Say with numbers whether prefetching can pay at this precision and budget: the bound of a
    perfect 1-layer-ahead predictor (and, where a load outlasts a layer, of a perfect 2-layer-ahead
    one), and what the predictors at hand reach (best policy, and Belady's eviction with the same
    predictor)."""
    oracle, oracle2 = oracles
    hw = machine.hardware(prec, shape, slots=slots)
    lru = _replay(ev, shape, slots, "lru", hw, None, steps, timed, nb, counts, None)
    orc = _replay(ev, shape, slots, "lru", hw, oracle, steps, timed, nb, counts, None)
    t_load = machine.load_seconds(prec) * 1e3
    t_layer = hw.layer_compute * 1e3
    miss_ms = lru.stall_seconds / max(lru.tokens, 1) * 1e3
    comp_ms = t_layer * shape.num_layers
    base = lru.tokens_per_s
    gain = orc.tokens_per_s / base if base > 0 else float("nan")
    # the perfect predictor with the best causal eviction planned here (without prefetch), too:
    # an eviction policy that beats LRU can make loads hideable that LRU's cannot ("static"
    # is left out: its pins are loaded before the first token, a head start, not hidden loads)
    plain = [r for r in rep.rows if r.precision == prec and r.memory_spec == m_spec
             and r.predictor == "none" and r.policy not in ("lru", "static")]  # fmt: skip
    evict, evict_pol = "LRU's", "lru"
    if plain and base > 0:
        top = max(plain, key=lambda r: r.tokens_per_s).policy
        g = _replay(ev, shape, slots, top, hw, oracle, steps, timed, nb, counts, None)
        if g.tokens_per_s / base > gain:
            evict, evict_pol = f"{top}'s; {gain:.2f}x with LRU's", top
            gain = g.tokens_per_s / base
    head = (
        f"{prec} at {m_spec} ({slots}/{shape.num_experts} per layer): LRU stalls {miss_ms:.1f} ms/token "
        f"on loads vs {comp_ms:.1f} ms/token compute; one expert load {t_load:.2f} ms vs one layer "
        f"{t_layer:.2f} ms; perfect 1-layer-ahead prefetch would give {gain:.2f}x LRU (with "
        f"{evict} eviction)."
    )
    gain2 = None  # one layer's compute hides only part of a load: would two layers of lead?
    if oracle2 is not None and t_load > t_layer and base > 0 and miss_ms > 0:
        g2 = _replay(ev, shape, slots, evict_pol, hw, oracle2, steps, timed, nb, counts, None)
        gain2 = g2.tokens_per_s / base
        head += f" Two layers ahead, a perfect predictor would give {gain2:.2f}x."
    if gain < PREFETCH_PAYS:
        why = "loads are the bottleneck" if t_load > t_layer else "few misses are left to hide"
        lead = (
            f" a predictor two layers ahead ({gain2:.2f}x if perfect),"
            if gain2 is not None and gain2 >= PREFETCH_PAYS
            else ""
        )
        return head + (
            f" Prefetch one layer ahead cannot pay here ({why}): a layer's compute hides at most "
            f"{min(1.0, t_layer / max(t_load, 1e-12)):.0%} of one load. What would help:{lead} "
            "fewer bytes per expert (int8 / int4 tiers), more resident memory (higher hit rate) "
            "or a faster tier."
        )
    mine = [r for r in rep.rows if r.precision == prec and r.memory_spec == m_spec
            and r.predictor != "none" and not is_bound_predictor(r.predictor)]  # fmt: skip
    bounds = [b for b in rep.bounds if b["precision"] == prec and b["memory"] == m_spec
              and b["predictor"] != "none" and not is_bound_predictor(b["predictor"])]  # fmt: skip
    if not mine or base <= 0:
        return head + " Loads can be hidden: a predictor that names the next layer's experts pays."
    best = max(mine, key=lambda r: r.tokens_per_s)
    b_best = max(bounds, key=lambda b: b["tokens_per_s"]) if bounds else None
    reach = best.tokens_per_s / base
    tail = (
        f" The predictors here reach {reach:.2f}x (best: {best.policy} + {best.predictor}, hit"
        f" {best.hit_rate:.3f})"
        + (
            f", {b_best['tokens_per_s'] / base:.2f}x with Belady's eviction and"
            f" {b_best['predictor']}"
            if b_best
            else ""
        )
        + "."
    )
    bound = (b_best["tokens_per_s"] / base, b_best["predictor"]) if b_best else None
    verdict, advice = prefetch_limit(reach, bound)
    if gain2 is not None and gain2 > max(gain, reach) * 1.05:
        advice += (
            f" A longer lead pays more than a better next-layer guess here: {gain2:.2f}x with"
            f" perfect predictions two layers ahead against {gain:.2f}x one layer ahead."
        )
    return head + verdict + tail + advice


def prefetch_limit(reach: float, bound: tuple[float, str] | None) -> tuple[str, str]:
    """Once a perfect predictor would pay: (whether the predictors at hand do, given their best
    gain over LRU `reach`; what stops them). Eviction stops them when Belady's eviction with the
    same predictor (bound: its gain over LRU and the predictor's name) pays, else their accuracy."""
    if reach >= PREFETCH_PAYS:
        return " Loads can be hidden: predictor-driven prefetch pays.", ""
    verdict = " Loads could be hidden, but not by the predictors at hand."
    if bound is not None and bound[0] >= PREFETCH_PAYS:
        return verdict, (
            f" What limits prefetch here is eviction, not the predictor: with {bound[1]} and the"
            " future known at eviction it pays, so the causal policies evict experts that are"
            " needed again soon. Belady's lead takes the exact routing of several tokens ahead"
            " (`belady:horizon=H` in replay measures how many); more resident memory or a"
            " quantised tier would help."
        )
    return verdict, (
        " What limits prefetch here is the predictor's accuracy (each wrong guess is a wasted"
        " read), not the link: a better next-layer predictor, or a quantised tier, would help."
    )
