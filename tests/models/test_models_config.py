"""MoETransformerConfig validation, serialisation, layer placement and the dense baseline."""

from __future__ import annotations

import json

import pytest

from moelab.errors import ConfigError
from moelab.layers.config import MoEConfig
from moelab.models import MoETransformerConfig, dense_baseline


def moe(**kw) -> MoEConfig:
    base = dict(d_model=32, d_ff=16, num_experts=4, top_k=2)
    base.update(kw)
    return MoEConfig(**base)


def cfg(**kw) -> MoETransformerConfig:
    base = dict(vocab_size=50, d_model=32, n_layers=4, n_heads=4, d_ff=64, max_seq_len=16)
    base.update(kw)
    return MoETransformerConfig(**base)


@pytest.mark.parametrize(
    "kw, field, fragment",
    [
        (dict(d_model=30, n_heads=4), "d_model", "divisible by n_heads=4"),
        (dict(d_model=36, n_heads=12), "n_heads", "must be even"),
        (dict(n_kv_heads=3), "n_kv_heads", "must divide n_heads=4"),
        (dict(mode="seq2seq"), "mode", "causal"),
        (dict(vocab_size=0), "vocab_size", "positive int"),
        (dict(first_k_dense=4), "first_k_dense", "[0, n_layers=4)"),
        (dict(moe_every=0), "moe_every", "positive int"),
        (dict(pad_token_id=50), "pad_token_id", "vocab_size=50"),
        (dict(dense_act="tanh"), "dense_act", "swiglu"),
        (dict(norm_eps=0.0), "norm_eps", "> 0"),
        (dict(moe=moe(d_model=64)), "moe.d_model", "must equal d_model=32"),
        (dict(moe=moe(), moe_every=8), "moe_every", "places no MoE layer"),
        (dict(moe=moe(router="hash", vocab_size=10)), "moe.vocab_size", "vocab_size=50"),
    ],
)
def test_config_errors_name_the_field(kw: dict, field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg(**kw)
    msg = str(e.value)
    assert f"MoETransformerConfig.{field}=" in msg
    assert fragment in msg


def test_n_kv_heads_defaults_to_n_heads_and_head_dim() -> None:
    c = cfg(n_heads=8)
    assert c.n_kv_heads == 8 and c.head_dim == 4


def test_round_trip_through_json() -> None:
    c = cfg(
        moe=moe(num_shared_experts=1, shared_gate=True), moe_every=2, first_k_dense=1, n_kv_heads=2
    )
    d = json.loads(json.dumps(c.to_dict()))
    assert isinstance(d["moe"], dict)
    c2 = MoETransformerConfig.from_dict(d)
    assert c2 == c
    assert isinstance(c2.moe, MoEConfig) and c2.moe.shared_gate
    # metadata keys written by save() are accepted, unknown keys are not
    assert MoETransformerConfig.from_dict({**d, "model_type": "moelab_transformer"}) == c
    with pytest.raises(ConfigError, match="unknown keys \\['colour'\\]"):
        MoETransformerConfig.from_dict({**d, "colour": 1})


def test_dense_round_trip() -> None:
    c = cfg()
    assert MoETransformerConfig.from_dict(c.to_dict()) == c
    assert c.moe_layer_indices() == []


@pytest.mark.parametrize(
    "n_layers, moe_every, first_k_dense, expected",
    [
        (4, 1, 0, [0, 1, 2, 3]),
        (4, 2, 0, [1, 3]),  # GShard / Switch / Qwen2-MoE decoder_sparse_step=2
        (6, 3, 0, [2, 5]),
        (4, 1, 1, [1, 2, 3]),  # DeepSeek first_k_dense_replace=1
        (6, 2, 2, [3, 5]),
    ],
)
def test_moe_layer_placement(
    n_layers: int, moe_every: int, first_k_dense: int, expected: list[int]
) -> None:
    c = cfg(n_layers=n_layers, moe=moe(), moe_every=moe_every, first_k_dense=first_k_dense)
    assert c.moe_layer_indices() == expected


def test_dense_baseline_matches_active_hidden() -> None:
    c = cfg(moe=moe(d_ff=16, top_k=2, num_shared_experts=1, shared_d_ff=24))
    d = dense_baseline(c)
    assert d.moe is None
    assert d.d_ff == 2 * 16 + 24
    assert d.dense_act == "swiglu" and d.n_layers == c.n_layers and d.d_model == c.d_model
    g = dense_baseline(cfg(moe=moe(expert_act="gelu", top_k=1)))
    assert g.d_ff == 16 and g.dense_act == "gelu"


def test_dense_baseline_with_mismatched_dense_layers_is_an_error() -> None:
    with pytest.raises(ConfigError, match="dense_baseline"):
        dense_baseline(cfg(moe=moe(), moe_every=2, d_ff=64))
    ok = dense_baseline(cfg(moe=moe(), moe_every=2, d_ff=32))  # 2 * 16 = 32: consistent
    assert ok.d_ff == 32
