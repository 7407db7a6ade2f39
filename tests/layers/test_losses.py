"""Balancing losses: equality with transformers' functions, hand-computed values, masks, errors."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.errors import ConfigError, InputError
from moelab.layers.losses import (
    aux_free_bias_update,
    cv_squared,
    importance_loss,
    load_balancing_loss,
    load_loss,
    megatron_load_balancing_loss,
    router_z_loss,
    sequence_balance_loss,
    smooth_load,
)

B, S, E, K, L = 3, 7, 8, 2, 3


def layers(seed: int = 0, scale: float = 2.0) -> tuple[torch.Tensor, ...]:
    """L layers of [B*S, E] router logits."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B * S, E, generator=g) * scale for _ in range(L))


def padding_mask() -> torch.Tensor:
    """[B, S] attention mask with left and right padding."""
    m = torch.ones(B, S, dtype=torch.long)
    m[0, :2] = 0
    m[2, -3:] = 0
    return m


def uniform_logits(T: int, E: int, k: int) -> torch.Tensor:
    """Cyclic logits: token t prefers experts t..t+k-1 (mod E); mean probs and counts are uniform."""
    logits = torch.zeros(T, E)
    for t in range(T):
        for j in range(k):
            logits[t, (t + j) % E] = 1.0 - 0.01 * j
    return logits


# ---------------------------------------------------------------- load balancing


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_load_balancing_equals_transformers(family, use_mask):
    mod = __import__(f"transformers.models.{family}.modeling_{family}", fromlist=["x"])
    logits = layers()
    mask = padding_mask() if use_mask else None
    ref = mod.load_balancing_loss_func(logits, E, K, mask)
    ours = load_balancing_loss(logits, E, K, mask)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    # gradients agree as well
    a = tuple(t.clone().requires_grad_() for t in logits)
    b = tuple(t.clone().requires_grad_() for t in logits)
    mod.load_balancing_loss_func(a, E, K, mask).backward()
    load_balancing_loss(b, E, K, mask).backward()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(y.grad, x.grad, atol=1e-6, rtol=1e-5)


def test_load_balancing_single_tensor_is_one_layer_and_k_range():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    t = layers()[0]
    for k in (1, 3, E):
        torch.testing.assert_close(
            load_balancing_loss(t, E, k), load_balancing_loss_func((t,), E, k)
        )


def test_load_balancing_hand_computed():
    # 2 tokens, 2 experts, k=1: probs p0 = softmax([1,0]), p1 = softmax([0,2])
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.softmax(logits, -1)
    f = torch.tensor([0.5, 0.5])  # token 0 -> expert 0, token 1 -> expert 1
    P = p.mean(0)
    torch.testing.assert_close(load_balancing_loss(logits, 2, 1), 2 * (f * P).sum())


def test_load_balancing_uniform_routing_equals_k_and_megatron_equals_one():
    for k in (1, 2, 3):
        lg = uniform_logits(24, 6, k)
        torch.testing.assert_close(load_balancing_loss(lg, 6, k), torch.tensor(float(k)))
        torch.testing.assert_close(megatron_load_balancing_loss(lg, 6, k), torch.tensor(1.0))


def test_pooled_per_layer_and_megatron_relations():
    lg = layers(scale=3.0)
    per = torch.stack([load_balancing_loss(t, E, K) for t in lg])
    torch.testing.assert_close(load_balancing_loss(lg, E, K, pooled=False), per.mean())
    torch.testing.assert_close(megatron_load_balancing_loss(lg, E, K), per.mean() / K)
    # pooled differs from the per-layer mean in general (it multiplies pooled f and P)
    assert not torch.isclose(load_balancing_loss(lg, E, K), per.mean())
    # Megatron's formula written out: E / (k T^2) * sum_e P_sum_e * count_e, for one layer
    t = lg[0]
    p = torch.softmax(t, -1)
    counts = torch.bincount(p.topk(K, -1).indices.flatten(), minlength=E).float()
    T = t.shape[0]
    mega = E / (K * T * T) * (p.sum(0) * counts).sum()
    torch.testing.assert_close(megatron_load_balancing_loss(t, E, K), mega)


