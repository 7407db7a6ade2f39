"""How much a background expert load slows the decode that it should hide behind (issue 17).

The main thread decodes held-out tokens teacher-forced with every expert resident (no load is
needed), while experts are loaded meanwhile by one of these paths (the same O_DIRECT file, its own
store and cache, nothing shared with the decode); the first three from a background thread at a
fixed cadence, one per `--period` ms:
  idle            - no background thread (the reference);
  raw preadv      - os.preadv of one expert's bytes into one reused buffer (the I/O alone);
  store.read      - ExpertStore.read (pooled buffer, tensor views: what a load returns);
  prefetcher      - Prefetcher.request + its worker (queue, read, cache insert): the live path
                    (requests in batches of 8, so that the requesting thread rarely wakes);
  per layer, thread / process loader - the decoding thread itself requests one load per MoE
                    layer (the live oracle's cadence; --period does not apply), read by the
                    Prefetcher's thread or by its helper process (moelab.offload.procreader):
                    measure.LayerCadenceLoads, what the planner's `measure_background` runs.
Interleaved repeats, medians of ms/token, the ratio to idle measured in the same repeat, and the
decode time lost per load done meanwhile; a live prefetch pays only if the decode slows by less
than the stall it hides.

Usage: .venv/bin/python bench/bench_load_interference.py --model runs/smol-testbed/smollm2-moe/moefy/model
         --trace runs/smol-testbed/smollm2-moe/trace/test [--period 2.5] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from moelab.offload.cache import ExpertCache
from moelab.offload.live import OffloadedModel
from moelab.offload.measure import LayerCadenceLoads, _all_resident, teacher_forced
from moelab.offload.plan import model_shape
from moelab.offload.plan_commands import Context, use_threads
from moelab.offload.prefetch import Prefetcher
from moelab.offload.store import ALIGN, ExpertStore, layer_file


def _raw_preadv(store_dir: Path, period: float, stop: threading.Event, n: list[int]) -> None:
    with ExpertStore(store_dir, tier="direct") as st:
        nbytes = -(-st.expert_nbytes(0) // ALIGN) * ALIGN
        fds = [os.open(store_dir / layer_file(i), os.O_RDONLY | os.O_DIRECT)
               for i in range(st.num_layers)]  # fmt: skip
    buf = mmap.mmap(-1, nbytes)  # page-aligned, as O_DIRECT needs
    i = 0
    try:
        while not stop.is_set():
            os.preadv(fds[i % len(fds)], [memoryview(buf)], 0)
            i += 1
            n[0] += 1
            time.sleep(period)
    finally:
        for fd in fds:
            os.close(fd)


def _store_read(store_dir: Path, period: float, stop: threading.Event, n: list[int]) -> None:
    with ExpertStore(store_dir, tier="direct") as st:
        E, i = st.num_experts[0], 0
        while not stop.is_set():
            v = st.read(i % st.num_layers, (3 * i) % E)
            del v
            i += 1
            n[0] += 1
            time.sleep(period)


def _prefetcher(store_dir: Path, period: float, stop: threading.Event, n: list[int]) -> None:
    """Requests come in batches of BATCH every BATCH periods, so the requesting thread wakes
    rarely (in a live run the decode thread itself requests, between layers)."""
    with ExpertStore(store_dir, tier="direct") as st:
        L, E = st.num_layers, st.num_experts[0]
        cache = ExpertCache(2, "lru", num_layers=L, num_experts=E,
                            expert_bytes=st.expert_nbytes(0), top_k=2)  # fmt: skip
        with Prefetcher(st, cache, None, loader="thread") as pf:
            i = 0
            while not stop.is_set():
                for _ in range(BATCH):  # each layer cycles through its experts: all loads
                    pf.request(i % L, [(i // L + 1) % E], target_step=1 << 30)
                    i += 1
                time.sleep(BATCH * period)
                n[0] = pf.stats.loaded


BATCH = 8


MODES: dict[str, Callable[[Path, float, threading.Event, list[int]], None] | str | None] = {
    "idle": None,
    "raw preadv": _raw_preadv,
    "store.read": _store_read,
    "prefetcher": _prefetcher,
    "per layer, thread loader": "thread",
    "per layer, process loader": "process",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="testbed or model folder")
    ap.add_argument("--trace", type=Path, default=None, help="held-out routing (non-testbed model)")
    ap.add_argument("--period", type=float, default=2.5, help="ms between background loads")
    ap.add_argument("--tokens", type=int, default=48, help="decode tokens per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch compute threads of the decode")
    args = ap.parse_args()
    use_threads(args.threads)
    ctx = Context(args.model, args.trace)
    store_dir = ctx.stores(["full"])["full"]
    _, ev = ctx.workload.split()
    w = np.asarray(ev.tokens[0][: args.tokens])
    m = ctx.load()
    st = ExpertStore(store_dir, tier="ram")
    cache = _all_resident(st, model_shape(m))
    pf = Prefetcher(st, cache, None)
    om = OffloadedModel(m, st, cache, pf)
    teacher_forced(m, w[:8], om)  # warm-up
    ms: dict[str, list[float]] = {k: [] for k in MODES}
    ratio: dict[str, list[float]] = {k: [] for k in MODES}
    per_load: dict[str, list[float]] = {k: [] for k in MODES}
    loads: dict[str, list[int]] = {k: [] for k in MODES}
    for _ in range(args.repeats):
        for name, fn in MODES.items():
            stop, n = threading.Event(), [0]
            th, per_layer = None, None
            if isinstance(fn, str):
                per_layer = LayerCadenceLoads(m, store_dir, "direct", fn)
            elif fn is not None:
                th = threading.Thread(target=fn, args=(store_dir, args.period / 1e3, stop, n))
                th.start()
                time.sleep(0.2)  # the loader runs before the decode starts
            n0 = n[0]
            t0 = time.perf_counter()
            teacher_forced(m, w, om)
            ms[name].append(1e3 * (time.perf_counter() - t0) / len(w))
            if per_layer is not None:
                n[0] = per_layer.close()
            loads[name].append(n[0] - n0)
            stop.set()
            if th is not None:
                th.join()
        for name in MODES:
            ratio[name].append(ms[name][-1] / ms["idle"][-1])
            if name != "idle":  # decode microseconds lost per load done meanwhile
                lost = 1e3 * (ms[name][-1] - ms["idle"][-1]) * len(w)
                per_load[name].append(lost / max(loads[name][-1], 1))
    om.close(), pf.close(), st.close()
    print(f"\n{ctx.shape.num_layers} MoE layers, {len(w)} decode tokens, {torch.get_num_threads()} "
          f"compute thread(s), one background load every {args.period} ms, "
          f"{args.repeats} interleaved repeats\n")  # fmt: skip
    print(
        "| background | decode ms/token | x idle (median, min-max) | loads per token | decode us lost per load |"
    )
    print("|---|---|---|---|---|")
    for name in MODES:
        r = ratio[name]
        lost = f"{statistics.median(per_load[name]):.0f}" if per_load[name] else "-"
        print(f"| {name} | {statistics.median(ms[name]):.2f} | {statistics.median(r):.3f} "
              f"({min(r):.3f}-{max(r):.3f}) | {statistics.median(loads[name]) / len(w):.1f} | "
              f"{lost} |")  # fmt: skip


if __name__ == "__main__":
    main()
