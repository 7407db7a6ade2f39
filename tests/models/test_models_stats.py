"""stats(): hand-computed counts, counted parameters, calculator agreement, dense baseline FLOPs."""

from __future__ import annotations

import pytest

from moelab.layers.config import MoEConfig
from moelab.models import MoETransformer, MoETransformerConfig, dense_baseline
from moelab.models.calc import count, from_model_config


def small(**kw) -> MoETransformerConfig:
    moe_kw = {"d_model": 32, "d_ff": 16, "num_experts": 4, "top_k": 2, **kw.pop("moe_kw", {})}
    base = dict(
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        max_seq_len=24,
        moe=MoEConfig(**moe_kw),
    )
    base.update(kw)
    return MoETransformerConfig(**base)


def test_stats_match_hand_computation() -> None:
    cfg = small(first_k_dense=1, moe_kw={"num_shared_experts": 1, "shared_gate": True})
    s = MoETransformer(cfg).stats()
    # parameters
    embed = 50 * 32  # tied with the LM head
    attn = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32  # q, k, v (2 kv heads x 8), o
    norms = 2 * 32
    dense = 3 * 32 * 48  # SwiGLU gate, up, down
    expert = 3 * 32 * 16
    moe = 32 * 4 + 4 * expert + expert + 32  # router, 4 routed, 1 shared, shared gate
    total = embed + 2 * (attn + norms) + dense + moe + 32  # + final norm
    assert total == 20352
    assert s.total_params == total
    assert s.active_params == total - 2 * expert  # 2 of 4 routed experts idle per token
    assert s.embedding_params == embed and s.routed_expert_params == 4 * expert
    # FLOPs per token (2 per multiply-add), attention over 24 positions
    head = 2 * 32 * 50
    per_layer_attn = 2 * attn + 2 * 2 * 24 * 4 * 8
    moe_flops = 2 * 32 * 4 + 2 * 2 * expert + 2 * expert + 2 * 32
    fwd = head + 2 * per_layer_attn + 2 * dense + moe_flops
    assert fwd == 40384
    assert s.flops_per_token_fwd == fwd
    assert s.flops_per_token_train == 3 * fwd
    assert s.router_flops_per_token == 2 * 32 * 4
    assert s.seq_len == 24
    assert MoETransformer(cfg).stats(seq_len=48).flops_per_token_fwd == fwd + 2 * (
        2 * 2 * 24 * 4 * 8
    )


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"tie_embeddings": False},
        {"moe_every": 2, "n_layers": 4},
        {"first_k_dense": 1, "moe_kw": {"num_shared_experts": 2, "shared_gate": True}},
        {"moe_kw": {"router_bias": True, "expert_act": "gelu"}, "dense_act": "gelu"},
        {"moe_kw": {"expert_act": "gelu"}, "first_k_dense": 1},  # SwiGLU dense, GELU experts
        {"moe": None},
    ],
)
def test_stats_agree_with_counted_params_and_calculator(kw: dict) -> None:
    cfg = small(**kw)
    model = MoETransformer(cfg)
    s = model.stats()
    counted = sum(p.numel() for p in model.parameters())
    assert s.total_params == counted
    idle = sum(
        (b.ffn.cfg.num_experts - b.ffn.cfg.top_k) * b.ffn.experts.gate_up_proj[0].numel()
        + (b.ffn.cfg.num_experts - b.ffn.cfg.top_k) * b.ffn.experts.down_proj[0].numel()
        for b in model.blocks
        if b.is_moe
    )
    assert s.active_params == counted - idle
    total, active, embedding, experts, flops = count(
        from_model_config(cfg), seq_len=cfg.max_seq_len
    )
    assert (total, active, embedding, experts, flops) == (
        s.total_params,
        s.active_params,
        s.embedding_params,
        s.routed_expert_params,
        s.flops_per_token_fwd,
    )


@pytest.mark.parametrize("shared", [0, 1])
def test_dense_baseline_has_equal_active_flops(shared: int) -> None:
    cfg = small(n_layers=3, moe_kw={"num_shared_experts": shared, "top_k": 2})
    moe = MoETransformer(cfg).stats()
    dense_cfg = dense_baseline(cfg)
    dense = MoETransformer(dense_cfg).stats()
    assert dense_cfg.d_ff == 2 * 16 + 16 * shared
    # identical except the routers (2*D*E FLOPs and D*E params per MoE layer)
    assert moe.flops_per_token_fwd - moe.router_flops_per_token == dense.flops_per_token_fwd
    assert moe.active_params - 3 * 32 * 4 == dense.active_params
    assert moe.total_params > 1.3 * dense.total_params


def test_fine_grained_keeps_flops() -> None:
    coarse = small()
    fine = small(moe_kw={"num_experts": 8, "top_k": 4, "d_ff": 8})
    a, b = MoETransformer(coarse).stats(), MoETransformer(fine).stats()
    assert (
        a.flops_per_token_fwd - a.router_flops_per_token
        == b.flops_per_token_fwd - b.router_flops_per_token
    )
    assert (
        a.total_params - a.routed_expert_params
        == b.total_params - b.routed_expert_params - 2 * 32 * 4
    )


def test_hash_router_has_no_router_params_or_flops() -> None:
    cfg = small(moe_kw={"router": "hash", "vocab_size": 50})
    s = MoETransformer(cfg).stats()
    assert s.router_flops_per_token == 0
    assert s.total_params == count(from_model_config(cfg))[0] - 2 * 32 * 4
