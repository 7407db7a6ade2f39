"""TrainConfig validation, schedule, metrics, MoE-vs-dense compare, topics CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from moelab.errors import ConfigError, InputError
from moelab.layers.types import RoutingResult
from moelab.train import TrainConfig, load_train_config, quick_overrides
from moelab.train.compare import compare
from moelab.train.metrics import ExpertLoad, unigram_logprobs, unigram_perplexity
from moelab.train.schedule import lr_factor


def test_bad_configs_raise_clear_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="d_model=100 must be divisible by n_heads=3"):
        load_train_config(d_model=100, n_heads=3)
    with pytest.raises(ConfigError, match=r"lr=-1\.0: Input should be greater than 0"):
        load_train_config(lr=-1.0)
    with pytest.raises(ConfigError, match="mode='rnn'"):
        load_train_config(mode="rnn")
    with pytest.raises(ConfigError, match="top_k=3 must be <= num_experts=2"):
        load_train_config(num_experts=2, top_k=3)
    y = tmp_path / "c.yaml"
    y.write_text("d_model: 64\nnot_a_field: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*not_a_field.*Extra inputs"):
        load_train_config(y)
    y.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_train_config(y)
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="router='nope' must be one of"):
        load_train_config(router="nope")
    with pytest.raises(ConfigError, match="n_kv_heads"):  # model-level check, raised when building
        TrainConfig(n_kv_heads=3).build_model_config(512, 0, 4, 1)


def test_precedence_quick_yaml_flags(tmp_path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("d_model: 48\nn_heads: 4\nmax_steps: 7\n")
    cfg = load_train_config(y, quick=True, max_steps=9, lr=None)
    assert cfg.d_model == 48 and cfg.max_steps == 9 and cfg.lr == TrainConfig().lr
    assert cfg.n_layers == quick_overrides()["n_layers"]
    # defaults = the documented default small MoE LM
    d = TrainConfig()
    assert (d.n_layers, d.d_model, d.num_experts, d.top_k, d.d_ff, d.seq_len, d.vocab_size) == (
        4,
        128,
        8,
        2,
        256,
        128,
        4096,
    )
    # YAML round trip
    y2 = tmp_path / "back.yaml"
    y2.write_text(cfg.to_yaml())
    assert load_train_config(y2) == cfg


def test_dense_config_has_equal_active_flops() -> None:
    from moelab.models import MoETransformer

    moe = MoETransformer(
        TrainConfig(d_model=32, n_heads=2, d_ff=32, num_experts=4).build_model_config(300, 0, 4, 1)
    )
    dense = MoETransformer(
        TrainConfig(d_model=32, n_heads=2, d_ff=32, num_experts=4, dense=True).build_model_config(
            300, 0, 4, 1
        )
    )
    assert dense.moe_layer_indices() == [] and dense.cfg.d_ff == 2 * 32
    sm, sd = moe.stats(32), dense.stats(32)
    assert sm.flops_per_token_fwd - sm.router_flops_per_token == sd.flops_per_token_fwd
    assert sm.total_params > sd.total_params


def test_schedule_warmup_cosine() -> None:
    f = [lr_factor(s, 10, 110, 0.1) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert (
        f[10] == pytest.approx(1.0)
        and f[60] == pytest.approx(0.55)
        and f[110] == pytest.approx(0.1)
    )
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    with pytest.raises(ConfigError):
        lr_factor(0, 1, 0)


def test_unigram_perplexity_matches_hand_computation() -> None:
    train_ids = np.array([5, 5, 5, 6])
    lp = unigram_logprobs(train_ids, vocab_size=8)  # add-one: counts 1,1,1,1,1,4,2,1 / 12
    assert np.exp(lp[5]) == pytest.approx(4 / 12) and np.exp(lp[0]) == pytest.approx(1 / 12)
    ppl = unigram_perplexity(lp, np.array([5, 6, -100]))
    assert ppl == pytest.approx(math.exp(-(math.log(4 / 12) + math.log(2 / 12)) / 2))
    with pytest.raises(InputError):
        unigram_logprobs(np.array([9]), vocab_size=8)


def test_expert_load_counts_and_dead_experts() -> None:
    load = ExpertLoad([1], num_experts=4)
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 1]])
    r = RoutingResult(expert_ids=ids, weights=torch.ones(4, 2), logits=torch.zeros(4, 4), aux={})
    load.update([None, r])
    s = load.summary()
    assert s["load"][0] == [0.5, 0.375, 0.125, 0.0]
    assert s["max_over_uniform"] == [2.0] and s["dead"] == [1]
    load.reset()
    assert load.summary()["dead"] == [4]


def test_compare_moe_vs_dense(tiny, tmp_path) -> None:
    cfg = load_train_config(**{**tiny, "max_steps": 4, "eval_every": 2})
    res = compare(cfg, tmp_path / "cmp")
    runs = res["runs"]
    assert set(runs) == {"moe", "dense"}
    assert runs["moe"]["tokens"] == runs["dense"]["tokens"] == 4 * 4 * 32
    # equal active FLOPs up to the router
    assert runs["moe"]["flops_per_token_train"] > runs["dense"]["flops_per_token_train"]
    assert runs["moe"]["flops_per_token_train"] < 1.01 * runs["dense"]["flops_per_token_train"]
    assert runs["moe"]["total_params"] > runs["dense"]["total_params"]
    # perplexity compared at the FLOP budget both reached: dense's last point, MoE interpolated
    assert res["flop_budget"] == runs["dense"]["evals"][-1]["train_flops"]
    assert runs["dense"]["val_ppl_at_equal_flops"] == pytest.approx(runs["dense"]["final_val_ppl"])
    ev = runs["moe"]["evals"]
    lo, hi = sorted((ev[-2]["val_ppl"], ev[-1]["val_ppl"]))
    assert lo <= runs["moe"]["val_ppl_at_equal_flops"] <= hi
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())[
        "unigram_ppl"
    ] == pytest.approx(res["unigram_ppl"])


def test_parallel_compare_equals_sequential_one_thread(tiny, tmp_path) -> None:
    """Two spawned one-thread trainings give exactly the numbers of the same runs in turn."""
    cfg = load_train_config(**{**tiny, "max_steps": 4, "eval_every": 2, "threads": 1})
    seq = compare(cfg, tmp_path / "seq")
    par = compare(cfg, tmp_path / "par", parallel=True)
    for name in ("moe", "dense"):
        a, b = seq["runs"][name], par["runs"][name]
        assert a["steps"] == b["steps"] == 4
        assert [e["val_loss"] for e in a["evals"]] == [e["val_loss"] for e in b["evals"]]
        assert a["final_val_ppl"] == b["final_val_ppl"]
    assert seq["unigram_ppl"] == par["unigram_ppl"]
    assert (tmp_path / "par" / "moe" / "model").is_dir()
    assert (tmp_path / "par" / "dense" / "model").is_dir()
