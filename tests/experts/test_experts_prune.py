"""Pruning and merging: selection, identical-expert merge, save/load/trace/export round trips."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from experts_tiny import tiny_moe

from moelab.errors import ConfigError, ModelError
from moelab.experts.prune import merge_model, prune_model, routing_stats, select_experts
from moelab.experts.similarity import permute_expert
from moelab.models import MoETransformer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_select_experts_keeps_the_highest_scores() -> None:
    s = np.array([[0.1, 0.5, 0.2, 0.9], [3.0, 1.0, 2.0, 0.0]])
    assert select_experts(s, 2, 4) == [[1, 3], [0, 2]]
    assert select_experts(None, 3, 4) == [[0, 1, 2]]
    with pytest.raises(ConfigError):
        select_experts(s, 5, 4)


def test_prune_copies_the_kept_experts_and_router_rows() -> None:
    m = tiny_moe(num_experts=6, top_k=2)
    p = prune_model(m, [[0, 2, 5], [1, 3, 4]])
    assert p.cfg.moe.num_experts == 3 and p.cfg.moe.top_k == 2
    for li, keep in zip(m.moe_layer_indices(), ([0, 2, 5], [1, 3, 4]), strict=True):
        a, b = m.blocks[li].ffn, p.blocks[li].ffn
        assert torch.equal(b.experts.gate_up_proj, a.experts.gate_up_proj[keep])
        assert torch.equal(b.experts.down_proj, a.experts.down_proj[keep])
        assert torch.equal(b.router.gate.weight, a.router.gate.weight[keep])
    assert torch.equal(p.embed_tokens.weight, m.embed_tokens.weight)
    with pytest.raises(ConfigError):
        prune_model(m, [[0, 1], [0, 1, 2]])
    with pytest.raises(ConfigError):
        prune_model(m, [[0, 0, 1]])
    with pytest.raises(ModelError):
        prune_model(tiny_moe(num_experts=4, router="hash", vocab_size=97), [[0, 1]])


def test_merging_two_identical_experts_keeps_outputs_equal() -> None:
    m = tiny_moe(num_experts=4, top_k=1)
    with torch.no_grad():
        for li in m.moe_layer_indices():
            bank, gate = m.blocks[li].ffn.experts, m.blocks[li].ffn.router.gate
            perm = np.random.default_rng(li).permutation(bank.d_ff)
            gu, dn = permute_expert(bank.gate_up_proj[0], bank.down_proj[0], perm)
            bank.gate_up_proj[3].copy_(gu)  # expert 3 = expert 0 with shuffled neurons
            bank.down_proj[3].copy_(dn)
            gate.weight[3].copy_(gate.weight[0])
    x = torch.randint(2, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    groups = [[[0, 3], [1], [2]]] * 2
    freq = np.array([[0.3, 0.2, 0.1, 0.4]] * 2)
    merged, used = merge_model(m, x, 3, groups=groups, freq=freq)
    assert used == groups and merged.cfg.moe.num_experts == 3
    with torch.no_grad():
        a, b = m(x).logits, merged(x).logits
    assert torch.allclose(a, b, atol=1e-6)
    # the merged expert is the group's leader (expert 3, most frequent) itself
    for li in m.moe_layer_indices():
        a_gu = m.blocks[li].ffn.experts.gate_up_proj[3]
        assert torch.allclose(merged.blocks[li].ffn.experts.gate_up_proj[0], a_gu, atol=1e-6)


def test_merge_groups_cover_all_experts_and_change_the_model() -> None:
    m = tiny_moe(num_experts=6, top_k=2)
    x = torch.randint(2, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    freq, mass = routing_stats(m, x)
    assert np.allclose(freq.sum(1), 1) and np.allclose(mass.sum(1), 1)
    merged, groups = merge_model(m, x, 3)
    for g in groups:
        assert sorted(e for grp in g for e in grp) == list(range(6)) and len(g) == 3
    with torch.no_grad():
        assert merged(x).logits.shape == m(x).logits.shape


def test_a_pruned_model_reloads_traces_and_exports(tmp_path) -> None:
    from moelab.data.corpora import Document
    from moelab.trace.api import trace_model

    m = tiny_moe(num_experts=6, top_k=2)
    p = prune_model(m, [[0, 1, 4]])
    p.save(tmp_path / "pruned")
    q = MoETransformer.load(tmp_path / "pruned")
    x = torch.randint(2, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(p(x).logits, q(x).logits)
    rng = np.random.default_rng(0)
    docs = [Document(f"d{i}", "x", "toy") for i in range(3)]
    tok = lambda text: [int(t) for t in rng.integers(2, 97, 20)]  # noqa: E731
    store = trace_model(tmp_path / "pruned", docs, tok, tmp_path / "trace", progress=False)
    assert store.meta.num_experts == 3 and store.meta.top_k == 2 and store.meta.num_layers == 2
    assert store.num_tokens == 3 * 21  # <bos> + 20 tokens per document
    transformers = pytest.importorskip("transformers")
    from moelab.models.export import export_hf

    out = export_hf(q, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=x).logits, q(x).logits, atol=1e-4)
