"""Make the routing-convention reference fixtures in tests/layers/fixtures/*.npz (issue 16).

References (installed OUTSIDE the project venv, so the lock file is untouched):

    .venv/bin/pip install --target /tmp/refpkgs --no-deps megatron-core==0.16.1 einops \
        packaging st-moe-pytorch mixture-of-experts beartype CoLT5-attention local-attention \
        hyper-connections
    PYTHONPATH=/tmp/refpkgs .venv/bin/python tools/make_routing_fixtures.py

- megatron-core 0.16.1: `TopKRouter.routing` (the router itself, fed fixed logits) and
  `moe_utils` (`topk_routing_with_score_function`, `get_capacity`, `z_loss_func`), on CPU in a
  one-process gloo group. `TopKRouter` allocates its expert-bias buffers with
  `torch.cuda.current_device()`; this script points that at "cpu" (nothing else is patched).
- transformers (the project venv's version): `SwitchTransformersTop1Router` and Switch's
  `load_balancing_loss_func` / `router_z_loss_func`.
- mixture-of-experts 0.2.3 (lucidrains GShard `Top2Gating`, second_policy "all") and
  st-moe-pytorch 0.1.8 (`TopNGating`, top-2, threshold 1e-12 so every second choice routes).

Every fixture stores its seeded inputs (hidden states x, router weight W [E, D] with logits =
F.linear(x, W), masks) and the reference outputs. Layouts are moelab's: tokens flat
batch-major (T = B*S); Megatron's [S, B] layout is produced here by transposing.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

OUT = Path(__file__).resolve().parents[1] / "tests" / "layers" / "fixtures"


def versions() -> dict[str, np.ndarray]:
    """Reference package versions, stored in every fixture."""
    names = ("megatron-core", "transformers", "torch", "mixture-of-experts", "st-moe-pytorch")
    return {f"version_{n.replace('-', '_')}": np.array(md.version(n)) for n in names}


def save(name: str, **arrays: object) -> None:
    """Write one compressed fixture."""
    data = {
        k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
        for k, v in arrays.items()
    }
    data.update(versions())
    np.savez_compressed(OUT / f"{name}.npz", **data)


def megatron_setup() -> None:
    """One-process gloo group + megatron's parallel state (CPU)."""
    path = os.path.join(tempfile.mkdtemp(), "pg")
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    torch.cuda.current_device = lambda: "cpu"  # TopKRouter's buffers go to the CPU


def megatron_router(**kw: object):
    """A megatron-core TopKRouter built from TransformerConfig keywords."""
    from megatron.core.transformer.moe import moe_utils as mu
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=1,
        use_cpu_initialization=True,
        moe_aux_loss_coeff=kw.pop("moe_aux_loss_coeff", 0.0),
        **kw,
    )
    r = TopKRouter(cfg, pg_collection=mu.get_default_pg_collection())
    r.layer_number = 1
    return r.train()


def megatron_route(router, logits_sbe: torch.Tensor, padding_mask=None):
    """(probs [T', E], routing_map [T', E], tracked losses) of TopKRouter.routing."""
    from megatron.core.transformer.moe import moe_utils as mu

    mu.clear_aux_losses_tracker()
    lg = logits_sbe.clone().requires_grad_(True)
    probs, rmap = router.routing(lg, padding_mask=padding_mask)
    tracked = {k: float(v["values"][0]) for k, v in mu.get_moe_layer_wise_logging_tracker().items()}
    return probs.detach(), rmap, tracked


