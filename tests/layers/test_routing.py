"""Routers: numerical equivalence with transformers' routers, per-router semantics, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moelab.errors import ConfigError, InputError, MoelabError
from moelab.layers.config import ROUTER_TYPES, MoEConfig
from moelab.layers.losses import load_balancing_loss
from moelab.layers.routing import (
    ROUTERS,
    DeepSeekRouter,
    ExpertChoiceRouter,
    GShardRouter,
    HashRouter,
    NoisyTopKRouter,
    SinkhornRouter,
    SwitchRouter,
    TopKRouter,
    balanced_hash_table,
    build_router,
    capacity_keep,
    expert_capacity,
    sinkhorn_log,
)

D = 32
ATOL = 1e-5


def make(router: str, **kw) -> nn.Module:
    """A router with random (non-zero) weights, in eval mode."""
    kw.setdefault("d_model", D)
    cfg = MoEConfig(router=router, **kw)
    torch.manual_seed(kw.get("seed", 0))
    r = build_router(cfg)
    return r.eval()


def sorted_by_id(ids: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row's (id, weight) pairs by id, for comparing unordered top-k sets."""
    order = ids.argsort(dim=-1)
    return ids.gather(1, order), w.gather(1, order)


# ---------------------------------------------------------------- transformers equivalence


def test_registry_covers_every_router_type():
    assert set(ROUTERS) == set(ROUTER_TYPES)
    for name, cls in ROUTERS.items():
        kw = {"vocab_size": 50} if name == "hash" else {}
        kw["top_k"] = {"switch": 1, "gshard": 2}.get(name, 2)
        assert isinstance(build_router(MoEConfig(router=name, **kw)), cls)


def test_topk_matches_mixtral_router():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    hf = MixtralTopKRouter(MixtralConfig(hidden_size=D, num_local_experts=8, num_experts_per_tok=2))
    nn.init.normal_(hf.weight, std=0.5)
    ours = make("topk", num_experts=8, top_k=2, norm_topk_prob=True)
    ours.gate.weight.data.copy_(hf.weight.data)
    x = torch.randn(40, D)
    hl, hw, hi = hf(x)
    r = ours(x)
    torch.testing.assert_close(r.logits, hl, atol=ATOL, rtol=0)
    assert torch.equal(r.expert_ids, hi)
    torch.testing.assert_close(r.weights, hw, atol=ATOL, rtol=0)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(40), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
@pytest.mark.parametrize("norm", [False, True])
def test_topk_matches_qwen2moe_and_olmoe_routers(family, norm):
    if family == "qwen2_moe":
        from transformers import Qwen2MoeConfig as Cfg
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter as R
    else:
        from transformers import OlmoeConfig as Cfg
        from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter as R
    hf = R(Cfg(hidden_size=D, num_experts=16, num_experts_per_tok=4, norm_topk_prob=norm))
    nn.init.normal_(hf.weight, std=0.5)
    ours = make("topk", num_experts=16, top_k=4, norm_topk_prob=norm)
    ours.gate.weight.data.copy_(hf.weight.data)
    x = torch.randn(50, D)
    hl, hw, hi = hf(x)
    r = ours(x)
    torch.testing.assert_close(r.logits, hl, atol=ATOL, rtol=0)
    assert torch.equal(r.expert_ids, hi)
    torch.testing.assert_close(r.weights, hw, atol=ATOL, rtol=0)
    sums = r.weights.sum(-1)
    if norm:
        torch.testing.assert_close(sums, torch.ones(50), atol=1e-6, rtol=0)
    else:  # unnormalised top-k probabilities sum to less than one
        assert bool((sums < 1).all())