def test_padding_never_counts_in_load_balancing():
    lg = layers()
    mask = padding_mask()
    base = load_balancing_loss(lg, E, K, mask)
    flat = mask.reshape(-1).bool()
    changed = tuple(t.clone() for t in lg)
    for t in changed:
        t[~flat] = torch.randn(int((~flat).sum()), E) * 10  # garbage at padding
    torch.testing.assert_close(load_balancing_loss(changed, E, K, mask), base)
    only_real = tuple(t[flat] for t in lg)
    torch.testing.assert_close(load_balancing_loss(only_real, E, K), base)
    # all-padding: zero, not NaN
    zero = load_balancing_loss(lg, E, K, torch.zeros(B, S))
    assert float(zero) == 0.0


def test_load_balancing_bad_input():
    t = layers()[0]
    with pytest.raises(ConfigError, match="top_k=9"):
        load_balancing_loss(t, E, 9)
    with pytest.raises(InputError, match="num_experts=7"):
        load_balancing_loss(t, 7, 2)
    with pytest.raises(InputError, match="attention_mask"):
        load_balancing_loss(t, E, 2, torch.ones(5))
    with pytest.raises(InputError, match="same"):
        load_balancing_loss((t, t[:3]), E, 2)
    with pytest.raises(InputError, match="router_logits"):
        load_balancing_loss((), E, 2)


# ---------------------------------------------------------------- z-loss and Switch forms


def test_router_z_loss_equals_switch_transformers():
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        router_z_loss_func,
    )

    lg = torch.randn(B, S, E) * 3
    torch.testing.assert_close(router_z_loss(lg), router_z_loss_func(lg))
    torch.testing.assert_close(router_z_loss(lg.reshape(-1, E)), router_z_loss_func(lg))
    manual = (torch.logsumexp(lg, -1) ** 2).mean()
    torch.testing.assert_close(router_z_loss(lg), manual)


def test_router_z_loss_mask_and_layers():
    lg = layers()
    mask = padding_mask()
    flat = mask.reshape(-1).bool()
    expected = torch.cat([torch.logsumexp(t[flat], -1) ** 2 for t in lg]).mean()
    torch.testing.assert_close(router_z_loss(lg, mask), expected)
    assert float(router_z_loss(lg, torch.zeros(B, S))) == 0.0


def test_top1_load_balancing_equals_switch_transformers_form():
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        load_balancing_loss_func,
    )

    lg = torch.randn(B, S, E) * 2
    probs = torch.softmax(lg, -1)
    ref = load_balancing_loss_func(probs, probs.argmax(-1))
    # Switch's function averages per group (= per sequence here) rather than pooling tokens
    per_sequence = torch.stack([load_balancing_loss(lg[b], E, 1) for b in range(B)])
    torch.testing.assert_close(per_sequence.mean(), ref)
    one_group = load_balancing_loss_func(probs.reshape(1, -1, E), probs.argmax(-1).reshape(1, -1))
    torch.testing.assert_close(load_balancing_loss(lg.reshape(-1, E), E, 1), one_group)


# ---------------------------------------------------------------- Shazeer importance / load


def test_cv_squared_values():
    assert float(cv_squared(torch.ones(5))) == 0.0
    x = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(cv_squared(x), torch.tensor(1.0 / 4.0), atol=1e-8, rtol=0)
    assert float(cv_squared(torch.tensor([2.0]))) == 0.0


def test_importance_loss_and_mask():
    gates = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.6, 0.4], [1.0, 0.0, 0.0]])
    imp = gates.sum(0)
    torch.testing.assert_close(importance_loss(gates), cv_squared(imp))
    mask = torch.tensor([True, True, False])
    torch.testing.assert_close(importance_loss(gates, mask), cv_squared(gates[:2].sum(0)))


