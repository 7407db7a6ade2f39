"""Routing, capacity and loss conventions against stored references (issue 16).

Fixtures in tests/layers/fixtures/*.npz were made by tools/make_routing_fixtures.py with
megatron-core 0.16.1 (TopKRouter / moe_utils), transformers (Switch), lucidrains'
mixture-of-experts 0.2.3 and st-moe-pytorch 0.1.8; these tests need none of them installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moelab.errors import ConfigError, InputError
from moelab.layers.config import MoEConfig
from moelab.layers.losses import (
    load_balancing_loss,
    megatron_load_balancing_loss,
    router_z_loss,
    row_balance_loss,
    sequence_balance_loss,
)
from moelab.layers.moe import MoEBlock
from moelab.layers.routing import build_router, expert_capacity

FIX = Path(__file__).parent / "fixtures"
TOL = {"rtol": 1e-6, "atol": 1e-6}  # float32 values up to ~30 (z-loss): relative 1e-6 too


def load(name: str) -> dict[str, np.ndarray]:
    """One fixture as a dict of arrays."""
    with np.load(FIX / f"{name}.npz") as f:
        return {k: f[k] for k in f.files}


def t(a: np.ndarray) -> torch.Tensor:
    """numpy -> torch."""
    return torch.from_numpy(np.ascontiguousarray(a))


def router_with(cfg: MoEConfig, W: np.ndarray, bias: np.ndarray | None = None):
    """A moelab router whose gate weight is W [E, D] (and DeepSeek bias)."""
    r = build_router(cfg)
    with torch.no_grad():
        r.gate.weight.copy_(t(W))
        if bias is not None:
            r.selection_bias_buffer().copy_(t(bias))
    return r


def dense(res, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, E], computed map [T, E]) of a RoutingResult."""
    T = res.expert_ids.shape[0]
    active = res.active_mask()
    w = torch.zeros(T, E).scatter(1, res.expert_ids, res.weights.detach().float() * active)
    m = torch.zeros(T, E, dtype=torch.bool).scatter(1, res.expert_ids, active)
    return w, m


# ---------------------------------------------------------------- group-limited routing


@pytest.mark.parametrize("i", [0, 1, 2])
def test_group_topk_sum_matches_megatron(i):
    f = load("megatron_group")
    E, k, G, g = (int(v) for v in f["cases"][i])
    cfg = MoEConfig(
        d_model=16,
        num_experts=E,
        top_k=k,
        router="deepseek",
        n_group=G,
        topk_group=g,
        routed_scaling_factor=float(f["scaling"]),
        convention="megatron",
    )
    assert cfg.group_score == "topk_sum"
    res = router_with(cfg, f[f"W_{i}"], f[f"bias_{i}"]).eval()(t(f[f"x_{i}"]))
    w, m = dense(res, E)
    assert torch.equal(m, t(f[f"map_{i}"]))
    torch.testing.assert_close(w, t(f[f"probs_{i}"]), **TOL)


def test_group_top2_differs_from_megatron_on_e32_k4():
    f = load("megatron_group")
    cfg = MoEConfig(d_model=16, num_experts=32, top_k=4, router="deepseek", n_group=4)
    cfg_hf = MoEConfig(**{**cfg.to_dict(), "routed_scaling_factor": float(f["scaling"])})
    _, m = dense(router_with(cfg_hf, f["W_0"], f["bias_0"]).eval()(t(f["x_0"])), 32)
    changed = int((m != t(f["map_0"])).any(dim=1).sum())
    assert changed > 0  # the issue saw 24 of 80 tokens change on its inputs (here 29)


def test_group_score_validation():
    with pytest.raises(ConfigError, match="group_score"):
        MoEConfig(
            num_experts=8,
            top_k=2,
            router="deepseek",
            n_group=4,
            topk_group=4,
            group_score="topk_sum",
        )
    with pytest.raises(ConfigError, match="group_score"):
        MoEConfig(group_score="sum")


# ---------------------------------------------------------------- token dropping