@pytest.mark.parametrize("norm", [True, False])
def test_deepseek_matches_deepseek_v3_router(norm):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hcfg = DeepseekV3Config(
        hidden_size=D,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=norm,
    )
    hf = DeepseekV3TopkRouter(hcfg)
    nn.init.normal_(hf.weight, std=0.5)
    hf.e_score_correction_bias.copy_(torch.randn(16) * 0.3)
    ours = make(
        "deepseek",
        num_experts=16,
        top_k=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=norm,
    )
    ours.gate.weight.data.copy_(hf.weight.data)
    ours.e_score_correction_bias.copy_(hf.e_score_correction_bias)
    x = torch.randn(60, D)
    hl, hw, hi = hf(x)
    r = ours(x)
    torch.testing.assert_close(r.logits, hl, atol=ATOL, rtol=0)
    a_ids, a_w = sorted_by_id(r.expert_ids, r.weights)
    b_ids, b_w = sorted_by_id(hi, hw)
    assert torch.equal(a_ids, b_ids)
    torch.testing.assert_close(a_w, b_w, atol=ATOL, rtol=0)
    # the bias changed the selection for some tokens but never the weights
    plain = torch.topk(torch.sigmoid(hl), 4, dim=-1).indices.sort(-1).values
    assert not torch.equal(plain, a_ids)
    # experts of at most topk_group=2 groups of 4 are used per token
    for row in a_ids:
        assert len(set((row // 4).tolist())) <= 2
    if norm:
        torch.testing.assert_close(r.weights.sum(-1), torch.full((60,), 2.5), atol=1e-5, rtol=0)


def test_switch_matches_switch_transformers_router_per_sequence():
    """transformers 5.23's top-1 router counts capacity per sequence and is correct (checked)."""
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP,
    )

    hcfg = SwitchTransformersConfig(
        d_model=D, d_ff=48, num_experts=4, expert_capacity=3, router_jitter_noise=0.0
    )
    torch.manual_seed(1)
    hf = SwitchTransformersSparseMLP(hcfg).eval()
    nn.init.normal_(hf.router.classifier.weight, std=0.5)
    ours = make("switch", num_experts=4, top_k=1, expert_capacity=3)
    ours.gate.weight.data.copy_(hf.router.classifier.weight.data)
    x = torch.randn(3, 10, D)
    expert_index, probs, hl = hf.router(x)
    y = hf(x)
    n_dropped = 0
    for b in range(3):  # our router sees one flat batch: feed one sequence at a time
        r = ours(x[b])
        torch.testing.assert_close(r.logits, hl[b], atol=ATOL, rtol=0)
        kept_hf = expert_index[b].sum(-1) == 1
        assert torch.equal(~r.dropped[:, 0], kept_hf)
        assert torch.equal(r.expert_ids[kept_hf, 0], expert_index[b][kept_hf].argmax(-1))
        torch.testing.assert_close(r.weights[kept_hf, 0], probs[b][kept_hf, 0], atol=ATOL, rtol=0)
        assert bool((r.weights[~kept_hf] == 0).all())
        assert int(r.expert_counts().max()) <= 3
        # dropped tokens get a zero MoE output in transformers (they pass through the residual)
        assert bool((y[b][~kept_hf] == 0).all()) and bool((y[b][kept_hf].abs().sum(-1) > 0).all())
        n_dropped += int((~kept_hf).sum())
    assert n_dropped > 0  # the test exercised dropping


# ---------------------------------------------------------------- per-router semantics


def test_expert_capacity_conventions():
    assert expert_capacity(100, 8, 2, 1.0, "switch") == 13  # ceil(100/8)
    assert expert_capacity(100, 8, 2, 1.0, "megatron") == 25  # ceil(200/8)
    assert expert_capacity(10, 4, 1, 1.25, "switch") == 4  # ceil(3.125)
    with pytest.raises(ConfigError, match="capacity_factor"):
        expert_capacity(10, 4, 1, 0.0)
    with pytest.raises(ConfigError, match="capacity_convention"):
        expert_capacity(10, 4, 1, 1.0, "bogus")


def test_capacity_keep_is_slot_major_first_come_first_served():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    keep = capacity_keep(ids, torch.ones_like(ids, dtype=torch.bool), 3, capacity=2)
    # first choices: expert 0 gets tokens 0, 1 (token 2 overflows), expert 1 gets token 3;
    # second choices: expert 1 has one slot left -> token 0; token 2's expert-1 slot overflows;
    # expert 2 takes token 1; expert 0 is full for token 3
    expected = torch.tensor([[True, True], [True, True], [False, False], [True, False]])
    assert torch.equal(keep, expected)


def test_switch_drops_overflow_in_token_order_and_zeroes_weight():
    r = make("switch", num_experts=4, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[2, 0] = 10.0  # every token with x0 > 0 prefers expert 2
    x = torch.randn(16, D)
    x[:, 0] = 1.0
    out = r(x)
    cap = math.ceil(16 * 1.0 / 4)
    assert torch.equal(out.expert_ids[:, 0], torch.full((16,), 2))
    assert torch.equal(out.dropped[:, 0], torch.arange(16) >= cap)
    assert bool((out.weights[cap:] == 0).all()) and bool((out.weights[:cap] > 0.9).all())
    # the weight is the top-1 softmax probability, not renormalised to 1
    p = torch.softmax(out.logits, -1)[:cap, 2]
    torch.testing.assert_close(out.weights[:cap, 0], p)
    assert set(out.aux) == {"load_balancing", "z_loss"}


def test_padding_never_takes_capacity():
    r = make("switch", num_experts=2, top_k=1, expert_capacity=2)
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[0, 0] = 5.0
    x = torch.zeros(6, D)
    x[:, 0] = 1.0
    mask = torch.tensor([False, False, True, True, True, False])
    out = r(x, mask=mask)
    assert torch.equal(~out.dropped[:, 0], torch.tensor([False, False, True, True, False, False]))


def test_topk_with_capacity_factor_drops_and_counts():
    r = make("topk", num_experts=4, top_k=2, capacity_factor=0.5, capacity_convention="megatron")
    out = r(torch.randn(64, D))
    cap = expert_capacity(64, 4, 2, 0.5, "megatron")
    assert int(out.expert_counts().max()) <= cap
    demand = torch.bincount(out.expert_ids.flatten(), minlength=4)
    assert int(out.dropped.sum()) == int((demand - cap).clamp_min(0).sum())


def test_noisy_topk_eval_equals_renormalised_topk_and_noise_only_in_training():
    cfg = dict(num_experts=8, top_k=2)
    noisy = make("noisy_topk", **cfg)
    plain = make("topk", norm_topk_prob=True, **cfg)
    plain.gate.load_state_dict(noisy.gate.state_dict())
    x = torch.randn(30, D)
    a, b = noisy(x), plain(x)
    assert torch.equal(a.expert_ids, b.expert_ids)
    torch.testing.assert_close(a.weights, b.weights, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.logits, b.logits)
    # eval: deterministic; training: noise changes H(x), the weights are still a softmax over k
    noisy.train()
    torch.manual_seed(3)
    c = noisy(x)
    assert not torch.allclose(c.logits, a.logits)
    torch.testing.assert_close(c.weights.sum(-1), torch.ones(30), atol=1e-6, rtol=0)
    kept = c.logits.gather(1, c.expert_ids)
    torch.testing.assert_close(c.weights, torch.softmax(kept, -1), atol=1e-6, rtol=0)
    assert set(c.aux) == {"importance", "load"}
    # both aux terms carry gradient to W_g; the load term also to W_noise (via the normal CDF)
    (c.aux["importance"] + c.aux["load"]).backward()
    assert noisy.gate.weight.grad.abs().sum() > 0
    assert noisy.w_noise.weight.grad.abs().sum() > 0


def test_noisy_topk_noise_scale_is_softplus_of_w_noise():
    r = make("noisy_topk", num_experts=4, top_k=1, noise_epsilon=0.0).train()
    with torch.no_grad():
        r.gate.weight.zero_()
        r.w_noise.weight.zero_()
        r.w_noise.weight[:, 0] = 3.0  # noise std = softplus(3 * x0)
    x = torch.zeros(4000, D)
    x[:, 0] = 1.0
    torch.manual_seed(0)
    out = r(x)
    std = out.logits.std(dim=0)
    expected = torch.nn.functional.softplus(torch.tensor(3.0))
    torch.testing.assert_close(std, expected.expand(4), atol=0.1, rtol=0)


def test_gshard_random_second_expert_rate_and_weights():
    r = make("gshard", num_experts=4, top_k=2)
    x = torch.randn(4000, D) * 0.5
    ev = r(x)
    assert ev.dropped is None  # inference keeps both experts
    top2 = torch.softmax(ev.logits, -1).topk(2, -1).values
    torch.testing.assert_close(ev.weights, top2 / top2.sum(-1, keepdim=True), atol=1e-6, rtol=0)
    r.train()
    torch.manual_seed(0)
    tr = r(x)
    assert not bool(tr.dropped[:, 0].any())  # the first expert is never randomly dropped
    expected_keep = float((2 * ev.weights[:, 1].detach()).clamp(max=1).mean())
    observed_keep = float((~tr.dropped[:, 1]).float().mean())
    assert abs(observed_keep - expected_keep) < 0.03
    # a skipped second expert has weight 0 and the first weight is not renormalised
    skipped = tr.dropped[:, 1]
    assert bool((tr.weights[skipped, 1] == 0).all())
    torch.testing.assert_close(tr.weights[:, 0], ev.weights[:, 0])


def test_gshard_second_choices_fill_capacity_after_first_choices():
    r = make("gshard", num_experts=2, top_k=2, expert_capacity=3)
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[0, 0] = 1.0  # all tokens: first choice 0, second choice 1
    x = torch.zeros(5, D)
    x[:, 0] = 1.0
    out = r(x)
    assert torch.equal(out.expert_ids, torch.tensor([[0, 1]] * 5))
    assert torch.equal(out.dropped[:, 0], torch.arange(5) >= 3)
    assert torch.equal(out.dropped[:, 1], torch.arange(5) >= 3)
    assert torch.equal(out.expert_counts(), torch.tensor([3, 3]))


def test_expert_choice_each_expert_takes_its_top_c_tokens():
    r = make("expert_choice", num_experts=4, top_k=2)
    x = torch.randn(20, D)
    out = r(x)
    c = math.ceil(20 * 2 / 4)
    assert r.tokens_per_expert(20) == c
    assert out.expert_ids.shape == (20, 4)
    assert torch.equal(out.expert_ids, torch.arange(4).expand(20, 4))
    probs = torch.softmax(out.logits, -1)
    for e in range(4):
        chosen = (~out.dropped[:, e]).nonzero().flatten()
        assert len(chosen) == c
        assert set(chosen.tolist()) == set(probs[:, e].topk(c).indices.tolist())
        torch.testing.assert_close(out.weights[chosen, e], probs[chosen, e])
    assert bool((out.weights[out.dropped] == 0).all())
    assert set(out.aux) == set()
    # explicit capacity factor, and padding is never chosen
    r2 = make("expert_choice", num_experts=4, top_k=2, capacity_factor=1.0)
    mask = torch.arange(20) < 12
    out2 = r2(x, mask=mask)
    assert torch.equal(out2.expert_counts(), torch.full((4,), 3))  # ceil(12 * 1 / 4)
    assert bool(out2.dropped[~mask].all())


def test_hash_router_table_is_balanced_fixed_and_needs_token_ids():
    table = balanced_hash_table(103, 8, 3, seed=5)
    assert table.shape == (103, 3)
    for j in range(3):
        counts = torch.bincount(table[:, j], minlength=8)
        assert int(counts.max() - counts.min()) <= 1
    assert all(len(set(row.tolist())) == 3 for row in table)
    assert torch.equal(table, balanced_hash_table(103, 8, 3, seed=5))
    assert not torch.equal(table, balanced_hash_table(103, 8, 3, seed=6))

    r = make("hash", num_experts=8, top_k=3, vocab_size=103, seed=5)
    assert list(r.parameters()) == [] and "table" in r.state_dict()
    ids = torch.tensor([0, 5, 5, 102])
    out = r(torch.randn(4, D), token_ids=ids)
    assert torch.equal(out.expert_ids, table[ids])
    torch.testing.assert_close(out.weights, torch.full((4, 3), 1 / 3))
    sel = torch.zeros(4, 8, dtype=torch.bool).scatter(1, table[ids], True)
    assert bool((out.logits[sel] == 0).all()) and bool((out.logits[~sel] == -30.0).all())
    with pytest.raises(InputError, match="token_ids"):
        r(torch.randn(4, D))
    with pytest.raises(InputError, match="vocab_size=103"):
        r(torch.randn(2, D), token_ids=torch.tensor([3, 103]))


def test_sinkhorn_plan_is_balanced_and_balances_training_selection():
    logits = torch.randn(64, 4) + torch.tensor([3.0, 0.0, 0.0, 0.0])
    plan = sinkhorn_log(logits, 50).exp()
    torch.testing.assert_close(plan.sum(0), torch.full((4,), 0.25), atol=1e-4, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.full((64,), 1 / 64), atol=1e-3, rtol=0)

    r = make("sinkhorn", num_experts=4, top_k=1, sinkhorn_iters=20)
    with torch.no_grad():
        r.gate.weight.mul_(0.2)
        r.gate.weight[0, 0] = 3.0  # skew every token towards expert 0
    x = torch.randn(256, D)
    x[:, 0] = 1.0
    inference = r(x)  # plain top-k: heavily skewed
    r.train()
    training = r(x)
    assert int(inference.expert_counts().max()) > 200
    assert int(training.expert_counts().max()) < 100
    # weights: softmax of the original logits at the chosen experts (k = 1: not renormalised)
    p1 = torch.softmax(training.logits, -1).gather(1, training.expert_ids)
    torch.testing.assert_close(training.weights, p1)
    assert bool((training.weights < 1).all())
    r2 = make("sinkhorn", num_experts=4, top_k=2, norm_topk_prob=False).train()
    o2 = r2(x)
    p = torch.softmax(o2.logits, -1).gather(1, o2.expert_ids)
    torch.testing.assert_close(o2.weights, p)


def test_deepseek_bias_selects_but_never_weights_and_update_rule():
    r = make("deepseek", num_experts=8, top_k=2, bias_update_rate=0.1, norm_topk_prob=False)
    x = torch.randn(32, D)
    before = r(x)
    with torch.no_grad():
        r.e_score_correction_bias[3] = 10.0  # expert 3 always selected
    after = r(x)
    assert bool((after.expert_ids == 3).any(dim=-1).all())
    s = torch.sigmoid(after.logits)
    torch.testing.assert_close(after.weights, s.gather(1, after.expert_ids))  # unbiased scores
    torch.testing.assert_close(after.logits, before.logits)
    r.e_score_correction_bias.zero_()
    new = r.update_bias(torch.tensor([10, 2, 4, 4, 4, 4, 4, 0]))  # mean 4
    torch.testing.assert_close(new, torch.tensor([-0.1, 0.1, 0, 0, 0, 0, 0, 0.1]))
    assert after.aux.keys() == {"seq_aux"}
    with pytest.raises(InputError, match="counts"):
        r.update_bias(torch.ones(3))


def test_topk_selection_bias_selects_but_never_weights_and_update_rule():
    r = make("topk", num_experts=8, top_k=2, bias_update_rate=0.05)
    assert "selection_bias" in dict(r.named_buffers())
    x = torch.randn(64, D)
    before = r(x)
    torch.testing.assert_close(  # a zero bias routes exactly like the plain router
        before.expert_ids, torch.topk(torch.softmax(before.logits, -1), 2).indices
    )
    with torch.no_grad():
        r.selection_bias[5] = 2.0  # larger than any probability gap: expert 5 always chosen
    after = r(x)
    assert bool((after.expert_ids == 5).any(dim=-1).all())
    probs = torch.softmax(after.logits, -1)
    chosen = probs.gather(1, after.expert_ids)
    torch.testing.assert_close(after.weights, chosen / chosen.sum(-1, keepdim=True))
    torch.testing.assert_close(after.logits, before.logits)
    r.selection_bias.zero_()
    new = r.update_bias(torch.tensor([10, 2, 4, 4, 4, 4, 4, 0]))  # mean 4
    torch.testing.assert_close(new, torch.tensor([-0.05, 0.05, 0, 0, 0, 0, 0, 0.05]))
    with pytest.raises(InputError, match="counts"):
        r.update_bias(torch.ones(3))
    plain = make("topk", num_experts=8, top_k=2)
    assert "selection_bias" not in dict(plain.named_buffers())  # old checkpoints still load
    with pytest.raises(ConfigError, match="no selection bias"):
        plain.update_bias(torch.ones(8))


def test_selection_bias_updates_balance_a_skewed_router():
    torch.manual_seed(0)
    r = make("topk", num_experts=8, top_k=2, bias_update_rate=0.01)
    with torch.no_grad():
        r.gate.weight[0] += 0.05  # expert 0 favoured by every input direction...
        r.gate.bias = None
    x = torch.randn(512, D) + 1.0  # ...for inputs with a positive mean

    def max_over_uniform() -> float:
        c = r(x).expert_counts().float()
        return float(c.max() / c.mean())

    start = max_over_uniform()
    for _ in range(300):
        r.update_bias(r(x).expert_counts())
    assert start > 3.5 and max_over_uniform() < 1.5


def test_topk_jitter_is_not_in_place_and_only_in_training():
    r = make("topk", num_experts=4, top_k=2, jitter_noise=0.1)
    x = torch.randn(10, D)
    x0 = x.clone()
    a = r(x)
    b = r(x)
    torch.testing.assert_close(a.logits, b.logits)
    r.train()
    c = r(x)
    assert torch.equal(x, x0)
    assert not torch.allclose(c.logits, a.logits)


def test_aux_losses_reflect_mask():
    r = make("topk", num_experts=4, top_k=2)
    x = torch.randn(12, D)
    mask = torch.arange(12) < 7
    full = r(x[:7])
    masked = r(x, mask=mask)
    for k in ("load_balancing", "z_loss"):
        torch.testing.assert_close(masked.aux[k], full.aux[k])
    torch.testing.assert_close(
        masked.aux["load_balancing"], load_balancing_loss(masked.logits[:7], 4, 2)
    )


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("router", ROUTER_TYPES)
def test_wrong_hidden_size_names_d_model(router):
    kw = {"vocab_size": 10} if router == "hash" else {}
    r = make(router, num_experts=4, top_k=1 if router == "switch" else 2, **kw)
    with pytest.raises(InputError, match="d_model=32"):
        r(torch.randn(5, D + 1), token_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(InputError, match="mask"):
        r(torch.randn(5, D), token_ids=torch.zeros(5, dtype=torch.long), mask=torch.ones(4))


@pytest.mark.parametrize(
    "router", ["topk", "noisy_topk", "switch", "gshard", "expert_choice", "sinkhorn", "deepseek"]
)
def test_nan_logits_raise_input_error(router):
    r = make(router, num_experts=4, top_k=1 if router == "switch" else 2)
    x = torch.randn(6, D)
    x[4, 3] = float("nan")
    with pytest.raises(InputError, match=r"NaN or inf.*\[4\]"):
        r(x)


def test_bad_config_values_name_the_parameter():
    with pytest.raises(ConfigError, match="top_k"):
        MoEConfig(num_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="capacity_factor"):
        MoEConfig(capacity_factor=0.0)
    with pytest.raises(ConfigError, match="capacity_factor"):
        MoEConfig(capacity_factor=-1.0)
    with pytest.raises(ConfigError, match="expert_capacity"):
        MoEConfig(expert_capacity=0)
    with pytest.raises(ConfigError, match="top_k"):
        build_router(MoEConfig(router="switch", top_k=2))
    with pytest.raises(ConfigError, match="top_k"):
        build_router(MoEConfig(router="gshard", top_k=1))
    with pytest.raises(ConfigError, match="topk_group"):
        build_router(MoEConfig(router="deepseek", num_experts=8, n_group=4, topk_group=1, top_k=3))
    with pytest.raises(ConfigError, match="vocab_size"):
        MoEConfig(router="hash")
    assert issubclass(ConfigError, MoelabError) and issubclass(InputError, MoelabError)


def test_router_classes_are_the_documented_ones():
    assert ROUTERS["topk"] is TopKRouter and ROUTERS["noisy_topk"] is NoisyTopKRouter
    assert ROUTERS["switch"] is SwitchRouter and ROUTERS["gshard"] is GShardRouter
    assert ROUTERS["expert_choice"] is ExpertChoiceRouter and ROUTERS["hash"] is HashRouter
    assert ROUTERS["sinkhorn"] is SinkhornRouter and ROUTERS["deepseek"] is DeepSeekRouter


def test_topk_unit_weights_for_moefication():
    r = make("topk", num_experts=4, top_k=2, unit_weights=True, norm_topk_prob=False)
    plain = make("topk", num_experts=4, top_k=2, norm_topk_prob=False)
    x = torch.randn(9, D)
    out = r(x)
    assert torch.equal(out.expert_ids, plain(x).expert_ids)
    assert torch.equal(out.weights, torch.ones(9, 2))
