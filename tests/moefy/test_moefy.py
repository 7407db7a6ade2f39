"""MoEfication and upcycling: exactness of the split, k = E reproduces the dense model, the whole
command on a tiny random Llama, and clear errors for unsupported models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moelab.errors import ConfigError, InputError, ModelError
from moelab.models.transformer import MoETransformer
from moelab.moefy.build import (
    ffn_compute_fraction,
    moefy_dense,
    perplexity,
    set_top_k,
    token_blocks,
)
from moelab.moefy.calibrate import LayerWalker, refit_down_proj, selected_features
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


def run_moefy_cli(tiny_llama_dir, out, *extra: str):
    from typer.testing import CliRunner

    from moelab.cli import app

    args = ["moefy", "--model", str(tiny_llama_dir), "--out", str(out), "--experts", "4"]
    args += ["--router-tokens", "4096", "--corpus", "python-code", "--seq-len", "64"]
    res = CliRunner().invoke(app, [*args, "--eval-tokens", "256", *extra])
    assert res.exit_code == 0, res.output
    return json.loads((out / "quality.json").read_text()), res.output


def test_moefy_command_end_to_end(tiny_llama_dir, tmp_path):
    out = tmp_path / "moe"
    q, _ = run_moefy_cli(tiny_llama_dir, out, "--top-k", "2", "--no-calibrate")
    assert q["quality"]["split"] == "test" and q["calibrated"] is False
    row = q["quality"]["domains"]["code"]
    assert {"dense", "k=1", "k=2", "k=4"} <= set(row)
    assert row["k=4"] == pytest.approx(row["dense"], rel=1e-4)  # k = E is the dense model
    assert q["ffn_compute_fraction"] == {"k=1": 0.25, "k=2": 0.5, "k=4": 1.0}
    m = MoETransformer.load(out)
    assert m.cfg.moe.num_experts == 4 and m.moe_layer_indices() == [0, 1]
    assert (out / "tokenizer.json").exists()


def test_moefy_command_calibrated_with_a_dense_first_layer(tiny_llama_dir, tmp_path):
    out = tmp_path / "moe_cal"
    q, text = run_moefy_cli(
        tiny_llama_dir, out, "--top-k", "4", "--dense-layers", "1", "--distill-steps", "2"
    )
    assert q["calibrated"] is True and q["dense_layers"] == 1
    row = q["quality"]["domains"]["code"]
    assert set(row) == {"tokens", "dense", "k=4"}  # calibrated for --top-k only
    assert row["k=4"] == pytest.approx(row["dense"], rel=1e-4)  # the refit keeps k = E exact
    assert q["ffn_compute_fraction"] == {"k=4": 1.0}
    assert q["calibration_rel_err_mean"]["after"] < 1e-8
    assert "calibration:" in text and "distilled 2 steps" in text
    dis = q["distilled"]
    assert dis["steps_done"] == 2 and dis["tokens"] == 2 * 2 * 64
    assert set(dis["quality_before"]["domains"]["code"]) == {"tokens", "dense", "k=4"}
    m = MoETransformer.load(out)
    assert m.moe_layer_indices() == [1]
    rep = json.loads((out / "moefy.json").read_text())
    assert [c["layer"] for c in rep["calibration"]] == [1] and len(rep["router_recall"]) == 1


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
    m = res["moefy"]
    assert m["calibrated"] and m["dense_layers"] == 1 and "(calibration)" in page
    assert m["ffn_compute_fraction"] == {"k=2": 0.75}  # layer 0 dense, layer 1 at 2 of 4


def test_layer_walker_reproduces_the_model_forward(tiny_llama_dir):
    hf, _ = load_dense_lm(tiny_llama_dir)
    dense = dense_to_moelab(hf, max_seq_len=64)
    blocks = list(torch.randint(0, hf.config.vocab_size, (3, 32)))
    w = LayerWalker(dense, blocks, batch=2)
    for blk in dense.blocks:
        h_attn, x = w.ffn_input(blk)
        assert x.shape == (96, 64)
        w.advance(h_attn, blk.ffn(x))
    with torch.no_grad():
        ref = dense(torch.stack(blocks)).logits
        got = dense.lm_head(dense.norm(w.h))
    assert torch.allclose(got, ref, atol=1e-5)


def test_refit_down_proj_recovers_a_planted_solution():
    from moelab.layers.config import MoEConfig
    from moelab.layers.moe import MoEBlock

    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2, router_bias=True, unit_weights=True)
    moe = MoEBlock(cfg)
    x = torch.randn(4000, 16)
    with torch.no_grad():
        planted = moe.experts.down_proj.clone() + 0.5 * torch.randn_like(moe.experts.down_proj)
        a = selected_features(moe, x)  # [N, E*f]
        target = a @ planted.permute(0, 2, 1).reshape(32, 16)
        cal = refit_down_proj(moe, x, target, ridge=1e-8, heldout=0.2, layer=3)
    assert cal.layer == 3 and (cal.fitted_tokens, cal.heldout_tokens) == (3200, 800)
    assert cal.rel_err_before > 0.1 and cal.rel_err_after < 1e-8
    assert torch.allclose(moe.experts.down_proj, planted, atol=1e-4)
    # the refitted block itself now produces the target
    y, _ = moe(x)
    assert torch.allclose(y, target, atol=1e-4)
    with pytest.raises(ConfigError, match="heldout"):
        refit_down_proj(moe, x, target, heldout=1.0)


def test_calibration_lowers_heldout_reconstruction_error(tiny_llama_dir):
    hf, _ = load_dense_lm(tiny_llama_dir)
    dense = dense_to_moelab(hf, max_seq_len=64)
    blocks = token_blocks(torch.randint(0, hf.config.vocab_size, (8192,)).tolist(), 64, 8192)
    moe, rep = moefy_dense(dense, hf.config, blocks, 4, 2, router_epochs=5, calibrate=True)
    assert rep.calibrated and [c["layer"] for c in rep.calibration] == [0, 1]
    for c in rep.calibration:  # held-out calibration tokens, never fitted
        assert c["heldout_tokens"] > 0 and c["rel_err_after"] < c["rel_err_before"]
    assert ffn_compute_fraction(moe) == 0.5
    plain, _ = moefy_dense(dense, hf.config, blocks, 4, 2, router_epochs=5)
    # the experts' gate/up halves are the same split; only down projections differ
    for a, b in zip(moe.blocks, plain.blocks, strict=True):
        assert torch.equal(a.ffn.experts.gate_up_proj, b.ffn.experts.gate_up_proj)
        assert not torch.equal(a.ffn.experts.down_proj, b.ffn.experts.down_proj)
    with pytest.raises(ConfigError, match="dense-layers"):
        moefy_dense(dense, hf.config, blocks, 4, 2, dense_layers=2)


class CharTokenizer:
    """Token id = domain letter's code, so every block tells which domain it came from."""

    eos_token_id = 0

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}