def seeded(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """Seeded standard-normal float32 tensor."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def sbe(flat: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """moelab flat [B*S, E] (batch-major) -> Megatron [S, B, E]."""
    return flat.reshape(B, S, -1).transpose(0, 1).contiguous()


def from_sb(t: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """Megatron flat [S*B, E] -> moelab flat [B*S, E]."""
    return t.reshape(S, B, -1).transpose(0, 1).reshape(B * S, -1)


def group_fixtures() -> None:
    """Group-limited sigmoid routing with expert bias: Megatron (topk_sum) and the full
    TopKRouter; shapes E=32 k=4 G=4 g=1, E=64 k=6 G=8 g=3, E=64 k=8 G=8 g=4."""
    cases = [(32, 4, 4, 1), (64, 6, 8, 3), (64, 8, 8, 4)]
    arrays: dict[str, object] = {"cases": np.array(cases)}
    D, T = 16, 80
    for i, (E, k, G, g) in enumerate(cases):
        x = seeded(100 + i, T, D)
        W = seeded(200 + i, E, D, scale=0.5)
        bias = seeded(300 + i, E, scale=0.05)
        router = megatron_router(
            num_moe_experts=E,
            moe_router_topk=k,
            moe_router_score_function="sigmoid",
            moe_router_num_groups=G,
            moe_router_group_topk=g,
            moe_router_topk_scaling_factor=2.5,
            moe_router_enable_expert_bias=True,
            moe_router_load_balancing_type="none",
        )
        router.expert_bias.copy_(bias)
        logits = F.linear(x, W)
        probs, rmap, _ = megatron_route(router, logits.reshape(T, 1, E))
        arrays.update({f"x_{i}": x, f"W_{i}": W, f"bias_{i}": bias})
        arrays.update({f"probs_{i}": probs, f"map_{i}": rmap})
    arrays["scaling"] = np.array(2.5)
    save("megatron_group", **arrays)


def drop_fixtures() -> None:
    """Megatron token dropping (probs / position, pad or not) for softmax top-k routing."""
    from megatron.core.transformer.moe import moe_utils as mu

    cases = [  # E, k, T, cf, policy, pad
        (8, 2, 64, 1.0, "probs", False),
        (8, 2, 64, 0.5, "probs", True),
        (8, 2, 64, 1.0, "position", False),
        (8, 2, 64, 0.75, "position", True),
        (64, 6, 96, 1.0, "probs", False),
        (64, 8, 96, 0.5, "position", False),
    ]
    arrays: dict[str, object] = {"n_cases": np.array(len(cases))}
    D = 16
    for i, (E, k, T, cf, policy, pad) in enumerate(cases):
        x = seeded(400 + i, T, D)
        W = seeded(500 + i, E, D, scale=0.7)
        router = megatron_router(
            num_moe_experts=E,
            moe_router_topk=k,
            moe_expert_capacity_factor=cf,
            moe_token_drop_policy=policy,
            moe_pad_expert_input_to_capacity=pad,
            moe_router_load_balancing_type="none",
        )
        probs, rmap, _ = megatron_route(router, F.linear(x, W).reshape(T, 1, E))
        arrays.update({f"x_{i}": x, f"W_{i}": W, f"probs_{i}": probs, f"map_{i}": rmap})
        arrays.update({f"E_{i}": E, f"k_{i}": k, f"cf_{i}": cf, f"policy_{i}": policy})
        arrays[f"pad_{i}"] = pad
        arrays[f"capacity_{i}"] = mu.get_capacity(T * k, E, cf)
    save("megatron_drop", **arrays)


def loss_fixtures() -> None:
    """Megatron aux (softmax) + z-loss and seq-aux (sigmoid, groups, bias) with padding."""
    from megatron.core.transformer.moe import moe_utils as mu

    B, S, D, E, k = 4, 12, 16, 16, 4
    lengths = torch.tensor([12, 7, 3, 10])
    attn = torch.arange(S)[None, :] < lengths[:, None]  # [B, S] True = real (right padding)
    pad_sb = (~attn).t().contiguous()  # Megatron [S, B] True = padding
    arrays: dict[str, object] = {"attention_mask": attn, "B": B, "S": S}
    # softmax router: aux_loss + z_loss, with and without padding
    x = seeded(600, B * S, D)
    W = seeded(601, E, D, scale=0.8)
    router = megatron_router(
        num_moe_experts=E,
        moe_router_topk=k,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1.0,
        moe_z_loss_coeff=1.0,
    )
    lg = sbe(F.linear(x, W), B, S)
    _, _, t_pad = megatron_route(router, lg, pad_sb)
    _, _, t_full = megatron_route(router, lg)
    arrays.update(x_soft=x, W_soft=W, k=k, E=E)
    arrays.update(aux_pad=t_pad["load_balancing_loss"], z_pad=t_pad["z_loss"])
    arrays.update(aux_full=t_full["load_balancing_loss"], z_full=t_full["z_loss"])
    arrays["z_func_pad"] = float(
        mu.z_loss_func(F.linear(x, W), 1.0, padding_mask=(~attn).reshape(-1))
    )
    # sigmoid DeepSeek-V3 router: seq_aux_loss with groups + bias (aux counts plain top-k)
    x2 = seeded(610, B * S, D)
    W2 = seeded(611, E, D, scale=0.8)
    bias = seeded(612, E, scale=0.2)
    router = megatron_router(
        num_moe_experts=E,
        moe_router_topk=k,
        moe_router_score_function="sigmoid",
        moe_router_num_groups=4,
        moe_router_group_topk=2,
        moe_router_enable_expert_bias=True,
        moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=1.0,
    )
    router.expert_bias.copy_(bias)
    # 0.16.1's _apply_expert_bias ANDs a [T, E] map with the flat [T] padding mask and fails
    # to broadcast; it only updates the bias token counts, so switch that update off (the
    # bias still enters the routing: expert_bias is passed to the score function).
    router.enable_expert_bias = False
    lg2 = sbe(F.linear(x2, W2), B, S)
    p_pad, m_pad, s_pad = megatron_route(router, lg2, pad_sb)
    _, _, s_full = megatron_route(router, lg2)
    arrays.update(x_sig=x2, W_sig=W2, bias_sig=bias, n_group=4, topk_group=2)
    arrays.update(seq_aux_pad=s_pad["seq_load_balancing_loss"])
    arrays.update(seq_aux_full=s_full["seq_load_balancing_loss"])
    arrays.update(probs_sig=from_sb(p_pad, B, S), map_sig=from_sb(m_pad, B, S))
    save("megatron_losses", **arrays)


def sinkhorn_fixtures() -> None:
    """Megatron sinkhorn routing (training and inference), k=1 and k=2."""
    arrays: dict[str, object] = {}
    T, D, E = 48, 16, 8
    for k in (1, 2):
        x = seeded(700 + k, T, D)
        W = seeded(710 + k, E, D, scale=1.5)
        router = megatron_router(
            num_moe_experts=E, moe_router_topk=k, moe_router_load_balancing_type="sinkhorn"
        )
        lg = F.linear(x, W).reshape(T, 1, E)
        p_tr, m_tr, _ = megatron_route(router, lg)
        router.eval()
        with torch.no_grad():
            p_ev, m_ev = router.routing(lg.clone())
        arrays.update({f"x_{k}": x, f"W_{k}": W, f"probs_train_{k}": p_tr, f"map_train_{k}": m_tr})
        arrays.update({f"probs_eval_{k}": p_ev, f"map_eval_{k}": m_ev})
    save("megatron_sinkhorn", **arrays)


def capacity_fixtures() -> None:
    """Capacities: Megatron get_capacity (with min_capacity) and the lucidrains / st-moe
    capacity read off their combine tensors' last dimension."""
    from megatron.core.transformer.moe import moe_utils as mu
    from mixture_of_experts.mixture_of_experts import Top2Gating
    from st_moe_pytorch.st_moe_pytorch import TopNGating

    rows = []  # T, E, k, cf, min_cap, megatron, megatron_min, lucidrains, st_moe
    for T, E, k, cf in [
        (10, 8, 2, 0.5),
        (64, 8, 2, 1.25),
        (37, 6, 1, 1.0),
        (100, 64, 8, 0.3),
        (48, 4, 1, 1.0),
        (10, 3, 1, 0.3),
    ]:
        torch.manual_seed(0)
        g1 = Top2Gating(8, E, second_policy_eval="all", capacity_factor_eval=cf).eval()
        g2 = TopNGating(8, E, top_n=2, capacity_factor_eval=cf).eval()
        x = torch.randn(1, T, 8)
        c1 = g1(x)[1].shape[-1]
        c2 = g2(x)[1].shape[-1]
        rows.append(
            [
                T,
                E,
                k,
                cf,
                4,
                mu.get_capacity(T * k, E, cf),
                mu.get_capacity(T * k, E, cf, min_capacity=4),
                c1,
                c2,
            ]
        )
    save("capacity", table=np.array(rows, dtype=np.float64))


def lucidrains_fixtures() -> None:
    """GShard per sequence: lucidrains Top2Gating (policy 'all') and st-moe TopNGating."""
    from mixture_of_experts.mixture_of_experts import Top2Gating
    from st_moe_pytorch.st_moe_pytorch import TopNGating

    B, S, D, E, cf = 3, 24, 16, 4, 1.0
    x = seeded(800, B, S, D)
    W = seeded(801, E, D, scale=1.5)
    g1 = Top2Gating(D, E, second_policy_eval="all", capacity_factor_eval=cf).eval()
    with torch.no_grad():
        g1.w_gating.copy_(W.t())
        _, combine1, loss1 = g1(x)
    g2 = TopNGating(D, E, top_n=2, threshold_train=1e-12, capacity_factor_train=cf).train()
    with torch.no_grad():
        g2.to_gates.weight.copy_(W)
        _, combine2, loss2, z2 = g2(x)
    save(
        "gshard_rows",
        x=x,
        W=W,
        cf=cf,
        weights_lucidrains=combine1.sum(-1).reshape(B * S, E),
        loss_lucidrains=float(loss1),
        weights_st_moe=combine2.sum(-1).reshape(B * S, E),
        loss_st_moe=float(loss2),
        z_st_moe=float(z2),
    )


def switch_fixtures() -> None:
    """transformers' SwitchTransformersTop1Router: capacity per sequence, loss per row."""
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers import modeling_switch_transformers as m

    B, S, D, E, cap = 4, 12, 16, 4, 3
    cfg = SwitchTransformersConfig(
        d_model=D, num_experts=E, expert_capacity=cap, router_jitter_noise=0.0
    )
    router = m.SwitchTransformersTop1Router(cfg).eval()
    x = seeded(900, B, S, D)
    W = seeded(901, E, D)
    with torch.no_grad():
        router.classifier.weight.copy_(W)
        index, probs, logits = router(x.clone())
    r_probs = F.softmax(logits, dim=-1)
    save(
        "hf_switch",
        x=x,
        W=W,
        expert_capacity=cap,
        kept_onehot=index.reshape(B * S, E),
        weight=probs.reshape(B * S),
        balance=float(m.load_balancing_loss_func(r_probs, logits.argmax(-1))),
        z_loss=float(m.router_z_loss_func(logits)),
    )


def main() -> None:
    """Write every fixture."""
    OUT.mkdir(parents=True, exist_ok=True)
    megatron_setup()
    group_fixtures()
    drop_fixtures()
    loss_fixtures()
    sinkhorn_fixtures()
    capacity_fixtures()
    lucidrains_fixtures()
    switch_fixtures()
    total = sum(p.stat().st_size for p in OUT.glob("*.npz"))
    print(f"wrote {len(list(OUT.glob('*.npz')))} fixtures, {total / 1024:.1f} kB in {OUT}")


if __name__ == "__main__":
    main()
