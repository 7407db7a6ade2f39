"""Live offloaded generation: a model whose routed experts come from an ExpertCache fed by an
ExpertStore (slow tier) and a Prefetcher, with prefill and decode measured separately.

moelab models: each MoEBlock's `experts` (ExpertBank) is replaced by `OffloadedExperts`, which has
`num_experts` and `forward_one(e, rows)` (the dispatch hook of docs/CONTRACTS.md) and runs the
ExpertBank's own `apply_params` on the fetched weights, so outputs are bit-identical.
transformers v5 Mixtral-family models (Mixtral, Qwen2/3-MoE, OLMoE: experts module with stacked
`gate_up_proj`/`down_proj` and `forward(hidden, top_k_index, top_k_weights)`) get
`HFOffloadedExperts`, which runs the same eager per-expert loop on fetched weights (sites are
found directly on the module tree, see offload/sites.py, not through the trace adapters).
At each MoE layer the router's forward hook knows the needed experts: it snapshots which are
already resident (timely hits), fetches the rest (stall), then lets the predictor queue
prefetches for later layers / the next token (Eliseev & Mazur 2023, arXiv:2312.17238).

Quantised stores (int8 / int4, moelab.offload.quant) serve QuantWeights that the stand-ins run with
the weight-only kernels. With `standin=` every expert also stays resident at low precision and a
miss is computed with that copy at once while the full-precision expert is fetched in the
background for later tokens (HOBBIT, Tang et al. 2024, arXiv:2411.01433); outputs then differ
from all-resident, which `moelab offload run` measures as a perplexity change.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from moelab.errors import OffloadError
from moelab.layers.experts import ExpertBank
from moelab.offload.cache import ExpertCache
from moelab.offload.prefetch import PREFETCH_CHUNK_BYTES, Prefetcher
from moelab.offload.quant import apply_quantized, is_quantized, qmm
from moelab.offload.sites import ExpertSite, require_sites
from moelab.offload.store import ExpertStore


@dataclass
class PhaseStats:
    """Counters of one phase (prefill or decode)."""

    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    stall_seconds: float = 0.0
    predictor_seconds: float = 0.0
    bytes_loaded: int = 0
    needed: int = 0  # (token step, layer, expert) experts needed
    timely: int = 0  # of which resident when the layer started
    late: int = 0  # waited for an in-flight prefetch
    misses: int = 0  # loaded on demand
    standin: int = 0  # computed with the resident low-precision copy (fetch queued)

    def to_dict(self) -> dict[str, float]:
        """Counters plus derived rates."""
        d: dict[str, float] = asdict(self)
        t = max(self.tokens, 1)
        d["tokens_per_s"] = self.tokens / self.seconds if self.seconds > 0 else float("nan")
        d["stall_ms_per_token"] = 1e3 * self.stall_seconds / t
        d["bytes_per_token"] = self.bytes_loaded / t
        d["timely_hit_rate"] = self.timely / self.needed if self.needed else float("nan")
        d["hit_rate"] = (self.timely + self.late) / self.needed if self.needed else float("nan")
        d["standin_rate"] = self.standin / self.needed if self.needed else float("nan")
        return d


class OffloadedExperts(nn.Module):
    """Stand-in for a moelab ExpertBank whose weights live in the cache/store."""

    apply_params = ExpertBank.apply_params  # the bank's own math: bit-identical outputs
    activate = ExpertBank.activate

    def __init__(self, owner: OffloadedModel, layer: int, bank: ExpertBank) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ff, self.act = (
            bank.num_experts,
            bank.d_model,
            bank.d_ff,
            bank.act,
        )
        self.n_in = int(bank.gate_up_proj.shape[1])
        self._owner, self.layer = [owner], layer  # list: not a registered submodule

    def forward_one(
        self,
        e: int,
        x: torch.Tensor,
        out: torch.Tensor | None = None,
        workspace: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run expert e on x [n, D] with weights fetched for this layer."""
        w = self._owner[0].weights(self.layer, e)
        if is_quantized(w):
            return apply_quantized(self.activate, w, x, out=out)
        return self.apply_params(w, x, out=out, workspace=workspace)

    def expert_nbytes(self) -> int:
        """Bytes of one expert (from the store)."""
        return self._owner[0].store.expert_nbytes(self.layer)