def test_domain_balanced_blocks_cover_every_domain_in_equal_shares():
    from moelab.data.corpora import Document
    from moelab.moefy.api import domain_balanced_blocks

    # documents listed domain by domain, as splits store them; domain "a" alone has 4000 tokens
    docs = [Document(f"{d}{i}", d * 399, d) for d in "abc" for i in range(10)]
    blocks = domain_balanced_blocks(CharTokenizer(), docs, 1200, 100, seed=1)
    assert all(b.shape == (100,) for b in blocks)
    first = [chr(int(b[0])) for b in blocks]
    assert sorted(first) == ["a"] * 4 + ["b"] * 4 + ["c"] * 4  # equal shares of 1200 tokens
    assert first != sorted(first)  # shuffled: a held-out tail covers several domains
    again = domain_balanced_blocks(CharTokenizer(), docs, 1200, 100, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(blocks, again, strict=True))
    with pytest.raises(InputError, match="no domain has 5000 tokens"):
        domain_balanced_blocks(CharTokenizer(), docs, 1200, 5000)


def test_distillation_trains_only_the_experts_and_lowers_kl(tiny_llama_dir):
    from moelab.moefy.distill import distill

    hf, _ = load_dense_lm(tiny_llama_dir)
    dense = dense_to_moelab(hf, max_seq_len=64)
    blocks = token_blocks(torch.randint(0, hf.config.vocab_size, (4096,)).tolist(), 64, 4096)
    moe, _ = moefy_dense(dense, hf.config, blocks, 4, 1, router_epochs=5, calibrate=True)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    log = distill(moe, dense, blocks, steps=30, lr=3e-3, batch_size=4, seed=0)
    assert [r["step"] for r in log] == list(range(1, 31))
    first = sum(r["kl"] for r in log[:5]) / 5
    last = sum(r["kl"] for r in log[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    after = moe.state_dict()
    for k, v in before.items():
        changed = not torch.equal(v, after[k])
        assert changed == (".experts." in k), k  # only expert weights move
    assert all(p.requires_grad for p in moe.parameters()) and not moe.training
    with pytest.raises(ConfigError, match="no MoE layers"):
        distill(dense, dense, blocks, steps=1)
