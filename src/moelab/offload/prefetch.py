"""Prefetcher: a background thread that loads the experts a predictor names for later layers (or
the next token) while the current layer computes, plus the live predictors that name them.

Speculative expert loading by applying the next layer's gate to the current hidden state follows
Eliseev & Mazur 2023 (arXiv:2312.17238, §3.2); prefetching from earlier requests' activation
statistics follows activation-aware offloaders (e.g. Xue et al. 2024, MoE-Infinity). The queue is
bounded, requests carry their target (token step, layer) and are cancelled once that layer has
started (stale), and each token step has a prefetch budget (experts). Prefetch reads go in chunks
(PREFETCH_CHUNK_BYTES): when the target layer starts without needing an expert still in transfer,
the read stops after its current chunk, so a wrong guess holds the tier for at most one chunk
instead of a whole expert and never enters the cache.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch

from moelab.errors import ConfigError, OffloadError
from moelab.offload.cache import ExpertCache, Key
from moelab.offload.procreader import ProcessReader, process_reader_available
from moelab.offload.sites import ExpertSite

Target = tuple[int, int]  # (token step, MoE layer)
# Prefetch reads go in pieces of this many bytes so that a wrong one can be stopped (measured on
# the testbed's O_DIRECT tier: 2 MiB pieces read an 8.65 MB expert about 9% slower than one call,
# 1 MiB about 14% slower; the planner measures the cost per piece and charges it).
PREFETCH_CHUNK_BYTES = 2 << 20
# Who does the prefetch reads: a thread of this process, or a helper process (procreader) where
# the store is a Linux file tier; 'auto' takes the process where it exists. The thread's GIL
# handovers cost the decode 40-150 us per load (bench/RESULTS.md run 27).
LOADERS = ("auto", "thread", "process")
Prediction = tuple[int, int, list[int]]  # (target step, target layer, experts best first)


@dataclass
class _Request:
    key: Key
    target: Target
    cancelled: bool = False
    issued: Target = (-1, -1)  # (step, layer) whose prediction asked for it


class _InFlight:
    def __init__(self, target: Target, issued: Target = (-1, -1)) -> None:
        self.target, self.issued = target, issued
        self.event = threading.Event()
        self.abort = threading.Event()  # set: stop the read after its current chunk
        self.aborted = False
        self.value: Any = None
        self.error: BaseException | None = None
        self.req = -1  # the process reader's request id


@dataclass
class PrefetchStats:
    """What the prefetcher did."""

    requested: int = 0  # experts named by the predictor
    enqueued: int = 0
    loaded: int = 0
    skipped_resident: int = 0  # already resident or in flight
    cancelled: int = 0  # stale or taken over by a demand load before starting
    dropped_full: int = 0  # queue full
    dropped_budget: int = 0  # per-step budget exhausted
    not_kept: int = 0  # loaded but the cache had no evictable slot
    late_waits: int = 0  # demand waited for an in-flight prefetch
    aborted: int = 0  # in transfer when its target layer started without needing it: stopped
    revised: int = 0  # superseded by a later prediction for the same target: dropped or stopped

    def to_dict(self) -> dict[str, int]:
        """Plain dict."""
        return asdict(self)


class Prefetcher:
    """Background loader of predicted experts into an ExpertCache from an ExpertStore."""

    def __init__(
        self,
        store: Any,
        cache: ExpertCache,
        predictor: LivePredictor | None = None,
        max_queue: int = 64,
        budget: int | None = None,
        start: bool = True,
        chunk_bytes: int = PREFETCH_CHUNK_BYTES,
        loader: str = "auto",
        read_ahead: int = 2,
    ) -> None:
        if loader not in LOADERS:
            raise ConfigError(f"Prefetcher loader={loader!r}: expected one of {LOADERS}")
        if read_ahead < 1:
            raise ConfigError(f"Prefetcher read_ahead={read_ahead}: must be >= 1 request")
        if chunk_bytes < 0:
            raise ConfigError(
                f"Prefetcher chunk_bytes={chunk_bytes}: must be >= 0 (0: whole reads)"
            )
        if max_queue < 1:
            raise ConfigError(f"Prefetcher max_queue={max_queue}: must be >= 1")
        if budget is not None and budget < 0:
            raise ConfigError(
                f"Prefetcher budget={budget}: must be >= 0 experts per step (or None)"
            )
        self.store, self.cache, self.predictor = store, cache, predictor
        self.max_queue, self.budget, self.chunk_bytes = max_queue, budget, int(chunk_bytes)
        self.stats = PrefetchStats()
        self._q: deque[_Request] = deque()
        self._queued: dict[Key, _Request] = {}
        self._inflight: dict[Key, _InFlight] = {}
        self._cv = threading.Condition()
        self._closed = False
        self._paused = not start
        self._step = 0
        self._budget_left = budget
        self.log: list[tuple[int, int, int, int, list[int]]] | None = None  # set [] to record
        if loader == "process" and not process_reader_available(store):
            raise ConfigError(
                f"Prefetcher loader='process': store tier {getattr(store, 'tier', '?')!r} has no "
                "process reader (a file tier, 'direct' or 'fadvise', on Linux); use 'thread'"
            )
        use_process = loader == "process" or (loader == "auto" and process_reader_available(store))
        self.loader = "process" if use_process else "thread"
        # process loader: requests go to the helper `read_ahead` at a time (so that it never idles
        # between two of this thread's visits) and its finished reads enter the cache when this
        # thread next requests, starts a layer or fetches
        self.read_ahead = read_ahead
        self._reader = ProcessReader(store) if use_process else None
        self._sent: dict[int, tuple[Key, _InFlight]] = {}
        self._thread: threading.Thread | None = None
        if self._reader is None:
            self._thread = threading.Thread(
                target=self._worker, name="moelab-prefetch", daemon=True
            )
            self._thread.start()

    # ------------------------------------------------------------------ control
    def begin_step(self, step: int) -> None:
        """A new token step starts: reset the budget."""
        with self._cv:
            self._step = step
            self._budget_left = self.budget

    def pause(self) -> None:
        """Stop taking requests off the queue (tests use it to observe the queue)."""
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        """Resume the worker."""
        with self._cv:
            self._paused = False
            self._cv.notify_all()
            self._pump()

    def close(self) -> None:
        """Cancel everything queued and stop the worker thread."""
        with self._cv:
            self._closed = True
            for r in self._q:
                r.cancelled = True
            self._q.clear()
            self._queued.clear()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._reader is not None:
            self._reader.close()
            self._inflight.clear()
            self._sent.clear()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def queued(self) -> list[Key]:
        """Keys waiting in the queue (not cancelled)."""
        with self._cv:
            return [r.key for r in self._q if not r.cancelled]

    def in_flight(self, key: Key) -> bool:
        """True while the worker is loading `key`."""
        with self._cv:
            return key in self._inflight

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until the queue is empty and nothing is in flight."""
        t_end = time.perf_counter() + timeout
        with self._cv:
            while (any(not r.cancelled for r in self._q) or self._inflight) and not self._closed:
                left = t_end - time.perf_counter()
                if left <= 0:
                    raise OffloadError(f"Prefetcher.drain: still busy after {timeout} s")
                if self._reader is not None:
                    if self._paused and not self._inflight:
                        raise OffloadError("Prefetcher.drain: paused with requests queued")
                    self._pump(wait=True)
                else:
                    self._cv.wait(timeout=left)

    # ------------------------------------------------------------------ requests
    def request(
        self,
        layer: int,
        experts: list[int],
        target_step: int | None = None,
        issued: Target = (-1, -1),
    ) -> int:
        """Queue loads of `experts` (best first) of `layer` for `target_step`, asked by the
        prediction made at (step, layer) `issued`; returns #enqueued."""
        n = 0
        with self._cv:
            if self._closed:
                return 0
            target = (self._step if target_step is None else target_step, layer)
            if self.cache.per_layer:  # more than a layer's slots would only evict each other
                experts = list(experts)[: self.cache.slots]
            for e in experts:
                key = (int(layer), int(e))
                self.stats.requested += 1
                if key in self.cache or key in self._inflight:
                    self.stats.skipped_resident += 1
                    continue
                if key in self._queued:
                    old = self._queued[key]
                    old.target, old.issued = min(old.target, target), max(old.issued, issued)
                    self.stats.skipped_resident += 1
                    continue
                if self._budget_left is not None and self._budget_left <= 0:
                    self.stats.dropped_budget += 1
                    continue
                if sum(not r.cancelled for r in self._q) >= self.max_queue:
                    self.stats.dropped_full += 1
                    continue
                r = _Request(key, target, issued=issued)
                self._q.append(r)
                self._queued[key] = r
                if self._budget_left is not None:
                    self._budget_left -= 1
                n += 1
            self.stats.enqueued += n
            if n:
                self._cv.notify_all()
            self._pump()
        return n

    def cancel_stale(self, step: int, layer: int, needed: Sequence[Key] = ()) -> int:
        """Cancel queued (not started) requests whose target is at or before (step, layer), and
        stop the reads in transfer for such a target unless their key is `needed` now (chunked
        reads stop after the current chunk); tells the cache its position (position- and
        predictor-aware policies). Returns the queued requests cancelled."""
        self.cache.at(step, layer)
        at = (step, layer)
        keep = {(int(a), int(b)) for a, b in needed}
        with self._cv:
            n, _ = self._withdraw(
                lambda r: r.target <= at, lambda key, fl: fl.target <= at and key not in keep
            )
            self.stats.cancelled += n
            self._pump()
        return n

    def revise(self, target: Target, named: Sequence[Key], issued: Target) -> int:
        """A prediction made at `issued` for `target` (step, layer) supersedes those made before
        it for the same target: their requests for experts it does not name are dropped (queued)
        or stopped after the current chunk (in transfer). A two-layer guess, corrected by the
        next layer's better one, so gets its head start without keeping its mistakes on the
        link. Returns how many were dropped or stopped."""
        keep = {(int(a), int(b)) for a, b in named}
        with self._cv:
            dropped, stopped = self._withdraw(
                lambda r: r.target == target and r.issued < issued and r.key not in keep,
                lambda key, fl: fl.target == target and fl.issued < issued and key not in keep,
            )
            self.stats.revised += dropped + stopped
        return dropped + stopped

    def _withdraw(
        self,
        queued: Callable[[_Request], bool],
        in_flight: Callable[[Key, _InFlight], bool],
    ) -> tuple[int, int]:
        """Cancel the live queued requests `queued` picks and stop (after their current chunk)
        the reads in transfer `in_flight` picks -> (cancelled, newly stopped). With _cv held."""
        n = 0
        for r in self._q:
            if not r.cancelled and queued(r):
                r.cancelled = True
                self._queued.pop(r.key, None)
                n += 1
        stopped = 0
        for key, fl in self._inflight.items():
            if in_flight(key, fl):
                stopped += not fl.abort.is_set()
                fl.abort.set()
                if self._reader is not None:
                    self._reader.abort(fl.req)
        return n, stopped

    def cancel_all(self) -> int:
        """Cancel every queued request."""
        with self._cv:
            n = sum(not r.cancelled for r in self._q)
            for r in self._q:
                r.cancelled = True
            self._q.clear()
            self._queued.clear()
            self.stats.cancelled += n
        return n

    def on_layer(self, step: int, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> None:
        """Ask the predictor what to load next, given layer `layer`'s router input and choice."""
        if self.predictor is None:
            return
        for t_step, t_layer, experts in self.predictor.on_layer(step, layer, x, expert_ids):
            if self.log is not None:
                self.log.append((step, layer, t_step, t_layer, list(experts)))
            self.cache.hint(t_step, t_layer, experts)  # predictor-aware eviction
            self.revise((t_step, t_layer), [(t_layer, e) for e in experts], (step, layer))
            self.request(t_layer, experts, target_step=t_step, issued=(step, layer))

    # ------------------------------------------------------------------ demand path
    def fetch(self, key: Key) -> tuple[Any, str, float]:
        """Weights of `key` for computing now -> (value, kind, seconds stalled).

        kind: "resident" (already in cache), "late" (waited for an in-flight prefetch),
        "miss" (loaded synchronously; a queued prefetch of it is cancelled).
        """
        key = (int(key[0]), int(key[1]))
        t0 = time.perf_counter()
        with self._cv:
            fl = self._inflight.get(key)
            if fl is None:
                hit, value = self.cache.access(key)
                if hit:
                    return value, "resident", 0.0
                r = self._queued.pop(key, None)
                if r is not None and not r.cancelled:
                    r.cancelled = True
                    self.stats.cancelled += 1
        if fl is not None:
            if self._reader is not None:
                with self._cv:
                    while not fl.event.is_set():
                        if self._closed:
                            raise OffloadError(
                                f"Prefetcher closed while expert {key[1]} at layer {key[0]} was "
                                "being read"
                            )
                        self._pump(wait=True)
            fl.event.wait()
            if fl.error is not None:
                raise OffloadError(
                    f"prefetch of expert {key[1]} at layer {key[0]} failed: {fl.error}"
                )
            self.cache.access(key)  # a hit once loaded; a miss if it was stopped (never entered)
            if not fl.aborted:
                with self._cv:
                    self.stats.late_waits += 1
                return fl.value, "late", time.perf_counter() - t0
        value = self.store.read(*key)
        self.cache.insert(key, value, prefetched=False)
        return value, "miss", time.perf_counter() - t0

    # ------------------------------------------------------------------ loaders
    def _finish(self, key: Key, fl: _InFlight) -> None:
        """A load ended (fl.value, fl.aborted or fl.error set): count it, insert what came,
        wake whoever waits. Called with self._cv held."""
        if fl.aborted:
            self.stats.aborted += 1
        elif fl.error is None:
            kept = self.cache.insert(key, fl.value, prefetched=True)
            self.stats.loaded += 1
            if not kept:
                self.stats.not_kept += 1
        self._inflight.pop(key, None)
        fl.event.set()
        self._cv.notify_all()

    def _pump(self, wait: bool = False) -> None:
        """Process loader (no-op for the thread): take in the helper's finished reads (with
        `wait`, block for at least one), then keep `read_ahead` requests with it. With _cv held."""
        rd = self._reader
        if rd is None or self._closed:
            return
        for c in rd.poll(wait=wait and bool(self._sent)):
            key, fl = self._sent.pop(c.req)
            fl.value, fl.aborted, fl.error = c.value, c.aborted, c.error
            self._finish(key, fl)
        while len(self._sent) < self.read_ahead and not self._paused:
            got = self._start_next()
            if got is None:
                break
            key, fl = got
            fl.req = rd.submit(*key, chunk=self.chunk_bytes)
            self._sent[fl.req] = (key, fl)

    def _start_next(self) -> tuple[Key, _InFlight] | None:
        """Take the next live request off the queue (cancelled ones dropped, resident ones
        skipped) and mark it in flight; None once the queue is empty. With _cv held."""
        while self._q:
            r = self._q.popleft()
            if r.cancelled:
                continue
            self._queued.pop(r.key, None)
            if r.key in self.cache:
                self.stats.skipped_resident += 1
                continue
            fl = _InFlight(r.target, r.issued)
            self._inflight[r.key] = fl
            return r.key, fl
        return None

    def _worker(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (self._paused or not self._q):
                    self._cv.wait()
                if self._closed:
                    return
                got = self._start_next()
                if got is None:
                    continue
                key, fl = got
            try:
                value = self.store.read(*key, chunk=self.chunk_bytes, abort=fl.abort.is_set)
                fl.value = value
                fl.aborted = value is None
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting demand path
                fl.error = exc
            with self._cv:
                self._finish(key, fl)


# --------------------------------------------------------------------------- live predictors
class LivePredictor(Protocol):
    """Names experts to prefetch as generation proceeds."""

    name: str

    def bind(self, sites: list[ExpertSite]) -> None:
        """Receive the model's MoE layers before the first step."""

    def on_layer(
        self, step: int, layer: int, x: torch.Tensor, expert_ids: torch.Tensor
    ) -> list[Prediction]:
        """Predictions after layer `layer` of step `step` routed (x: router input [T, D])."""


def _rank_rows(scores: torch.Tensor, per_row: int) -> list[int]:
    """Experts best first: union over rows of each row's top `per_row`, ranked by summed score."""
    if scores.shape[0] == 1:
        return torch.topk(scores[0], per_row).indices.tolist()
    top = torch.topk(scores, per_row, dim=-1).indices
    chosen = torch.unique(top)
    mass = scores.sum(0)
    return chosen[torch.argsort(mass[chosen], descending=True)].tolist()


def oracle_lead(spec: str) -> int | None:
    """Layers of lead of an oracle predictor spec: 'oracle' -> 1 (the next layer of the same
    token), 'oracle:d=N' -> N (the layer N positions later in decode order, across tokens);
    None for any other spec."""
    spec = spec.strip()
    if spec == "oracle":
        return 1
    if not spec.startswith("oracle:"):
        return None
    key, _, val = spec[len("oracle:") :].partition("=")
    if key != "d" or not val.isdigit() or int(val) < 1:
        raise ConfigError(f"predictor {spec!r}: expected 'oracle' or 'oracle:d=N' with N >= 1")
    return int(val)


class RecordedRouting:
    """Perfect predictions from a known routing [steps, L, k] of the sequence being decoded (an
    earlier decode of the same tokens: full precision routes identically). `ahead` = 1: after
    layer l, the experts layer l+1 uses (with `wrap`, after the last layer the next token's first
    layer's); `ahead` = d > 1: the layer d positions later in decode order (step x L + layer),
    across token boundaries. The live upper bound of prefetch with that much lead (the replay's
    oracle_plan for d = 1)."""

    def __init__(self, expert_ids: np.ndarray, wrap: bool = False, ahead: int = 1) -> None:
        if expert_ids.ndim != 3:
            raise ConfigError(
                f"RecordedRouting: routing of shape {expert_ids.shape}, expected [steps, L, k]"
            )
        if ahead < 1:
            raise ConfigError(f"RecordedRouting: ahead={ahead}, expected >= 1 layer")
        self.ids, self.ahead = expert_ids, int(ahead)
        self.wrap = wrap or self.ahead > 1
        self.name = "oracle" if self.ahead == 1 else f"oracle:d={self.ahead}"

    def bind(self, sites: list[ExpertSite]) -> None:
        """Check that the routing has the model's number of MoE layers."""
        if len(sites) != self.ids.shape[1]:
            raise ConfigError(
                f"RecordedRouting: routing of {self.ids.shape[1]} layers for a model with "
                f"{len(sites)} MoE layers"
            )

    def on_layer(
        self, step: int, layer: int, x: torch.Tensor, expert_ids: torch.Tensor
    ) -> list[Prediction]:
        L = self.ids.shape[1]
        t_step, t_layer = divmod(step * L + layer + self.ahead, L)
        if t_step != step and not self.wrap:
            return []
        if t_step >= len(self.ids):
            return []
        return [(t_step, t_layer, [int(e) for e in self.ids[t_step, t_layer] if e >= 0])]


class GateLookahead:
    """Apply MoE layer l+d's router to layer l's router input (Eliseev & Mazur 2023, §3.2)."""

    def __init__(self, distances: tuple[int, ...] = (1,), top: int | None = None) -> None:
        if not distances or min(distances) < 1:
            raise ConfigError(f"GateLookahead distances={distances}: need at least one d >= 1")
        self.distances, self.top = tuple(distances), top
        self.name = "gate" + ("" if self.distances == (1,) else "-" + "-".join(map(str, distances)))
        self._w: list[torch.Tensor] = []
        self._b: list[torch.Tensor | None] = []
        self._k = 1

    def bind(self, sites: list[ExpertSite]) -> None:
        """Keep each layer's router projection."""
        self._w = [s.router_weight().detach() for s in sites]
        self._b = [
            getattr(getattr(s.router, "gate", None), "bias", None) if s.kind == "moelab" else None
            for s in sites
        ]
        self._k = sites[0].top_k

    @torch.no_grad()
    def on_layer(
        self, step: int, layer: int, x: torch.Tensor, expert_ids: torch.Tensor
    ) -> list[Prediction]:
        out: list[Prediction] = []
        for d in self.distances:
            t = layer + d
            if t >= len(self._w):
                continue
            logits = x.float() @ self._w[t].float().t()
            if self._b[t] is not None:
                logits = logits + self._b[t].float()
            out.append((step, t, _rank_rows(torch.softmax(logits, -1), self.top or self._k)))
        return out


class AdaptiveLookahead:
    """Gate lookahead fused with temporal reuse, weighted by each source's live precision.

    For target layer l+1 it scores expert e as p_gate * [e in gate top-k] + p_prev * [e used by
    the previous token at l+1] (+ a tiny gate-probability tie-break), where p_gate and p_prev are
    exponential moving averages of each source's top-k precision, measured online against the
    routing actually observed when layer l+1 runs. When the gate is unreliable the prediction
    falls back to the resident previous-token set (no loads, plain LRU behaviour); when the gate
    is reliable it drives prefetching (Eliseev & Mazur 2023 combined LRU + speculative loading).
    """

    name = "adaptive"

    def __init__(self, decay: float = 0.9, prior: float = 0.5) -> None:
        if not 0 <= decay < 1:
            raise ConfigError(f"AdaptiveLookahead decay={decay}: must be in [0, 1)")
        self.decay = decay
        self.p_gate = self.p_prev = prior
        self._gate = GateLookahead((1,))
        self._last: dict[int, set[int]] = {}
        self._pending: dict[tuple[int, int], tuple[set[int], set[int]]] = {}

    def bind(self, sites: list[ExpertSite]) -> None:
        """Keep the routers (through a GateLookahead)."""
        self._gate.bind(sites)
        self._k, self._L = sites[0].top_k, len(sites)

    @torch.no_grad()
    def on_layer(
        self, step: int, layer: int, x: torch.Tensor, expert_ids: torch.Tensor
    ) -> list[Prediction]:
        if expert_ids.shape[0] > 1:  # prefill: plain gate lookahead over all rows
            if layer == 0:  # a new sequence starts
                self._last, self._pending = {}, {}
            self._last[layer] = {int(e) for e in expert_ids[-1].tolist() if e >= 0}
            return self._gate.on_layer(step, layer, x, expert_ids)
        truth = {int(e) for e in expert_ids[-1].tolist() if e >= 0}
        seen = self._pending.pop((step, layer), None)
        if seen is not None and truth:
            g, p = seen
            self.p_gate = self.decay * self.p_gate + (1 - self.decay) * len(g & truth) / len(truth)
            if p:
                self.p_prev = self.decay * self.p_prev + (1 - self.decay) * len(p & truth) / len(
                    truth
                )
        t = layer + 1
        out: list[Prediction] = []
        if t < self._L:
            logits = x[-1:].float() @ self._gate._w[t].float().t()
            if self._gate._b[t] is not None:
                logits = logits + self._gate._b[t].float()
            prob = torch.softmax(logits, -1)[0]
            gate_set = set(torch.topk(prob, self._k).indices.tolist())
            prev_set = self._last.get(t, set())
            score = 1e-3 * prob
            for e in gate_set:
                score[e] += self.p_gate
            for e in prev_set:
                score[e] += self.p_prev
            self._pending[(step, t)] = (gate_set, prev_set)
            out.append((step, t, torch.topk(score, self._k).indices.tolist()))
        self._last[layer] = truth
        return out


class PreviousToken:
    """Temporal predictor: the next token uses the experts this token used at the same layer."""

    name = "prev"

    def bind(self, sites: list[ExpertSite]) -> None:
        """Nothing to keep."""

    def on_layer(
        self, step: int, layer: int, x: torch.Tensor, expert_ids: torch.Tensor
    ) -> list[Prediction]:
        last = expert_ids[-1]
        return [(step + 1, layer, [int(e) for e in last.tolist() if e >= 0])]


class Combined:
    """Several live predictors; their requests are issued in order (the first gets priority)."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.name = "+".join(p.name for p in parts)

    def bind(self, sites: list[ExpertSite]) -> None:
        """Bind every part."""
        for p in self.parts:
            p.bind(sites)

    def on_layer(
        self, step: int, layer: int, x: torch.Tensor, expert_ids: torch.Tensor
    ) -> list[Prediction]:
        out: list[Prediction] = []
        for p in self.parts:
            out += p.on_layer(step, layer, x, expert_ids)
        return out


class TracePredictorLive:
    """Run a fitted `moelab.predict` Predictor live through its `predict_step(StepContext)` API.

    Its horizon decides the target: layers_ahead=d -> (this token, layer + d), asked after layer
    `layer` routed (a wrapping router-input probe also asks, from the last d layers, for the
    next token's first d layers); tokens_ahead=t -> (token t steps later, same layer). The routing seen so far
    in this sequence (NO_EXPERT where not yet known) and the current token's router inputs are
    passed as the StepContext. With `min_score`, only experts scored at least that (a probe's
    sigmoid is a probability of use) are named: a longer-lead guess issued only where it is
    likely right, since a wrong one costs a read and an eviction.
    """

    def __init__(
        self, predictor: Any, top: int | None = None, min_score: float | None = None
    ) -> None:
        if min_score is not None and not 0.0 <= min_score <= 1.0:
            raise ConfigError(f"TracePredictorLive: min_score={min_score}, expected 0..1")
        self.predictor, self.top, self.min_score = predictor, top, min_score
        hz = predictor.horizon
        self.layers_ahead, self.tokens_ahead = int(hz.layers_ahead), int(hz.tokens_ahead)
        if self.layers_ahead == 0 and self.tokens_ahead == 0:
            raise ConfigError(
                "TracePredictorLive: the predictor's horizon must look ahead (d>=1 or t>=1)"
            )
        self.name = getattr(predictor, "label", type(predictor).__name__)
        if min_score is not None:
            self.name += f":min={min_score:g}"
        self.token_ids: list[int] = []
        self._rows: list[np.ndarray] = []
        self._hidden: np.ndarray | None = None
        self._L = self._k = 0
        # predictors that map the current router input alone (HiddenProbe on router_input) are
        # asked through live_logits_torch: the same ranking without the per-call StepContext
        self._direct = (
            self.layers_ahead > 0
            and hasattr(predictor, "live_logits_torch")
            and getattr(predictor, "point", None) == "router_input"
        )
        self._wrap = self._direct and bool(getattr(predictor, "wrap", False))
        # the direct path ranks logits: score >= P  <=>  logit >= log(P / (1 - P))
        self._min_logit = None
        if min_score is not None:
            from scipy.special import logit

            self._min_logit = float(logit(min_score))

    def bind(self, sites: list[ExpertSite]) -> None:
        """Remember the layer count and k; check they match the predictor."""
        self._L, self._k = len(sites), sites[0].top_k
        want = (self.predictor.num_layers, self.predictor.num_experts, self.predictor.top_k)
        have = (len(sites), sites[0].num_experts, sites[0].top_k)
        if want != have:
            raise OffloadError(
                f"predictor {self.name} was fitted for (L, E, k)={want}, the model has {have}"
            )

    def set_tokens(self, token_ids: list[int]) -> None:
        """Token ids of the sequence so far (prompt + generated); the wrapper calls it per step."""
        if len(token_ids) < len(self.token_ids):
            self._rows = []
        self.token_ids = list(token_ids)

    def on_layer(
        self, step: int, layer: int, x: torch.Tensor, expert_ids: torch.Tensor
    ) -> list[Prediction]:
        from moelab.predict.base import StepContext

        if self.layers_ahead:
            t_layer, t_step = layer + self.layers_ahead, step
        else:
            t_layer, t_step = layer, step + self.tokens_ahead
        if self._direct:  # a router-input probe: its map on the current input, no StepContext
            if t_layer >= self._L:
                if not self._wrap:
                    return []
                t_layer, t_step = t_layer - self._L, step + 1  # the next token's first layers
            z = self.predictor.live_logits_torch(t_layer, x[-1:] if x.shape[0] > 1 else x)
            v, i = torch.topk(z[0], min(self.top or self._k, z.shape[-1]))
            vals, top = v.tolist(), i.tolist()
            if not all(map(math.isfinite, vals)):
                return []
            if self._min_logit is not None:
                top = [e for e, s in zip(top, vals, strict=True) if s >= self._min_logit]
                if not top:
                    return []
            return [(t_step, t_layer, top)]
        T, n = int(expert_ids.shape[0]), len(self.token_ids)
        while len(self._rows) < n:
            self._rows.append(np.full((self._L, self._k), -1, dtype=np.int16))
        ids = expert_ids.detach().cpu().numpy().astype(np.int16)
        for i in range(T):
            self._rows[n - T + i][layer] = ids[i]
        if self._hidden is None or self._hidden.shape[1] != x.shape[-1]:
            self._hidden = np.zeros((self._L, x.shape[-1]), dtype=np.float32)
        self._hidden[layer] = x[-1].detach().float().cpu().numpy()
        if t_layer >= self._L:
            return []
        ctx = StepContext(
            token_ids=np.asarray(self.token_ids, dtype=np.int64),
            experts=np.stack(self._rows[:n]),
            layer=t_layer,
            hidden={"router_input": self._hidden.copy()},
        )
        scores = self.predictor.predict_step(ctx)
        scores = np.asarray(scores, dtype=np.float32)
        if not np.isfinite(scores).all():
            return []
        m = self.top or self._k
        top = np.argsort(-scores, kind="stable")[:m]
        if self.min_score is not None:
            top = top[scores[top] >= self.min_score]
            if not len(top):
                return []
        return [(t_step, t_layer, [int(e) for e in top])]


LIVE_PREDICTORS = ("none", "gate", "gate2", "prev", "adaptive", "gate+prev", "gate2+prev")


def make_live_predictor(spec: str) -> Any:
    """'none' | 'gate' (d=1) | 'gate2' (d=1 and 2) | 'prev' | 'adaptive' | combinations with '+'
    | a saved moelab.predict predictor directory (`DIR:min=P`: only experts it scores >= P) ->
    live predictor (None for 'none')."""
    from pathlib import Path

    spec = spec.strip()
    if spec == "none":
        return None
    parts = spec.split("+")
    out = []
    for p in parts:
        if p == "gate":
            out.append(GateLookahead((1,)))
        elif p == "gate2":
            out.append(GateLookahead((1, 2)))
        elif p == "prev":
            out.append(PreviousToken())
        elif p == "adaptive":
            out.append(AdaptiveLookahead())
        elif oracle_lead(p) is not None:
            raise ConfigError(
                f"prefetch predictor {p!r} needs the routing of the tokens decoded, known "
                "beforehand: `moelab offload run --predictor oracle` records it first (teacher-"
                "forced windows), run_live(..., routing=) takes it; open generation cannot"
            )
        elif Path(p.partition(":min=")[0]).is_dir():
            from moelab.predict.base import Predictor

            path, _, level = p.partition(":min=")
            try:
                min_score = float(level) if level else None
            except ValueError:
                raise ConfigError(
                    f"prefetch predictor {p!r}: DIR:min=P needs a probability P in 0..1"
                ) from None
            out.append(TracePredictorLive(Predictor.load(path), min_score=min_score))
        else:
            raise ConfigError(
                f"prefetch predictor {p!r}: expected one of {LIVE_PREDICTORS} or a saved predictor "
                "directory (moelab predict ... --save DIR)"
            )
    return out[0] if len(out) == 1 else Combined(out)
