"""Scaling calculator: presets against published parameter counts, KV cache, memory fit, CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moelab.errors import ConfigError, InputError
from moelab.layers.config import MoEConfig
from moelab.models import MoETransformer, MoETransformerConfig
from moelab.models.calc import (
    GIB,
    PRESETS,
    ArchSpec,
    calculate,
    get_preset,
    kv_bytes_per_token,
    load_spec,
)

TOLERANCE = 0.03  # presets must be within 3% of the published counts

PUBLISHED = {  # total, active (None: not published)
    "Mixtral-8x7B": (46.7e9, 12.9e9),
    "DeepSeek-V3": (671e9, 37e9),
    "Qwen3-30B-A3B": (30.5e9, 3.3e9),
    "OLMoE-1B-7B": (6.9e9, 1.3e9),
    "Llama-4-Scout": (109e9, 17e9),
    "Llama-4-Maverick": (400e9, 17e9),
    "Switch-base-8": (620e6, None),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_match_published_counts(name: str) -> None:
    total, active = PUBLISHED[name]
    r = calculate(get_preset(name))
    assert abs(r.total_params / total - 1) < TOLERANCE, (name, r.total_params)
    if active is not None:
        assert abs(r.active_params / active - 1) < TOLERANCE, (name, r.active_params)
    assert r.active_params < r.total_params
    assert r.flops_per_token_train == 3 * r.flops_per_token_fwd


def test_every_preset_is_tested() -> None:
    assert set(PRESETS) == set(PUBLISHED)


def test_mixtral_exact_count() -> None:
    s = get_preset("mixtral-8x7b")
    D, F, E, L, V = 4096, 14336, 8, 32, 32000
    attn = D * D * 2 + 2 * D * 1024  # q, o; k, v with 8 kv heads x 128
    layer = attn + E * 3 * D * F + D * E + 2 * D
    total = 2 * V * D + L * layer + D
    r = calculate(s, seq_len=4096)
    assert r.total_params == total
    assert r.active_params == total - L * (E - 2) * 3 * D * F
    assert r.flops_per_token_fwd == 2 * V * D + L * (
        2 * attn + 2 * 2 * 4096 * 32 * 128 + 2 * (D * E + 2 * 3 * D * F)
    )


def test_kv_cache_per_token() -> None:
    # GQA: layers x 2 (k and v) x kv heads x head_dim x bytes
    assert kv_bytes_per_token(get_preset("Mixtral-8x7B"), "bf16") == 32 * 2 * 8 * 128 * 2
    assert kv_bytes_per_token(get_preset("OLMoE-1B-7B"), "fp32") == 16 * 2 * 16 * 128 * 4
    # MLA caches the compressed latent plus the shared rotary key only
    assert kv_bytes_per_token(get_preset("DeepSeek-V3"), "bf16") == 61 * (512 + 64) * 2
    assert kv_bytes_per_token(get_preset("DeepSeek-V3"), "fp8") == 61 * (512 + 64)


def test_memory_fit() -> None:
    s = get_preset("Qwen3-30B-A3B")
    r = calculate(s, seq_len=4096, memory_gib=80, weight_dtype="bf16", kv_dtype="bf16")
    free = 80 * GIB - 2 * r.total_params
    assert r.kv_tokens_fit == free // (48 * 2 * 4 * 128 * 2)
    assert r.sequences_fit == r.kv_tokens_fit // 4096
    assert (
        r.weight_bytes["int4"] == r.total_params // 2
        and r.weight_bytes["fp32"] == 4 * r.total_params
    )
    # Mixtral in bf16 does not fit in 80 GiB at all: no room for KV
    assert calculate(get_preset("Mixtral-8x7B"), memory_gib=80).kv_tokens_fit == 0
    # fp8 weights leave more room than bf16
    a = calculate(s, memory_gib=80, weight_dtype="fp8").kv_tokens_fit
    assert a > r.kv_tokens_fit


def test_bad_inputs() -> None:
    with pytest.raises(InputError, match="unknown preset 'gpt-5'"):
        get_preset("gpt-5")
    with pytest.raises(InputError, match="dtype='fp2'"):
        calculate(get_preset("OLMoE-1B-7B"), memory_gib=10, weight_dtype="fp2")
    with pytest.raises(InputError, match="memory_gib"):
        calculate(get_preset("OLMoE-1B-7B"), memory_gib=-1)
    with pytest.raises(ConfigError, match="top_k"):
        ArchSpec(
            name="x",
            vocab_size=10,
            d_model=8,
            n_layers=1,
            n_heads=2,
            n_kv_heads=2,
            head_dim=4,
            d_ff=8,
            num_experts=4,
            top_k=5,
            expert_d_ff=8,
        )


def test_load_spec_from_model_dir_and_archspec_json(tmp_path) -> None:
    cfg = MoETransformerConfig(
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=48,
        max_seq_len=16,
        moe=MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=2),
    )
    model = MoETransformer(cfg)
    model.save(tmp_path / "m")
    spec = load_spec(tmp_path / "m")
    r = calculate(spec, seq_len=16)
    s = model.stats()
    assert (r.total_params, r.active_params, r.flops_per_token_fwd) == (
        s.total_params,
        s.active_params,
        s.flops_per_token_fwd,
    )
    (tmp_path / "spec.json").write_text(json.dumps(get_preset("OLMoE-1B-7B").to_dict()))
    assert load_spec(tmp_path / "spec.json") == get_preset("OLMoE-1B-7B")
    with pytest.raises(InputError, match="does not exist"):
        load_spec(tmp_path / "missing.json")


def test_cli_calc() -> None:
    from moelab.cli import app

    runner = CliRunner()
    res = runner.invoke(
        app, ["calc", "--preset", "DeepSeek-V3", "--memory-gb", "1000", "--dtype", "fp8", "--json"]
    )
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["name"] == "DeepSeek-V3" and d["memory_gib"] == 1000 and d["weight_dtype"] == "fp8"
    want = calculate(get_preset("DeepSeek-V3"), memory_gib=1000, weight_dtype="fp8")
    assert d["kv_tokens_fit"] == want.kv_tokens_fit > 0
    res = runner.invoke(app, ["calc", "--preset", "Mixtral-8x7B", "--memory-gb", "80"])
    assert res.exit_code == 0 and "46.703 B" in res.output and "KV tokens in 80 GiB" in res.output
    res = runner.invoke(app, ["calc"])
    assert isinstance(res.exception, InputError)