@pytest.mark.parametrize("i", range(6))
def test_drop_policies_match_megatron(i):
    f = load("megatron_drop")
    E, k, cf = int(f[f"E_{i}"]), int(f[f"k_{i}"]), float(f[f"cf_{i}"])
    pad = bool(f[f"pad_{i}"])
    cfg = MoEConfig(
        d_model=16,
        num_experts=E,
        top_k=k,
        capacity_factor=cf,
        drop_policy=str(f[f"policy_{i}"]),
        pad_to_capacity=pad,
        convention="megatron",
    )
    r = router_with(cfg, f[f"W_{i}"]).eval()
    T = f[f"x_{i}"].shape[0]
    assert r.capacity(T, k) == int(f[f"capacity_{i}"])
    res = r(t(f[f"x_{i}"]))
    w, m = dense(res, E)
    ref_map, ref_probs = t(f[f"map_{i}"]), t(f[f"probs_{i}"])
    torch.testing.assert_close(w, ref_probs, **TOL)
    if pad:
        assert torch.equal(res.capacity_map, ref_map)
        assert torch.equal(m, ref_map & (ref_probs > 0))
    else:
        assert res.capacity_map is None
        assert torch.equal(m, ref_map)


def test_megatron_position_is_not_slot_order():
    f = load("megatron_drop")
    i = 2
    kw = dict(d_model=16, num_experts=8, top_k=2, capacity_factor=1.0)
    slot = router_with(MoEConfig(**kw, capacity_convention="megatron"), f[f"W_{i}"]).eval()
    _, m = dense(slot(t(f[f"x_{i}"])), 8)
    assert not torch.equal(m, t(f[f"map_{i}"]))


def test_capacity_rules_match_references():
    table = load("capacity")["table"]
    for T, E, k, cf, mn, meg, meg_min, luc, stm in table:
        T, E, k, mn = int(T), int(E), int(k), int(mn)
        assert expert_capacity(T, E, k, cf, "megatron") == meg
        assert expert_capacity(T, E, k, cf, "megatron", min_capacity=mn) == meg_min
        # lucidrains / st-moe: floor(S*cf/E) (clipped to S), at least 4
        got = expert_capacity(T, E, 1, cf, "switch", rounding="floor", min_capacity=mn)
        assert got == luc == stm
    # the case: T=10, E=8, cf=0.5 gives 1 (moelab's ceil) vs 4 (min_capacity floor)
    assert expert_capacity(10, 8, 1, 0.5) == 1
    cfg = MoEConfig(
        num_experts=8, top_k=2, router="gshard", capacity_factor=0.5, convention="lucidrains"
    )
    assert build_router(cfg).capacity(10, 2) == 4


def test_drop_options_validation():
    with pytest.raises(ConfigError, match="pad_to_capacity"):
        MoEConfig(capacity_factor=1.0, pad_to_capacity=True)
    with pytest.raises(ConfigError, match="drop_policy"):
        MoEConfig(capacity_factor=1.0, drop_policy="probs", capacity_scope="row")
    with pytest.raises(ConfigError, match="min_capacity"):
        MoEConfig(min_capacity=0)
    with pytest.raises(ConfigError, match="convention"):
        MoEConfig(convention="deepspeed")


# ---------------------------------------------------------------- losses (with padding)


def test_aux_and_z_loss_match_megatron_with_padding():
    f = load("megatron_losses")
    E, k = int(f["E"]), int(f["k"])
    attn = t(f["attention_mask"])
    logits = torch.nn.functional.linear(t(f["x_soft"]), t(f["W_soft"]))
    got = megatron_load_balancing_loss(logits, E, k, padding_mask=~attn)
    torch.testing.assert_close(got, torch.tensor(float(f["aux_pad"])), **TOL)
    got = megatron_load_balancing_loss(logits, E, k)
    torch.testing.assert_close(got, torch.tensor(float(f["aux_full"])), **TOL)
    for z in (
        router_z_loss(logits, padding_mask=~attn),
        router_z_loss(logits, attention_mask=attn),
    ):
        torch.testing.assert_close(z, torch.tensor(float(f["z_pad"])), **TOL)
        torch.testing.assert_close(z, torch.tensor(float(f["z_func_pad"])), **TOL)
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(float(f["z_full"])), **TOL)
    # transformers' form (k under uniform routing) is the Megatron value times k
    lb = load_balancing_loss(logits, E, k, attention_mask=attn)
    torch.testing.assert_close(lb / k, torch.tensor(float(f["aux_pad"])), **TOL)


def seq_aux_block(f: dict, **kw) -> MoEBlock:
    """MoEBlock with the fixture's sigmoid DeepSeek router."""
    cfg = MoEConfig(
        d_model=16,
        num_experts=int(f["E"]),
        top_k=int(f["k"]),
        router="deepseek",
        n_group=int(f["n_group"]),
        topk_group=int(f["topk_group"]),
        **kw,
    )
    block = MoEBlock(cfg)
    with torch.no_grad():
        block.router.gate.weight.copy_(t(f["W_sig"]))
        block.router.e_score_correction_bias.copy_(t(f["bias_sig"]))
    return block


