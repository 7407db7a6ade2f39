"""Balancing losses for MoE routers, as pure functions of router logits / scores.

- `load_balancing_loss`: Switch Transformers (Fedus et al. 2021, Eq. 4-6) in the form of
  transformers' `load_balancing_loss_func` (Mixtral/Qwen-MoE/OLMoE): L = E * sum_e f_e * P_e
  with f_e the fraction of (token, slot) assignments to expert e over all k slots and P_e
  the mean softmax probability of e. Layers are pooled (all layers' tokens concatenated),
  padding excluded via `attention_mask`. It equals k under perfectly uniform routing.
  `pooled=False` averages the per-layer losses instead.
- `megatron_load_balancing_loss`: Megatron-Core's `switch_load_balancing_loss_func` per layer,
  E / (k T^2) * sum_e P_sum_e * count_e = the transformers value divided by k (so it equals 1
  under uniform routing); layers averaged. Multiply by k to compare with transformers.
- `router_z_loss`: ST-MoE (Zoph et al. 2022, Eq. 5) = mean over tokens of logsumexp(logits)^2,
  as transformers' Switch `router_z_loss_func`.
- `cv_squared`, `importance_loss`, `smooth_load`, `load_loss`: Shazeer et al. 2017 Sec. 4 and
  Appendix A (importance = sum of gate values, load via the normal CDF, CV^2 losses).
- `sequence_balance_loss`: DeepSeek-V3 complementary sequence-wise auxiliary loss (Eq. 17-20).
- `sequence_balance_loss(length="mean")`: Megatron-Core's `seq_aux_loss` (every sequence's
  length taken as n_valid / B, the sum divided by B).
- `row_balance_loss`: the first-choice balance loss per batch row, mean over rows: transformers'
  Switch `load_balancing_loss_func`, lucidrains' GShard `Top2Gating` (first choices as chosen)
  and st-moe-pytorch's `TopNGating` (`kept=`: only first choices that survive capacity).
- `aux_free_bias_update`: DeepSeek-V3 auxiliary-loss-free bias step (Sec. 2.1.2).

Masks: the positional `mask` (True / 1 = real token) is taken as is; by keyword,
`attention_mask=` (1 = real token, transformers) or `padding_mask=` (True = padding,
Megatron-Core) are checked and refused when they look inverted (`moelab.layers.masks`).
Padding tokens never count. Values are raw (no coefficient applied).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from moelab.errors import ConfigError, InputError
from moelab.layers.masks import resolve_mask

TensorOrLayers = torch.Tensor | Sequence[torch.Tensor]


def _layers(router_logits: TensorOrLayers, where: str) -> list[torch.Tensor]:
    """Per-layer [T, E] logits from one tensor ([..., E]) or a sequence of them."""
    if isinstance(router_logits, torch.Tensor):
        items = [router_logits]
    elif isinstance(router_logits, Sequence) and len(router_logits) > 0:
        items = list(router_logits)
    else:
        raise InputError(
            f"{where}: router_logits must be a tensor [T, E] or a non-empty tuple of them, "
            f"got {type(router_logits).__name__}"
        )
    out = []
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor) or t.dim() < 1 or not t.is_floating_point():
            raise InputError(f"{where}: layer {i} logits must be a float tensor [T, E]")
        out.append(t.reshape(-1, t.shape[-1]))
    if len({t.shape for t in out}) != 1:
        raise InputError(
            f"{where}: every layer must have the same [T, E] shape, got {[tuple(t.shape) for t in out]}"
        )
    return out


def _flat_mask(
    attention_mask: torch.Tensor | None, num_tokens: int, device: torch.device, where: str
) -> torch.Tensor | None:
    """Float [T] mask (1 = real token) or None."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.numel() != num_tokens:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else None
        raise InputError(
            f"{where}: attention_mask must have {num_tokens} elements (one per routed token), "
            f"got shape {shape}"
        )
    return attention_mask.reshape(-1).to(device=device, dtype=torch.float32)


