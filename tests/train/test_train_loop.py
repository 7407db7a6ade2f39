"""Training loop: loss decreases, logs/checkpoints/model written, resume after kill is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moelab.data import load_tokenizer
from moelab.errors import ConfigError
from moelab.models import MoETransformer
from moelab.train import load_train_config, train
from moelab.train.checkpoint import latest_checkpoint


class Killed(Exception):
    """Stands in for SIGKILL: leaves the loop without any cleanup or final checkpoint."""


def test_tiny_run_learns_and_writes_everything(tiny) -> None:
    cfg = load_train_config(**{**tiny, "max_steps": 30, "eval_every": 10, "tensorboard": True})
    r = train(cfg)
    assert r.steps == 30 and len(r.losses) == 30 and r.stopped == "max_steps"
    first, last = sum(r.losses[:5]) / 5, sum(r.losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert [e["step"] for e in r.evals] == [10, 20, 30]
    assert r.evals[-1]["val_ppl"] < r.evals[0]["val_ppl"]
    assert r.evals[-1]["tokens"] == 30 * 4 * 32
    assert r.evals[-1]["train_flops"] == pytest.approx(
        r.stats["flops_per_token_train"] * 30 * 4 * 32
    )
    assert r.unigram_ppl > 1
    # expert load per MoE layer, fractions sum to one
    load = r.expert_load
    assert load is not None and load["layers"] == [0, 1]
    for fr in load["load"]:
        assert len(fr) == 4 and sum(fr) == pytest.approx(1.0)
    assert all(1.0 <= m <= 4.0 for m in load["max_over_uniform"])
    lines = [json.loads(ln) for ln in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines if "lm_loss" in ln] == list(range(3, 31, 3))
    assert any("expert_load" in ln for ln in lines)
    assert list((r.run_dir / "tb").iterdir())
    # final model + tokenizer saved side by side and loadable
    m = MoETransformer.load(r.model_dir)
    tok = load_tokenizer(r.model_dir / "tokenizer.json")
    assert m.cfg.vocab_size == tok.get_vocab_size()
    summary = json.loads((r.run_dir / "summary.json").read_text())
    assert summary["final_val_ppl"] == pytest.approx(r.final_val_ppl)
    assert latest_checkpoint(r.run_dir).name == "step-0000030"
    assert len(list((r.run_dir / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints


def test_resume_refuses_changed_model(tiny) -> None:
    train(load_train_config(**{**tiny, "max_steps": 4}))
    with pytest.raises(ConfigError, match="d_model"):
        train(load_train_config(**{**tiny, "max_steps": 4, "d_model": 64}))
    # --no-resume starts over
    r = train(load_train_config(**{**tiny, "max_steps": 4, "d_model": 64}), resume=False)
    assert r.resumed_from == 0 and r.steps == 4


def test_time_budget_stops_early(tiny) -> None:
    r = train(load_train_config(**{**tiny, "max_steps": 1000, "max_minutes": 0.0001}))
    assert r.stopped == "time_cap" and r.time_capped and r.steps < 1000
    assert r.warning == f"stopped by the time cap (max_minutes=0.0001) after {r.steps} of 1000 " + (
        "steps: numbers are not comparable with a run that completed its step budget"
    )
    summary = json.loads((Path(r.run_dir) / "summary.json").read_text())
    assert summary["stopped"] == "time_cap" and summary["warning"] == r.warning
    assert r.evals and r.evals[-1]["step"] == r.steps
    assert latest_checkpoint(r.run_dir).name == f"step-{r.steps:07d}"
    if r.steps:  # routing statistics of the last partial window are kept
        assert r.expert_load is not None and r.expert_load["layers"] == [0, 1]


def test_bias_update_rate_moves_selection_biases_and_saves_them(tiny) -> None:
    rate = 0.01
    r = train(load_train_config(**{**tiny, "max_steps": 6, "bias_update_rate": rate}))
    m = MoETransformer.load(r.model_dir)
    for i in m.moe_layer_indices():
        b = m.blocks[i].ffn.router.selection_bias
        assert b.abs().max() > 0  # updated every step...
        steps = (b / rate).round()
        torch.testing.assert_close(b, steps * rate)  # ...by +-rate or 0 per expert and step
        assert steps.abs().max() <= 6
    with pytest.raises(ConfigError, match="bias_update_rate"):
        load_train_config(**{**tiny, "bias_update_rate": 0.01, "router": "switch", "top_k": 1})
