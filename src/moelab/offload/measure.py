"""Live measurement for the offload planner: what each cost the replay charges takes on this
machine (a tier's read, a read into fresh memory, a stoppable read's chunks, per-layer compute,
a demand miss, a background load, a live predictor call: `measure_machine` takes them all), the
expert stores those reads come from, and live decodes that check a plan (`run_live`, the same
code path as `moelab generate`; `heldout_quality`: each store precision's perplexity change
and routing agreement, scored the way `run_live` scores).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab.errors import ConfigError, OffloadError
from moelab.offload.cache import ExpertCache
from moelab.offload.plan import Machine, ModelShape, make_cache, model_shape, split_precision
from moelab.offload.prefetch import (
    PREFETCH_CHUNK_BYTES,
    Prefetcher,
    make_live_predictor,
    oracle_lead,
)
from moelab.offload.sites import require_sites
from moelab.offload.store import ExpertStore


def ensure_store(model: torch.nn.Module, root: Path, precision: str) -> Path:
    """The expert store of `precision` under root/<precision>, written if missing or stale."""
    d = Path(root) / precision
    if (d / "manifest.json").exists():
        try:
            with ExpertStore(d, tier="ram") as st:
                st.check_model(require_sites(model))
            return d
        except OffloadError:
            pass
    ExpertStore.write(model, d, precision=precision)
    return d


def measure_reads(store_dir: Path, tier: str = "auto", reads: int = 24) -> tuple[float, str]:
    """Median seconds of one expert read from the tier, and the tier used."""
    with ExpertStore(store_dir, tier=tier) as st:
        st.read(0, 0)
        return float(st.measure(reads=reads)["seconds_per_expert"]), st.tier


def measure_chunk_overhead(
    store_dir: Path, tier: str = "auto", chunk: int = PREFETCH_CHUNK_BYTES, reads: int = 12
) -> float:
    """Extra seconds per chunk when an expert is read in `chunk`-byte pieces (as the prefetcher
    reads, so that a wrong prefetch can be stopped) instead of one call: the same experts read
    both ways, interleaved; median difference / (pieces - 1), >= 0; 0 for one-piece experts."""
    if reads < 1:
        raise ConfigError(f"measure_chunk_overhead: reads={reads} must be >= 1")
    rng = np.random.default_rng(2)
    diffs = []
    with ExpertStore(store_dir, tier=tier) as st:
        pieces = -(-st.expert_nbytes(0) // chunk) if chunk else 1
        if pieces <= 1:
            return 0.0
        st.read(0, 0)
        for _ in range(reads):
            layer = int(rng.integers(st.num_layers))
            e = int(rng.integers(st.num_experts[layer]))
            t0 = time.perf_counter()
            st.read(layer, e)
            t1 = time.perf_counter()
            st.read(layer, e, chunk=chunk, abort=lambda: False)
            diffs.append(time.perf_counter() - t1 - (t1 - t0))
    return max(0.0, float(np.median(diffs)) / (pieces - 1))


def measure_fill_reads(store_dir: Path, tier: str = "auto", reads: int = 8) -> float:
    """Median seconds of one expert read from the tier into memory not used before (every result
    is held, so the store's buffer pool allocates for each): what a load that fills a free cache
    slot costs live, page faults of the fresh buffer included."""
    if reads < 1:
        raise ConfigError(f"measure_fill_reads: reads={reads} must be >= 1")
    rng = np.random.default_rng(1)
    held, times = [], []
    with ExpertStore(store_dir, tier=tier) as st:
        held.append(st.read(0, 0))  # opens the files; its buffer stays held
        n0 = st.buffers.allocated
        for _ in range(reads):
            layer = int(rng.integers(st.num_layers))
            e = int(rng.integers(st.num_experts[layer]))
            t0 = time.perf_counter()
            held.append(st.read(layer, e))
            times.append(time.perf_counter() - t0)
        if st.buffers.allocated - n0 != reads:
            raise OffloadError(
                f"measure_fill_reads: {st.buffers.allocated - n0} of {reads} reads went into fresh"
                " buffers; the measurement needs every one fresh"
            )
    return float(np.median(times))


@torch.no_grad()
def teacher_forced(
    model: torch.nn.Module, tokens: np.ndarray, om: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a window token by token with a KV cache (prefill = its first token) -> (greedy
    predictions [S], log-probabilities of the true next tokens [S-1])."""
    from moelab.models import KVCache

    if not (hasattr(model, "cfg") and hasattr(model, "blocks")):
        raise OffloadError("teacher-forced decode supports moelab models; use `moelab generate`")
    if om is not None:
        om.new_sequence()
    kv = KVCache()
    x = torch.as_tensor(tokens, dtype=torch.long)[None]
    preds, lps = [], []
    for i in range(x.shape[1]):
        logits = model(x[:, i : i + 1], cache=kv).logits[0, -1].float()
        preds.append(int(logits.argmax()))
        if i + 1 < x.shape[1]:
            lps.append(float(torch.log_softmax(logits, -1)[x[0, i + 1]]))
    return torch.tensor(preds), torch.tensor(lps)


def _lru_cache(st: ExpertStore, shape: ModelShape, slots: int) -> ExpertCache:
    """An LRU ExpertCache of `slots` experts per layer over the experts of `st`."""
    return ExpertCache(slots, "lru", num_layers=shape.num_layers, num_experts=shape.num_experts,
                       expert_bytes=st.expert_nbytes(0), top_k=shape.top_k)  # fmt: skip


def _all_resident(st: ExpertStore, shape: ModelShape) -> ExpertCache:
    """An LRU ExpertCache holding every expert of `st`, read in up front (no misses)."""
    cache = _lru_cache(st, shape, shape.num_experts)
    for layer in range(shape.num_layers):
        for e in range(shape.num_experts):
            cache.preload((layer, e), st.read(layer, e))
    return cache


def measure_compute(
    load_model: Callable[[], torch.nn.Module],
    stores: dict[str, Path],
    tokens: np.ndarray,
    repeats: int = 3,
    tier: str = "ram",
) -> dict[str, float]:
    """Seconds per MoE layer per decode token with every expert in the cache, per precision
    (hooks, attention and the weight-only kernels included, as a live run pays them): the
    median of `repeats` teacher-forced decodes of `tokens` after a warm-up. The experts are read
    from the store on `tier` (the live run's tier gives the live run's buffers and layout)."""
    if repeats < 1:
        raise ConfigError(f"measure_compute: repeats={repeats} must be >= 1")
    out = {}
    for prec, d in stores.items():
        m = load_model()
        with ExpertStore(d, tier=tier) as st:
            shape = model_shape(m)
            cache = _all_resident(st, shape)
            from moelab.offload.live import OffloadedModel

            with Prefetcher(st, cache, None) as pf, OffloadedModel(m, st, cache, pf) as om:
                teacher_forced(m, tokens[:4], om)  # warm-up
                per_layer = []
                for _ in range(repeats):  # median: one decode pays first-touch costs
                    om.reset_stats()
                    teacher_forced(m, tokens, om)
                    d = om.stats()["decode"]
                    per_layer.append(d["seconds"] / max(d["tokens"], 1) / shape.num_layers)
                out[prec] = float(np.median(per_layer))
    return out


def measure_predictors(
    load_model: Callable[[], torch.nn.Module],
    store_dir: Path,
    tokens: np.ndarray,
    specs: Sequence[str],
    tier: str = "ram",
    slots: int | None = None,
) -> dict[str, float]:
    """Seconds one live predictor call costs a decode, per predictor spec: a teacher-forced
    decode of `tokens` through the live path with a Prefetcher running it (tensor conversions,
    the cache hint and the queue included, which the replay's timing of the predictor alone
    leaves out); predictor seconds / (decode tokens x MoE layers). The cache holds `slots`
    experts per layer (default: a quarter of them, at least top_k) under LRU, so the prefetch
    thread loads from the store while the predictor runs, as in an offloaded decode: with every
    expert resident the same calls measured about 0.6x their live cost."""
    from moelab.offload.live import OffloadedModel

    out: dict[str, float] = {}
    for spec in specs:
        if spec == "none" or oracle_lead(spec) is not None:  # a lookup of known routing: 0
            continue
        m = load_model()
        shape = model_shape(m)
        n = max(shape.top_k, shape.num_experts // 4) if slots is None else int(slots)
        if not shape.top_k <= n <= shape.num_experts:
            raise ConfigError(
                f"measure_predictors: slots={n} per layer, expected top_k={shape.top_k} to"
                f" num_experts={shape.num_experts}"
            )
        with ExpertStore(store_dir, tier=tier) as st:
            cache = _lru_cache(st, shape, n)
            pf = Prefetcher(st, cache, make_live_predictor(spec))
            with pf, OffloadedModel(m, st, cache, pf) as om:
                teacher_forced(m, tokens[:4], om)  # warm-up (also fills the buffer pool)
                om.reset_stats()
                teacher_forced(m, tokens, om)
                d = om.stats()["decode"]
        out[spec] = float(d["predictor_seconds"]) / max(d["tokens"] * shape.num_layers, 1)
    return out


def measure_misses(
    load_model: Callable[[], torch.nn.Module],
    stores: dict[str, Path],
    tokens: np.ndarray,
    tier: str = "auto",
    repeats: int = 3,
) -> dict[str, dict[str, float]]:
    """What a demand miss costs a live decode, per store precision: teacher-forced decodes of
    `tokens` through the live path (OffloadedModel, Prefetcher without predictor, an LRU
    ExpertCache of top_k experts per layer, the store on `tier`) after a warm-up decode that also
    fills the store's buffer pool. Per decode: stall seconds / demand misses (one read into a
    recycled buffer between computations, cache insert and eviction: what back-to-back reads of
    one buffer, measure_reads, understate) and non-stall seconds per MoE layer; medians over
    `repeats` decodes -> {precision: {"seconds_per_miss", "layer_seconds", "misses_per_token"}}."""
    if repeats < 1:
        raise ConfigError(f"measure_misses: repeats={repeats} must be >= 1")
    from moelab.offload.live import OffloadedModel

    out = {}
    for prec, d in stores.items():
        m = load_model()
        shape = model_shape(m)
        with ExpertStore(d, tier=tier) as st:
            cache = _lru_cache(st, shape, shape.top_k)
            with Prefetcher(st, cache, None) as pf, OffloadedModel(m, st, cache, pf) as om:
                teacher_forced(m, tokens[:8], om)  # warm-up: model, kernels, buffer pool
                per_miss, per_layer, rate = [], [], []
                for _ in range(repeats):
                    om.reset_stats()
                    teacher_forced(m, tokens, om)
                    dd = om.stats()["decode"]
                    if dd["misses"] < 1 or dd["tokens"] < 1:
                        raise OffloadError(
                            f"measure_misses ({prec}): the calibration decode had no misses"
                        )
                    per_miss.append(dd["stall_seconds"] / dd["misses"])
                    per_layer.append(
                        (dd["seconds"] - dd["stall_seconds"]) / dd["tokens"] / shape.num_layers
                    )
                    rate.append(dd["misses"] / dd["tokens"])
        out[prec] = {
            "seconds_per_miss": float(np.median(per_miss)),
            "layer_seconds": float(np.median(per_layer)),
            "misses_per_token": float(np.median(rate)),
        }
    return out


class LayerCadenceLoads:
    """Prefetch loads at the live cadence, for measuring what they cost the decode: the decoding
    thread itself, as each MoE layer routes, makes the live path's two prefetcher calls
    (cancel_stale, then request of one expert) on a Prefetcher with its own store and cache, whose
    reads `loader` does (a thread of this process or the helper process, prefetch.LOADERS)."""

    def __init__(self, model: torch.nn.Module, store_dir: Path, tier: str, loader: str) -> None:
        self.st = ExpertStore(store_dir, tier=tier)
        L, E = self.st.num_layers, min(self.st.num_experts)
        if E < 3:
            raise ConfigError(
                f"LayerCadenceLoads: {E} experts per layer; needs >= 3 (2 stay resident)"
            )
        self.cache = ExpertCache(2, "lru", num_layers=L, num_experts=E,
                                 expert_bytes=self.st.expert_nbytes(0), top_k=2)  # fmt: skip
        self.pf = Prefetcher(self.st, self.cache, None, loader=loader)
        self.pf.request(0, [0], target_step=1 << 30)  # the loader (a helper process) is up
        self.pf.drain()
        self._n0 = self.pf.stats.loaded
        self.st.reset_stats()  # its own store: only the cadence loads' reads count from here
        self.read_seconds = float("nan")  # mean seconds of one of its reads, set by close()
        self.alone_seconds = float("nan")  # the same of reads with nothing else running
        self.i, self.L, self.E = 0, L, E
        self._visits = [0] * L
        self._hooks = [s.router.register_forward_hook(self._on_layer) for s in require_sites(model)]

    def _on_layer(self, *_: object) -> None:
        # each layer's requests cycle through all its experts: more than the 2 slots it keeps,
        # so every request is a load (a pattern that revisits a resident expert loads nothing)
        self.pf.cancel_stale(0, -1)
        self._request(self.i % self.L)
        self.i += 1

    def _request(self, layer: int) -> None:
        self._visits[layer] += 1
        self.pf.request(layer, [self._visits[layer] % self.E], target_step=1 << 30)

    def close(self, alone: int = 0) -> int:
        """Remove the hooks, stop the loader -> prefetches finished. Sets read_seconds, the mean
        time one of its reads took as the loader timed it, and with `alone` > 0 alone_seconds:
        the same for `alone` further reads through the same loader one at a time with nothing
        else running, the reference measured at the same moment (a shared tier's speed drifts
        by 2x within minutes here, bench/RESULTS.md run 30)."""
        for h in self._hooks:
            h.remove()
        self.pf.drain()
        n = self.pf.stats.loaded - self._n0
        st = self.st.stats()
        if st["reads"] > 0:
            self.read_seconds = st["seconds"] / st["reads"]
        if alone > 0:
            self.st.reset_stats()
            for j in range(alone):  # after a drain nothing is in flight: any expert not resident
                layer = j % self.L
                e = next(e for e in range(self.E) if (layer, e) not in self.cache)
                self.pf.request(layer, [e], target_step=1 << 30)
                self.pf.drain()
            st = self.st.stats()
            if st["reads"] > 0:
                self.alone_seconds = st["seconds"] / st["reads"]
        self.pf.close()
        self.st.close()
        return n


def measure_background(
    load_model: Callable[[], torch.nn.Module],
    store_dir: Path,
    tokens: np.ndarray,
    tier: str = "auto",
    repeats: int = 3,
    loader: str = "auto",
) -> tuple[float, float, float]:
    """What prefetch loads cost beside a live decode -> (foreground seconds one load costs the
    decode, seconds one of those reads takes, how many times a read alone that is): all-resident
    decodes of `tokens` through the live path, alternately alone and with one prefetch
    requested per MoE layer by `loader` from the store on `tier` (LayerCadenceLoads), each pair
    followed by reads through the same loader with nothing else running; (busy - alone) decode
    seconds / loads done (>= 0), the loads' mean read time and its ratio to the reads alone of
    the same repeat, medians over `repeats`. The cadence matters: a thread loader costs far
    more per load issued between layers than per load read back to back (bench/RESULTS.md run
    28); a read beside compute takes longer than one alone (run 29); and the ratio is paired
    within a repeat because the tier's own speed drifts (run 30)."""
    from moelab.offload.live import OffloadedModel

    if repeats < 1:
        raise ConfigError(f"measure_background: repeats={repeats} must be >= 1")
    m = load_model()
    shape = model_shape(m)
    per, reads, ratios = [], [], []
    with ExpertStore(store_dir, tier=tier) as st:
        cache = _all_resident(st, shape)
        with (
            Prefetcher(st, cache, None, loader="thread") as pf,
            OffloadedModel(m, st, cache, pf) as om,
        ):
            teacher_forced(m, tokens[:8], om)  # warm-up

            def decode() -> float:
                om.reset_stats()
                teacher_forced(m, tokens, om)
                return float(om.stats()["decode"]["seconds"])

            for _ in range(repeats):
                alone = decode()
                loads = LayerCadenceLoads(m, store_dir, tier, loader)
                try:
                    busy = decode()
                finally:
                    n = loads.close(alone=2 * shape.num_layers)
                if n < 1 or not math.isfinite(loads.read_seconds):
                    raise OffloadError("measure_background: no background load finished")
                per.append((busy - alone) / n)
                reads.append(loads.read_seconds)
                if math.isfinite(loads.alone_seconds) and loads.alone_seconds > 0:
                    ratios.append(loads.read_seconds / loads.alone_seconds)
    if not ratios:
        raise OffloadError("measure_background: no read alone finished (the reference)")
    return max(0.0, float(np.median(per))), float(np.median(reads)), float(np.median(ratios))


def measure_machine(
    load_model: Callable[[], torch.nn.Module],
    stores: dict[str, Path],
    tokens: np.ndarray,
    tier: str = "auto",
    predictors: Sequence[str] = (),
    predictor_seconds: dict[str, float] | None = None,
) -> Machine:
    """Every cost the replay charges, measured now on this machine: per store precision the
    tier's read, a read into fresh memory, the chunk overhead, the per-layer compute (all
    experts resident, and outside stalls in a decode that loads them) and the demand-miss
    stall; the foreground cost of a background read (on the full store when there is one); and
    the live cost per call of each of `predictors` (`predictor_seconds`: costs already
    measured, kept unless measured again here). `tokens`: a held-out window (its first 48
    tokens are decoded, 24 for the predictors)."""
    if not stores:
        raise ConfigError("measure_machine: no expert store to measure")
    secs, fresh, chunk, used = {}, {}, {}, tier
    for p, d in stores.items():
        secs[p], used = measure_reads(d, tier)
        fresh[p] = measure_fill_reads(d, tier)
        chunk[p] = measure_chunk_overhead(d, tier)
    comp = measure_compute(load_model, stores, tokens[:48], tier=tier)
    mm = measure_misses(load_model, stores, tokens[:48], tier)
    miss = {p: v["seconds_per_miss"] for p, v in mm.items()}
    loading = {p: v["layer_seconds"] for p, v in mm.items()}
    main_p = "full" if "full" in stores else next(iter(stores))
    main = stores[main_p]
    bg, _, beside = measure_background(load_model, main, tokens[:48], tier)  # shared cores
    # the replay moves a demand load in the live miss time (Machine.load_seconds); a prefetch
    # read beside compute took `beside` times a read alone of the same moment. Below 1 the
    # ratio is noise (the replay would move prefetches faster than demand loads)
    slowdown = max(1.0, beside)
    preds = dict(predictor_seconds or {})
    if predictors:
        preds.update(measure_predictors(load_model, main, tokens[:24], list(predictors), tier))
    return Machine(secs, comp, used, False, miss, fresh, bg, chunk, preds, loading, slowdown)


@dataclass
class Quality:
    """Held-out perplexity of one expert precision against full precision, from teacher-forced
    decodes of the same windows (the live path): the paired loss change with its standard error
    over windows, and how often the routing stayed the full-precision routing."""

    precision: str
    ppl: float
    delta_loss: float  # mean nats per token vs full precision
    delta_loss_se: float  # cluster-robust (windows) standard error; NaN with one window
    routing_agreement: float  # (token, layer) pairs routed to the same expert set as full
    windows: int
    tokens: int

    @property
    def ppl_ratio(self) -> float:
        """exp(delta_loss): perplexity at this precision / at full precision."""
        return math.exp(self.delta_loss)

    @property
    def ppl_ratio_se(self) -> float:
        """Standard error of the ratio (delta method: ratio x SE of the loss change)."""
        return self.ppl_ratio * self.delta_loss_se


def nll_sums(lps: Sequence[torch.Tensor], where: str) -> tuple[list[float], list[int]]:
    """Per-window summed negative log-likelihood (float64) and scored tokens of log-probabilities;
    OffloadError naming `where` if a window's is not finite (no perplexity from it)."""
    nll = [-float(x.double().sum()) for x in lps]
    bad = [i for i, v in enumerate(nll) if not math.isfinite(v)]
    if bad:
        raise OffloadError(
            f"{where}: held-out window(s) {bad} scored a non-finite log-likelihood (NaN or inf "
            "weights?); no perplexity is reported from them"
        )
    return nll, [int(x.numel()) for x in lps]


def routing_agreement(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Fraction of (token, layer) pairs routed to the same expert set in a and b ([S, L, k] per
    window, the same windows)."""
    same = [(np.sort(x, -1) == np.sort(y, -1)).all(-1) for x, y in zip(a, b, strict=True)]
    return float(np.concatenate(same).mean())


@torch.no_grad()
def window_losses(
    load_model: Callable[[], torch.nn.Module],
    store: Path,
    windows: Sequence[np.ndarray],
    full_sequence: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Teacher-forced decode of each window with every expert served from `store` (the arithmetic
    of a live run, whatever is resident; full_sequence: one forward per window instead) ->
    per-window summed NLL, scored tokens, routing."""
    from moelab.offload.live import OffloadedModel

    m = load_model()
    with ExpertStore(store, tier="ram") as st:
        cache = _all_resident(st, model_shape(m))
        with Prefetcher(st, cache, None) as pf, OffloadedModel(m, st, cache, pf) as om:
            lps, routing = [], []
            for w in windows:
                om.reset_stats()
                if full_sequence:
                    om.new_sequence()
                    x = torch.as_tensor(w, dtype=torch.long)[None]
                    lp = torch.log_softmax(m(x).logits[0, :-1].float(), -1)
                    lps.append(lp.gather(1, x[0, 1:, None])[:, 0])
                else:
                    lps.append(teacher_forced(m, w, om)[1])
                routing.append(om.recorded_expert_ids())
    nll, n = nll_sums(lps, f"experts of {store}")
    return np.asarray(nll), np.asarray(n, dtype=np.float64), routing


def paired_change(nll: np.ndarray, base: np.ndarray, n: np.ndarray) -> tuple[float, float]:
    """Mean loss change per token of `nll` over `base` (per-window sums, the same windows and
    tokens) and its standard error over windows."""
    from moelab.experts.heldout import ratio_and_se

    return ratio_and_se(np.asarray(nll) - np.asarray(base), np.asarray(n, dtype=np.float64))


def heldout_quality(
    load_model: Callable[[], torch.nn.Module],
    stores: dict[str, Path],
    windows: Sequence[np.ndarray],
) -> dict[str, Quality]:
    """Quality of every store's precision on held-out windows against the 'full' store, all
    scored by the same teacher-forced decode that `run_live` scores (a full-sequence forward is
    another evaluation: with bf16 kernels the two route differently often enough, on a model
    with near-tied routers, to disagree by several percent of perplexity)."""
    if "full" not in stores:
        raise ConfigError(
            f"heldout_quality: needs the 'full' store as the reference, got {sorted(stores)}"
        )
    if not windows:
        raise ConfigError("heldout_quality: no held-out windows to score")
    got = {p: window_losses(load_model, d, windows) for p, d in stores.items()}
    base, n, base_routing = got["full"]
    out = {}
    for p, (nll, n_p, routing) in got.items():
        if not np.array_equal(n_p, n):
            raise OffloadError(f"heldout_quality: {p} scored other token counts than full")
        d, se = paired_change(nll, base, n)
        out[p] = Quality(p, math.exp(float(nll.sum() / n.sum())), d, se,
                         routing_agreement(routing, base_routing), len(windows), int(n.sum()))  # fmt: skip
    return out


# --------------------------------------------------------------------------- live
def run_live(
    load_model: Callable[[], torch.nn.Module],
    stores: dict[str, Path],
    windows: Sequence[np.ndarray],
    precision: str,
    policy: str,
    predictor: str,
    slots: int,
    tier: str = "auto",
    counts: np.ndarray | None = None,
    reference: Sequence[torch.Tensor] | None = None,
    routing: Sequence[np.ndarray] | None = None,
    loader: str = "auto",
) -> dict[str, Any]:
    """Teacher-forced live decode of `windows` with the configuration; decode stats, held-out
    perplexity of the decoded tokens, the routing seen per window ("routing", [S, L, k] each) and
    (with `reference` greedy predictions) identity. `predictor` "oracle" prefetches `routing`
    (an earlier run's, e.g. all-resident): the next layer's true experts after each layer, the
    live counterpart of the replay's perfect one-layer-ahead predictor (oracle_plan);
    "oracle:d=N" the true experts N layers ahead in decode order (RecordedRouting). `loader`:
    who reads prefetches (prefetch.LOADERS)."""
    from moelab.offload.live import OffloadedModel
    from moelab.offload.prefetch import RecordedRouting

    lead = oracle_lead(predictor)
    if lead is not None and (routing is None or len(routing) != len(windows)):
        raise ConfigError(
            f"run_live: predictor {predictor!r} needs the routing of every window (routing=, one "
            "[S, L, k] array per window, e.g. the 'routing' of an all-resident run_live)"
        )

    main, low = split_precision(precision)
    model = load_model()
    shape = model_shape(model)
    st = ExpertStore(stores[main], tier=tier)
    sub = ExpertStore(stores[low], tier="ram") if low else None
    cache = make_cache(policy, slots, shape, st.expert_nbytes(0), counts)
    pred = None if lead is not None else make_live_predictor(predictor)
    pf = Prefetcher(st, cache, pred, loader=loader)
    om = OffloadedModel(model, st, cache, pf, standin=sub)
    preds, lps = [], []
    try:
        for i, w in enumerate(windows):
            if lead is not None:
                pf.predictor = RecordedRouting(np.asarray(routing[i]), ahead=lead)  # type: ignore[index]
                pf.predictor.bind(om.sites)
            p, lp = teacher_forced(model, w, om)
            preds.append(p)
            lps.append(lp)
        s = om.stats()
        ids = om.recorded_expert_ids()
    finally:
        om.close()
        pf.close()
        st.close()
        if sub is not None:
            sub.close()
    s["loader"] = pf.loader
    s["window_nll"], s["window_tokens"] = nll_sums(lps, f"live decode ({precision})")
    s["ppl"] = float(torch.exp(-torch.cat(lps).mean()))
    s["predictions"] = preds
    s["routing"] = np.split(ids, np.cumsum([len(w) for w in windows])[:-1])
    if lead is not None and not all(
        np.array_equal(a, np.asarray(b))
        for a, b in zip(s["routing"], routing, strict=True)  # type: ignore[arg-type]
    ):
        raise OffloadError(
            "run_live: the decode routed differently from the routing given to the oracle "
            "(another model's, another precision's or other windows' routing): its figures "
            "would not be a perfect predictor's"
        )
    if reference is not None:
        s["identical"] = all(torch.equal(a, b) for a, b in zip(preds, reference, strict=True))
        s["agreement"] = float(
            torch.cat([(a == b).float() for a, b in zip(preds, reference, strict=True)]).mean()
        )
    return s