def test_seq_aux_matches_megatron_with_padding():
    f = load("megatron_losses")
    B, S = int(f["B"]), int(f["S"])
    attn = t(f["attention_mask"])
    x = t(f["x_sig"]).reshape(B, S, 16)
    block = seq_aux_block(f, convention="megatron")
    _, res = block(x, padding_mask=~attn)
    w, m = dense(res, int(f["E"]))
    assert torch.equal(m, t(f["map_sig"]))  # routing itself: bias + groups, as Megatron
    torch.testing.assert_close(w, t(f["probs_sig"]), **TOL)
    torch.testing.assert_close(res.aux["seq_aux"], torch.tensor(float(f["seq_aux_pad"])), **TOL)
    _, res = block(x)
    torch.testing.assert_close(res.aux["seq_aux"], torch.tensor(float(f["seq_aux_full"])), **TOL)


def test_seq_aux_own_length_differs_with_padding():
    f = load("megatron_losses")
    B, S, E, k = int(f["B"]), int(f["S"]), int(f["E"]), int(f["k"])
    attn = t(f["attention_mask"])
    x = t(f["x_sig"]).reshape(B, S, 16)
    _, own = seq_aux_block(f, seq_aux_length="own", seq_aux_choice="topk")(x, attention_mask=attn)
    assert abs(float(own.aux["seq_aux"].detach()) - float(f["seq_aux_pad"])) > 1e-3
    # the loss function directly: length="mean" is Megatron's, "own" each row's length
    s = own.scores.reshape(B, S, E)
    ids = torch.topk(s, k, dim=-1).indices
    mean = sequence_balance_loss(s, ids, E, attention_mask=attn, length="mean")
    torch.testing.assert_close(mean, torch.tensor(float(f["seq_aux_pad"])), **TOL)
    torch.testing.assert_close(
        sequence_balance_loss(s, ids, E, attention_mask=attn), own.aux["seq_aux"]
    )


def test_seq_aux_default_is_flat_routed():
    f = load("megatron_losses")
    B, S, E = int(f["B"]), int(f["S"]), int(f["E"])
    x = t(f["x_sig"]).reshape(B, S, 16)
    _, res = seq_aux_block(f)(x)
    ref = sequence_balance_loss(res.scores, res.expert_ids, E)
    torch.testing.assert_close(res.aux["seq_aux"], ref)


# ---------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_sinkhorn_matches_megatron(k, training):
    f = load("megatron_sinkhorn")
    cfg = MoEConfig(d_model=16, num_experts=8, top_k=k, router="sinkhorn", convention="megatron")
    assert cfg.sinkhorn_tol == 1e-4 and cfg.norm_topk_prob is False
    r = router_with(cfg, f[f"W_{k}"]).train(training)
    w, m = dense(r(t(f[f"x_{k}"])), 8)
    tag = "train" if training else "eval"
    assert torch.equal(m, t(f[f"map_{tag}_{k}"]))
    torch.testing.assert_close(w, t(f[f"probs_{tag}_{k}"]), **TOL)


def test_sinkhorn_k1_softmax_default_differs():
    f = load("megatron_sinkhorn")
    cfg = MoEConfig(d_model=16, num_experts=8, top_k=1, router="sinkhorn")
    w, _ = dense(router_with(cfg, f["W_1"]).eval()(t(f["x_1"])), 8)
    assert float((w - t(f["probs_eval_1"])).abs().max()) > 0.1


# ---------------------------------------------------------------- per-row capacity, balance


def switch_block(f: dict, **kw) -> MoEBlock:
    """MoEBlock with the fixture's Switch router weight."""
    E = f["W"].shape[0]
    cfg = MoEConfig(
        d_model=16,
        num_experts=E,
        top_k=1,
        router="switch",
        expert_capacity=int(f["expert_capacity"]),
        expert_act="relu",
        **kw,
    )
    block = MoEBlock(cfg).eval()
    with torch.no_grad():
        block.router.gate.weight.copy_(t(f["W"]))
    return block


