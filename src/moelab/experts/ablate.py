"""Expert ablation: remove one expert at a time and measure the held-out loss change per domain.

Two named ways to remove expert e of layer l, both through forward hooks on the router (no
weight edits, the model is unchanged after the context exits):

- ``reroute``: mask e's router logit (-1e9 / -inf before the softmax), so its tokens go to the
  remaining experts with renormalised weights -- what a model pruned of e computes (expert
  pruning as in Lu et al. 2024, "Not All Experts are Equal", whose importance is this loss change);
- ``zero``: keep the routing and drop e's contribution (its combine weight set to 0, the others
  not renormalised) -- the "expert knock-out" used to find critical experts (e.g. the Mixtral
  expert whose removal breaks the model, in "A Closer Look into MoE in LLMs", Lo et al. 2024).

Works on moelab MoETransformers (routers with a linear `gate`: topk, noisy_topk, switch, gshard,
expert_choice, sinkhorn; zero mode for every router) and on transformers MoE models through the
tracing adapters' router sites: zero mode for every (logits, weights, ids) router, reroute for
the softmax top-k routers of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (recomputed exactly as
their `*TopKRouter.forward` does, with the masked logit).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from moelab._io import atomic_write_json
from moelab.errors import ConfigError, ModelError
from moelab.experts.heldout import (
    DomainLoss,
    EvalSample,
    block_inputs,
    domain_loss,
    ratio_and_se,
    sequence_sums,
)

__all__ = [
    "MODES",
    "HF_REROUTE_FAMILIES",
    "AblationResult",
    "moe_sites",
    "ablated",
    "ablation_importance",
    "batched_path_reason",
]

MODES = ("reroute", "zero")
MASK_LOGIT = -1e9  # finite (moelab routers refuse inf logits); softmax gives exactly 0
HF_REROUTE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
_MOELAB_REROUTE = ("topk", "noisy_topk", "switch", "gshard", "expert_choice", "sinkhorn")


def moe_sites(model: nn.Module) -> tuple[list[Any], int, list[int]]:
    """(router sites of the tracing adapter, experts per layer, transformer layer of each site)."""
    from moelab.trace.adapters import get_adapter

    ad = get_adapter(model)
    return ad.sites, int(ad.num_experts), ad.layer_indices()


def _is_moelab(model: nn.Module) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "cfg")


class _BufferPatch:
    """Sets entries of a buffer in place until remove() puts the old values back."""

    def __init__(self, buf: torch.Tensor, idx: torch.Tensor, value: float) -> None:
        self.buf, self.idx = buf, idx.to(buf.device)
        self.old = buf[self.idx].clone()
        with torch.no_grad():
            buf[self.idx] = value

    def remove(self) -> None:
        """Restore the patched entries."""
        with torch.no_grad():
            self.buf[self.idx] = self.old


def _moelab_hooks(model: nn.Module, targets: dict[int, list[int]], mode: str) -> list[Any]:
    sites, E, _ = moe_sites(model)
    handles: list[Any] = []
    for li, experts in targets.items():
        block = sites[li].module  # MoEBlock
        idx = torch.as_tensor(sorted(experts), dtype=torch.long)
        if mode == "reroute":
            router = block.router
            name = model.cfg.moe.router
            if name not in _MOELAB_REROUTE or not isinstance(
                getattr(router, "gate", None), nn.Linear
            ):
                raise ModelError(
                    f"ablate --mode reroute: moe.router={name!r} has no logit to mask (supported: "
                    f"{', '.join(_MOELAB_REROUTE)}); use --mode zero"
                )

            def gate_hook(_m, _a, out, idx=idx):
                out = out.clone()
                out[..., idx.to(out.device)] = MASK_LOGIT
                return out

            handles.append(router.gate.register_forward_hook(gate_hook))
            bias = (
                router.selection_bias_buffer() if hasattr(router, "selection_bias_buffer") else None
            )
            if bias is not None:  # selection is by probs + bias: keep e out of the top-k too
                handles.append(_BufferPatch(bias, idx, MASK_LOGIT))
        else:

            def router_hook(_m, _a, r, idx=idx):
                hit = torch.isin(r.expert_ids, idx.to(r.expert_ids.device))
                return dataclasses.replace(r, weights=r.weights.masked_fill(hit, 0))

            handles.append(block.router.register_forward_hook(router_hook))
    return handles


def _hf_hooks(
    model: nn.Module, targets: dict[int, list[int]], mode: str
) -> list[torch.utils.hooks.RemovableHandle]:
    sites, E, _ = moe_sites(model)
    family = str(getattr(model.config, "model_type", ""))
    if mode == "reroute" and family not in HF_REROUTE_FAMILIES:
        raise ModelError(
            f"ablate --mode reroute: {family!r} routers are not re-implemented here (supported: "
            f"{', '.join(HF_REROUTE_FAMILIES)}); use --mode zero"
        )
    handles = []
    for li, experts in targets.items():
        site = sites[li]
        idx = torch.as_tensor(sorted(experts), dtype=torch.long)

        def hook(mod, _a, out, idx=idx, site=site):
            if not isinstance(out, tuple) or len(out) < 3:
                raise ModelError(
                    f"{site.name}: router returned {type(out).__name__}, expected (logits, "
                    "weights, indices)"
                )
            logits, w, ids = out[0], out[1], out[2]
            i = idx.to(logits.device)
            if mode == "zero":
                if w.shape[-1] == logits.shape[-1] and ids.shape[-1] != logits.shape[-1]:
                    w = w.clone()
                    w[..., i] = 0
                else:
                    w = w.masked_fill(torch.isin(ids, i), 0)
                return (logits, w, ids, *out[3:])
            masked = logits.clone()
            masked[..., i] = float("-inf")
            probs = F.softmax(masked, dim=-1, dtype=torch.float)
            top_w, top_i = torch.topk(probs, ids.shape[-1], dim=-1)
            if getattr(mod, "norm_topk_prob", family == "mixtral"):
                top_w = top_w / top_w.sum(dim=-1, keepdim=True)
            return (masked, top_w.to(w.dtype), top_i.to(ids.dtype), *out[3:])

        # the generic tracing path's sites are the experts modules; the router beside them
        # returns (logits, weights, indices)
        router = getattr(site, "router", None) or site.module
        handles.append(router.register_forward_hook(hook))
    return handles


def _check_targets(model: nn.Module, targets: dict[int, list[int]], mode: str) -> None:
    """Refuse an unknown mode, out-of-range layers or experts, or a reroute leaving < top_k."""
    if mode not in MODES:
        raise ConfigError(f"ablate: mode={mode!r}; expected one of {MODES}")
    sites, E, _ = moe_sites(model)
    for li, experts in targets.items():
        if not 0 <= li < len(sites):
            raise ConfigError(f"ablate: MoE layer {li} out of range [0, {len(sites)})")
        bad = [e for e in experts if not 0 <= e < E]
        if bad:
            raise ConfigError(f"ablate: experts {bad} of MoE layer {li} out of range [0, {E})")
        k = _top_k(model)
        if mode == "reroute" and E - len(set(experts)) < k:
            raise ConfigError(
                f"ablate: removing {len(set(experts))} of {E} experts leaves fewer than top_k={k}"
            )


@contextmanager
def ablated(model: nn.Module, targets: dict[int, list[int]], mode: str) -> Iterator[nn.Module]:
    """Within the block, the experts `targets[moe_layer]` are removed in the named `mode`."""
    _check_targets(model, targets, mode)
    handles = (_moelab_hooks if _is_moelab(model) else _hf_hooks)(model, targets, mode)
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _top_k(model: nn.Module) -> int:
    from moelab.trace.adapters import get_adapter

    return int(get_adapter(model).top_k)


@dataclass
class AblationResult:
    """Loss change when each (MoE layer, expert) is removed, per mode and domain (held-out)."""

    split: str
    modes: list[str]
    layers: list[int]  # transformer layer index of each MoE layer
    num_experts: int
    domains: list[str]  # columns of delta/se: the domains, then "all"
    base: DomainLoss
    delta: dict[str, np.ndarray]  # mode -> [L, E, D+1] mean loss change (nats/token)
    se: dict[str, np.ndarray]  # mode -> [L, E, D+1] standard error over sequences
    tokens: int
    sequences: int
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def importance(self, mode: str, domain: str = "all") -> np.ndarray:
        """[L, E] loss increase for one mode and domain column."""
        return self.delta[mode][:, :, self.domains.index(domain)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "split": self.split,
            "modes": self.modes,
            "layers": self.layers,
            "num_experts": self.num_experts,
            "domains": self.domains,
            "base_loss": self.base.value,
            "base_loss_se": self.base.se,
            "tokens_per_domain": self.base.tokens,
            "delta": {m: v.tolist() for m, v in self.delta.items()},
            "se": {m: v.tolist() for m, v in self.se.items()},
            "tokens": self.tokens,
            "sequences": self.sequences,
            "seconds": self.seconds,
            **self.extra,
        }


# ------------------------------------------------------------------ batched (fast) path
_BATCHED_ROUTERS = ("topk", "noisy_topk")
BATCH_TOKENS = 16384  # tokens per stacked forward of the batched path (memory ~ this x vocab)


def batched_path_reason(model: nn.Module) -> str | None:
    """None if `ablation_importance` can run the batched path on this model, else why not.

    The batched path stacks copies of one layer's input, each with a different expert removed,
    along the batch; that is exact only where a token's routing depends on that token alone.
    """
    if not _is_moelab(model):
        return (
            "transformers models run the exact one-ablation-at-a-time path (the batched path "
            "drives moelab MoETransformer blocks directly)"
        )
    from moelab.layers.dispatch import LocalDispatcher
    from moelab.layers.routing import NoisyTopKRouter, TopKRouter

    mc = model.cfg.moe
    if mc.router not in _BATCHED_ROUTERS:
        return (
            f"moe.router={mc.router!r}: only per-token routers ({', '.join(_BATCHED_ROUTERS)}) "
            "route each stacked copy independently"
        )
    if mc.capacity_factor is not None or mc.expert_capacity is not None:
        return "expert capacity is set: a token's routing depends on the other tokens of the batch"
    for i in model.moe_layer_indices():
        ffn = model.blocks[i].ffn
        if type(ffn.router) not in (TopKRouter, NoisyTopKRouter) or not isinstance(
            getattr(ffn.router, "gate", None), nn.Linear
        ):
            return (
                f"block {i}: router {type(ffn.router).__name__} is not the library's top-k router"
            )
        if not isinstance(ffn.dispatcher, LocalDispatcher):
            return f"block {i}: dispatcher {type(ffn.dispatcher).__name__} is not the local one"
    return None


HEAD_ROWS = 512  # scored positions per LM-head matmul (the logits stay in cache)


def _head_sums(
    model: nn.Module, h: torch.Tensor, ids: torch.Tensor, dom: torch.Tensor, num_domains: int
) -> torch.Tensor:
    """Next-token loss sums [R, D] (float64) of final hidden states h [R, S, d] of input_ids
    [R, S]: the LM head runs on the scored positions only (target domain >= 0)."""
    x = model.norm(h)[:, :-1]
    rows, pos = (dom >= 0).nonzero(as_tuple=True)
    xs, tgt, d = x[rows, pos], ids[:, 1:][rows, pos], dom[rows, pos]
    nll = torch.cat(
        [
            F.cross_entropy(
                model.lm_head(xs[r : r + HEAD_ROWS]).float(), tgt[r : r + HEAD_ROWS],
                reduction="none",
            )
            for r in range(0, xs.shape[0], HEAD_ROWS)
        ]
        or [xs.new_zeros(0)]
    )  # fmt: skip
    s = torch.zeros(h.shape[0], num_domains, dtype=torch.float64, device=h.device)
    return s.index_put_((rows, d), nll.double(), accumulate=True)


def _base_pass(
    model: nn.Module, sample: EvalSample, blocks: list[int], batch_size: int, device: Any
) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[torch.Tensor, torch.Tensor]], dict]:
    """One plain forward of the sample: (loss sums [B, D], counts [B, D], per block of `blocks`
    the hidden states after its attention and its MoE input (both [B, S, d]), per block the
    experts [E] bool that some token gives a nonzero weight)."""
    from moelab.experts.heldout import _moelab_blocks

    D, B = len(sample.domains), sample.num_sequences
    E = model.cfg.moe.num_experts
    sums = np.zeros((B, D))
    states: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {b: [] for b in blocks}
    used = {b: torch.zeros(E, dtype=torch.bool) for b in blocks}
    handles = []
    for b in blocks:

        def route_hook(_m, _a, r, b=b):
            hit = r.expert_ids[r.weights != 0].reshape(-1)
            used[b] |= torch.bincount(hit, minlength=E).cpu() > 0

        def norm_hook(_m, a, out, b=b):
            states[b].append((a[0], out))

        handles.append(model.blocks[b].ffn.router.register_forward_hook(route_hook))
        handles.append(model.blocks[b].ffn_norm.register_forward_hook(norm_hook))
    try:
        for i in range(0, B, batch_size):
            ids = sample.input_ids[i : i + batch_size].to(device)
            h = _moelab_blocks(model, ids, model.embed_tokens(ids), 0, len(model.blocks))
            dom = sample.target_domain[i : i + batch_size].to(device)
            sums[i : i + ids.shape[0]] = _head_sums(model, h, ids, dom, D).cpu().numpy()
    finally:
        for hd in handles:
            hd.remove()
    dom = sample.target_domain
    counts = np.zeros((B, D))
    for j in range(D):
        counts[:, j] = (dom == j).sum(1).numpy()
    cat = {
        b: (torch.cat([a for a, _ in v]), torch.cat([x for _, x in v])) for b, v in states.items()
    }
    return sums, counts, cat, {b: u.numpy() for b, u in used.items()}


def _stacked_sums(
    model: nn.Module,
    block: int,
    h_mid: torch.Tensor,
    x_ffn: torch.Tensor,
    ids: torch.Tensor,
    dom: torch.Tensor,
    spec: list[tuple[str, int]],
    num_domains: int,
) -> torch.Tensor:
    """Loss sums [len(spec) + 1, c, D] of c sequences whose hidden states after the attention of
    `block` are h_mid [c, S, d] (MoE input x_ffn): copy 0 unchanged, copy j + 1 with expert
    spec[j][1] removed at `block` in mode spec[j][0] (the same masks as `ablated`), all copies
    in one forward from that MoE layer on (the steps of `Block.forward`)."""
    from moelab.experts.heldout import _moelab_blocks

    n, (c, S, _) = len(spec) + 1, h_mid.shape
    E = model.cfg.moe.num_experts
    dev = h_mid.device
    per_copy = {
        m: torch.tensor([-1] + [e if mm == m else -1 for mm, e in spec], device=dev) for m in MODES
    }
    ar = torch.arange(E, device=dev)
    masks = {m: ar[None, :] == v.repeat_interleave(c * S)[:, None] for m, v in per_copy.items()}
    blk = model.blocks[block]
    router = blk.ffn.router
    handles: list[Any] = []
    bias = router.selection_bias_buffer() if hasattr(router, "selection_bias_buffer") else None
    mr, mz = masks["reroute"], masks["zero"]
    try:
        if bool(mr.any()):

            def gate_hook(_m, _a, out):
                return out.masked_fill(mr, MASK_LOGIT)

            handles.append(router.gate.register_forward_hook(gate_hook))
            if bias is not None:  # per-token selection bias: e out of the top-k of its copy
                router._buffers["selection_bias"] = bias.expand(mr.shape).masked_fill(
                    mr, MASK_LOGIT
                )
        if bool(mz.any()):

            def router_hook(_m, _a, r):
                hit = mz.gather(1, r.expert_ids)
                return dataclasses.replace(r, weights=r.weights.masked_fill(hit, 0))

            handles.append(router.register_forward_hook(router_hook))
        idsn = ids.repeat(n, 1)
        y, _ = blk.ffn(x_ffn.repeat(n, 1, 1), token_ids=idsn, mask=None)
        h = _moelab_blocks(model, idsn, h_mid.repeat(n, 1, 1) + y, block + 1, len(model.blocks))
        return _head_sums(model, h, idsn, dom.repeat(n, 1), num_domains).view(n, c, num_domains)
    finally:
        for hd in handles:
            hd.remove()
        if bias is not None:
            router._buffers["selection_bias"] = bias


def _fingerprint(model: nn.Module, sample: EvalSample) -> str:
    from moelab.trace.adapters import get_adapter

    h = hashlib.sha256(get_adapter(model).fingerprint().encode())
    h.update(sample.input_ids.numpy().tobytes())
    h.update(sample.target_domain.numpy().tobytes())
    return h.hexdigest()[:16]


def ablation_importance(
    model: nn.Module,
    sample: EvalSample,
    modes: tuple[str, ...] | list[str] = MODES,
    layers: list[int] | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    cache: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
    batched: bool = True,
) -> AblationResult:
    """Held-out loss change of removing each expert alone, for every MoE layer (or `layers`,
    MoE-layer positions) and mode; `cache` (a JSON file) keeps finished entries for a resume.

    With `batched` (and `batched_path_reason(model)` None) one plain forward caches the hidden
    states entering every MoE layer, and all removals of one layer run together from that layer
    on, stacked along the batch next to an unchanged copy (the paired reference); otherwise each
    removal is its own forward under `ablated`. Both compute the same numbers (to float32
    rounding); `extra["path"]` says which ran and why.
    """
    for m in modes:
        if m not in MODES:
            raise ConfigError(f"ablate: mode={m!r}; expected one of {MODES}")
    sites, E, layer_idx = moe_sites(model)
    L = len(sites)
    layers = list(range(L)) if layers is None else list(layers)
    for li in layers:
        if not 0 <= li < L:
            raise ConfigError(f"ablate: --layers {li} out of range [0, {L}) MoE layers")
    model.eval()
    reason = batched_path_reason(model) if batched else "batched=False was asked for"
    if reason is None:
        for m in modes:  # the refusals of `ablated` (e.g. reroute leaving < top_k experts)
            for li in layers:
                _check_targets(model, {li: [0]}, m)
    fp = _fingerprint(model, sample)
    done: dict[str, list] = {}
    cpath = Path(cache) if cache is not None else None
    if cpath is not None and cpath.is_file():
        old = json.loads(cpath.read_text(encoding="utf-8"))
        if old.get("fingerprint") == fp:
            done = old.get("entries", {})
    t0 = time.perf_counter()
    D = len(sample.domains)
    todo = [(m, li, e) for m in modes for li in layers for e in range(E)]
    with Progress(
        TextColumn("ablating {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not show_progress,
    ) as prog:
        task = prog.add_task("experts", total=len(todo))
        if reason is None:
            with torch.inference_mode():
                base_s, counts = _batched_entries(
                    model, sample, modes, layers, layer_idx, batch_size, device, done,
                    lambda: cpath is not None and atomic_write_json(
                        cpath, {"fingerprint": fp, "entries": done}, indent=0
                    ),
                    lambda li, n: prog.update(
                        task, advance=n, description=f"layer {layer_idx[li]} ({n} removals)"
                    ),
                )  # fmt: skip
        else:
            base_s, counts = sequence_sums(model, sample, batch_size, device)
            cached: tuple[int, list[torch.Tensor]] | None = None
            for n, (m, li, e) in enumerate(todo):
                key = f"{m}/{li}/{e}"
                if key not in done:
                    kw: dict[str, Any] = {}
                    if _is_moelab(model):  # blocks before the ablated one run once per layer
                        if cached is None or cached[0] != li:
                            cached = (
                                li,
                                block_inputs(model, sample, layer_idx[li], batch_size, device),
                            )
                        kw = {"start_block": layer_idx[li], "states": cached[1]}
                    with ablated(model, {li: [e]}, m):
                        s, _ = sequence_sums(model, sample, batch_size, device, **kw)
                    done[key] = (s - base_s).tolist()
                    if cpath is not None and (n + 1 == len(todo) or todo[n + 1][1] != li):
                        atomic_write_json(cpath, {"fingerprint": fp, "entries": done}, indent=0)
                prog.update(task, advance=1, description=f"{m} layer {layer_idx[li]} expert {e}")
    delta = {m: np.full((L, E, D + 1), np.nan) for m in modes}
    se = {m: np.full((L, E, D + 1), np.nan) for m in modes}
    for m, li, e in todo:
        d_s = np.asarray(done[f"{m}/{li}/{e}"], dtype=np.float64)
        for j in range(D):
            delta[m][li, e, j], se[m][li, e, j] = ratio_and_se(d_s[:, j], counts[:, j])
        delta[m][li, e, D], se[m][li, e, D] = ratio_and_se(d_s.sum(1), counts.sum(1))
    base = domain_loss(base_s, counts, sample.domains)
    return AblationResult(
        split=sample.split,
        modes=list(modes),
        layers=layer_idx,
        num_experts=E,
        domains=[*sample.domains, "all"],
        base=base,
        delta=delta,
        se=se,
        tokens=sample.num_tokens,
        sequences=sample.num_sequences,
        seconds=time.perf_counter() - t0,
        extra={"path": "batched" if reason is None else f"one removal per forward: {reason}"},
    )


def _batched_entries(
    model: nn.Module,
    sample: EvalSample,
    modes: tuple[str, ...] | list[str],
    layers: list[int],
    layer_idx: list[int],
    batch_size: int,
    device: Any,
    done: dict[str, list],
    save: Any,
    advance: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Fill `done` (key "mode/layer/expert" -> per-sequence loss change [B, D]) for every
    removal not in it by the batched path; return the base (loss sums, counts)."""
    E, B, D = model.cfg.moe.num_experts, sample.num_sequences, len(sample.domains)
    S = sample.input_ids.shape[1]
    blocks = sorted({layer_idx[li] for li in layers})
    base_s, counts, states, used = _base_pass(model, sample, blocks, batch_size, device)
    ids, dom = sample.input_ids.to(device), sample.target_domain.to(device)
    for li in layers:
        b = layer_idx[li]
        spec: list[tuple[str, int]] = []
        for m in modes:
            for e in range(E):
                key = f"{m}/{li}/{e}"
                if key in done:
                    continue
                if m == "zero" and not used[b][e]:
                    # no token gives e a nonzero weight here: zeroing it changes nothing
                    done[key] = np.zeros((B, D)).tolist()
                else:
                    spec.append((m, e))
        if spec:
            d = np.zeros((len(spec), B, D))
            c = max(1, BATCH_TOKENS // ((len(spec) + 1) * S))
            for r0 in range(0, B, c):
                sl = slice(r0, r0 + c)
                h_mid, x_ffn = states[b][0][sl], states[b][1][sl]
                sums = _stacked_sums(model, b, h_mid, x_ffn, ids[sl], dom[sl], spec, D)
                d[:, sl] = (sums[1:] - sums[:1]).cpu().numpy()
            for j, (m, e) in enumerate(spec):
                done[f"{m}/{li}/{e}"] = d[j].tolist()
            save()
        advance(li, len(modes) * E)
    return base_s, counts


def top_experts_by_domain(result: AblationResult, mode: str, n: int = 3) -> dict[str, list[dict]]:
    """Per domain column the n (layer, expert) whose removal costs that domain most."""
    out = {}
    for j, dom in enumerate(result.domains):
        d = result.delta[mode][:, :, j]
        s = result.se[mode][:, :, j]
        flat = np.argsort(-np.nan_to_num(d, nan=-np.inf), axis=None)[:n]
        rows = []
        for f in flat:
            li, e = np.unravel_index(f, d.shape)
            rows.append(
                {"layer": result.layers[li], "expert": int(e), "delta": float(d[li, e]),
                 "se": float(s[li, e])}
            )  # fmt: skip
        out[dom] = rows
    return out


def plot_importance(result: AblationResult, path: str | os.PathLike[str]) -> None:
    """PNG: one row per mode, one layer x expert heatmap of the loss change per domain column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moelab._io import atomic_write_with

    cols = result.domains
    nm = len(result.modes)
    fig, axes = plt.subplots(
        nm, len(cols), figsize=(3.2 * len(cols) + 1, 0.35 * len(result.layers) * nm + 1.8 * nm),
        squeeze=False,
    )  # fmt: skip
    for r, mode in enumerate(result.modes):
        vmax = float(np.nanmax(np.abs(result.delta[mode]))) or 1e-9
        for c, dom in enumerate(cols):
            ax = axes[r][c]
            im = ax.imshow(
                result.delta[mode][:, :, c], cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto"
            )
            ax.set_yticks(range(len(result.layers)), [f"L{x}" for x in result.layers])
            ax.set_xlabel("expert")
            ax.set_title(f"{mode}: {dom}", fontsize=9)
        fig.colorbar(im, ax=list(axes[r]), fraction=0.02, label="loss change [nats/token]")
    fig.suptitle(
        f"held-out loss change when one expert is removed ({result.tokens} tokens, "
        f"{result.sequences} sequences; {result.split})",
        fontsize=9,
    )
    atomic_write_with(path, lambda p: fig.savefig(p, dpi=110, format="png", bbox_inches="tight"))
    plt.close(fig)
