"""Export to transformers: reload with AutoModelForCausalLM and compare logits (1e-4) and aux loss."""

from __future__ import annotations

import os

import pytest
import torch

from moelab.errors import ModelError
from moelab.layers.config import MoEConfig
from moelab.models import MoETransformer, MoETransformerConfig
from moelab.models.export import export_hf, hf_family

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

V, D = 67, 32


def build(moe_kw: dict | None = None, seed: int = 0, **kw) -> MoETransformer:
    moe_kw = (
        None
        if moe_kw is None
        else {"d_model": D, "d_ff": 16, "num_experts": 4, "top_k": 2, **moe_kw}
    )
    moe = None if moe_kw is None else MoEConfig(**moe_kw)
    base = dict(
        vocab_size=V,
        d_model=D,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        d_ff=40,
        max_seq_len=32,
        moe=moe,
        init_std=0.2,
        rope_theta=300.0,
        norm_eps=1e-5,
    )
    base.update(kw)
    model = MoETransformer(MoETransformerConfig(**base), seed=seed)
    with torch.no_grad():  # non-trivial norm weights so any norm mismatch shows
        g = torch.Generator().manual_seed(seed + 7)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def round_trip(model: MoETransformer, tmp_path, expected_cls: str) -> None:
    out = export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == expected_cls
    x = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    mask[1, 8:] = 0
    with torch.no_grad():
        ours = model(x, attention_mask=mask)
        theirs = hf(x, attention_mask=mask, output_router_logits=model.cfg.moe is not None)
    assert ours.logits.abs().max() > 0.5  # values large enough for the comparison to mean something
    real = mask.bool()
    diff = (ours.logits[real] - theirs.logits[real]).abs().max().item()  # padded rows: do not care
    assert diff < 1e-4, diff
    if (
        model.cfg.moe is not None
    ):  # same pooled load-balancing loss as transformers, padding excluded
        torch.testing.assert_close(ours.aux_loss, theirs.aux_loss.float(), atol=1e-5, rtol=1e-5)
        rows = real.reshape(-1)
        for r, hf_logits in zip(
            [r for r in ours.routing if r is not None], theirs.router_logits, strict=True
        ):
            theirs_l = hf_logits.reshape(r.logits.shape)
            torch.testing.assert_close(r.logits[rows], theirs_l[rows], atol=1e-5, rtol=1e-5)


def test_mixtral_round_trip(tmp_path) -> None:
    model = build({})
    assert hf_family(model) == "mixtral"
    round_trip(model, tmp_path, "MixtralForCausalLM")


def test_qwen2_moe_round_trip_with_gated_shared_expert_and_alternation(tmp_path) -> None:
    model = build(
        {"num_shared_experts": 1, "shared_d_ff": 24, "shared_gate": True, "norm_topk_prob": False},
        n_layers=4,
        moe_every=2,
        tie_embeddings=False,
        d_ff=36,
    )
    assert hf_family(model) == "qwen2_moe"
    round_trip(model, tmp_path, "Qwen2MoeForCausalLM")


def test_qwen2_moe_round_trip_with_ungated_shared_experts_and_first_dense(tmp_path) -> None:
    model = build({"num_shared_experts": 2}, first_k_dense=1)
    round_trip(model, tmp_path, "Qwen2MoeForCausalLM")


def test_dense_llama_round_trip_and_greedy_generation(tmp_path) -> None:
    model = build(None, n_kv_heads=4)
    round_trip(model, tmp_path, "LlamaForCausalLM")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = torch.randint(0, V, (1, 4), generator=torch.Generator().manual_seed(2))
    ours = model.generate(prompt, 6)
    theirs = hf.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(ours, theirs)


def test_export_overwrites_existing_dir(tmp_path) -> None:
    a, b = build({}, seed=1), build({}, seed=2)
    export_hf(a, tmp_path / "hf")
    export_hf(b, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, V, (1, 5))
    with torch.no_grad():
        assert (b(x).logits - hf(x).logits).abs().max() < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp dirs left behind


@pytest.mark.parametrize(
    "moe_kw, kw, fragment",
    [
        ({}, {"mode": "mlm"}, "mode='mlm'"),
        ({"router": "hash", "vocab_size": V}, {}, "moe.router='hash'"),
        ({"router": "switch", "top_k": 1}, {}, "moe.router='switch'"),
        ({"expert_act": "gelu"}, {}, "expert_act='gelu'"),
        ({"capacity_factor": 1.25}, {}, "capacity"),
        ({"router_bias": True}, {}, "router_bias"),
        ({"bias_update_rate": 1e-3}, {}, "bias_update_rate"),
        ({}, {"moe_every": 3}, "moe_every=1"),
        ({"norm_topk_prob": False}, {}, "norm_topk_prob=True"),
        (None, {"dense_act": "gelu"}, "dense_act='gelu'"),
    ],
)
def test_models_without_equivalent_raise(tmp_path, moe_kw, kw, fragment) -> None:
    model = build(moe_kw, **kw)
    with pytest.raises(ModelError) as e:
        export_hf(model, tmp_path / "x")
    assert fragment in str(e.value)
    assert not (tmp_path / "x").exists()


def test_cli_export(tmp_path) -> None:
    from typer.testing import CliRunner

    from moelab.cli import app

    build({}).save(tmp_path / "m")
    res = CliRunner().invoke(app, ["export", str(tmp_path / "m"), str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    assert "MixtralForCausalLM: max |logit difference|" in res.output
    assert (tmp_path / "hf" / "config.json").is_file()
