"""Shrink an MoE: prune the least important experts per layer, or merge experts into fewer.

Pruning keeps E' experts per MoE layer, chosen by

- ``importance``: the held-out loss increase when the expert alone is removed by re-routing
  (``moelab.experts.ablate``; the criterion of Lu et al. 2024, "Not All Experts are Equal:
  Efficient Expert Pruning and Skipping for Mixture-of-Experts LLMs", there by enumeration);
- ``frequency``: how often the router picks it, ``gate_mass``: the sum of its combine weights
  (the routing-statistics criteria, e.g. Muzio et al. 2024, "SEER-MoE"), on calibration text;
- ``index``: experts 0..E'-1 (the naive reference).

Merging follows MC-SMoE (Li et al. 2024, "Merge, Then Compress: Demystify Efficient SMoE with
Hints from Its Routing Policy"): the E' most frequently routed experts are dominant; every
other expert joins the dominant one whose router logits over the calibration tokens are most
similar (cosine); inside a group the members' neurons are aligned to the dominant expert
(Hungarian matching, ``moelab.experts.similarity.align_neurons``) and averaged with their
routing frequencies as weights; the group's router rows are combined with the same weights.
HC-SMoE (Chen et al. 2024) groups by expert outputs instead; the averaging is the same.

The result is a normal MoETransformer (same config with ``moe.num_experts = E'`` and
``top_k = min(top_k, E')``), saved with ``save()`` and exportable with ``export_hf``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from moelab.errors import ConfigError, ModelError
from moelab.experts.access import capture_router_inputs, layer_experts
from moelab.experts.similarity import align_neurons, permute_expert

__all__ = [
    "CRITERIA",
    "routing_stats",
    "select_experts",
    "prune_model",
    "merge_groups",
    "merge_model",
]

CRITERIA = ("importance", "frequency", "gate_mass", "index")


@torch.no_grad()
def routing_stats(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """(frequency [L, E] share of routed slots, gate mass [L, E] share of combine weight)."""
    from moelab.experts.heldout import forward_logits
    from moelab.trace.adapters import get_adapter
    from moelab.trace.schema import NO_EXPERT

    ad = get_adapter(model)
    L, E = len(ad.sites), ad.num_experts
    freq = np.zeros((L, E))
    mass = np.zeros((L, E))
    handles = []
    for li, s in enumerate(ad.sites):

        def hook(_m, args, out, li=li, s=s):
            d = ad.decode(s, args, out)
            ids = d.expert_ids.reshape(-1).cpu()
            w = d.weights.reshape(-1).float().cpu()
            ok = ids != NO_EXPERT
            freq[li] += np.bincount(ids[ok].numpy(), minlength=E)
            mass[li] += np.bincount(ids[ok].numpy(), weights=w[ok].numpy(), minlength=E)

        handles.append(s.module.register_forward_hook(hook))
    try:
        model.eval()
        for i in range(0, input_ids.shape[0], batch_size):
            forward_logits(model, input_ids[i : i + batch_size])
    finally:
        for h in handles:
            h.remove()
    freq /= np.maximum(freq.sum(1, keepdims=True), 1)
    mass /= np.maximum(mass.sum(1, keepdims=True), 1e-12)
    return freq, mass


def select_experts(scores: np.ndarray | None, keep: int, num_experts: int) -> list[list[int]]:
    """Per layer the `keep` experts with the highest score, in index order (scores None or an
    [L, 0] array: experts 0..keep-1, the index criterion)."""
    if not 1 <= keep <= num_experts:
        raise ConfigError(f"prune: keep={keep} experts per layer must be in [1, {num_experts}]")
    if scores is None or scores.shape[1] == 0:
        return [list(range(keep))]
    out = []
    for row in np.asarray(scores):
        order = np.argsort(-np.nan_to_num(row, nan=-np.inf), kind="stable")
        out.append(sorted(int(e) for e in order[:keep]))
    return out


def _check_moelab(model: nn.Module, what: str) -> None:
    if not (hasattr(model, "blocks") and hasattr(model, "cfg")) or model.cfg.moe is None:
        raise ModelError(
            f"{what}: needs a moelab MoETransformer with MoE layers (a transformers model can be "
            "ablated; to shrink it, convert it to moelab first)"
        )
    if model.cfg.moe.router in ("hash",):
        raise ModelError(f"{what}: hash routing has a fixed token->expert table; cannot shrink")


def _new_model(model: nn.Module, keep: int) -> nn.Module:
    from moelab.models.transformer import MoETransformer

    m = model.cfg.moe
    moe = replace(m, num_experts=keep, top_k=min(m.top_k, keep))
    new = MoETransformer(replace(model.cfg, moe=moe))
    return new.to(device=model.device, dtype=model.dtype)


def _copy_shrunk(
    model: nn.Module, new: nn.Module, rows: dict[str, dict[str, torch.Tensor]]
) -> nn.Module:
    """Copy every tensor of `model` into `new`; `rows[name]` replaces one MoE tensor."""
    src = model.state_dict()
    dst = new.state_dict()
    E = model.cfg.moe.num_experts
    for name, t in dst.items():
        layer_key = name.split(".ffn.")[0] if ".ffn." in name else None
        if layer_key is not None and name in rows.get(layer_key, {}):
            t.copy_(rows[layer_key][name])
        elif src[name].shape == t.shape:
            t.copy_(src[name])
        else:
            raise ModelError(
                f"shrink: {name} has shape {tuple(src[name].shape)} (E={E}) and no rule to "
                f"shrink it to {tuple(t.shape)}"
            )
    new.eval()
    return new


def _expert_tensors(model: nn.Module, i: int) -> dict[str, torch.Tensor]:
    """The per-expert tensors (first dim E) of MoE block i, by state-dict name."""
    E = model.cfg.moe.num_experts
    prefix = f"blocks.{i}.ffn."
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith(prefix + "experts.") or name.startswith(prefix + "router."):
            if t.dim() >= 1 and t.shape[0] == E:
                out[name] = t
    return out


@torch.no_grad()
def prune_model(model: nn.Module, keep: list[list[int]]) -> nn.Module:
    """A new MoETransformer keeping experts `keep[l]` (same count in every MoE layer, or one
    list for all layers) with their router rows."""
    _check_moelab(model, "prune")
    layers = model.moe_layer_indices()
    if len(keep) == 1:
        keep = keep * len(layers)
    if len(keep) != len(layers):
        raise ConfigError(f"prune: {len(keep)} keep lists for {len(layers)} MoE layers")
    n = {len(k) for k in keep}
    if len(n) != 1:
        raise ConfigError(f"prune: every MoE layer must keep the same number of experts, got {n}")
    E = model.cfg.moe.num_experts
    for k in keep:
        if len(set(k)) != len(k) or any(not 0 <= e < E for e in k):
            raise ConfigError(f"prune: keep list {k} must hold distinct experts in [0, {E})")
    new = _new_model(model, n.pop())
    rows = {}
    for i, k in zip(layers, keep, strict=True):
        idx = torch.as_tensor(k, dtype=torch.long)
        rows[f"blocks.{i}"] = {
            name: t[idx.to(t.device)] for name, t in _expert_tensors(model, i).items()
        }
    return _copy_shrunk(model, new, rows)


def merge_groups(
    freq: np.ndarray, router_logits: list[torch.Tensor], keep: int
) -> list[list[list[int]]]:
    """Per layer, `keep` groups (each led by a dominant expert) covering all experts."""
    out = []
    for f, logits in zip(freq, router_logits, strict=True):
        E = f.shape[0]
        if not 1 <= keep <= E:
            raise ConfigError(f"merge: keep={keep} must be in [1, {E}]")
        dominant = [int(e) for e in np.argsort(-f, kind="stable")[:keep]]
        z = logits.double()
        z = z / z.norm(dim=0, keepdim=True).clamp_min(1e-12)
        sim = (z.t() @ z).numpy()
        groups = {d: [d] for d in dominant}
        for e in range(E):
            if e not in groups:
                best = max(dominant, key=lambda d, e=e: sim[e, d])
                groups[best].append(e)
        out.append([groups[d] for d in sorted(dominant)])
    return out


@torch.no_grad()
def merge_model(
    model: nn.Module,
    calib_ids: torch.Tensor,
    keep: int,
    groups: list[list[list[int]]] | None = None,
    freq: np.ndarray | None = None,
) -> tuple[nn.Module, list[list[list[int]]]]:
    """(merged MoETransformer with `keep` experts per layer, the groups used), MC-SMoE style."""
    _check_moelab(model, "merge")
    exps = layer_experts(model)
    if freq is None:
        freq, _ = routing_stats(model, calib_ids)
    if groups is None:
        inputs = capture_router_inputs(model, calib_ids)
        logits = []
        for le, x in zip(exps, inputs, strict=True):
            if le.router_weight is None:
                raise ModelError("merge: the router has no linear projection to compare logits")
            logits.append(x.double() @ le.router_weight.detach().double().cpu().t())
        groups = merge_groups(freq, logits, keep)
    new = _new_model(model, keep)
    rows = {}
    for li, (i, le) in enumerate(zip(model.moe_layer_indices(), exps, strict=True)):
        tensors = _expert_tensors(model, i)
        gu_name = f"blocks.{i}.ffn.experts.gate_up_proj"
        dn_name = f"blocks.{i}.ffn.experts.down_proj"
        merged: dict[str, list[torch.Tensor]] = {name: [] for name in tensors}
        for group in groups[li]:
            w = torch.as_tensor(freq[li][group], dtype=torch.float64)
            w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1 / len(group))
            lead = group[0] if len(group) == 1 else max(group, key=lambda e: freq[li][e])
            ga, da = le.gate_up[lead].double(), le.down[lead].double()
            acc_gu, acc_dn = torch.zeros_like(ga), torch.zeros_like(da)
            for wt, e in zip(w.tolist(), group, strict=True):
                gb, db = le.gate_up[e].double(), le.down[e].double()
                if e != lead:
                    perm, _ = align_neurons(ga.cpu(), da.cpu(), gb.cpu(), db.cpu())
                    gb, db = permute_expert(gb, db, perm)
                acc_gu += wt * gb
                acc_dn += wt * db
            for name, t in tensors.items():
                if name == gu_name:
                    merged[name].append(acc_gu.to(t.dtype))
                elif name == dn_name:
                    merged[name].append(acc_dn.to(t.dtype))
                else:  # router rows, biases, selection biases: same weighted combination
                    idx = torch.as_tensor(group, device=t.device)
                    comb = (t[idx].double() * w.to(t.device).view(-1, *[1] * (t.dim() - 1))).sum(0)
                    merged[name].append(comb.to(t.dtype))
        rows[f"blocks.{i}"] = {name: torch.stack(v) for name, v in merged.items()}
    return _copy_shrunk(model, new, rows), groups
