"""The layers demo: one row per router with consistent statistics, printed table, CLI command."""

from __future__ import annotations

import math

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from moelab.errors import ConfigError
from moelab.layers.commands import register
from moelab.layers.config import ROUTER_TYPES
from moelab.layers.demo import demo_config, run_layers_demo


def test_demo_rows_cover_every_router_with_consistent_stats():
    console = Console(record=True, width=160)
    T, E, k = 96, 4, 2
    rows = run_layers_demo(tokens=T, d_model=16, experts=E, top_k=k, seed=1, console=console)
    assert [r.router for r in rows] == list(ROUTER_TYPES)
    by = {r.router: r for r in rows}
    for r in rows:
        assert 0 <= r.tokens_per_expert_min <= r.tokens_per_expert_max <= T
        assert 0.0 <= r.tokenless_share <= 1.0
        assert math.isfinite(r.load_balancing) and math.isfinite(r.z_loss)
        assert 0.0 <= r.load_entropy <= 1.0 + 1e-6
        assert all(math.isfinite(v) for v in r.aux.values())
    # dropless token-choice routers: exactly k experts for every token, nothing dropped
    for name in ("topk", "noisy_topk", "hash", "sinkhorn", "deepseek"):
        s = by[name]
        assert s.top_k == k and s.dropped_slot_share == 0.0
        assert s.experts_per_token_min == s.experts_per_token_max == k
        assert s.router_grad_norm > 0 or name == "hash"
    assert by["hash"].router_grad_norm == 0.0
    # switch: top-1 with capacity ceil(T * 1.25 / E)
    cap = math.ceil(T * 1.25 / E)
    assert by["switch"].top_k == 1 and by["switch"].tokens_per_expert_max <= cap
    assert by["switch"].experts_per_token_max <= 1
    # expert choice: every expert takes exactly c = ceil(T * k / E) tokens, perfectly balanced
    ec = by["expert_choice"]
    assert ec.tokens_per_expert_min == ec.tokens_per_expert_max == math.ceil(T * k / E)
    assert ec.cv2 == pytest.approx(0.0, abs=1e-9) and ec.dropped_slot_share is None
    assert set(by["topk"].aux) == {"load_balancing", "z_loss"}
    assert set(by["deepseek"].aux) == {"seq_aux"}
    text = console.export_text()
    for name in ROUTER_TYPES:
        assert name in text
    assert "LB" in text and "router aux" in text


def test_demo_is_seeded():
    a = run_layers_demo(
        tokens=32, d_model=8, experts=4, top_k=1, seed=3, console=Console(file=None, quiet=True)
    )
    b = run_layers_demo(
        tokens=32, d_model=8, experts=4, top_k=1, seed=3, console=Console(quiet=True)
    )
    for x, y in zip(a, b, strict=True):
        assert x.load_balancing == y.load_balancing and x.aux == y.aux
        assert x.tokens_per_expert_max == y.tokens_per_expert_max


def test_demo_bad_arguments_and_configs():
    with pytest.raises(ConfigError, match="top_k"):
        run_layers_demo(tokens=8, d_model=8, experts=4, top_k=5, seed=0)
    with pytest.raises(ConfigError, match="tokens"):
        run_layers_demo(tokens=0, d_model=8, experts=4, top_k=1, seed=0)
    cfg = demo_config("deepseek", 8, 8, 6, 64, 0)  # k larger than one group: more groups kept
    assert cfg.top_k <= cfg.topk_group * cfg.num_experts // cfg.n_group


def test_layers_demo_cli_command():
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """moelab (test app)."""

    register(app)
    res = CliRunner().invoke(
        app, ["layers-demo", "--tokens", "24", "--d-model", "8", "--experts", "4", "--top-k", "2"]
    )
    assert res.exit_code == 0, res.output
    assert "expert_choice" in res.output and "deepseek" in res.output
