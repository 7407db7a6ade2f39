"""Numerical equivalence of moelab's MoEBlock with transformers' MoE blocks (same weights, fp32).

Tiny modules are built from transformers' config classes (no hub access); weights are copied
HF -> moelab (Mixtral, OLMoE, DeepSeek-V3, Switch) or moelab -> HF (Qwen2-MoE) and outputs,
router logits, selections and combine weights are compared within 1e-5.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moelab.layers.config import MoEConfig  # noqa: E402
from moelab.layers.moe import MoEBlock  # noqa: E402
from moelab.layers.routing import ROUTERS  # noqa: E402

ATOL = 1e-5
D, F_, E = 32, 48, 8


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny blocks: one thread avoids OpenMP barrier overhead on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Normal weights (HF blocks init some weights to zeros / empty)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def compare_topk(hf_gate, ours: MoEBlock, x2d: torch.Tensor) -> None:
    """Router logits, expert sets and combine weights agree (slot order may differ)."""
    logits, w_hf, i_hf = hf_gate(x2d)
    r = ours.router(x2d)
    torch.testing.assert_close(r.logits, logits, atol=ATOL, rtol=0)
    i_ours, o1 = r.expert_ids.sort(dim=-1)
    i_ref, o2 = i_hf.sort(dim=-1)
    assert torch.equal(i_ours, i_ref)
    torch.testing.assert_close(r.weights.gather(1, o1), w_hf.gather(1, o2), atol=ATOL, rtol=0)


def test_mixtral_block_equivalence_and_gradients():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hc = MixtralConfig(
        hidden_size=D,
        intermediate_size=F_,
        num_local_experts=E,
        num_experts_per_tok=2,
        experts_implementation="eager",
    )
    hf = MixtralSparseMoeBlock(hc)
    randomize(hf, 0)
    ours = MoEBlock(MoEConfig(d_model=D, d_ff=F_, num_experts=E, top_k=2))
    with torch.no_grad():  # HF -> moelab
        ours.router.gate.weight.copy_(hf.gate.weight)
        ours.experts.gate_up_proj.copy_(hf.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf.experts.down_proj)
    g = torch.Generator().manual_seed(1)
    for shape in [(1, 1, D), (1, 5, D), (3, 17, D)]:
        x = torch.randn(shape, generator=g)
        with torch.no_grad():
            y_hf = hf(x.clone())
            y, routing = ours(x)
        assert y.shape == shape
        torch.testing.assert_close(y, y_hf, atol=ATOL, rtol=0)
        assert routing.expert_ids.shape == (shape[0] * shape[1], 2)
        compare_topk(hf.gate, ours, x.reshape(-1, D))
        assert y.abs().max() > 1e-3  # not a trivially zero output

    # gradients: same loss, same grads w.r.t. input and every weight
    x = torch.randn(2, 9, D, generator=g)
    gout = torch.randn(2, 9, D, generator=g)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (hf(xa) * gout).sum().backward()
    (ours(xb)[0] * gout).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.router.gate.weight.grad, hf.gate.weight.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        ours.experts.gate_up_proj.grad, hf.experts.gate_up_proj.grad, atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        ours.experts.down_proj.grad, hf.experts.down_proj.grad, atol=ATOL, rtol=0
    )


def test_qwen2_moe_block_with_shared_expert_and_gate():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    hc = Qwen2MoeConfig(
        hidden_size=D,
        moe_intermediate_size=F_,
        shared_expert_intermediate_size=2 * F_,
        num_experts=E,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        experts_implementation="eager",
    )
    hf = Qwen2MoeSparseMoeBlock(hc)
    cfg = MoEConfig(
        d_model=D,
        d_ff=F_,
        num_experts=E,
        top_k=4,
        norm_topk_prob=False,
        num_shared_experts=1,
        shared_d_ff=2 * F_,
        shared_gate=True,
    )
    ours = MoEBlock(cfg)
    randomize(ours, 2)
    with torch.no_grad():  # moelab -> HF
        hf.gate.weight.copy_(ours.router.gate.weight)
        hf.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        hf.experts.down_proj.copy_(ours.experts.down_proj)
        gate_w, up_w = ours.shared_experts.gate_up_proj[0].chunk(2, dim=0)
        hf.shared_expert.gate_proj.weight.copy_(gate_w)
        hf.shared_expert.up_proj.weight.copy_(up_w)
        hf.shared_expert.down_proj.weight.copy_(ours.shared_experts.down_proj[0])
        hf.shared_expert_gate.weight.copy_(ours.shared_gate.weight)
    x = torch.randn(2, 11, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y_hf = hf(x)
        y, routing = ours(x)
        torch.testing.assert_close(y, y_hf, atol=ATOL, rtol=0)
        compare_topk(hf.gate, ours, x.reshape(-1, D))
        # the shared expert and its sigmoid gate matter: removing the gate changes the output
        ours.shared_gate.weight.zero_()  # sigmoid(0) = 1/2
        y_half, _ = ours(x)
    shared = hf.shared_expert(x)
    torch.testing.assert_close(
        y_half,
        y_hf - torch.sigmoid(hf.shared_expert_gate(x)) * shared + 0.5 * shared,
        atol=ATOL,
        rtol=0,
    )
    # not renormalised: weights sum below 1
    assert bool((routing.weights.sum(-1) < 1 - 1e-3).all())


def test_olmoe_block_equivalence():
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    hc = OlmoeConfig(
        hidden_size=D,
        intermediate_size=F_,
        num_experts=E,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        experts_implementation="eager",
    )
    hf = OlmoeSparseMoeBlock(hc)
    randomize(hf, 4)
    ours = MoEBlock(MoEConfig(d_model=D, d_ff=F_, num_experts=E, top_k=2, norm_topk_prob=False))
    with torch.no_grad():
        ours.router.gate.weight.copy_(hf.gate.weight)
        ours.experts.gate_up_proj.copy_(hf.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf.experts.down_proj)
    x = torch.randn(2, 13, D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x), atol=ATOL, rtol=0)
    compare_topk(hf.gate, ours, x.reshape(-1, D))


def test_grouped_mm_backend_matches_hf_mixtral_grouped_mm():
    from moelab.layers.experts import grouped_mm_available

    if not grouped_mm_available():
        pytest.skip("this torch has no grouped_mm")
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hc = MixtralConfig(
        hidden_size=D,
        intermediate_size=F_,
        num_local_experts=E,
        num_experts_per_tok=2,
        experts_implementation="grouped_mm",
    )
    hf = MixtralSparseMoeBlock(hc)
    randomize(hf, 6)
    ours = MoEBlock(MoEConfig(d_model=D, d_ff=F_, num_experts=E, top_k=2), backend="grouped_mm")
    with torch.no_grad():
        ours.router.gate.weight.copy_(hf.gate.weight)
        ours.experts.gate_up_proj.copy_(hf.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf.experts.down_proj)
        x = torch.randn(2, 10, D, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(ours(x)[0], hf(x), atol=ATOL, rtol=0)


@pytest.mark.skipif("deepseek" not in ROUTERS, reason="deepseek router not implemented")
def test_deepseek_v3_moe_equivalence():
    """Group-limited sigmoid routing with a selection bias, routed scaling, shared experts."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hc = DeepseekV3Config(
        hidden_size=D,
        moe_intermediate_size=F_,
        n_routed_experts=E,
        num_experts_per_tok=3,
        n_shared_experts=2,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        experts_implementation="eager",
    )
    hf = DeepseekV3MoE(hc)
    randomize(hf, 8)
    cfg = MoEConfig(
        d_model=D,
        d_ff=F_,
        num_experts=E,
        top_k=3,
        router="deepseek",
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_shared_experts=2,
    )
    ours = MoEBlock(cfg)
    assert ours.shared_experts.d_ff == 2 * F_ and ours.shared_gate is None
    bias = torch.linspace(-0.3, 0.3, E)  # a selection bias that changes some choices
    with torch.no_grad():
        hf.gate.e_score_correction_bias.copy_(bias)
        ours.router.e_score_correction_bias.copy_(bias)
        ours.router.gate.weight.copy_(hf.gate.weight)
        ours.experts.gate_up_proj.copy_(hf.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf.experts.down_proj)
        s = hf.shared_experts
        ours.shared_experts.gate_up_proj[0].copy_(torch.cat([s.gate_proj.weight, s.up_proj.weight]))
        ours.shared_experts.down_proj[0].copy_(s.down_proj.weight)
    x = torch.randn(2, 15, D, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        y_hf = hf(x)
        y, routing = ours(x)
    torch.testing.assert_close(y, y_hf, atol=ATOL, rtol=0)
    compare_topk(hf.gate, ours, x.reshape(-1, D))
    # the bias changes selection but never the combine weights: weights are unbiased sigmoid
    # scores renormalised and scaled
    sig = torch.sigmoid(routing.logits)
    w = sig.gather(1, routing.expert_ids)
    torch.testing.assert_close(
        routing.weights, 2.5 * w / w.sum(-1, keepdim=True), atol=ATOL, rtol=0
    )
    with torch.no_grad():
        ours.router.e_score_correction_bias.zero_()
        unbiased = ours.router(x.reshape(-1, D))
    assert not torch.equal(unbiased.expert_ids.sort(-1).values, routing.expert_ids.sort(-1).values)
    # group limit: the chosen experts of each token lie in at most topk_group=2 groups
    groups = routing.expert_ids // (E // 4)
    assert all(len(set(row)) <= 2 for row in groups.tolist())


@pytest.mark.skipif("switch" not in ROUTERS, reason="switch router not implemented")
def test_switch_sparse_mlp_capacity_and_drops():
    """transformers 5.23 `SwitchTransformersSparseMLP`: top-1 router, capacity per sequence in
    token order (cumsum of the one-hot choice along the sequence, keep priority <= capacity),
    kept tokens get expert(x) * p_max, and DROPPED tokens get 0 (its `SwitchTransformersExperts`
    starts from zeros and index_adds only kept tokens), so the layer's residual passes them
    through unchanged. transformers v4 instead returned p_max * x for dropped tokens (hidden
    state scaled by the router probability); moelab's semantics are the zero contribution of the
    Switch paper, which is what 5.23 does, so the whole output is comparable and compared.
    Capacity is per sequence in HF and over the flat batch in moelab: we compare per sequence.
    """
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP,
    )

    cap = 3
    hc = SwitchTransformersConfig(
        d_model=D, d_ff=F_, num_experts=4, expert_capacity=cap, dense_act_fn="relu"
    )
    hf = SwitchTransformersSparseMLP(hc).eval()
    randomize(hf, 10)
    cfg = MoEConfig(
        d_model=D,
        d_ff=F_,
        num_experts=4,
        top_k=1,
        router="switch",
        expert_act="relu",
        expert_capacity=cap,
    )
    ours = MoEBlock(cfg).eval()
    with torch.no_grad():
        ours.router.gate.weight.copy_(hf.router.classifier.weight)
        for e in range(4):
            ours.experts.gate_up_proj[e].copy_(hf.experts[f"expert_{e}"].wi.weight)
            ours.experts.down_proj[e].copy_(hf.experts[f"expert_{e}"].wo.weight)
    x = torch.randn(2, 20, D, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        y_hf = hf(x)
        dispatch_mask, p_max, logits = hf.router(x)
        for b in range(2):
            y, routing = ours(x[b])
            torch.testing.assert_close(routing.logits, logits[b], atol=ATOL, rtol=0)
            kept = ~routing.dropped[:, 0]
            assert torch.equal(kept, dispatch_mask[b].sum(-1) > 0)
            # capacity respected exactly, and tokens were dropped (20 tokens, 4 experts x 3)
            counts = torch.bincount(routing.expert_ids[kept, 0], minlength=4)
            assert int(counts.max()) <= cap and int((~kept).sum()) >= 20 - 4 * cap
            assert torch.equal(routing.expert_ids[kept, 0], dispatch_mask[b][kept].argmax(-1))
            torch.testing.assert_close(y, y_hf[b], atol=ATOL, rtol=0)
            torch.testing.assert_close(
                routing.weights[kept, 0], p_max[b, kept, 0], atol=ATOL, rtol=0
            )
            assert torch.equal(y[~kept], torch.zeros_like(y[~kept]))  # dropped: zero
