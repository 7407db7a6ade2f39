"""Routers: map token hidden states [T, D] to a RoutingResult (which experts, which weights).

Every router is registered in `ROUTERS` under its `MoEConfig.router` name and built with
`build_router(cfg)`. Implemented schemes and their references:

- `topk`: softmax over all E experts in float32, top-k, optional renormalisation
  (`norm_topk_prob`) -- transformers' `MixtralTopKRouter` (always renormalises),
  `Qwen2MoeTopKRouter` / `OlmoeTopKRouter` (flag). Training jitter multiplies a *copy* of the
  router input (Mixtral's block multiplies its input in place, so there the experts see the
  jittered input too; here they do not).
- `noisy_topk`: Shazeer et al. 2017, "Outrageously Large Neural Networks", Eq. 3-5:
  H(x) = x W_g + N(0,1) * (softplus(x W_noise) + eps), KeepTopK, softmax; noise only in
  training; the smooth load estimate of Appendix A (normal CDF) feeds the load loss.
- `switch`: Fedus et al. 2021, "Switch Transformers" (Sec. 2.1-2.2): top-1, weight = the
  top-1 softmax probability (not renormalised), expert capacity with tokens dropped in token
  order (their MoE output is 0, so they pass through the residual), router z-loss
  (Zoph et al. 2022, ST-MoE Eq. 5).
- `gshard`: Lepikhin et al. 2020, "GShard", Algorithm 1: top-2, weights g1/(g1+g2),
  g2/(g1+g2), random routing of the second expert, optional capacity.
- `expert_choice`: Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", Eq. 1:
  every expert takes its top-c tokens by token-wise softmax score.
- `hash`: Roller et al. 2021, "Hash Layers For Large Sparse Models": fixed balanced random
  token-id -> expert map, no learned router.
- `sinkhorn`: Clark et al. 2022, "Unified Scaling Laws for Routed Language Models",
  Sinkhorn-BASE: balanced assignment from Sinkhorn iterations in training, top-k at inference.
- `deepseek`: DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", Eq. 12-16 (sigmoid
  affinities, group-limited top-k, normalised weights, routed scaling factor) and Sec. 2.1.2
  (auxiliary-loss-free balancing: bias used for selection only, b_e += gamma * sign(mean - load_e)).

Capacity (any token-choice router, when `capacity_factor` or `expert_capacity` is set):
`expert_capacity()` gives ceil(T*cf/E) (Switch convention) or ceil((T*k/E)*cf) (Megatron's
`get_capacity(T*k, E, cf)`), or the floor (`capacity_rounding="floor"`: lucidrains /
st-moe-pytorch `int(S*cf/E)`), raised to `min_capacity` if set. Who keeps a slot
(`MoEConfig.drop_policy`):

- "slot" (default): slot-major first come first served (all first choices in token order,
  then all second choices, ... as GShard Algorithm 1, lucidrains and st-moe-pytorch);
- "probs": Megatron-Core's default -- each expert keeps its `capacity` highest-weight tokens
  (`apply_router_token_dropping`: `torch.topk(routing_probs, capacity, dim=0)`);
- "position": Megatron-Core's "position" policy, computed as Megatron does
  (`torch.topk(routing_map.int(), capacity, dim=0, sorted=False)`): which of the tied tokens
  an expert keeps is torch.topk's choice, not token order (it matches Megatron on the same
  torch build and device).

`pad_to_capacity` (Megatron `moe_pad_expert_input_to_capacity`) records the padded [T, E]
map in `RoutingResult.capacity_map` (every expert filled to capacity with zero-weight
tokens); the combine is unchanged because padded slots weigh 0. `capacity_scope="row"`
applies capacity per batch row (transformers' Switch router, lucidrains / st-moe), the first-
choice balance loss too. Slots beyond capacity are `dropped` with weight 0. Padding tokens
(mask False) never take capacity and capacity counts only real tokens (Megatron and
transformers count padding as tokens: match them on unpadded batches).

Masks: routers take the positional `mask` (True = real token, as is) or, by keyword,
`padding_mask=` (True = padding) / `attention_mask=` (1 = real), refused when they look
inverted (`moelab.layers.masks`). `rows` (MoEBlock passes the batch size of a [B, S, D]
input) gives the row structure of the flat tokens for per-row capacity and losses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moelab.errors import ConfigError, InputError
from moelab.layers.config import MoEConfig
from moelab.layers.losses import (
    aux_free_bias_update,
    cv_squared,
    load_balancing_loss,
    router_z_loss,
    row_balance_loss,
    sequence_balance_loss,
    smooth_load,
)
from moelab.layers.masks import resolve_mask
from moelab.layers.types import LazyAux, RoutingResult

# Logit given to experts a hash router does not pick (finite, representable in float16).
HASH_OFF_LOGIT = -30.0


def check_router_input(x: torch.Tensor, d_model: int, where: str) -> None:
    """Raise InputError unless x is a float [T, d_model] tensor."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[-1] != d_model:
        raise InputError(
            f"{where}: expected hidden states of shape [tokens, d_model={d_model}], got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise InputError(f"{where}: hidden states must be floating point, got {x.dtype}")


def check_logits_finite(logits: torch.Tensor, where: str) -> None:
    """Raise InputError if router logits contain NaN/inf (usually a diverged model or bad input)."""
    if not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).any(dim=-1).nonzero().flatten()[:5].tolist()
        raise InputError(
            f"{where}: router logits contain NaN or inf (first bad token rows: {bad}); "
            "check the input hidden states and the router weights"
        )


