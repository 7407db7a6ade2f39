"""MoEfication and upcycling: exactness of the split, k = E reproduces the dense model, the whole
command on a tiny random Llama, and clear errors for unsupported models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moelab.errors import ConfigError, ModelError
from moelab.models.transformer import MoETransformer
from moelab.moefy.build import moefy_dense, perplexity, set_top_k, token_blocks
from moelab.moefy.convert import dense_to_moelab, load_dense_lm
from moelab.moefy.partition import balanced_kmeans, partition_neurons, split_ffn
from moelab.moefy.router import fit_router, topk_recall
from moelab.moefy.upcycle import upcycle_dense


def swiglu(x, g, u, d):
    return (F.silu(x @ g.t()) * (x @ u.t())) @ d.t()


@pytest.mark.parametrize("method", ["cluster", "random", "coactivation"])
def test_partition_sums_to_original_ffn(method):
    torch.manual_seed(0)
    f, dm, e = 96, 32, 8
    g, u, d = torch.randn(f, dm), torch.randn(f, dm), torch.randn(dm, f)
    x = torch.randn(50, dm)
    acts = F.silu(x @ g.t()) * (x @ u.t())
    groups = partition_neurons(g, u, e, method, activations=acts, seed=1)
    assert sorted(np.concatenate(groups).tolist()) == list(range(f))  # a partition
    assert all(len(gr) == f // e for gr in groups)  # equal sizes
    gu, dn = split_ffn(g, u, d, groups)
    assert gu.shape == (e, 2 * f // e, dm) and dn.shape == (e, dm, f // e)
    parts = sum(swiglu(x, gu[i, : f // e], gu[i, f // e :], dn[i]) for i in range(e))
    ref = swiglu(x, g, u, d)
    assert torch.allclose(parts, ref, atol=1e-5 * ref.abs().max().item())


def test_balanced_kmeans_recovers_clusters():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 5)) * 10
    x = np.concatenate([c + rng.normal(size=(10, 5)) for c in centers])
    a = balanced_kmeans(x, 4, seed=0)
    assert np.bincount(a).tolist() == [10, 10, 10, 10]
    for k in range(4):  # each true cluster lands in one group
        assert len(set(a[10 * k : 10 * k + 10])) == 1


def test_topk_recall_known_values():
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    target = torch.tensor([[5.0, 1.0, 4.0, 0.0], [5.0, 1.0, 4.0, 0.0]])
    assert topk_recall(scores, target, 1) == pytest.approx(0.5)
    assert topk_recall(scores, target, 2) == pytest.approx(0.5)  # 1 of 2 + 1 of 2


def test_router_learns_a_linear_rule():
    torch.manual_seed(0)
    x = torch.randn(3000, 16)
    w = torch.randn(4, 16)
    norms = torch.softmax(x @ w.t() * 3, -1)  # group shares are a softmax of a linear map
    fit = fit_router(x, norms, epochs=60, lr=3e-2)
    assert fit.topk_recall[1] > 0.85 and fit.heldout_tokens == 300


def test_k_equals_e_reproduces_dense_and_k_sweep(tiny_llama_dir):
    hf, tok = load_dense_lm(tiny_llama_dir)
    dense = dense_to_moelab(hf, max_seq_len=64)
    x = torch.randint(0, hf.config.vocab_size, (2, 32))
    assert torch.allclose(hf(x).logits, dense(x).logits, atol=1e-5)
    blocks = token_blocks(torch.randint(0, hf.config.vocab_size, (2048,)).tolist(), 32, 2048)
    moe, rep = moefy_dense(
        dense, hf.config, blocks, num_experts=4, top_k=2, method="cluster", router_epochs=5
    )
    assert len(rep.router_recall) == 2 and rep.router_tokens == 2048
    set_top_k(moe, 4)
    assert torch.allclose(moe(x).logits, dense(x).logits, atol=1e-4)
    set_top_k(moe, 1)
    r = moe(x).routing[0]
    assert r.expert_ids.shape == (64, 1) and torch.all(r.weights == 1)
    assert perplexity(moe, blocks[:2]) != perplexity(dense, blocks[:2])
    with pytest.raises(ConfigError, match="top_k"):
        set_top_k(moe, 5)


def test_moefy_command_end_to_end(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from moelab.cli import app

    out = tmp_path / "moe"
    res = CliRunner().invoke(
        app,
        [
            "moefy",
            "--model",
            str(tiny_llama_dir),
            "--out",
            str(out),
            "--experts",
            "4",
            "--top-k",
            "2",
            "--router-tokens",
            "4096",
            "--corpus",
            "python-code",
            "--seq-len",
            "64",
            "--eval-tokens",
            "256",
        ],
    )
    assert res.exit_code == 0, res.output
    q = json.loads((out / "quality.json").read_text())
    assert q["quality"]["split"] == "test"
    row = q["quality"]["domains"]["code"]
    assert {"dense", "k=1", "k=2", "k=4"} <= set(row)
    assert row["k=4"] == pytest.approx(row["dense"], rel=1e-4)  # k = E is the dense model
    m = MoETransformer.load(out)
    assert m.cfg.moe.num_experts == 4 and m.moe_layer_indices() == [0, 1]
    assert (out / "tokenizer.json").exists()


def test_upcycle_step0_equals_dense(tiny_llama_dir):
    hf, _ = load_dense_lm(tiny_llama_dir)
    dense = dense_to_moelab(hf, max_seq_len=64)
    moe = upcycle_dense(dense, hf.config, experts=4, top_k=2)
    x = torch.randint(0, hf.config.vocab_size, (2, 32))
    assert torch.allclose(moe(x).logits, dense(x).logits, atol=1e-5)
    assert moe.stats().total_params > dense.stats().total_params


def test_unsupported_models_get_clear_errors(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig

    from moelab.moefy.convert import check_supported

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(
        tmp_path
    )
    with pytest.raises(ModelError, match="Supported families are llama, mistral"):
        load_dense_lm(tmp_path)
    with pytest.raises(ModelError, match="activation 'gelu'"):
        check_supported(LlamaConfig(hidden_act="gelu"))
    with pytest.raises(ModelError, match="does not exist"):
        load_dense_lm(tmp_path / "nope")


def test_moefied_demo_runs_on_a_tiny_llama(tiny_llama_dir, tmp_path):
    """The `moelab demo --model smollm2-moe` chain (moefy -> trace -> analyze -> predict ->
    report) on a tiny random Llama, through the same code path as the real SmolLM2."""
    from moelab.demo.pipeline import DemoConfig
    from moelab.demo.smollm2 import run_moefied_demo

    cfg = DemoConfig.make(quick=True, out=str(tmp_path))
    res = run_moefied_demo(cfg, tiny_llama_dir, None, "tiny-moe", experts=4, corpus="python-code")
    root = tmp_path / "tiny-moe"
    for stage in ("moefy", "trace", "analyze", "predict"):
        assert (root / stage / "done.json").exists()
    assert res["trace"]["test_tokens"] > 0 and res["predict"]["split"] == "test"
    page = (root / "report.html").read_text()
    assert "MoEfication quality" in page and "Expert predictors" in page and "2.1 " in page