def test_smooth_load_matches_monte_carlo_probability():
    """P(x, i) of Appendix A is the chance expert i stays in the top-k when only its noise is redrawn."""
    torch.manual_seed(0)
    T, E_, k = 6, 5, 2
    clean = torch.randn(T, E_)
    std = torch.rand(T, E_) + 0.3
    noisy = clean + torch.randn(T, E_) * std
    load = smooth_load(clean, noisy, std, k)
    n = 40000
    mc = torch.zeros(E_)
    for i in range(E_):
        resampled = noisy.unsqueeze(0).repeat(n, 1, 1)
        resampled[:, :, i] = clean[:, i] + torch.randn(n, T) * std[:, i]
        in_top = (resampled.topk(k, dim=-1).indices == i).any(-1).float()  # [n, T]
        mc[i] = in_top.mean(0).sum()
    torch.testing.assert_close(load, mc, atol=0.03, rtol=0)
    torch.testing.assert_close(load_loss(clean, noisy, std, k), cv_squared(load))
    mask = torch.tensor([True, False, True, True, False, True])
    torch.testing.assert_close(
        smooth_load(clean, noisy, std, k, mask), smooth_load(clean[mask], noisy[mask], std[mask], k)
    )
    with pytest.raises(ConfigError, match="top_k"):
        smooth_load(clean, noisy, std, E_)
    with pytest.raises(InputError, match="shape"):
        smooth_load(clean, noisy[:2], std, k)


# ---------------------------------------------------------------- DeepSeek


def test_sequence_balance_loss_hand_computed_and_uniform():
    # one sequence, 2 tokens, 4 experts, k=1
    s = torch.tensor([[0.9, 0.1, 0.5, 0.5], [0.2, 0.8, 0.5, 0.5]])
    ids = torch.tensor([[0], [1]])
    f = torch.tensor([1.0, 1.0, 0.0, 0.0]) * 4 / (1 * 2)
    P = (s / s.sum(-1, keepdim=True)).mean(0)
    torch.testing.assert_close(sequence_balance_loss(s, ids, 4), (f * P).sum())
    # uniform routing: 1
    T = 12
    ids_u = torch.stack([torch.arange(T) % 6, (torch.arange(T) + 1) % 6], -1)
    torch.testing.assert_close(
        sequence_balance_loss(torch.full((T, 6), 0.3), ids_u, 6), torch.tensor(1.0)
    )


def test_sequence_balance_loss_is_mean_over_sequences_and_ignores_padding():
    torch.manual_seed(0)
    s = torch.rand(B, S, E)
    ids = torch.rand(B, S, E).topk(K, -1).indices
    per = torch.stack([sequence_balance_loss(s[b], ids[b], E) for b in range(B)])
    torch.testing.assert_close(sequence_balance_loss(s, ids, E), per.mean())
    mask = padding_mask()
    per_m = [
        sequence_balance_loss(s[b][mask[b].bool()], ids[b][mask[b].bool()], E) for b in range(B)
    ]
    torch.testing.assert_close(sequence_balance_loss(s, ids, E, mask), torch.stack(per_m).mean())
    mask[1] = 0  # a fully padded sequence is skipped
    per_m2 = [per_m[0], per_m[2]]
    torch.testing.assert_close(sequence_balance_loss(s, ids, E, mask), torch.stack(per_m2).mean())
    with pytest.raises(InputError, match="expert_ids"):
        sequence_balance_loss(s, ids[:, :3], E)


def test_aux_free_bias_update_sign_rule():
    b = torch.tensor([0.0, 0.5, -0.5, 0.0])
    counts = torch.tensor([6, 2, 4, 4])  # mean 4
    torch.testing.assert_close(
        aux_free_bias_update(b, counts, 0.01), torch.tensor([-0.01, 0.51, -0.5, 0.0])
    )
    torch.testing.assert_close(aux_free_bias_update(b, counts, 0.0), b)
    with pytest.raises(ConfigError, match="rate"):
        aux_free_bias_update(b, counts, -1.0)
    with pytest.raises(InputError, match="counts"):
        aux_free_bias_update(b, counts[:2], 0.1)
    assert math.isfinite(float(aux_free_bias_update(b, counts, 0.1).sum()))