def expert_capacity(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    capacity_factor: float,
    convention: str = "switch",
    rounding: str = "ceil",
    min_capacity: int | None = None,
) -> int:
    """Slots per expert: ceil(T*cf/E) ("switch") or ceil((T*k/E)*cf) ("megatron", Megatron's
    operation order), floor instead of ceil with rounding="floor", at least min_capacity."""
    if capacity_factor is None or not capacity_factor > 0:
        raise ConfigError(f"capacity_factor={capacity_factor!r}: must be > 0")
    if convention == "switch":
        raw = num_tokens * capacity_factor / num_experts
    elif convention == "megatron":
        raw = (num_tokens * top_k / num_experts) * capacity_factor
    else:
        raise ConfigError(f"capacity_convention={convention!r}: must be 'switch' or 'megatron'")
    if rounding == "ceil":
        cap = math.ceil(raw)
    elif rounding == "floor":
        cap = int(raw)
    else:
        raise ConfigError(f"capacity_rounding={rounding!r}: must be 'ceil' or 'floor'")
    if min_capacity is not None and cap < min_capacity:
        cap = int(min_capacity)
    return cap


def capacity_keep(
    expert_ids: torch.Tensor,
    candidate: torch.Tensor,
    num_experts: int,
    capacity: int | torch.Tensor,
) -> torch.Tensor:
    """[T, k] bool: candidate slots that fit in `capacity` per expert, slot-major then token order.

    `capacity` is one int, or a [num_experts] tensor (one capacity per expert id, used with
    row-offset ids for per-row capacity).
    """
    T, k = expert_ids.shape
    cand = candidate.t().reshape(-1)  # slot-major: slot 0 of every token first
    ids = expert_ids.t().reshape(-1).masked_fill(~cand, num_experts)  # non-candidates sort last
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    counts = torch.bincount(sorted_ids, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(ids)
    position[order] = torch.arange(ids.numel(), device=ids.device) - starts[sorted_ids]
    if isinstance(capacity, torch.Tensor):
        cap = torch.cat([capacity.to(ids.device), capacity.new_zeros(1).to(ids.device)])[ids]
        keep = cand & (position < cap)
    else:
        keep = cand & (position < capacity)
    return keep.reshape(k, T).t()


def megatron_capacity_mask(
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    candidate: torch.Tensor,
    num_experts: int,
    capacity: int,
    policy: str,
    real: torch.Tensor | None = None,
) -> torch.Tensor:
    """[T, E] bool capacity mask of Megatron-Core's `apply_router_token_dropping`.

    Builds Megatron's routing_probs / routing_map [T, E] from the candidate slots and keeps,
    per expert, the `capacity` tokens torch.topk picks over dim 0 ("probs": by weight;
    "position": over the int map, ties as torch.topk breaks them); all tokens when capacity
    exceeds the real token count. Padding rows (`real` False) rank below every real token.
    """
    T = expert_ids.shape[0]
    n_real = T if real is None else int(real.sum())
    if capacity > n_real:
        return torch.ones(T, num_experts, dtype=torch.bool, device=expert_ids.device)
    if policy == "probs":
        w = weights.detach().float().masked_fill(~candidate, 0.0)
        score = torch.zeros(T, num_experts, device=weights.device).scatter(1, expert_ids, w)
    elif policy == "position":
        score = torch.zeros(T, num_experts, dtype=torch.int32, device=expert_ids.device)
        score = score.scatter(1, expert_ids, candidate.to(torch.int32))
    else:
        raise ConfigError(f"drop_policy={policy!r}: expected 'position' or 'probs'")
    if real is not None and not bool(real.all()):
        score = score.masked_fill(~real[:, None], -1)
    idx = torch.topk(score, k=capacity, dim=0, sorted=False).indices
    return torch.zeros(T, num_experts, dtype=torch.bool, device=expert_ids.device).scatter(
        0, idx, True
    )


class Router(nn.Module):
    """Base class: `forward(x [T, D], token_ids=None, mask=None, *, padding_mask=None,
    attention_mask=None, rows=None, padding_side="right") -> RoutingResult`.

    `mask` [T] bool marks real tokens (False = padding); padding never counts in aux losses.
    `padding_mask` (True = padding) / `attention_mask` (1 = real) are the checked, explicit
    forms (`moelab.layers.masks`); `rows` is the number of batch rows of the flat tokens.
    Subclasses implement `route(x, token_ids, mask, rows)` and set `self.gate`
    (nn.Linear D->E) when they have a learned linear router.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.d_model = cfg.d_model
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        """Multiplicative uniform jitter in training (Switch/Mixtral); returns a new tensor."""
        if self.training and self.cfg.jitter_noise > 0:
            eps = self.cfg.jitter_noise
            return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        return x

    def check_inputs(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Validate x [T, D], token_ids [T] and mask [T]; return the mask as bool (or None)."""
        where = type(self).__name__
        check_router_input(x, self.d_model, where)
        T = x.shape[0]
        if token_ids is not None:
            if not isinstance(token_ids, torch.Tensor) or token_ids.shape != (T,):
                shape = tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor) else None
                raise InputError(f"{where}: token_ids must be a [T={T}] tensor, got shape {shape}")
            if token_ids.is_floating_point():
                raise InputError(f"{where}: token_ids must be integers, got {token_ids.dtype}")
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.shape != (T,):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else None
            raise InputError(f"{where}: mask must be a [T={T}] bool tensor, got shape {shape}")
        return mask.to(device=x.device, dtype=torch.bool)

    def forward(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        padding_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rows: int | None = None,
        padding_side: str = "right",
    ) -> RoutingResult:
        """Validate inputs and masks, then `route` the flat tokens x [T, D]."""
        where = type(self).__name__
        check_router_input(x, self.d_model, where)
        T = x.shape[0]
        if rows is not None and (not isinstance(rows, int) or rows < 1 or T % rows != 0):
            raise InputError(f"{where}: rows={rows!r} must be a positive int dividing T={T}")
        mask = resolve_mask(
            T,
            where,
            mask=mask,
            padding_mask=padding_mask,
            attention_mask=attention_mask,
            rows=rows,
            padding_side=padding_side,
        )
        mask = self.check_inputs(x, token_ids, mask)
        return self.route(x, token_ids, mask, rows)

    def route(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None,
        mask: torch.Tensor | None,
        rows: int | None,
    ) -> RoutingResult:
        """Route validated inputs (subclasses implement this)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement route()")

    def capacity(self, num_tokens: int, k: int) -> int | None:
        """Per-expert capacity for num_tokens real tokens with k slots each, or None (dropless)."""
        if self.cfg.expert_capacity is not None:
            return int(self.cfg.expert_capacity)
        if self.cfg.capacity_factor is None:
            return None
        return expert_capacity(
            num_tokens,
            self.num_experts,
            k,
            self.cfg.capacity_factor,
            self.cfg.capacity_convention,
            self.cfg.capacity_rounding,
            self.cfg.min_capacity,
        )

    def row_count(self, rows: int | None) -> int:
        """Rows capacity and the first-choice balance loss work over (1 = the whole batch)."""
        return rows if self.cfg.capacity_scope == "row" and rows is not None else 1

    def apply_capacity(
        self,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        mask: torch.Tensor | None,
        dropped: torch.Tensor | None = None,
        rows: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Drop slots beyond capacity (and padding when capacity applies); zero their weights.

        Returns (weights, dropped, capacity_map); capacity_map is Megatron's padded [T, E] map
        with cfg.pad_to_capacity, else None.
        """
        T, k = expert_ids.shape
        E = self.num_experts
        R = self.row_count(rows)
        if self.cfg.expert_capacity is None and self.cfg.capacity_factor is None:
            if dropped is not None:
                weights = weights.masked_fill(dropped, 0.0)
            return weights, dropped, None
        candidate = torch.ones_like(expert_ids, dtype=torch.bool)
        if dropped is not None:
            candidate &= ~dropped
        if mask is not None:
            candidate &= mask.unsqueeze(-1)
        capacity_map = None
        if R > 1:  # per batch row: row r's expert e is bucket r*E + e
            S = T // R
            n_rows = [S] * R if mask is None else mask.reshape(R, S).sum(dim=1).tolist()
            caps = torch.tensor([self.capacity(int(n), k) for n in n_rows], device=weights.device)
            offset = (torch.arange(T, device=expert_ids.device) // S * E).unsqueeze(-1)
            keep = capacity_keep(expert_ids + offset, candidate, E * R, caps.repeat_interleave(E))
        elif self.cfg.drop_policy == "slot":
            n_real = T if mask is None else int(mask.sum())
            keep = capacity_keep(expert_ids, candidate, E, self.capacity(n_real, k))
        else:
            n_real = T if mask is None else int(mask.sum())
            cmask = megatron_capacity_mask(
                expert_ids,
                weights,
                candidate,
                E,
                self.capacity(n_real, k),
                self.cfg.drop_policy,
                mask,
            )
            keep = candidate & cmask.gather(1, expert_ids)
            if self.cfg.pad_to_capacity:
                capacity_map = cmask if mask is None else cmask & mask[:, None]
        return weights.masked_fill(~keep, 0.0), ~keep, capacity_map

    def selection_bias_buffer(self) -> torch.Tensor | None:
        """The [E] bias this router adds to its scores for selection only (aux-loss-free
        balancing), or None if it has none."""
        return None

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> torch.Tensor:
        """Aux-loss-free step b_e += gamma*sign(mean_load - load_e) (gamma = bias_update_rate;
        Wang et al. 2024, DeepSeek-V3 Sec. 2.1.2) on this router's selection bias."""
        bias = self.selection_bias_buffer()
        where = f"{type(self).__name__}.update_bias"
        if bias is None:
            raise ConfigError(
                f"{where}: this router has no selection bias (MoEConfig.bias_update_rate=0)"
            )
        counts = torch.as_tensor(counts, device=bias.device)
        if counts.shape != (self.num_experts,):
            raise InputError(
                f"{where}: counts must have shape [{self.num_experts}], got {tuple(counts.shape)}"
            )
        bias.copy_(aux_free_bias_update(bias, counts, self.cfg.bias_update_rate))
        return bias

    def logits_of(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits of the (jittered in training) input, checked finite."""
        logits = self.gate(self.jitter(x))
        check_logits_finite(logits, type(self).__name__)
        return logits

    def softmax_result(
        self,
        x: torch.Tensor,
        logits: torch.Tensor,
        probs: torch.Tensor,
        top_i: torch.Tensor,
        top_w: torch.Tensor,
        dropped: torch.Tensor | None,
        mask: torch.Tensor | None,
        lb_k: int,
        rows: int | None = None,
        capacity_map: torch.Tensor | None = None,
    ) -> RoutingResult:
        """RoutingResult of a softmax router, with the Switch/Mixtral load-balancing loss
        (counting lb_k choices per token) and the router z-loss as aux terms.

        First-choice routers (lb_k = 1: Switch, GShard) with capacity_scope="row" or
        balance_count="kept" use `row_balance_loss` (per batch row; only the first choices
        kept by capacity with "kept", as st-moe-pytorch)."""
        R = self.row_count(rows)
        kept_only = self.cfg.balance_count == "kept"
        E = self.num_experts

        def terms() -> dict[str, torch.Tensor]:
            if lb_k == 1 and (R > 1 or kept_only):
                kept = None
                if kept_only and dropped is not None:
                    kept = ~dropped[:, 0]
                balance = row_balance_loss(logits, top_i[:, 0], E, R, mask, kept)
            else:
                balance = load_balancing_loss(logits, E, lb_k, mask)
            return {"load_balancing": balance, "z_loss": router_z_loss(logits, mask)}

        aux = LazyAux(terms)
        return RoutingResult(
            expert_ids=top_i,
            weights=top_w.to(x.dtype),
            logits=logits,
            aux=aux,
            dropped=dropped,
            scores=probs,
            capacity_map=capacity_map,
        )


class TopKRouter(Router):
    """Softmax top-k router (Mixtral, Qwen2/3-MoE, OLMoE); aux: load_balancing, z_loss.

    With cfg.unit_weights every selected expert gets weight 1 (MoEfication, Zhang et al. 2022:
    a dense FFN split into experts is the plain sum of its selected parts).
    With cfg.bias_update_rate > 0 a `selection_bias` buffer [E] is added to the probabilities
    for choosing the top-k only (the weights stay the unbiased probabilities): auxiliary-loss-free
    balancing (Wang et al. 2024, arXiv:2408.15664), updated by `update_bias` after each step.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        self.gate = nn.Linear(cfg.d_model, cfg.num_experts, bias=cfg.router_bias)
        if cfg.bias_update_rate > 0:
            self.register_buffer("selection_bias", torch.zeros(cfg.num_experts))

    def selection_bias_buffer(self) -> torch.Tensor | None:
        """The `selection_bias` buffer (None unless bias_update_rate > 0)."""
        return getattr(self, "selection_bias", None)

    def route(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None,
        mask: torch.Tensor | None,
        rows: int | None,
    ) -> RoutingResult:
        """Route x [T, D]: softmax (float32) over E, top-k, optional renormalisation."""
        logits = self.logits_of(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        bias = self.selection_bias_buffer()
        if bias is None:
            top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        else:  # choose by biased score, weigh by the unbiased probability
            top_i = torch.topk(probs + bias.float(), self.top_k, dim=-1).indices
            top_w = probs.gather(-1, top_i)
        if self.cfg.unit_weights:  # MoEfication: the selected parts of the FFN sum with weight 1
            top_w = torch.ones_like(top_w)
        elif self.cfg.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        top_w, dropped, cmap = self.apply_capacity(top_i, top_w, mask, rows=rows)
        return self.softmax_result(
            x, logits, probs, top_i, top_w, dropped, mask, self.top_k, rows, cmap
        )


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017, Eq. 3-5); aux: importance, load (CV^2).

    H(x) = x W_g + N(0,1) * (softplus(x W_noise) + noise_epsilon) in training, x W_g otherwise;
    G(x) = softmax(KeepTopK(H(x), k)), i.e. a softmax over the k kept logits (equal to
    renormalised top-k softmax probabilities). `noise_epsilon` (cfg, default 1e-2) is
    tensor2tensor's floor on the noise scale; 0 gives the paper's formula exactly. W_noise
    starts at zero as in the paper; W_g keeps nn.Linear's init so routing is not tied at start.
    The load estimate is Appendix A's P(x, i) = Phi((x W_g)_i - kth_excluding(H(x), k, i)) /
    noise_std_i), summed over real tokens; outside training (no noise) the load is the count.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        self.gate = nn.Linear(cfg.d_model, cfg.num_experts, bias=cfg.router_bias)
        self.w_noise = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        nn.init.zeros_(self.w_noise.weight)

    def route(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None,
        mask: torch.Tensor | None,
        rows: int | None,
    ) -> RoutingResult:
        """Route x [T, D] with noisy top-k gating; logits are the noisy H(x) used for selection."""
        clean = self.gate(x)
        check_logits_finite(clean, type(self).__name__)
        k, E = self.top_k, self.num_experts
        if self.training:
            noise_std = F.softplus(self.w_noise(x)) + self.cfg.noise_epsilon
            logits = clean + torch.randn_like(clean) * noise_std
        else:
            noise_std, logits = None, clean
        top_h, top_i = torch.topk(logits.float(), min(k + 1, E), dim=-1)
        top_w = F.softmax(top_h[:, :k], dim=-1)
        top_i = top_i[:, :k]
        gates = torch.zeros_like(logits, dtype=torch.float32).scatter(1, top_i, top_w)
        m = None if mask is None else mask.to(gates.dtype).unsqueeze(-1)
        importance = (gates if m is None else gates * m).sum(dim=0)
        if noise_std is not None and k < E:
            load = smooth_load(clean, logits, noise_std, k, mask)
        else:
            load = ((gates > 0).to(gates.dtype) if m is None else (gates > 0) * m).sum(dim=0)
        top_w, dropped, cmap = self.apply_capacity(top_i, top_w, mask, rows=rows)
        aux = {"importance": cv_squared(importance), "load": cv_squared(load)}
        return RoutingResult(
            expert_ids=top_i,
            weights=top_w.to(x.dtype),
            logits=logits,
            aux=aux,
            dropped=dropped,
            capacity_map=cmap,
        )


class SwitchRouter(Router):
    """Switch Transformer top-1 router with capacity; aux: load_balancing (k=1), z_loss.

    Requires cfg.top_k == 1. Capacity: `cfg.expert_capacity` if set, else ceil(T*cf/E)
    (both conventions agree for k = 1), None cf = dropless. Tokens beyond an expert's capacity
    are dropped in token order (first come, first served; transformers
    `SwitchTransformersTop1Router` does the same per sequence), their weight is 0.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        if cfg.top_k != 1:
            raise ConfigError(
                f"MoEConfig.top_k={cfg.top_k}: the switch router routes top-1; set top_k=1"
            )
        self.gate = nn.Linear(cfg.d_model, cfg.num_experts, bias=cfg.router_bias)

    def route(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None,
        mask: torch.Tensor | None,
        rows: int | None,
    ) -> RoutingResult:
        """Route x [T, D] to its argmax expert, dropping overflow beyond capacity."""
        logits = self.logits_of(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        top_w, top_i = probs.max(dim=-1, keepdim=True)
        top_w, dropped, cmap = self.apply_capacity(top_i, top_w, mask, rows=rows)
        return self.softmax_result(x, logits, probs, top_i, top_w, dropped, mask, 1, rows, cmap)


class GShardRouter(Router):
    """GShard top-2 router (Lepikhin et al. 2020, Algorithm 1); aux: load_balancing, z_loss.

    Requires cfg.top_k == 2. Rule implemented: p = softmax(logits); (g1, e1), (g2, e2) = top-2;
    weights w1 = g1/(g1+g2), w2 = g2/(g1+g2); in training the second expert is kept iff
    u < 2*w2 with u ~ U[0, 1) per token, i.e. with probability 2*g2/(g1+g2) (<= 1 since
    g2 <= g1); at inference both are kept (deterministic). A skipped second slot is `dropped`
    with weight 0 and w1 is NOT renormalised (as in Algorithm 1, which normalises before the
    random and capacity masks). Capacity (optional): first choices fill experts in token order,
    then kept second choices take what is left; GShard's paper capacity 2N/E is the Megatron
    convention with cf = 1. `load_balancing` uses first choices only (GShard's
    l_aux = mean_e(c_e/S * m_e) times E^2, i.e. the Switch form with k = 1).
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        if cfg.top_k != 2:
            raise ConfigError(
                f"MoEConfig.top_k={cfg.top_k}: the gshard router is top-2; set top_k=2"
            )
        self.gate = nn.Linear(cfg.d_model, cfg.num_experts, bias=cfg.router_bias)

    def route(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None,
        mask: torch.Tensor | None,
        rows: int | None,
    ) -> RoutingResult:
        """Route x [T, D] top-2 with random routing of the second expert in training."""
        logits = self.logits_of(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        top_g, top_i = torch.topk(probs, 2, dim=-1)
        top_w = top_g / top_g.sum(dim=-1, keepdim=True)
        dropped = torch.zeros_like(top_i, dtype=torch.bool)
        if self.training:
            u = torch.rand(top_w.shape[0], device=x.device)
            dropped[:, 1] = ~(u < 2.0 * top_w[:, 1].detach())
        top_w, dropped, cmap = self.apply_capacity(top_i, top_w, mask, dropped, rows=rows)
        if dropped is not None and not bool(dropped.any()):
            dropped = None
        return self.softmax_result(x, logits, probs, top_i, top_w, dropped, mask, 1, rows, cmap)


class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-c tokens; aux: none.

    S = softmax(x W_g) over experts per token (Eq. 1); expert e takes the c real tokens with the
    largest S[:, e], weight S[t, e]. c = cfg.expert_capacity if set, else ceil(n * cf / E)
    with n real tokens and cf = cfg.capacity_factor, or cf = cfg.top_k when capacity_factor is
    None (the paper's c = average experts per token, so the default matches top-k compute);
    c is clipped to n, so a capacity larger than the batch works. The RoutingResult has k = E
    slots per token, slot j is expert j (`expert_ids[t, j] == j`), `dropped[t, j]` marks the
    experts that did not pick token t, so a token gets 0..E experts. Padding is never picked.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        self.gate = nn.Linear(cfg.d_model, cfg.num_experts, bias=cfg.router_bias)

    def tokens_per_expert(self, num_tokens: int) -> int:
        """c: tokens each expert takes out of num_tokens real tokens."""
        if self.cfg.expert_capacity is not None:
            c = int(self.cfg.expert_capacity)
        else:
            cf = self.cfg.capacity_factor if self.cfg.capacity_factor is not None else self.top_k
            c = expert_capacity(num_tokens, self.num_experts, 1, cf, "switch")
        return min(c, num_tokens)

    def route(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None,
        mask: torch.Tensor | None,
        rows: int | None,
    ) -> RoutingResult:
        """Route x [T, D]: experts pick tokens; returns E slots per token with `dropped`."""
        logits = self.logits_of(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        T, E = probs.shape
        n_real = T if mask is None else int(mask.sum())
        c = self.tokens_per_expert(n_real)
        chosen = torch.zeros(T, E, dtype=torch.bool, device=x.device)
        if c > 0:
            sel = (
                probs.detach() if mask is None else probs.detach().masked_fill(~mask[:, None], -1.0)
            )
            tok = torch.topk(sel, c, dim=0).indices  # [c, E]
            chosen[tok, torch.arange(E, device=x.device).expand_as(tok)] = True
        ids = torch.arange(E, device=x.device).expand(T, E).contiguous()
        weights = probs * chosen
        return RoutingResult(
            expert_ids=ids,
            weights=weights.to(x.dtype),
            logits=logits,
            aux={},
            dropped=~chosen,
            scores=probs,
        )


def balanced_hash_table(vocab_size: int, num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """[V, k] int64 fixed map: each slot column gives every expert floor/ceil(V/E) token ids.

    a_v = position of v in a seeded random permutation of the vocabulary, mod E (balanced);
    slot j of token v is pi[(a_v + j) mod E] for a seeded random expert permutation pi, so the
    k experts of a token are distinct and every slot column is balanced.
    """
    g = torch.Generator().manual_seed(int(seed))
    rank = torch.empty(vocab_size, dtype=torch.long)
    rank[torch.randperm(vocab_size, generator=g)] = torch.arange(vocab_size)
    pi = torch.randperm(num_experts, generator=g)
    base = rank % num_experts
    slots = (base.unsqueeze(-1) + torch.arange(top_k)) % num_experts
    return pi[slots]


class HashRouter(Router):
    """Hash layer routing (Roller et al. 2021): expert(s) fixed by the token id; aux: none.

    No learned parameters: the [vocab_size, k] table (a buffer, from cfg.seed) is built by
    `balanced_hash_table`. Weights are 1/k per slot (k = 1: the expert output as is, as in the
    paper). `logits` are one-hot-ish for tracing and losses: 0 for chosen experts and
    HASH_OFF_LOGIT (-30) elsewhere, so softmax(logits) ~ the k-hot/k routing; they carry no
    gradient. Requires `token_ids` [T] in [0, vocab_size).
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        if cfg.vocab_size is None or cfg.vocab_size <= 0:
            raise ConfigError(f"MoEConfig.vocab_size={cfg.vocab_size!r}: hash routing needs it > 0")
        table = balanced_hash_table(cfg.vocab_size, cfg.num_experts, cfg.top_k, cfg.seed)
        self.register_buffer("table", table)

    def route(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None,
        mask: torch.Tensor | None,
        rows: int | None,
    ) -> RoutingResult:
        """Look the experts of each token id up in the fixed table."""
        where = type(self).__name__
        if token_ids is None:
            raise InputError(
                f"{where}: token_ids is required for hash routing (pass the [T] input ids)"
            )
        V = self.table.shape[0]
        if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= V):
            raise InputError(
                f"{where}: token_ids must be in [0, vocab_size={V}), got range "
                f"[{int(token_ids.min())}, {int(token_ids.max())}]"
            )
        ids = self.table[token_ids.to(self.table.device).long()].to(x.device)
        T, k = ids.shape
        weights = torch.full((T, k), 1.0 / k, dtype=x.dtype, device=x.device)
        hit = torch.zeros(T, self.num_experts, dtype=torch.bool, device=x.device)
        hit.scatter_(1, ids, True)
        logits = torch.full(
            (T, self.num_experts), HASH_OFF_LOGIT, dtype=torch.float32, device=x.device
        )
        logits = logits.masked_fill(hit, 0.0)
        weights, dropped, cmap = self.apply_capacity(ids, weights, mask, rows=rows)
        return RoutingResult(
            expert_ids=ids,
            weights=weights,
            logits=logits,
            aux={},
            dropped=dropped,
            capacity_map=cmap,
        )


def sinkhorn_log(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Log of the Sinkhorn-balanced plan of exp(logits) [n, E] (rows sum 1/n, columns 1/E)."""
    n, E = logits.shape
    log_p = logits.float()
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True) - math.log(n)
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) - math.log(E)
    return log_p


def sinkhorn_tolerance(
    logits: torch.Tensor, tol: float = 1e-4, max_iters: int = 1000
) -> torch.Tensor:
    """Megatron-Core's `moe_utils.sinkhorn`: the balanced plan d1 * exp(logits) * d0 [n, E].

    Scalings d0 (rows) and d1 (columns) alternate, with eps = 1e-8, until the mean absolute
    change of d1 is <= tol (Megatron loops without a cap; here at most max_iters steps).
    """
    cost = torch.exp(logits.float())
    d0 = torch.ones(cost.size(0), device=cost.device, dtype=cost.dtype)
    d1 = torch.ones(cost.size(1), device=cost.device, dtype=cost.dtype)
    eps = 0.00000001
    error = 1e9
    d1_old = d1
    steps = 0
    while error > tol and steps < max_iters:
        d0 = (1 / d0.size(0)) * 1 / (torch.sum(d1 * cost, 1) + eps)
        d1 = (1 / d1.size(0)) * 1 / (torch.sum(d0.unsqueeze(1) * cost, 0) + eps)
        error = torch.mean(torch.abs(d1_old - d1))
        d1_old = d1
        steps += 1
    return d1 * cost * d0.unsqueeze(1)


class SinkhornRouter(Router):
    """Sinkhorn-BASE router (Clark et al. 2022, Sec. 3 / App. A.1); aux: none.

    Training: Sinkhorn iterations (no gradient) turn exp(logits) over the real tokens into a
    plan with uniform token and expert marginals; each token takes the top-k experts of its
    row of that plan (an approximately balanced assignment). With cfg.sinkhorn_tol None:
    `cfg.sinkhorn_iters` log-space iterations (`sinkhorn_log`); with a tolerance: Megatron-
    Core's multiplicative loop until the column scaling changes by <= tol
    (`sinkhorn_tolerance`, at most cfg.sinkhorn_max_iters). Inference: plain top-k of
    softmax(logits). The weights are the softmax probabilities of the original logits at
    the chosen experts, renormalised over the k if cfg.norm_topk_prob and k > 1 (never for
    k = 1, where it would make every weight 1 and cut the router's gradient), so gradients
    reach the router through the weights. For k = 1, cfg.sinkhorn_k1_weight="sigmoid" gives
    sigmoid(logit) instead (Megatron's `sinkhorn_load_balancing`).
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        if cfg.sinkhorn_iters < 1:
            raise ConfigError(f"MoEConfig.sinkhorn_iters={cfg.sinkhorn_iters}: must be >= 1")
        self.gate = nn.Linear(cfg.d_model, cfg.num_experts, bias=cfg.router_bias)

    def route(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None,
        mask: torch.Tensor | None,
        rows: int | None,
    ) -> RoutingResult:
        """Route x [T, D] by a Sinkhorn-balanced plan (training) or top-k (inference)."""
        logits = self.logits_of(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        top_i = torch.topk(probs, self.top_k, dim=-1).indices
        if self.training:
            with torch.no_grad():
                real = (
                    torch.arange(x.shape[0], device=x.device)
                    if mask is None
                    else mask.nonzero()[:, 0]
                )
                if real.numel() > 0:
                    if self.cfg.sinkhorn_tol is None:
                        plan = sinkhorn_log(logits.detach()[real], self.cfg.sinkhorn_iters)
                    else:
                        plan = sinkhorn_tolerance(
                            logits.detach()[real],
                            self.cfg.sinkhorn_tol,
                            self.cfg.sinkhorn_max_iters,
                        )
                    top_i = top_i.clone()
                    top_i[real] = torch.topk(plan, self.top_k, dim=-1).indices
        if self.top_k == 1 and self.cfg.sinkhorn_k1_weight == "sigmoid":
            top_w = torch.sigmoid(logits.float()).gather(1, top_i)
        else:
            top_w = probs.gather(1, top_i)
        if self.cfg.norm_topk_prob and self.top_k > 1:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        top_w, dropped, cmap = self.apply_capacity(top_i, top_w, mask, rows=rows)
        return RoutingResult(
            expert_ids=top_i,
            weights=top_w.to(x.dtype),
            logits=logits,
            aux={},
            dropped=dropped,
            scores=probs,
            capacity_map=cmap,
        )


class DeepSeekRouter(Router):
    """DeepSeek-V3 router (Eq. 12-16, Sec. 2.1.2); aux: seq_aux (Eq. 17-20 over the flat batch).

    Computed in float32 like transformers' `DeepseekV3TopkRouter`: s = sigmoid(x W^T);
    selection uses s + b (`e_score_correction_bias` buffer) restricted to the `topk_group`
    groups (of `n_group`) with the largest sum of their top-2 biased scores
    (cfg.group_score="top2"; "topk_sum": of their top top_k // topk_group, Megatron-Core's
    `group_limited_topk`); weights are the
    unbiased s of the chosen experts, divided by their sum (+1e-20) if cfg.norm_topk_prob,
    times cfg.routed_scaling_factor. Slots are ordered by biased score (transformers returns
    them unsorted; the set is the same). `update_bias(counts)` is the aux-loss-free update.

    seq_aux: `sequence_balance_loss` of the normalised affinities over the chosen experts
    (cfg.seq_aux_choice="routed") or the plain top-k of the unbiased affinities, no groups
    ("topk", Megatron's `compute_routing_scores_for_aux_loss`); over the flat batch as one
    sequence (cfg.seq_aux_length="flat"), or per batch row (`rows`) with each row's own
    length ("own") or Megatron's n_valid / B for every row ("mean").
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        per_group = cfg.num_experts // cfg.n_group
        if cfg.top_k > cfg.topk_group * per_group:
            raise ConfigError(
                f"MoEConfig.top_k={cfg.top_k}: must be <= topk_group*num_experts/n_group = "
                f"{cfg.topk_group}*{per_group} (experts reachable in the kept groups)"
            )
        self.gate = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts))

    def route(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None,
        mask: torch.Tensor | None,
        rows: int | None,
    ) -> RoutingResult:
        """Route x [T, D] by sigmoid affinity with group limit and selection bias."""
        logits = F.linear(self.jitter(x).float(), self.gate.weight.float())
        check_logits_finite(logits, type(self).__name__)
        scores = logits.sigmoid()
        choice = scores.detach() + self.e_score_correction_bias.float()
        G = self.cfg.n_group
        if G > 1:
            T, E = choice.shape
            grouped = choice.view(T, G, E // G)
            n_top = (
                min(2, E // G)
                if self.cfg.group_score == "top2"
                else self.top_k // self.cfg.topk_group
            )
            group_scores = grouped.topk(n_top, dim=-1).values.sum(dim=-1)
            group_idx = torch.topk(group_scores, self.cfg.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter(
                1, group_idx, True
            )
            choice = choice.masked_fill(~group_mask.repeat_interleave(E // G, dim=1), float("-inf"))
        top_i = torch.topk(choice, self.top_k, dim=-1).indices
        top_w = scores.gather(1, top_i)
        if self.cfg.norm_topk_prob:
            top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
        top_w = top_w * self.cfg.routed_scaling_factor
        top_w, dropped, cmap = self.apply_capacity(top_i, top_w, mask, rows=rows)
        aux = {"seq_aux": self.seq_aux(scores, top_i, mask, rows)}
        return RoutingResult(
            expert_ids=top_i,
            weights=top_w.to(x.dtype),
            logits=logits,
            aux=aux,
            dropped=dropped,
            scores=scores,
            capacity_map=cmap,
        )

    def seq_aux(
        self,
        scores: torch.Tensor,
        top_i: torch.Tensor,
        mask: torch.Tensor | None,
        rows: int | None,
    ) -> torch.Tensor:
        """The sequence-wise balance loss under cfg.seq_aux_choice / cfg.seq_aux_length."""
        ids = top_i
        if self.cfg.seq_aux_choice == "topk":
            ids = torch.topk(scores.detach(), self.top_k, dim=-1).indices
        if self.cfg.seq_aux_length == "flat":
            return sequence_balance_loss(scores, ids, self.num_experts, mask)
        R = rows if rows is not None else 1
        T, E = scores.shape
        m = None if mask is None else mask.reshape(R, T // R)
        return sequence_balance_loss(
            scores.reshape(R, T // R, E),
            ids.reshape(R, T // R, -1),
            self.num_experts,
            m,
            length=self.cfg.seq_aux_length,
        )

    def selection_bias_buffer(self) -> torch.Tensor | None:
        """The `e_score_correction_bias` buffer (transformers' name)."""
        return self.e_score_correction_bias


ROUTERS: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "noisy_topk": NoisyTopKRouter,
    "switch": SwitchRouter,
    "gshard": GShardRouter,
    "expert_choice": ExpertChoiceRouter,
    "hash": HashRouter,
    "sinkhorn": SinkhornRouter,
    "deepseek": DeepSeekRouter,
}


def build_router(cfg: MoEConfig) -> Router:
    """Instantiate the router named by cfg.router."""
    try:
        cls = ROUTERS[cfg.router]
    except KeyError:
        raise ConfigError(
            f"MoEConfig.router={cfg.router!r} has no implementation; available: {sorted(ROUTERS)}"
        ) from None
    return cls(cfg)
