"""Expert ablation: hooks, importance, never-routed experts, agreement with a pruned model."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from experts_tiny import tiny_moe

from moelab.errors import ConfigError, ModelError
from moelab.experts.ablate import (
    ablated,
    ablation_importance,
    batched_path_reason,
    plot_importance,
    top_experts_by_domain,
)
from moelab.experts.heldout import EvalSample, domain_loss, sequence_sums
from moelab.experts.prune import prune_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _sample(vocab: int = 97, B: int = 6, S: int = 20, seed: int = 0) -> EvalSample:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (B, S), generator=g)
    dom = torch.randint(0, 2, (B, S - 1), generator=g)
    dom[:, 0] = -1  # a document start: not scored
    return EvalSample(ids, dom, ["a", "b"], "synthetic")


def test_sequence_sums_match_the_token_mean_cross_entropy() -> None:
    m = tiny_moe()
    s = _sample()
    sums, counts = sequence_sums(m, s, batch_size=4)
    with torch.no_grad():
        logits = m(s.input_ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 97), s.input_ids[:, 1:].reshape(-1), reduction="none"
    )
    dom = s.target_domain.reshape(-1)
    dl = domain_loss(sums, counts, s.domains)
    for j, name in enumerate(s.domains):
        assert dl.value[name] == pytest.approx(float(nll[dom == j].mean()), rel=1e-6)
    assert dl.value["all"] == pytest.approx(float(nll[dom >= 0].mean()), rel=1e-6)
    assert dl.tokens["all"] == s.num_tokens == int((dom >= 0).sum())
    assert 0 < dl.se["all"] < 1
    # running from a block on cached block inputs gives the same sums (ablation's shortcut)
    from moelab.experts.heldout import block_inputs

    for b in (0, 1):
        st = block_inputs(m, s, b, batch_size=4)
        s2, c2 = sequence_sums(m, s, batch_size=4, start_block=b, states=st)
        assert np.allclose(s2, sums, rtol=1e-6, atol=1e-6) and np.array_equal(c2, counts)


@pytest.mark.parametrize("batched", [True, False])
def test_a_never_routed_expert_has_zero_importance(batched: bool) -> None:
    m = tiny_moe(num_experts=4, router_bias=True)
    with torch.no_grad():
        for i in m.moe_layer_indices():
            m.blocks[i].ffn.router.gate.bias[2] = -100.0  # expert 2 is never chosen
    s = _sample()
    res = ablation_importance(m, s, show_progress=False, batched=batched)
    assert res.extra["path"] == "batched" if batched else res.extra["path"].startswith("one")
    for mode in ("reroute", "zero"):
        imp = res.importance(mode)
        assert imp.shape == (2, 4)
        assert np.all(np.abs(res.delta[mode][:, 2, :]) < 1e-6), mode
        assert np.all(np.abs(np.delete(imp, 2, axis=1)) > 1e-5), mode  # the others matter
    assert np.all(res.delta["zero"][:, 2, :] == 0.0)  # bit-identical forward
    top = top_experts_by_domain(res, "zero", 2)
    assert set(top) == {"a", "b", "all"} and all(r["expert"] != 2 for r in top["all"])


@pytest.mark.parametrize(
    "kw",
    [
        {"bias_update_rate": 0.001},  # selection bias: per-copy bias in the stacked forward
        {"norm_topk_prob": False},  # every token's weights change when a logit is masked
        {"router": "noisy_topk"},
    ],
)
def test_the_batched_path_equals_one_removal_per_forward(kw: dict) -> None:
    m = tiny_moe(num_experts=5, n_layers=3, **kw)
    if "bias_update_rate" in kw:
        with torch.no_grad():
            for li in m.moe_layer_indices():
                bias = torch.tensor([0.01, -0.02, 0.0, 0.3, 0.02]) * (li + 1)
                m.blocks[li].ffn.router.selection_bias.copy_(bias)
    s = _sample(B=7, S=16)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fast = ablation_importance(m, s, show_progress=False, batch_size=3)
    slow = ablation_importance(m, s, show_progress=False, batch_size=3, batched=False)
    assert fast.extra["path"] == "batched"
    assert slow.extra["path"] == "one removal per forward: batched=False was asked for"
    assert fast.base.value == pytest.approx(slow.base.value, abs=1e-6)
    for mode in ("reroute", "zero"):
        assert np.isfinite(slow.delta[mode]).all() and np.abs(slow.delta[mode]).max() > 1e-3
        np.testing.assert_allclose(fast.delta[mode], slow.delta[mode], rtol=0, atol=1e-5)
        np.testing.assert_allclose(fast.se[mode], slow.se[mode], rtol=0, atol=1e-5)
    for k, v in m.state_dict().items():  # weights and the selection-bias buffers restored
        assert torch.equal(v, before[k]), k
    # one layer, one mode, through a resume cache: the same entries
    part = ablation_importance(m, s, modes=("zero",), layers=[1], show_progress=False)
    np.testing.assert_allclose(part.delta["zero"][1], slow.delta["zero"][1], atol=1e-5)
    assert np.isnan(part.delta["zero"][0]).all()


def test_the_batched_path_states_why_it_does_not_apply() -> None:
    assert batched_path_reason(tiny_moe()) is None
    cap = tiny_moe(num_experts=4, capacity_factor=1.0)
    assert "capacity" in batched_path_reason(cap)
    ec = tiny_moe(num_experts=4, router="expert_choice")
    assert "expert_choice" in batched_path_reason(ec)
    s = _sample(B=3, S=10)
    res = ablation_importance(cap, s, show_progress=False)  # falls back, still computes
    assert res.extra["path"].startswith("one removal per forward: expert capacity")
    assert np.isfinite(res.delta["zero"]).all()


def test_reroute_equals_the_pruned_model_and_hooks_are_removed() -> None:
    m = tiny_moe(num_experts=5, top_k=2, bias_update_rate=0.001)
    with torch.no_grad():  # aux-loss-free selection biases: expert 3 favoured for selection
        for li in m.moe_layer_indices():
            m.blocks[li].ffn.router.selection_bias.copy_(
                torch.tensor([0.01, -0.02, 0.0, 0.3, 0.02])
            )
    x = torch.randint(2, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    bias_before = m.blocks[1].ffn.router.selection_bias.clone()
    with torch.no_grad():
        ref = m(x).logits
        with ablated(m, {1: [3]}, "reroute"):
            ab = m(x).logits
        after = m(x).logits
        pruned = prune_model(m, [[0, 1, 2, 4], [0, 1, 2, 4]])
        with ablated(m, {0: [3], 1: [3]}, "reroute"):
            ab2 = m(x).logits
        pr = pruned(x).logits
    assert torch.equal(ref, after)
    assert torch.equal(m.blocks[1].ffn.router.selection_bias, bias_before)  # restored
    assert not torch.allclose(ab, ref, atol=1e-4)
    assert torch.allclose(ab2, pr, atol=1e-5)


def test_zero_mode_drops_only_that_expert() -> None:
    m = tiny_moe(num_experts=4, top_k=2)
    x = torch.randint(2, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    got = {}

    def grab(_m, _a, out):
        got["w"] = out[1].weights.clone()
        got["ids"] = out[1].expert_ids.clone()

    h = m.blocks[0].ffn.register_forward_hook(grab)
    with torch.no_grad(), ablated(m, {0: [1]}, "zero"):
        m(x)
    h.remove()
    hit = got["ids"] == 1
    assert hit.any()
    assert torch.all(got["w"][hit] == 0) and torch.all(got["w"][~hit] > 0)


def test_refusals() -> None:
    m = tiny_moe(num_experts=4, top_k=2)
    with pytest.raises(ConfigError):
        with ablated(m, {0: [7]}, "zero"):
            pass
    with pytest.raises(ConfigError):
        with ablated(m, {0: [0]}, "drop"):
            pass
    with pytest.raises(ConfigError):
        with ablated(m, {0: [0, 1, 2]}, "reroute"):  # leaves 1 < top_k experts
            pass
    h = tiny_moe(num_experts=4, top_k=2, router="hash", vocab_size=97)
    with pytest.raises(ModelError):
        with ablated(h, {0: [0]}, "reroute"):
            pass


def _tiny_hf(family: str):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, intermediate_size=24,
                  num_experts_per_tok=2)  # fmt: skip
    if family == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_local_experts=5)
        cls = transformers.MixtralForCausalLM
    elif family == "olmoe":
        cfg = transformers.OlmoeConfig(**common, num_experts=5)
        cls = transformers.OlmoeForCausalLM
    else:
        cfg = transformers.Qwen2MoeConfig(**common, num_experts=5, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=16, norm_topk_prob=False)  # fmt: skip
        cls = transformers.Qwen2MoeForCausalLM
    torch.manual_seed(0)
    m = cls(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "gate" in n and p.dim() == 2 and p.shape[0] == 5:
                p.normal_(0, 0.5)  # router weights init to zero in some families
    return m


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe"])
def test_hf_reroute_matches_a_model_without_the_expert(family: str) -> None:
    m = _tiny_hf(family)
    x = torch.randint(2, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(input_ids=x).logits
        with ablated(m, {0: []}, "reroute"):  # the hook's re-computation itself is exact
            same = m(input_ids=x).logits
        with ablated(m, {0: [2], 1: [2]}, "reroute"):
            ab = m(input_ids=x).logits
        with ablated(m, {1: [4]}, "zero"):
            zero = m(input_ids=x).logits
    assert torch.allclose(same, ref, atol=1e-6)
    assert not torch.allclose(zero, ref, atol=1e-5)
    # reference: the same weights without expert 2 in a model of E-1 experts
    cfg = m.config.__class__(**{**m.config.to_dict()})
    key = "num_local_experts" if family == "mixtral" else "num_experts"
    setattr(cfg, key, 4)
    small = type(m)(cfg).eval()
    keep = torch.tensor([0, 1, 3, 4])
    sd = {}
    for n, p in m.state_dict().items():
        tgt = small.state_dict()[n]
        sd[n] = p[keep] if p.shape != tgt.shape and p.shape[0] == 5 else p
    small.load_state_dict(sd)
    with torch.no_grad():
        pr = small(input_ids=x).logits
    assert torch.allclose(ab, pr, atol=1e-5)


def test_importance_on_a_hf_model_and_heatmap(tmp_path) -> None:
    m = _tiny_hf("mixtral")
    s = _sample(B=4, S=12)
    res = ablation_importance(m, s, show_progress=False, cache=tmp_path / "c.json")
    assert res.extra["path"].startswith("one removal per forward: transformers models")
    assert res.delta["reroute"].shape == (2, 5, 3)
    assert np.isfinite(res.delta["zero"]).all() and np.isfinite(res.se["zero"]).all()
    again = ablation_importance(m, s, show_progress=False, cache=tmp_path / "c.json")  # resumed
    assert np.array_equal(again.delta["zero"], res.delta["zero"])
    plot_importance(res, tmp_path / "imp.png")
    assert (tmp_path / "imp.png").stat().st_size > 1000