class HFOffloadedExperts(nn.Module):
    """Stand-in for a transformers v5 experts module (eager loop of MixtralExperts.forward)."""

    def __init__(self, owner: OffloadedModel, layer: int, experts: nn.Module) -> None:
        super().__init__()
        self.num_experts = int(experts.gate_up_proj.shape[0])
        self.act_fn = experts.act_fn
        self.has_gate = experts.gate_up_proj.shape[1] == 2 * experts.down_proj.shape[2]
        self._owner, self.layer = [owner], layer

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
            mask = mask.permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for idx in hit:
            e = int(idx[0])
            if e == self.num_experts:
                continue
            w = self._owner[0].weights(self.layer, e)
            top_k_pos, token_idx = torch.where(mask[e])
            cur = hidden_states[token_idx]
            lin = qmm if is_quantized(w) else nn.functional.linear
            if self.has_gate:
                gate, up = lin(cur, w["gate_up_proj"]).chunk(2, dim=-1)
                h = self.act_fn(gate) * up
            else:
                h = self.act_fn(lin(cur, w["gate_up_proj"]))
            h = lin(h, w["down_proj"])
            h = h * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, h.to(final.dtype))
        return final


class OffloadedModel:
    """Wrap a model in place so its routed experts come from `cache`/`store` via `prefetcher`.

    keep=False gives the on-demand baseline with no cache (experts dropped after each layer).
    standin: a low-precision store (or {(layer, e): weights}) whose copy of every expert stays
    resident and serves a miss while the full-precision expert is fetched for later tokens.
    """

    def __init__(
        self,
        model: nn.Module,
        store: ExpertStore,
        cache: ExpertCache,
        prefetcher: Prefetcher | None = None,
        keep: bool = True,
        standin: ExpertStore | dict | None = None,
    ) -> None:
        self.model, self.store, self.cache, self.keep = model, store, cache, keep
        self.sites: list[ExpertSite] = require_sites(model)
        store.check_model(self.sites)
        E, L = max(s.num_experts for s in self.sites), len(self.sites)
        if cache.num_layers != L or cache.num_experts != E:
            raise OffloadError(
                f"ExpertCache built for {cache.num_layers} layers x {cache.num_experts} experts, model "
                f"has {L} x {E}"
            )
        k = max(s.top_k for s in self.sites)
        if cache.slots < k:
            raise OffloadError(
                f"ExpertCache holds {cache.slots} experts per group, fewer than top_k={k} needed by one layer"
            )
        self.prefetcher = prefetcher or Prefetcher(store, cache, None)
        self._own_prefetcher = prefetcher is None
        if self.prefetcher.cache is not cache or self.prefetcher.store is not store:
            raise OffloadError("Prefetcher must use the same store and cache as the OffloadedModel")
        if self.prefetcher.predictor is not None:
            self.prefetcher.predictor.bind(self.sites)
        for key in sorted(cache.pinned):
            cache.preload(key, store.read(*key))
        self.standin: dict | None = None
        self.standin_nbytes = 0  # bytes the resident low-precision copies take
        if isinstance(standin, ExpertStore):
            standin.check_model(self.sites)
            self.standin = {
                (s.layer, e): standin.read(s.layer, e)
                for s in self.sites
                for e in range(s.num_experts)
            }
            self.standin_nbytes = sum(
                standin.expert_nbytes(s.layer) * s.num_experts for s in self.sites
            )
        elif standin is not None:
            self.standin = dict(standin)
        self._current: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        self._handles = []
        self._step = -1
        self._phase = "prefill"
        self._t_step = 0.0
        self._bytes_step = 0
        self._tokens: list[int] = []
        self._rows: list[np.ndarray] = []
        self._step_ids: np.ndarray | None = None
        self.phases = {"prefill": PhaseStats(), "decode": PhaseStats()}
        for s in self.sites:
            if s.kind == "moelab":
                setattr(s.parent, s.attr, OffloadedExperts(self, s.layer, s.experts))
            else:
                setattr(s.parent, s.attr, HFOffloadedExperts(self, s.layer, s.experts))
            s.experts = getattr(s.parent, s.attr)
            self._handles.append(s.router.register_forward_hook(self._router_hook(s)))
            self._handles.append(s.parent.register_forward_hook(self._block_end_hook(s)))
        self._handles.append(model.register_forward_pre_hook(self._step_start, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._step_end))
        self.site_top_k = k

    # ------------------------------------------------------------------ hooks
    def _step_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        S = int(ids.shape[-1]) if ids is not None else 1
        T = int(ids.numel()) if ids is not None else 1
        self._step += 1
        self._phase = "prefill" if (self._step == 0 or S > 1) else "decode"
        if ids is not None:
            self._tokens += ids.reshape(-1).tolist() if ids.shape[0] == 1 else ids[0].tolist()
        pred = self.prefetcher.predictor
        if pred is not None and hasattr(pred, "set_tokens"):
            pred.set_tokens(self._tokens)
        self.prefetcher.begin_step(self._step)
        self._step_ids = np.full((T, len(self.sites), self.site_top_k), -1, dtype=np.int16)
        self._bytes_step = self.cache.counters.bytes_loaded
        self._t_step = time.perf_counter()

    def _step_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        ph = self.phases[self._phase]
        ph.seconds += time.perf_counter() - self._t_step
        ph.steps += 1
        ph.tokens += 0 if self._step_ids is None else self._step_ids.shape[0]
        ph.bytes_loaded += self.cache.counters.bytes_loaded - self._bytes_step
        if self._step_ids is not None:
            self._rows.append(self._step_ids)

    def _router_hook(self, site: ExpertSite):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0] if args else None
            if isinstance(output, tuple):  # HF: (logits, weights, indices)
                ids, dropped = output[-1], None
            else:  # moelab RoutingResult
                ids, dropped = output.expert_ids, output.dropped
            self._layer_start(site, x.reshape(-1, x.shape[-1]), ids, dropped)

        return hook

    def _block_end_hook(self, site: ExpertSite):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            cur = self._current.pop(site.layer, {})
            self.cache.unlock()
            if not self.keep:
                for e in cur:
                    self.cache.remove((site.layer, e))

        return hook

    def _layer_start(
        self, site: ExpertSite, x: torch.Tensor, ids: torch.Tensor, dropped: torch.Tensor | None
    ) -> None:
        layer = site.layer
        sel = ids if dropped is None else ids[~dropped]
        needed = sorted({int(e) for e in sel.reshape(-1).tolist() if e >= 0})
        ph = self.phases[self._phase]
        pf = self.prefetcher
        keys = [(layer, e) for e in needed]
        pf.cancel_stale(self._step, layer, keys)
        self.cache.lock(keys)
        at_start = {k: k in self.cache for k in keys}
        ph.needed += len(keys)
        cur: dict[int, dict[str, torch.Tensor]] = {}
        for key in keys:
            if self.standin is not None and key not in self.cache and not pf.in_flight(key):
                # low-precision copy now; the full-precision expert comes for the next tokens
                self.cache.access(key)
                cur[key[1]] = self.standin[key]
                ph.standin += 1
                pf.request(layer, [key[1]], target_step=self._step + 1)
                continue
            value, kind, dt = pf.fetch(key)
            cur[key[1]] = value
            ph.stall_seconds += dt
            if kind == "miss":
                ph.misses += 1
            elif kind == "resident" and at_start[key]:
                ph.timely += 1
            else:  # waited for, or arrived after the layer started
                ph.late += 1
        self._current[layer] = cur
        if self._step_ids is not None:
            k = min(ids.shape[1], self._step_ids.shape[2])
            self._step_ids[: ids.shape[0], layer, :k] = ids[:, :k].detach().cpu().numpy()
        if pf.predictor is not None:
            t0 = time.perf_counter()
            pf.on_layer(self._step, layer, x.detach(), ids.detach())
            ph.predictor_seconds += time.perf_counter() - t0

    def weights(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        """Weights of expert e at `layer` for the computation in progress (fetched if needed)."""
        cur = self._current.setdefault(layer, {})
        if e not in cur:
            value, _, dt = self.prefetcher.fetch((layer, e))
            cur[e] = value
            self.phases[self._phase].stall_seconds += dt
        return cur[e]

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Greedy generation through the wrapped model (moelab or transformers generate)."""
        self.new_sequence()
        if hasattr(self.model, "cfg") and hasattr(self.model, "blocks"):
            return self.model.generate(input_ids, max_new_tokens, greedy=True, **kwargs)
        out = self.model.generate(
            input_ids,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            **kwargs,
        )
        return out

    def new_sequence(self) -> None:
        """The next forward call starts a new sequence (its prefill); call before custom loops."""
        self._step = -1
        self._tokens = []

    def reset_stats(self) -> None:
        """Zero phase statistics, cache counters, store counters and the recorded routing."""
        self.phases = {"prefill": PhaseStats(), "decode": PhaseStats()}
        self.cache.counters = type(self.cache.counters)()
        self.store.reset_stats()
        self._rows = []

    def stats(self) -> dict[str, Any]:
        """Prefill and decode statistics, cache counters, prefetcher counters, store tier/bandwidth."""
        self.cache.finish()
        return {
            "prefill": self.phases["prefill"].to_dict(),
            "decode": self.phases["decode"].to_dict(),
            "cache": self.cache.summary(),
            "prefetch": self.prefetcher.stats.to_dict(),
            "store": self.store.stats(),
            "predictor": getattr(self.prefetcher.predictor, "name", "none"),
        }

    def recorded_expert_ids(self) -> np.ndarray:
        """Routing seen so far as [rows, L, k] (rows = tokens fed to the model, in order)."""
        if not self._rows:
            return np.zeros((0, len(self.sites), self.site_top_k), dtype=np.int16)
        return np.concatenate(self._rows, 0)

    def close(self) -> None:
        """Stop an owned prefetch thread and remove hooks (the model stays offloaded)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._own_prefetcher:
            self.prefetcher.close()

    def __enter__(self) -> OffloadedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def greedy(model: nn.Module, x: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy generation for a moelab model or a transformers model."""
    with torch.no_grad():
        if hasattr(model, "cfg") and hasattr(model, "blocks"):
            return model.generate(x, max_new_tokens, greedy=True)
        return model.generate(
            x, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False
        )


def measure_layer_compute(
    model: nn.Module, x: torch.Tensor, max_new_tokens: int = 16
) -> tuple[float, float]:
    """All-resident decode seconds per MoE layer per token (all per-token work attributed to the
    MoE layers) and 0 overhead, from timing generate(n) against generate(1)."""
    L = len(require_sites(model))
    greedy(model, x, 2)  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        greedy(model, x, 1)
        t1 = time.perf_counter()
        greedy(model, x, max_new_tokens + 1)
        t2 = time.perf_counter()
        times.append(((t2 - t1) - (t1 - t0)) / max_new_tokens)
    per_token = float(np.median(times))
    return per_token / L, 0.0


def generate_offloaded(
    load_model: Any,
    x: torch.Tensor,
    max_new_tokens: int,
    resident: str | int = "25%",
    policy: str = "lru",
    prefetch: str = "gate",
    store_dir: Any = None,
    tier: str = "auto",
    bandwidth: float | None = None,
    latency: float = 0.0,
    budget: int | None = None,
    compare: bool = True,
    repeats: int = 1,
    prefetch_chunk: int | None = None,
    loader: str = "auto",
) -> dict[str, Any]:
    """Load a model (callable), offload its experts, generate greedily and report; with
    `compare` also run the all-resident model and check token-for-token equality.

    With repeats > 1 the all-resident and the offloaded run (a fresh cold cache each time) alternate
    `repeats` times; times are medians and `speed_vs_all_resident_repeats` keeps each repeat's
    ratio (see moelab.timing.RatioSummary). Counters (hits, bytes, stalls) are the first repeat's.
    prefetch_chunk: bytes per piece of a prefetch read (None: PREFETCH_CHUNK_BYTES; 0: whole).
    loader: who reads prefetches (prefetch.LOADERS: a thread, or a helper process on file tiers).
    """
    from pathlib import Path

    from moelab.offload.cache import parse_capacity
    from moelab.offload.prefetch import make_live_predictor

    if repeats < 1:
        raise OffloadError(f"generate_offloaded: repeats={repeats} must be >= 1")
    model = load_model()
    sites = require_sites(model)
    store_dir = Path(store_dir)
    if not (store_dir / "manifest.json").exists():
        ExpertStore.write(model, store_dir)
    report: dict[str, Any] = {}
    ref = None
    if compare:
        ref = load_model()
        greedy(ref, x[:, :4], 1)  # warm-up
    L, E, k = len(sites), max(s.num_experts for s in sites), max(s.top_k for s in sites)
    ref_times, off_times, identical = [], [], []
    for rep in range(repeats):
        if ref is not None:
            t0 = time.perf_counter()
            ref_out = greedy(ref, x, max_new_tokens)
            ref_times.append(time.perf_counter() - t0)
        if rep > 0:
            model = load_model()  # a fresh model whose experts are offloaded anew
        st = ExpertStore(store_dir, tier=tier, bandwidth=bandwidth, latency=latency)
        cache = ExpertCache(
            parse_capacity(resident, L, E, top_k=k), policy, num_layers=L, num_experts=E,
            expert_bytes=[st.expert_nbytes(i) for i in range(L)], top_k=k,
        )  # fmt: skip
        pf = Prefetcher(
            st, cache, make_live_predictor(prefetch), budget=budget,
            chunk_bytes=PREFETCH_CHUNK_BYTES if prefetch_chunk is None else prefetch_chunk,
            loader=loader,
        )  # fmt: skip
        om = OffloadedModel(model, st, cache, pf)
        try:
            t0 = time.perf_counter()
            out = om.generate(x, max_new_tokens)
            off_times.append(time.perf_counter() - t0)
            if rep == 0:
                report.update(om.stats())
                report["loader"] = pf.loader
        finally:
            om.close()
            pf.close()
            st.close()
        if ref is not None:
            identical.append(bool(torch.equal(out, ref_out)))
    report["repeats"] = repeats
    report["offloaded_seconds"] = float(np.median(off_times))
    if ref is not None:
        report["all_resident_seconds"] = float(np.median(ref_times))
        report["identical_to_all_resident"] = all(identical)
        ratios = [a / b for a, b in zip(ref_times, off_times, strict=True)]
        report["speed_vs_all_resident"] = float(np.median(ratios))
        report["speed_vs_all_resident_repeats"] = ratios
    report["output_ids"] = out[0].tolist()
    return report
