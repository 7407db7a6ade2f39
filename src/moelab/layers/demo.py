"""Layers demo: an MoEBlock for every router in ROUTERS, one forward+backward on random tokens,
and a rich table of routing statistics and balancing losses per router.

Losses shown are computed uniformly from each RoutingResult with `moelab.layers.losses`
(Switch/transformers load-balancing loss, ST-MoE z-loss), so routers can be compared; a second
table lists each router's own `aux` terms and its forward+backward time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from moelab.errors import ConfigError
from moelab.layers.config import ROUTER_TYPES, MoEConfig
from moelab.layers.losses import cv_squared, load_balancing_loss, router_z_loss
from moelab.layers.moe import MoEBlock
from moelab.layers.types import RoutingResult


@dataclass
class RouterStats:
    """One row of the demo table."""

    router: str
    top_k: int
    tokens_per_expert_min: int
    tokens_per_expert_max: int
    dropped_slot_share: float | None  # None for expert choice (unused slots are not drops)
    tokenless_share: float  # share of tokens that no expert computes
    experts_per_token_mean: float
    experts_per_token_min: int
    experts_per_token_max: int
    load_balancing: float
    z_loss: float
    cv2: float
    load_entropy: float  # entropy of the expert load distribution / log E (1 = balanced)
    router_grad_norm: float
    ms: float
    aux: dict[str, float]


def demo_config(
    router: str, d_model: int, experts: int, top_k: int, vocab_size: int, seed: int
) -> MoEConfig:
    """A small MoEConfig for `router`, with the settings that router needs (k, capacity, groups)."""
    extra: dict = {}
    k = top_k
    if router == "switch":
        k, extra = 1, {"capacity_factor": 1.25}
    elif router == "gshard":
        if experts < 2:
            raise ConfigError(f"layers demo: experts={experts}: gshard needs at least 2 experts")
        k, extra = 2, {"capacity_factor": 1.25, "capacity_convention": "megatron"}
    elif router == "deepseek":
        n_group = 2 if experts % 2 == 0 and experts >= 4 else 1
        per_group = experts // n_group
        topk_group = min(n_group, max(1, math.ceil(k / per_group)))
        extra = {"n_group": n_group, "topk_group": topk_group, "bias_update_rate": 1e-3}
    elif router == "hash":
        extra = {"vocab_size": vocab_size}
    return MoEConfig(
        d_model=d_model,
        d_ff=2 * d_model,
        num_experts=experts,
        top_k=k,
        router=router,
        seed=seed,
        **extra,
    )


def routing_stats(router: str, cfg: MoEConfig, r: RoutingResult) -> dict:
    """Load, drop and loss statistics of one RoutingResult."""
    E = r.num_experts
    counts = r.expert_counts()
    active = r.active_mask()
    per_token = active.sum(dim=1)
    p = counts.float() / counts.sum().clamp_min(1)
    ent = float(-(p * p.clamp_min(1e-12).log()).sum() / math.log(E)) if E > 1 else 1.0
    dropped = None
    if router != "expert_choice":
        dropped = 0.0 if r.dropped is None else float(r.dropped.float().mean())
    k_lb = cfg.top_k if router != "expert_choice" else min(cfg.top_k, E)
    with torch.no_grad():
        lb = float(load_balancing_loss(r.logits.detach(), E, k_lb))
        z = float(router_z_loss(r.logits.detach()))
    return {
        "tokens_per_expert_min": int(counts.min()),
        "tokens_per_expert_max": int(counts.max()),
        "dropped_slot_share": dropped,
        "tokenless_share": float((per_token == 0).float().mean()),
        "experts_per_token_mean": float(per_token.float().mean()),
        "experts_per_token_min": int(per_token.min()),
        "experts_per_token_max": int(per_token.max()),
        "load_balancing": lb,
        "z_loss": z,
        "cv2": float(cv_squared(counts.float())),
        "load_entropy": ent,
        "aux": {name: float(v.detach()) for name, v in r.aux.items()},
    }


def run_layers_demo(
    tokens: int = 512,
    d_model: int = 64,
    experts: int = 8,
    top_k: int = 2,
    seed: int = 0,
    device: str = "cpu",
    console: Console | None = None,
) -> list[RouterStats]:
    """Build an MoEBlock per router type, run forward+backward on random tokens, print a table."""
    if tokens < 1 or d_model < 1 or experts < 1:
        raise ConfigError(
            f"layers demo: tokens={tokens}, d_model={d_model}, experts={experts} must all be >= 1"
        )
    if not 1 <= top_k <= experts:
        raise ConfigError(f"layers demo: top_k={top_k} must be in [1, experts={experts}]")
    console = console or Console()
    vocab_size = max(4 * experts, 64)
    rows: list[RouterStats] = []
    for router in ROUTER_TYPES:
        if router == "gshard" and experts < 2:
            console.print("[yellow]gshard skipped: top-2 routing needs at least 2 experts[/]")
            continue
        torch.manual_seed(seed)
        cfg = demo_config(router, d_model, experts, top_k, vocab_size, seed)
        block = MoEBlock(cfg).to(device).train()
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(tokens, d_model, generator=gen).to(device)
        ids = torch.randint(0, vocab_size, (tokens,), generator=gen).to(device)
        t0 = time.perf_counter()
        y, r = block(x, token_ids=ids)
        loss = y.pow(2).mean() + 0.01 * sum(r.aux.values(), torch.zeros((), device=device))
        loss.backward()
        ms = (time.perf_counter() - t0) * 1e3
        grads = [p.grad for n, p in block.router.named_parameters() if p.grad is not None]
        gnorm = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads))) if grads else 0.0
        if router == "deepseek":
            block.router.update_bias(r.expert_counts())
        rows.append(
            RouterStats(
                router=router,
                top_k=r.top_k,
                router_grad_norm=gnorm,
                ms=ms,
                **routing_stats(router, cfg, r),
            )
        )
    console.print(render_table(rows, tokens, d_model, experts, top_k))
    console.print(render_aux_table(rows))
    return rows


def render_table(
    rows: list[RouterStats], tokens: int, d_model: int, experts: int, top_k: int
) -> Table:
    """The rich table of per-router statistics."""
    t = Table(
        title=f"MoE routers: {tokens} random tokens, d_model {d_model}, E {experts}, k {top_k}",
        caption="tok/E = tokens per expert; drop = capacity-dropped slots; none = tokens with no "
        "expert; LB = transformers load-balancing loss (k if uniform); z = router z-loss; "
        "H = load entropy / log E; switch k=1 cf 1.25, gshard k=2 cf 1.25 (megatron), "
        "others dropless; expert_choice c = ceil(T*k/E)",
    )
    headers = ("router", "k", "tok/E", "drop%", "none%", "E/tok", "LB", "z", "CV²", "H", "|∇gate|")
    for col in headers:
        t.add_column(col, justify="left" if col == "router" else "right")
    for s in rows:
        drop = "—" if s.dropped_slot_share is None else f"{100 * s.dropped_slot_share:.1f}"
        t.add_row(
            s.router,
            str(s.top_k),
            f"{s.tokens_per_expert_min}–{s.tokens_per_expert_max}",
            drop,
            f"{100 * s.tokenless_share:.1f}",
            f"{s.experts_per_token_mean:.2f} ({s.experts_per_token_min}–{s.experts_per_token_max})",
            f"{s.load_balancing:.3f}",
            f"{s.z_loss:.2f}",
            f"{s.cv2:.4f}",
            f"{s.load_entropy:.3f}",
            f"{s.router_grad_norm:.1e}",
        )
    return t


def render_aux_table(rows: list[RouterStats]) -> Table:
    """The routers' own auxiliary terms and forward+backward time."""
    t = Table(title="router aux terms (raw, no coefficient) and forward+backward time")
    t.add_column("router")
    t.add_column("aux")
    t.add_column("fwd+bwd ms", justify="right")
    for s in rows:
        aux = ", ".join(f"{k}={v:.4g}" for k, v in s.aux.items()) or "— (balanced by design)"
        t.add_row(s.router, aux, f"{s.ms:.1f}")
    return t
