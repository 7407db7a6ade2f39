"""MoEBlock, ExpertBank and dispatch: values against a dense reference for every router, drops,
padding, the offloading hook, grouped_mm == loop, decode path, gradients, fine-grained FLOPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelab.errors import ConfigError, InputError, MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.dispatch import SMALL_SLOTS, dispatch_combine
from moelab.layers.experts import ExpertBank, grouped_mm_available, sorted_expert_mlp
from moelab.layers.moe import MoEBlock, expert_flops_per_token
from moelab.layers.routing import ROUTERS
from moelab.layers.types import RoutingResult

D, F_, E = 32, 48, 8


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny blocks: one thread avoids OpenMP barrier overhead on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def naive_expert(bank: ExpertBank, e: int, x: torch.Tensor) -> torch.Tensor:
    """Textbook expert FFN from the raw stacked weights."""
    gu, down = bank.gate_up_proj[e], bank.down_proj[e]
    h = x @ gu.T
    if bank.act == "swiglu":
        a = F.silu(h[:, : bank.d_ff]) * h[:, bank.d_ff :]
    elif bank.act == "gelu":
        a = F.gelu(h)
    else:
        a = torch.relu(h)
    return a @ down.T


def reference(block: MoEBlock, x2d: torch.Tensor, r: RoutingResult, mask=None) -> torch.Tensor:
    """y[t] = sum over computed slots of w * expert(x[t]) (+ gated shared expert)."""
    y = torch.zeros_like(x2d)
    active = r.active_mask()
    for t in range(x2d.shape[0]):
        if mask is not None and not bool(mask[t]):
            continue
        for j in range(r.top_k):
            if active[t, j]:
                e = int(r.expert_ids[t, j])
                y[t] += r.weights[t, j] * naive_expert(block.experts, e, x2d[t : t + 1])[0]
    if block.shared_experts is not None:
        s = naive_expert(block.shared_experts, 0, x2d)
        if block.shared_gate is not None:
            s = torch.sigmoid(x2d @ block.shared_gate.weight.T) * s
        y = y + s
    return y


def router_cfgs() -> list[tuple[str, dict]]:
    base = dict(d_model=D, d_ff=F_, num_experts=E, top_k=2)
    out = [
        ("topk", base),
        ("topk capacity 0.5", dict(base, capacity_factor=0.5)),
        (
            "topk gelu + shared gated",
            dict(base, expert_act="gelu", num_shared_experts=1, shared_gate=True),
        ),
        (
            "topk relu fine-grained",
            dict(base, expert_act="relu", d_ff=F_ // 2, num_experts=16, top_k=4),
        ),
    ]
    specific = {
        "noisy_topk": dict(base, router="noisy_topk"),
        "switch": dict(base, router="switch", top_k=1, capacity_factor=1.0),
        "gshard": dict(base, router="gshard", capacity_factor=1.0),
        "expert_choice": dict(base, router="expert_choice"),
        "hash": dict(base, router="hash", vocab_size=50),
        "sinkhorn": dict(base, router="sinkhorn"),
        "deepseek": dict(base, router="deepseek", n_group=4, topk_group=2, num_shared_experts=2),
    }
    out += [(k, v) for k, v in specific.items() if k in ROUTERS]
    return out


@pytest.mark.parametrize("name,kw", router_cfgs(), ids=[n for n, _ in router_cfgs()])
@pytest.mark.parametrize("training", [False, True])
def test_block_matches_dense_reference(name, kw, training):
    torch.manual_seed(0)
    block = MoEBlock(MoEConfig(**kw)).train(training)
    x = torch.randn(3, 12, D)
    tok = torch.randint(0, 50, (3, 12))
    torch.manual_seed(1)
    y, r = block(x, token_ids=tok)
    assert y.shape == x.shape and r.expert_ids.shape[0] == 36
    assert torch.isfinite(y).all()
    ref = reference(block, x.reshape(-1, D), r)
    torch.testing.assert_close(y.reshape(-1, D), ref, atol=1e-5, rtol=1e-5)
    assert y.abs().max() > 1e-3
    # the no-grad inference fast path gives the same numbers
    with torch.no_grad():
        torch.manual_seed(1)
        y2, r2 = block(x, token_ids=tok)
    if torch.equal(r2.expert_ids, r.expert_ids) and torch.equal(r2.active_mask(), r.active_mask()):
        torch.testing.assert_close(y2, y, atol=1e-5, rtol=1e-5)
    if name == "expert_choice":  # k = E slots; tokens get 0..E experts
        assert r.top_k == E and r.dropped is not None
        per_expert = r.active_mask().sum(0)
        assert bool((per_expert == per_expert[0]).all())


def test_dropped_slots_contribute_zero_and_mask_skips_padding():
    torch.manual_seed(0)
    bank = ExpertBank(4, D, F_)
    x = torch.randn(5, D)
    ids = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]])
    w = torch.rand(5, 2)
    dropped = torch.tensor(
        [[False, True], [True, True], [False, False], [True, False], [False, False]]
    )
    r = RoutingResult(expert_ids=ids, weights=w, logits=torch.zeros(5, 4), dropped=dropped)
    y = dispatch_combine(x, r, bank)
    assert torch.equal(y[1], torch.zeros(D))  # fully dropped token: passes via residual only
    torch.testing.assert_close(y[0], w[0, 0] * naive_expert(bank, 0, x[:1])[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(y[3], w[3, 1] * naive_expert(bank, 0, x[3:4])[0], atol=1e-6, rtol=0)
    mask = torch.tensor([True, True, False, True, True])
    y_m = dispatch_combine(x, r, bank, mask=mask)
    assert torch.equal(y_m[2], torch.zeros(D))
    torch.testing.assert_close(y_m[[0, 3, 4]], y[[0, 3, 4]], atol=1e-6, rtol=0)


class CountingExperts:
    """Stand-in for an offloading wrapper: only `num_experts` and `forward_one`."""

    def __init__(self, bank: ExpertBank) -> None:
        self.bank, self.num_experts, self.calls = bank, bank.num_experts, []

    def forward_one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((e, x.shape[0]))
        return self.bank.apply_params(self.bank.expert_params(e), x)


@pytest.mark.parametrize("T", [1, 3, 40])
def test_forward_one_hook_called_once_per_active_expert(T):
    torch.manual_seed(0)
    block = MoEBlock(MoEConfig(d_model=D, d_ff=F_, num_experts=E, top_k=2))
    x = torch.randn(T, D)
    with torch.no_grad():
        y_ref, r = block(x)
        counting = CountingExperts(block.experts)
        block.experts = counting
        y, _ = block(x)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)
    used = r.expert_counts()
    assert sorted(e for e, _ in counting.calls) == used.nonzero().flatten().tolist()
    assert all(n == int(used[e]) for e, n in counting.calls)


@pytest.mark.parametrize("T", [1, 2, SMALL_SLOTS // 2, SMALL_SLOTS // 2 + 1])
def test_small_decode_path_equals_sorted_path(T):
    """Around the SMALL_SLOTS threshold the results match the reference, with and without grad."""
    torch.manual_seed(T)
    block = MoEBlock(MoEConfig(d_model=D, d_ff=F_, num_experts=E, top_k=2, num_shared_experts=1))
    x = torch.randn(T, D, requires_grad=True)
    y, r = block(x)
    torch.testing.assert_close(y, reference(block, x, r), atol=1e-5, rtol=0)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(block(x)[0], y, atol=1e-6, rtol=0)


@pytest.mark.skipif(not grouped_mm_available(), reason="this torch has no grouped_mm")
@pytest.mark.parametrize("act", ["swiglu", "gelu", "relu"])
def test_grouped_mm_equals_loop_forward_and_backward(act):
    torch.manual_seed(0)
    cfg = MoEConfig(
        d_model=D, d_ff=F_, num_experts=E, top_k=2, expert_act=act, capacity_factor=0.75
    )
    loop = MoEBlock(cfg, backend="loop")
    gm = MoEBlock(cfg, backend="grouped_mm")
    gm.load_state_dict(loop.state_dict())
    x = torch.randn(2, 20, D)
    g = torch.randn(2, 20, D)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, ra = loop(xa)
    yb, _ = gm(xb)
    assert ra.dropped is not None and bool(ra.dropped.any())  # drops exercised
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)
    for (n, pa), pb in zip(loop.named_parameters(), gm.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-5, rtol=1e-5, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0], loop(x)[0], atol=1e-5, rtol=1e-5)


def test_grouped_mm_misaligned_sizes_raise_clear_error():
    if not grouped_mm_available():
        with pytest.raises(ConfigError, match="grouped_mm"):
            MoEBlock(MoEConfig(d_model=D, d_ff=F_), backend="grouped_mm")(torch.randn(20, D))
        return
    block = MoEBlock(MoEConfig(d_model=30, d_ff=F_, num_experts=4), backend="grouped_mm")
    with pytest.raises(ConfigError, match="multiples of 4"):
        block(torch.randn(20, 30))


def test_gradients_reach_router_experts_and_shared_gate():
    torch.manual_seed(0)
    cfg = MoEConfig(
        d_model=D, d_ff=F_, num_experts=E, top_k=2, num_shared_experts=1, shared_gate=True
    )
    block = MoEBlock(cfg)
    y, _ = block(torch.randn(4, 8, D))
    y.square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_fine_grained_segmentation_keeps_flops_and_params():
    cfg = MoEConfig(d_model=D, d_ff=64, num_experts=4, top_k=2, num_shared_experts=1)
    for m in (1, 2, 4):
        fg = cfg.fine_grained(m)
        assert (fg.num_experts, fg.d_ff, fg.top_k) == (4 * m, 64 // m, 2 * m)
        assert expert_flops_per_token(fg) == expert_flops_per_token(cfg) == (2 + 1) * 3 * 2 * D * 64
        a, b = MoEBlock(cfg), MoEBlock(fg)
        n_exp = lambda blk: sum(p.numel() for p in blk.experts.parameters())  # noqa: E731
        n_sh = lambda blk: sum(p.numel() for p in blk.shared_experts.parameters())  # noqa: E731
        assert n_exp(a) == n_exp(b) and n_sh(a) == n_sh(b)
        y, r = b(torch.randn(6, D))
        assert y.shape == (6, D) and r.expert_ids.shape == (6, 2 * m)
    with pytest.raises(ConfigError, match="fine_grained"):
        cfg.fine_grained(3)


def test_expert_bank_params_roundtrip_and_out_path():
    torch.manual_seed(0)
    for act in ("swiglu", "gelu", "relu"):
        bank = ExpertBank(3, D, F_, act)
        x = torch.randn(7, D)
        for e in range(3):
            p = bank.expert_params(e)
            ref = naive_expert(bank, e, x)
            torch.testing.assert_close(bank.apply_params(p, x), ref, atol=1e-6, rtol=0)
            torch.testing.assert_close(bank.forward_one(e, x), ref, atol=1e-6, rtol=0)
            with torch.no_grad():
                out = torch.empty(7, D)
                ws = torch.empty(10, bank.n_in)
                bank.forward_one(e, x, out=out, workspace=ws)
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        n_in = 2 * F_ if act == "swiglu" else F_
        assert bank.expert_nbytes() == (n_in * D + D * F_) * 4
    with pytest.raises(InputError, match="out of range"):
        ExpertBank(3, D, F_).expert_params(3)
    with pytest.raises(ConfigError, match="act"):
        ExpertBank(3, D, F_, "tanh")


def test_bad_inputs_raise_moelab_errors():
    block = MoEBlock(MoEConfig(d_model=D, d_ff=F_, num_experts=4, top_k=2))
    with pytest.raises(InputError, match="d_model=32"):
        block(torch.randn(5, D + 1))
    with pytest.raises(InputError, match="mask"):
        block(torch.randn(5, D), mask=torch.ones(4, dtype=torch.bool))
    bad = RoutingResult(
        expert_ids=torch.tensor([[0, 7]]), weights=torch.ones(1, 2), logits=torch.zeros(1, 4)
    )
    with pytest.raises(InputError, match="4 experts"):
        dispatch_combine(torch.randn(1, D), bad, block.experts)
    with pytest.raises(InputError, match="expert_ids"):
        dispatch_combine(torch.randn(2, D), bad, block.experts)
    with pytest.raises(ConfigError, match="backend"):
        MoEBlock(MoEConfig(d_model=D, d_ff=F_), backend="einsum")
    with pytest.raises(ConfigError, match="dispatch_backend"):
        MoEConfig(dispatch_backend="nope")
    nan_x = torch.randn(3, D)
    nan_x[1, 0] = float("nan")
    with pytest.raises(MoelabError):
        block(nan_x)
    with pytest.raises(ConfigError, match="grouped_mm"):
        dispatch_combine(
            torch.randn(SMALL_SLOTS, D),
            RoutingResult(
                expert_ids=torch.zeros(SMALL_SLOTS, 2, dtype=torch.long),
                weights=torch.ones(SMALL_SLOTS, 2),
                logits=torch.zeros(SMALL_SLOTS, 4),
            ),
            CountingExperts(block.experts),
            backend="grouped_mm",
        )


@pytest.mark.parametrize("act", ["swiglu", "gelu", "relu"])
def test_sorted_experts_backward_passes_gradcheck(act):
    """The hand-written backward of the sorted-expert loop against finite differences (fp64)."""
    torch.manual_seed(0)
    bank = ExpertBank(3, 6, 5, act, dtype=torch.float64)
    xs = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    counts = [3, 0, 4]  # an expert without tokens gets a zero gradient

    def fn(xs, gu, down):
        return sorted_expert_mlp(xs, gu, down, counts, act)

    gu = bank.gate_up_proj.detach().clone().requires_grad_()
    down = bank.down_proj.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (xs, gu, down), eps=1e-6, atol=1e-5)
    ys = bank.forward_sorted(xs, counts)
    ref = torch.cat([naive_expert(bank, 0, xs[:3]), naive_expert(bank, 2, xs[3:])])
    torch.testing.assert_close(ys, ref)
    ys.sum().backward()
    assert torch.equal(bank.gate_up_proj.grad[1], torch.zeros_like(bank.gate_up_proj.grad[1]))