def _mask_arg(
    mask: torch.Tensor | None,
    padding_mask: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    padding_side: str,
    num_tokens: int,
    device: torch.device,
    where: str,
) -> torch.Tensor | None:
    """Float [T] mask (1 = real token) from the positional mask or an explicit, checked one."""
    if padding_mask is None and attention_mask is None:
        return _flat_mask(mask, num_tokens, device, where)
    valid = resolve_mask(
        num_tokens,
        where,
        mask=mask,
        padding_mask=padding_mask,
        attention_mask=attention_mask,
        padding_side=padding_side,
    )
    return valid.to(device=device, dtype=torch.float32)


def _check_k(num_experts: int, top_k: int, logits_e: int, where: str) -> None:
    """Validate num_experts against the logits and 1 <= top_k <= num_experts."""
    if num_experts != logits_e:
        raise InputError(
            f"{where}: num_experts={num_experts} but the router logits have {logits_e} columns"
        )
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"{where}: top_k={top_k} must be in [1, num_experts={num_experts}]")


def load_balancing_loss(
    router_logits: TensorOrLayers,
    num_experts: int,
    top_k: int = 2,
    mask: torch.Tensor | None = None,
    pooled: bool = True,
    *,
    attention_mask: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    padding_side: str = "right",
) -> torch.Tensor:
    """transformers' load_balancing_loss_func: E * sum_e f_e P_e over pooled layers (k if uniform)."""
    where = "load_balancing_loss"
    layers = _layers(router_logits, where)
    _check_k(num_experts, top_k, layers[0].shape[-1], where)
    device = layers[0].device
    mask = _mask_arg(
        mask, padding_mask, attention_mask, padding_side, layers[0].shape[0], device, where
    )
    if not pooled:
        per = [load_balancing_loss(t, num_experts, top_k, mask) for t in layers]
        return torch.stack(per).mean()
    flat_mask = mask if mask is not None else torch.ones(layers[0].shape[0], device=device)
    tokens_per_expert_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    router_prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    total_rows = flat_mask.new_zeros(())
    for layer_gate in layers:
        routing_weights = F.softmax(layer_gate, dim=-1)
        _, selected = torch.topk(routing_weights, top_k, dim=-1)
        tokens_per_expert_sum = tokens_per_expert_sum + torch.zeros_like(
            tokens_per_expert_sum
        ).scatter_add_(0, selected.reshape(-1), flat_mask.repeat_interleave(top_k))
        router_prob_sum = router_prob_sum + (routing_weights.float() * flat_mask[:, None]).sum(0)
        total_rows = total_rows + flat_mask.sum()
    if float(total_rows) == 0.0:  # every token is padding: nothing to balance
        return router_prob_sum.sum() * 0.0
    tokens_per_expert = tokens_per_expert_sum / total_rows
    router_prob_per_expert = router_prob_sum / total_rows
    return torch.sum(tokens_per_expert * router_prob_per_expert) * num_experts


def megatron_load_balancing_loss(
    router_logits: TensorOrLayers,
    num_experts: int,
    top_k: int = 2,
    mask: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    padding_side: str = "right",
) -> torch.Tensor:
    """Megatron-Core form: per-layer E/(k T^2) sum_e P_sum_e count_e, mean over layers (1 if uniform)."""
    loss = load_balancing_loss(
        router_logits,
        num_experts,
        top_k,
        mask,
        pooled=False,
        attention_mask=attention_mask,
        padding_mask=padding_mask,
        padding_side=padding_side,
    )
    return loss / top_k


def router_z_loss(
    router_logits: TensorOrLayers,
    mask: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    padding_side: str = "right",
) -> torch.Tensor:
    """ST-MoE router z-loss: mean over real tokens (and pooled layers) of logsumexp(logits)^2."""
    where = "router_z_loss"
    layers = _layers(router_logits, where)
    mask = _mask_arg(
        mask,
        padding_mask,
        attention_mask,
        padding_side,
        layers[0].shape[0],
        layers[0].device,
        where,
    )
    total = layers[0].new_zeros((), dtype=torch.float32)
    count = 0.0
    for t in layers:
        z = torch.logsumexp(t.float(), dim=-1) ** 2
        if mask is None:
            total = total + z.sum()
            count += z.shape[0]
        else:
            total = total + (z * mask).sum()
            count += float(mask.sum())
    if count == 0.0:
        return total * 0.0
    return total / count


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation var(x)/(mean(x)^2 + eps), population variance (tensor2tensor)."""
    x = x.float().reshape(-1)
    if x.numel() <= 1:
        return x.sum() * 0.0
    mean = x.mean()
    return ((x - mean) ** 2).mean() / (mean**2 + eps)


def importance_loss(
    gates: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Shazeer 2017 Eq. 6-7 (raw): CV^2 of Importance_e = sum over real tokens of gate values G(x)_e."""
    if gates.dim() != 2:
        raise InputError(f"importance_loss: gates must be [T, E], got {tuple(gates.shape)}")
    mask = _flat_mask(attention_mask, gates.shape[0], gates.device, "importance_loss")
    g = gates.float() if mask is None else gates.float() * mask[:, None]
    return cv_squared(g.sum(dim=0))