def test_switch_row_capacity_matches_transformers():
    f = load("hf_switch")
    x = t(f["x"])
    _, res = switch_block(f, convention="hf")(x)
    E = f["W"].shape[0]
    w, m = dense(res, E)
    ref = t(f["kept_onehot"]).bool()
    assert torch.equal(m, ref)
    torch.testing.assert_close(w.sum(-1), t(f["weight"]) * ref.any(-1), **TOL)
    torch.testing.assert_close(res.aux["load_balancing"], torch.tensor(float(f["balance"])), **TOL)
    torch.testing.assert_close(res.aux["z_loss"], torch.tensor(float(f["z_loss"])), **TOL)
    # the flat batch (default) keeps a different set
    _, flat = switch_block(f)(x)
    changed = int((dense(flat, E)[1] != ref).any(-1).sum())
    assert changed > 0  # the issue saw 6 of 48 tokens change kept status on its inputs


@pytest.mark.parametrize("convention", ["lucidrains", "st_moe"])
def test_gshard_rows_match_lucidrains_and_st_moe(convention):
    f = load("gshard_rows")
    E = f["W"].shape[0]
    cfg = MoEConfig(
        d_model=16,
        num_experts=E,
        top_k=2,
        router="gshard",
        capacity_factor=float(f["cf"]),
        convention=convention,
    )
    block = MoEBlock(cfg).eval()
    with torch.no_grad():
        block.router.gate.weight.copy_(t(f["W"]))
    _, res = block(t(f["x"]))
    w, _ = dense(res, E)
    torch.testing.assert_close(w, t(f[f"weights_{convention}"]), **TOL)
    ref_loss = torch.tensor(float(f[f"loss_{convention}"]))
    torch.testing.assert_close(res.aux["load_balancing"], ref_loss, **TOL)
    if convention == "st_moe":
        torch.testing.assert_close(res.aux["z_loss"], torch.tensor(float(f["z_st_moe"])), **TOL)


def test_st_moe_and_lucidrains_losses_differ_under_drops():
    f = load("gshard_rows")
    assert abs(float(f["loss_st_moe"]) - float(f["loss_lucidrains"])) > 1e-3
    logits = torch.nn.functional.linear(t(f["x"]), t(f["W"]))
    first = logits.argmax(-1).reshape(-1)
    got = row_balance_loss(logits, first, logits.shape[-1])
    torch.testing.assert_close(got, torch.tensor(float(f["loss_lucidrains"])), **TOL)


# ---------------------------------------------------------------- masks by explicit name


def test_inverted_masks_are_refused():
    f = load("megatron_losses")
    attn = t(f["attention_mask"])
    logits = torch.nn.functional.linear(t(f["x_soft"]), t(f["W_soft"]))
    with pytest.raises(InputError, match="start of every row"):
        router_z_loss(logits, attention_mask=~attn)  # a Megatron padding mask, misnamed
    with pytest.raises(InputError, match="every token as padding"):
        router_z_loss(logits, padding_mask=torch.ones_like(attn))  # attention_mask, misnamed
    with pytest.raises(InputError, match="only one"):
        router_z_loss(logits, attention_mask=attn, padding_mask=~attn)
    with pytest.raises(InputError, match="0/1"):
        router_z_loss(logits, attention_mask=attn.float() * 2)
    left = attn.flip(1)  # a left-padded batch is fine when said so
    torch.testing.assert_close(
        router_z_loss(logits, attention_mask=left, padding_side="left"),
        router_z_loss(logits, left.reshape(-1)),
    )
    block = MoEBlock(MoEConfig(d_model=16, num_experts=16, top_k=4))
    x = t(f["x_soft"]).reshape(4, 12, 16)
    with pytest.raises(InputError, match="start of every row"):
        block(x, attention_mask=~attn)
    with pytest.raises(InputError, match="every token as padding"):
        block.router(x.reshape(-1, 16), padding_mask=torch.ones(48, dtype=torch.bool))
    _, a = block(x, attention_mask=attn)
    _, b = block(x, padding_mask=~attn)
    _, c = block(x, mask=attn)
    torch.testing.assert_close(a.aux["z_loss"], c.aux["z_loss"])
    torch.testing.assert_close(b.aux["z_loss"], c.aux["z_loss"])


def test_convention_preset_keeps_explicit_values():
    cfg = MoEConfig(capacity_factor=1.0, convention="megatron", drop_policy="position")
    assert cfg.drop_policy == "position" and cfg.capacity_convention == "megatron"
    again = MoEConfig.from_dict(cfg.to_dict())
    assert again == cfg
    plain = MoEConfig()
    assert (plain.drop_policy, plain.group_score, plain.capacity_scope) == ("slot", "top2", "batch")
