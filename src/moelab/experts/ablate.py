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


@contextmanager
def ablated(model: nn.Module, targets: dict[int, list[int]], mode: str) -> Iterator[nn.Module]:
    """Within the block, the experts `targets[moe_layer]` are removed in the named `mode`."""
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
) -> AblationResult:
    """Held-out loss change of removing each expert alone, for every MoE layer (or `layers`,
    MoE-layer positions) and mode; `cache` (a JSON file) keeps finished entries for a resume."""
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
    fp = _fingerprint(model, sample)
    done: dict[str, list] = {}
    cpath = Path(cache) if cache is not None else None
    if cpath is not None and cpath.is_file():
        old = json.loads(cpath.read_text(encoding="utf-8"))
        if old.get("fingerprint") == fp:
            done = old.get("entries", {})
    t0 = time.perf_counter()
    base_s, counts = sequence_sums(model, sample, batch_size, device)
    D = len(sample.domains)
    delta = {m: np.full((L, E, D + 1), np.nan) for m in modes}
    se = {m: np.full((L, E, D + 1), np.nan) for m in modes}
    todo = [(m, li, e) for m in modes for li in layers for e in range(E)]
    cols = [*sample.domains, "all"]
    with Progress(
        TextColumn("ablating {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not show_progress,
    ) as prog:
        task = prog.add_task("experts", total=len(todo))
        cached: tuple[int, list[torch.Tensor]] | None = None
        for n, (m, li, e) in enumerate(todo):
            key = f"{m}/{li}/{e}"
            if key in done:
                d_s = np.asarray(done[key], dtype=np.float64)
            else:
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
                d_s = s - base_s
                done[key] = d_s.tolist()
                if cpath is not None and (n + 1 == len(todo) or todo[n + 1][1] != li):
                    atomic_write_json(cpath, {"fingerprint": fp, "entries": done}, indent=0)
            for j in range(D):
                delta[m][li, e, j], se[m][li, e, j] = ratio_and_se(d_s[:, j], counts[:, j])
            delta[m][li, e, D], se[m][li, e, D] = ratio_and_se(d_s.sum(1), counts.sum(1))
            prog.update(task, advance=1, description=f"{m} layer {layer_idx[li]} expert {e}")
    base = domain_loss(base_s, counts, sample.domains)
    return AblationResult(
        split=sample.split,
        modes=list(modes),
        layers=layer_idx,
        num_experts=E,
        domains=cols,
        base=base,
        delta=delta,
        se=se,
        tokens=sample.num_tokens,
        sequences=sample.num_sequences,
        seconds=time.perf_counter() - t0,
    )


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
