"""Property tests (hypothesis) of every router over random sizes: slot structure, weights,
capacity, expert choice, hashing, balance losses, the aux-free bias update and gradients."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.layers.config import MoEConfig
from moelab.layers.losses import cv_squared, load_balancing_loss
from moelab.layers.moe import MoEBlock
from moelab.layers.routing import build_router, expert_capacity

FAST = settings(max_examples=30, deadline=None)
TOKEN_CHOICE = ("topk", "noisy_topk", "switch", "gshard", "hash", "sinkhorn", "deepseek")


@st.composite
def sizes(draw, router: str | None = None):
    """(router, T, D, E, k, seed, train) with k fitting the router's constraints."""
    router = router or draw(st.sampled_from(TOKEN_CHOICE))
    E = draw(st.integers(2, 12))
    if router == "switch":
        k = 1
    elif router == "gshard":
        k = 2
    else:
        k = draw(st.integers(1, E))
    T = draw(st.integers(1, 40))
    D = draw(st.sampled_from([8, 16]))
    return router, T, D, E, k, draw(st.integers(0, 10_000)), draw(st.booleans())


def config(router: str, D: int, E: int, k: int, seed: int, **kw) -> MoEConfig:
    """A valid config for (router, E, k); deepseek gets 2 groups when that keeps k reachable."""
    if router == "deepseek" and E % 2 == 0 and E >= 4 and "n_group" not in kw:
        kw.update(n_group=2, topk_group=2 if k > E // 2 else 1)
    if router == "hash":
        kw.setdefault("vocab_size", 37)
    return MoEConfig(d_model=D, num_experts=E, top_k=k, router=router, seed=seed, **kw)


def run(cfg: MoEConfig, T: int, seed: int, train: bool, mask=None):
    """Build the router, route T random tokens, return (router, result)."""
    torch.manual_seed(seed)
    r = build_router(cfg).train(train)
    x = torch.randn(T, cfg.d_model)
    ids = torch.randint(0, 37, (T,))
    return r, r(x, token_ids=ids, mask=mask)


@FAST
@given(sizes())
def test_token_choice_gives_k_distinct_experts(s):
    router, T, D, E, k, seed, train = s
    _, out = run(config(router, D, E, k, seed), T, seed, train)
    assert out.expert_ids.shape == (T, k) and out.expert_ids.dtype == torch.int64
    assert out.weights.shape == (T, k) and out.logits.shape == (T, E)
    assert bool(((out.expert_ids >= 0) & (out.expert_ids < E)).all())
    srt = out.expert_ids.sort(-1).values
    assert bool((srt[:, 1:] != srt[:, :-1]).all())  # distinct per token
    assert bool((out.weights >= 0).all()) and bool(torch.isfinite(out.weights).all())
    if router in ("topk", "noisy_topk", "sinkhorn", "deepseek", "hash"):  # dropless
        assert out.dropped is None
    if router in ("topk", "noisy_topk", "deepseek", "hash") or (router == "sinkhorn" and k > 1):
        # renormalised over the k slots (sinkhorn keeps the raw probability when k = 1)
        torch.testing.assert_close(out.weights.sum(-1), torch.ones(T), atol=1e-5, rtol=0)
    if router == "sinkhorn" and k == 1:
        p = torch.softmax(out.logits.float(), -1).gather(1, out.expert_ids)
        torch.testing.assert_close(out.weights, p)
    if router == "gshard" and not train:
        torch.testing.assert_close(out.weights.sum(-1), torch.ones(T), atol=1e-5, rtol=0)
    if router == "gshard" and train and out.dropped is not None:
        assert bool((out.weights.sum(-1) <= 1 + 1e-6).all())


@FAST
@given(sizes(), st.floats(0.1, 3.0), st.sampled_from(["switch", "megatron"]))
def test_capacity_never_exceeded_and_drops_counted(s, cf, conv):
    router, T, D, E, k, seed, train = s
    cfg = config(router, D, E, k, seed, capacity_factor=cf, capacity_convention=conv)
    _, out = run(cfg, T, seed, train)
    cap = expert_capacity(T, E, k, cf, conv)
    counts = out.expert_counts()
    assert int(counts.max()) <= cap
    active = out.active_mask()
    assert int(active.sum()) + (0 if out.dropped is None else int(out.dropped.sum())) == T * k
    assert bool((out.weights[~active] == 0).all())
    if router != "gshard" or not train:  # no random drops: drops are exactly the overflow
        demand = torch.bincount(out.expert_ids.flatten(), minlength=E)
        overflow = int((demand - cap).clamp_min(0).sum())
        assert (0 if out.dropped is None else int(out.dropped.sum())) == overflow


@FAST
@given(sizes(), st.integers(0, 5))
def test_capacity_larger_than_tokens_drops_nothing(s, extra):
    router, T, D, E, k, seed, train = s
    if router == "gshard" and train:
        train = False  # random second-expert drops are not capacity drops
    _, out = run(config(router, D, E, k, seed, expert_capacity=T + extra), T, seed, train)
    assert out.dropped is None or not bool(out.dropped.any())
    _, out2 = run(config(router, D, E, k, seed, capacity_factor=50.0), T, seed, train)
    assert out2.dropped is None or not bool(out2.dropped.any())


@FAST
@given(
    st.integers(2, 10),
    st.integers(1, 40),
    st.integers(1, 10),
    st.one_of(st.none(), st.floats(0.1, 4.0)),
    st.integers(0, 1000),
    st.integers(0, 10),
)
def test_expert_choice_every_expert_gets_exactly_c_tokens(E, T, k_raw, cf, seed, n_pad):
    k = min(k_raw, E)
    cfg = MoEConfig(d_model=8, num_experts=E, top_k=k, router="expert_choice", capacity_factor=cf)
    n_pad = min(n_pad, T - 1)
    mask = torch.arange(T) < T - n_pad
    n = T - n_pad
    r, out = run(cfg, T, seed, True, mask=mask)
    c = min(math.ceil(n * (cf if cf is not None else k) / E), n)
    assert r.tokens_per_expert(n) == c
    assert torch.equal(out.expert_counts(), torch.full((E,), c))
    per_token = out.active_mask().sum(-1)
    assert int(per_token.min()) >= 0 and int(per_token.max()) <= E
    assert int(per_token[~mask].sum()) == 0
    assert bool((out.weights[out.dropped] == 0).all())


@FAST
@given(st.integers(1, 200), st.integers(2, 12), st.data())
def test_hash_is_deterministic_and_balanced(V, E, data):
    k = data.draw(st.integers(1, E))
    seed = data.draw(st.integers(0, 10_000))
    cfg = MoEConfig(d_model=8, num_experts=E, top_k=k, router="hash", vocab_size=V, seed=seed)
    a, b = build_router(cfg), build_router(cfg)
    assert torch.equal(a.table, b.table)
    ids = torch.randint(0, V, (25,))
    ra = a(torch.randn(25, 8), token_ids=ids)
    rb = b(torch.randn(25, 8), token_ids=ids)  # hidden states do not matter
    assert torch.equal(ra.expert_ids, rb.expert_ids)
    for j in range(k):
        c = torch.bincount(a.table[:, j], minlength=E)
        assert int(c.max() - c.min()) <= 1


@FAST
@given(st.integers(2, 10), st.integers(1, 6), st.data())
def test_lb_loss_equals_k_under_uniform_routing(E, m, data):
    k = data.draw(st.integers(1, E))
    T = E * m
    logits = torch.full((T, E), -1.0)
    for t in range(T):  # token t prefers experts t..t+k-1 (mod E) with a cyclic pattern
        for j in range(k):
            logits[t, (t + j) % E] = 2.0 - 0.1 * j
    torch.testing.assert_close(load_balancing_loss(logits, E, k), torch.tensor(float(k)))
    n_layers = data.draw(st.integers(1, 3))
    torch.testing.assert_close(
        load_balancing_loss(tuple(logits for _ in range(n_layers)), E, k), torch.tensor(float(k))
    )


@settings(max_examples=5, deadline=None)
@given(st.sampled_from([4, 8]), st.integers(1, 2), st.integers(0, 100))
def test_aux_free_bias_update_moves_load_toward_balance(E, k, seed):
    cfg = MoEConfig(d_model=16, num_experts=E, top_k=k, router="deepseek", bias_update_rate=0.01)
    torch.manual_seed(seed)
    r = build_router(cfg).eval()
    with torch.no_grad():
        r.gate.weight.mul_(0.3)
        r.gate.weight[0] += 1.5  # skew: expert 0 favoured by inputs with positive mean
    x = torch.randn(64, 16) + 0.5
    first = r(x).expert_counts().float()
    history = []
    for _ in range(60):
        counts = r(x).expert_counts()
        history.append(counts.float())
        r.update_bias(counts)
    # a sign step of fixed size oscillates around balance: judge the load over the last steps
    late = torch.stack(history[-15:]).mean(0)
    assert float(first[0]) > 64 * k / E  # the input was skewed
    assert float(cv_squared(late)) < 0.25 * float(cv_squared(first))
    assert float(late.max()) < float(first.max())
    assert float(r.e_score_correction_bias[0]) < 0  # the overloaded expert was pushed down
    # the bias never enters the weights: they are still the (renormalised) sigmoid scores
    out = r(x)
    w = torch.sigmoid(out.logits).gather(1, out.expert_ids)
    torch.testing.assert_close(out.weights, w / w.sum(-1, keepdim=True))


@settings(max_examples=16, deadline=None)
@given(
    st.sampled_from(
        ["topk", "noisy_topk", "switch", "gshard", "expert_choice", "sinkhorn", "deepseek", "hash"]
    ),
    st.integers(0, 100),
)
def test_gradients_finite_and_reach_router_and_experts(router, seed):
    k = {"switch": 1, "gshard": 2}.get(router, 2)
    cfg = config(router, 16, 4, k, seed, d_ff=16)
    torch.manual_seed(seed)
    block = MoEBlock(cfg).train()
    x = torch.randn(24, 16)
    y, out = block(x, token_ids=torch.randint(0, 37, (24,)))
    loss = y.pow(2).mean() + sum(out.aux.values(), torch.zeros(()))
    loss.backward()
    for name, p in block.named_parameters():
        if p.grad is not None:
            assert bool(torch.isfinite(p.grad).all()), name
    assert block.experts.gate_up_proj.grad is not None
    assert float(block.experts.gate_up_proj.grad.abs().sum()) > 0
    if router != "hash":  # hash routing has no learned router
        g = block.router.gate.weight.grad
        assert g is not None and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0