def smooth_load(
    clean_logits: torch.Tensor,
    noisy_logits: torch.Tensor,
    noise_std: torch.Tensor,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shazeer 2017 App. A Eq. 9-10: Load_e = sum_x Phi((clean_e - kth_excluding(H, k, e)) / std_e)."""
    where = "smooth_load"
    if clean_logits.shape != noisy_logits.shape or clean_logits.shape != noise_std.shape:
        raise InputError(
            f"{where}: clean_logits, noisy_logits and noise_std must share a [T, E] shape, got "
            f"{tuple(clean_logits.shape)}, {tuple(noisy_logits.shape)}, {tuple(noise_std.shape)}"
        )
    E = clean_logits.shape[-1]
    if not 1 <= top_k < E:
        raise ConfigError(f"{where}: top_k={top_k} must be in [1, num_experts-1={E - 1}]")
    mask = _flat_mask(attention_mask, clean_logits.shape[0], clean_logits.device, where)
    top = torch.topk(noisy_logits.float(), top_k + 1, dim=-1).values
    # for an expert inside the top-k, the k-th largest of the others is the (k+1)-th overall
    threshold_if_in = top[:, top_k : top_k + 1]
    threshold_if_out = top[:, top_k - 1 : top_k]
    is_in = noisy_logits.float() > threshold_if_in
    normal = torch.distributions.Normal(0.0, 1.0)
    std = noise_std.float()
    prob_if_in = normal.cdf((clean_logits.float() - threshold_if_in) / std)
    prob_if_out = normal.cdf((clean_logits.float() - threshold_if_out) / std)
    prob = torch.where(is_in, prob_if_in, prob_if_out)
    if mask is not None:
        prob = prob * mask[:, None]
    return prob.sum(dim=0)


def load_loss(
    clean_logits: torch.Tensor,
    noisy_logits: torch.Tensor,
    noise_std: torch.Tensor,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shazeer 2017 Eq. 11 (raw): CV^2 of the smooth load estimate."""
    return cv_squared(smooth_load(clean_logits, noisy_logits, noise_std, top_k, attention_mask))


def sequence_balance_loss(
    scores: torch.Tensor,
    expert_ids: torch.Tensor,
    num_experts: int,
    mask: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    padding_side: str = "right",
    length: str = "own",
) -> torch.Tensor:
    """DeepSeek-V3 Eq. 17-20 (alpha = 1): sum_i f_i P_i per sequence, mean over sequences.

    scores [B, S, E] (or [T, E] = one sequence) are the sigmoid affinities s_{i,t};
    expert_ids [B, S, k] the selected experts; f_i = E/(k S) * #{t: i selected at t},
    P_i = mean_t s_{i,t} / sum_j s_{j,t}. Equals 1 under perfectly uniform routing.
    Padding (mask False) is excluded.

    length="own" (default): S is each sequence's own number of real tokens and sequences
    without real tokens are skipped. length="mean": Megatron-Core's `seq_aux_loss` -- every
    sequence uses S = n_valid / B (all real tokens over all B rows) and the sum over
    sequences is divided by B (`_apply_seq_aux_loss` with a padding mask); the two agree
    without padding.
    """
    where = "sequence_balance_loss"
    if scores.dim() == 2:
        scores, expert_ids = scores.unsqueeze(0), expert_ids.unsqueeze(0)
    if scores.dim() != 3 or expert_ids.dim() != 3 or scores.shape[:2] != expert_ids.shape[:2]:
        raise InputError(
            f"{where}: scores must be [B, S, E] (or [T, E]) and expert_ids [B, S, k] with the "
            f"same leading dims, got {tuple(scores.shape)} and {tuple(expert_ids.shape)}"
        )
    B, S, E = scores.shape
    k = expert_ids.shape[-1]
    _check_k(num_experts, k, E, where)
    if length not in ("own", "mean"):
        raise ConfigError(f"{where}: length={length!r}; expected 'own' or 'mean'")
    flat = _mask_arg(mask, padding_mask, attention_mask, padding_side, B * S, scores.device, where)
    mask = torch.ones(B, S, device=scores.device) if flat is None else flat.reshape(B, S)
    n = mask.sum(dim=1)  # real tokens per sequence
    onehot = F.one_hot(expert_ids, E).sum(dim=2).float()  # [B, S, E]
    counts = (onehot * mask[..., None]).sum(dim=1)  # [B, E]
    s_norm = scores.float() / scores.float().sum(dim=-1, keepdim=True)
    p_sum = (s_norm * mask[..., None]).sum(dim=1)  # [B, E]
    valid = n > 0
    if not bool(valid.any()):
        return p_sum.sum() * 0.0
    if length == "mean":  # Megatron: one length n_valid/B for every sequence, sum / B
        t = n.sum() / B
        return (p_sum * counts).sum() * (E / (k * t * t)) / B
    n_v = n[valid][:, None]
    f = counts[valid] * E / (k * n_v)
    p = p_sum[valid] / n_v
    return (f * p).sum(dim=-1).mean()


def row_balance_loss(
    router_logits: torch.Tensor,
    first_choice: torch.Tensor,
    num_experts: int,
    rows: int = 1,
    mask: torch.Tensor | None = None,
    kept: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    padding_side: str = "right",
) -> torch.Tensor:
    """First-choice balance loss per batch row, mean over rows: E * sum_e f_e P_e per row.

    router_logits [T, E] (T = rows * S, row-major) or [B, S, E]; first_choice [T] the first
    expert of each token; f_e = fraction of the row's real tokens whose first choice is e
    (only those with `kept` True when given: st-moe-pytorch's TopNGating, whose `mask_1` is
    trimmed by capacity in place), P_e = the row's mean softmax probability of e. Equals
    transformers' Switch `load_balancing_loss_func` (mean(f * P) * E^2 over [B, E]) and
    lucidrains' `Top2Gating` loss; rows without real tokens are skipped.
    """
    where = "row_balance_loss"
    lg = router_logits.reshape(-1, router_logits.shape[-1])
    T, E = lg.shape
    _check_k(num_experts, 1, E, where)
    if router_logits.dim() == 3:
        rows = router_logits.shape[0]
    if rows < 1 or T % rows != 0:
        raise InputError(f"{where}: rows={rows} must divide the {T} tokens")
    first = first_choice.reshape(-1)
    if first.numel() != T:
        raise InputError(f"{where}: first_choice must have {T} entries, got {first.numel()}")
    flat = _mask_arg(mask, padding_mask, attention_mask, padding_side, T, lg.device, where)
    m = torch.ones(T, device=lg.device) if flat is None else flat
    probs = F.softmax(lg.float(), dim=-1)
    onehot = F.one_hot(first, E).float()
    if kept is not None:
        onehot = onehot * kept.reshape(-1, 1).to(onehot.dtype)
    S = T // rows
    m = m.reshape(rows, S, 1)
    n = m.sum(dim=1)  # [rows, 1]
    valid = n[:, 0] > 0
    if not bool(valid.any()):
        return probs.sum() * 0.0
    f = (onehot.reshape(rows, S, E) * m).sum(dim=1)[valid] / n[valid]
    p = (probs.reshape(rows, S, E) * m).sum(dim=1)[valid] / n[valid]
    return (f * p).sum(dim=-1).mean() * E


def aux_free_bias_update(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3 aux-loss-free step: returns bias + rate * sign(mean(counts) - counts)."""
    if rate < 0:
        raise ConfigError(f"aux_free_bias_update: rate (bias_update_rate)={rate} must be >= 0")
    if counts.shape != bias.shape:
        raise InputError(
            f"aux_free_bias_update: counts shape {tuple(counts.shape)} != bias shape {tuple(bias.shape)}"
        )
    c = counts.to(device=bias.device, dtype=torch.float32)
    return bias + rate * torch.sign(c.mean() - c).to(bias.dtype)
