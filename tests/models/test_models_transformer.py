"""MoETransformer: values against a naive reference, masks, losses, routers, save/load, generate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moelab.errors import InputError, ModelError
from moelab.layers.config import ROUTER_TYPES, MoEConfig
from moelab.layers.losses import load_balancing_loss, router_z_loss
from moelab.layers.moe import MoEBlock
from moelab.layers.routing import ROUTERS
from moelab.layers.types import RoutingResult
from moelab.models import KVCache, MoETransformer, MoETransformerConfig
from moelab.models.transformer import DenseFFN

V, D = 61, 32


def make(mode: str = "causal", seed: int = 0, **kw) -> MoETransformer:
    moe_kw = {"d_model": D, "d_ff": 16, "num_experts": 4, "top_k": 2, **kw.pop("moe_kw", {})}
    m = MoEConfig(**moe_kw)
    base = dict(
        vocab_size=V,
        d_model=D,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        max_seq_len=24,
        mode=mode,
        moe=m,
        init_std=0.1,
        rope_theta=100.0,
    )
    base.update(kw)
    model = MoETransformer(MoETransformerConfig(**base), seed=seed)
    with torch.no_grad():  # norms away from 1 so a wrong norm placement shows in the values
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, V, (b, s), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- naive reference
def ref_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding via complex multiplication of (x_i, x_{i+d/2}) pairs [B, H, S, hd]."""
    hd, S = x.shape[-1], x.shape[-2]
    freqs = theta ** (-torch.arange(0, hd // 2, dtype=torch.float64) * 2 / hd)
    angle = torch.arange(S, dtype=torch.float64)[:, None] * freqs[None]
    z = torch.complex(x[..., : hd // 2].double(), x[..., hd // 2 :].double()) * torch.polar(
        torch.ones_like(angle), angle
    )
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def ref_forward(
    model: MoETransformer, x: torch.Tensor, pad: torch.Tensor | None = None
) -> torch.Tensor:
    """Explicit-loop reference forward (softmax attention written out, GQA by repetition)."""
    cfg = model.cfg
    B, S = x.shape
    H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def norm(w, h):
        return w * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)

    h = model.embed_tokens.weight[x]
    allowed = torch.ones(S, S, dtype=torch.bool)
    if cfg.mode == "causal":
        allowed = torch.tril(allowed)
    allowed = allowed.expand(B, 1, S, S)
    if pad is not None:
        allowed = allowed & pad.bool()[:, None, None, :]
    for block in model.blocks:
        a = block.attn
        u = norm(block.attn_norm.weight, h)
        q = (u @ a.q_proj.weight.T).view(B, S, H, hd).transpose(1, 2)
        k = (u @ a.k_proj.weight.T).view(B, S, Hkv, hd).transpose(1, 2)
        v = (u @ a.v_proj.weight.T).view(B, S, Hkv, hd).transpose(1, 2)
        q, k = ref_rope(q, cfg.rope_theta), ref_rope(k, cfg.rope_theta)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        h = h + (att @ v).transpose(1, 2).reshape(B, S, -1) @ a.o_proj.weight.T
        u = norm(block.ffn_norm.weight, h)
        if isinstance(block.ffn, MoEBlock):
            y, _ = block.ffn(u, token_ids=x)
        else:
            f = block.ffn
            y = (F.silu(u @ f.gate_proj.weight.T) * (u @ f.up_proj.weight.T)) @ f.down_proj.weight.T
        h = h + y
    return norm(model.norm.weight, h) @ model.lm_head.weight.T


# ----------------------------------------------------------------------- values
@pytest.mark.parametrize("mode", ["causal", "mlm"])
def test_shapes_and_values_match_reference(mode: str) -> None:
    model = make(mode, first_k_dense=1)
    x = ids(2, 9)
    out = model(x)
    assert out.logits.shape == (2, 9, V)
    assert len(out.routing) == 2 and out.routing[0] is None
    r = out.routing[1]
    assert (
        isinstance(r, RoutingResult) and r.expert_ids.shape == (18, 2) and r.logits.shape == (18, 4)
    )
    torch.testing.assert_close(out.logits, ref_forward(model, x), atol=2e-5, rtol=1e-4)
    assert out.logits.std() > 0.1  # not a degenerate near-constant output


def test_causal_mask_is_causal() -> None:
    model = make("causal")
    x = ids(1, 10)
    y = x.clone()
    y[0, 6] = (x[0, 6] + 7) % V
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=0, rtol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


def test_mlm_sees_the_future() -> None:
    model = make("mlm")
    x = ids(1, 10)
    y = x.clone()
    y[0, 8] = (x[0, 8] + 7) % V
    a, b = model(x).logits, model(y).logits
    assert (a[:, :8] - b[:, :8]).abs().amax(dim=-1).min() > 1e-5  # every earlier position changes


@pytest.mark.parametrize("mode", ["causal", "mlm"])
def test_padding_mask(mode: str) -> None:
    model = make(mode)
    x = ids(2, 10)
    mask = torch.ones_like(x)
    mask[1, 6:] = 0  # second row: 6 real tokens, 4 padding
    out = model(x, attention_mask=mask)
    alone = model(x[1:, :6]).logits
    torch.testing.assert_close(out.logits[1, :6], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[0], model(x[:1]).logits[0], atol=1e-5, rtol=1e-5)
    ref = ref_forward(model, x, mask)
    torch.testing.assert_close(out.logits[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=1e-4)
    # the content of padded positions does not matter
    z = x.clone()
    z[1, 6:] = 3
    torch.testing.assert_close(model(z, attention_mask=mask).logits[1, :6], out.logits[1, :6])
    assert torch.isfinite(out.logits).all()
    # losses exclude padding: same as the library functions on the real rows only
    real = mask.reshape(-1).bool()
    logits = [r.logits for r in out.routing if r is not None]
    want_aux = load_balancing_loss([g[real] for g in logits], 4, 2)
    torch.testing.assert_close(out.aux_loss, want_aux)
    torch.testing.assert_close(out.z_loss, router_z_loss([g[real] for g in logits]))


def test_left_padding_rows_stay_finite() -> None:
    model = make("causal")
    x = ids(1, 8)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    out = model(x, attention_mask=mask)
    assert torch.isfinite(out.logits).all()


# ------------------------------------------------------------------------ losses
def test_causal_loss_shifts_and_ignores_labels() -> None:
    model = make("causal", aux_loss_coef=0.1, z_loss_coef=0.01)
    x = ids(2, 8)
    labels = x.clone()
    labels[0, 3] = -100
    out = model(x, labels=labels)
    want = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.lm_loss, want)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.1 * out.aux_loss + 0.01 * out.z_loss)
    moe_logits = [r.logits for r in out.routing if r is not None]
    torch.testing.assert_close(out.aux_loss, load_balancing_loss(moe_logits, 4, 2))
    assert 1.0 <= out.aux_loss.item() <= 4.0  # Switch loss is >= 1 and equals k when uniform


def test_mlm_loss_only_on_labelled_positions() -> None:
    model = make("mlm")
    x = ids(2, 8)
    labels = torch.full_like(x, -100)
    labels[0, 2], labels[1, 5] = 7, 11
    out = model(x, labels=labels)
    want = (
        F.cross_entropy(out.logits[0, 2:3], labels[0, 2:3])
        + F.cross_entropy(out.logits[1, 5:6], labels[1, 5:6])
    ) / 2
    torch.testing.assert_close(out.lm_loss, want)


def test_dense_model_has_no_router_losses() -> None:
    model = make("causal", moe=None)
    out = model(ids(1, 5), labels=ids(1, 5))
    assert out.aux_loss is None and out.z_loss is None and out.routing == [None, None]
    torch.testing.assert_close(out.loss, out.lm_loss)
    assert all(isinstance(b.ffn, DenseFFN) for b in model.blocks)


@pytest.mark.parametrize("router", ROUTER_TYPES)
def test_every_router_runs_in_the_model(router: str) -> None:
    if router not in ROUTERS:
        pytest.fail(f"router {router!r} is listed in ROUTER_TYPES but not registered in ROUTERS")
    moe_kw = {"router": router}
    if router == "hash":
        moe_kw["vocab_size"] = V
    if router == "switch":
        moe_kw.update(top_k=1, capacity_factor=2.0)
    if router == "expert_choice":
        moe_kw.update(capacity_factor=1.0)
    model = make("causal", moe_kw=moe_kw, aux_loss_coef=0.01, z_loss_coef=0.001).train()
    x = ids(2, 8)
    mask = torch.ones_like(x)
    mask[0, 6:] = 0
    out = model(x, attention_mask=mask, labels=x)
    assert out.logits.shape == (2, 8, V)
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss) and torch.isfinite(out.z_loss)
    for r in out.routing:
        assert r.expert_ids.shape[0] == 16 and r.logits.shape == (16, 4)
    out.loss.backward()
    for i in model.moe_layer_indices():
        grads = [p.grad for p in model.blocks[i].ffn.experts.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    if router == "hash":  # hash routing is a function of the token id only
        r = out.routing[0]
        flat = x.reshape(-1)
        for tok in flat.unique():
            rows = r.expert_ids[flat == tok]
            assert (rows == rows[0]).all()


def test_moe_every_and_first_k_dense_place_blocks() -> None:
    model = make("causal", n_layers=6, moe_every=2, first_k_dense=2)
    kinds = [type(b.ffn).__name__ for b in model.blocks]
    assert kinds == ["DenseFFN", "DenseFFN", "DenseFFN", "MoEBlock", "DenseFFN", "MoEBlock"]
    assert model.moe_layer_indices() == [3, 5] == model.cfg.moe_layer_indices()
    out = model(ids(1, 4))
    assert [r is not None for r in out.routing] == [False, False, False, True, False, True]


def test_shared_and_fine_grained_experts() -> None:
    model = make("causal", moe_kw={"num_shared_experts": 1, "shared_gate": True})
    ffn = model.blocks[0].ffn
    assert ffn.shared_experts is not None and ffn.shared_gate is not None
    fine = MoEConfig(d_model=D, d_ff=16, num_experts=4, top_k=2).fine_grained(2)
    m2 = MoETransformer(
        MoETransformerConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=4, moe=fine), seed=0
    )
    assert m2.blocks[0].ffn.experts.num_experts == 8 and m2.blocks[0].ffn.experts.d_ff == 8
    assert m2(ids(1, 5)).routing[0].expert_ids.shape == (5, 4)


def test_seed_makes_init_reproducible() -> None:
    a, b, c = make(seed=3), make(seed=3), make(seed=4)
    x = ids(1, 5)
    torch.testing.assert_close(a(x).logits, b(x).logits, atol=0, rtol=0)
    assert (a(x).logits - c(x).logits).abs().max() > 1e-3


def test_bad_inputs() -> None:
    model = make()
    with pytest.raises(InputError, match="vocab_size=61"):
        model(torch.tensor([[1, 61]]))
    with pytest.raises(InputError, match="max_seq_len=24"):
        model(ids(1, 25))
    with pytest.raises(InputError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(InputError, match="attention_mask shape"):
        model(ids(1, 4), attention_mask=torch.ones(1, 5))


# --------------------------------------------------------------------- save/load
@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip(tmp_path, tie: bool) -> None:
    model = make("causal", tie_embeddings=tie, moe_kw={"num_shared_experts": 1})
    x = ids(2, 7)
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = MoETransformer.load(tmp_path / "m")
    assert loaded.cfg == model.cfg
    torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tie
    half = MoETransformer.load(tmp_path / "m", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half(x).logits.float(), model(x).logits, atol=0.1, rtol=0.1)


def test_save_load_keeps_router_buffers(tmp_path) -> None:
    model = make("causal", moe_kw={"router": "hash", "vocab_size": V})
    model.save(tmp_path)
    loaded = MoETransformer.load(tmp_path)
    x = ids(1, 9)
    assert torch.equal(loaded(x).routing[0].expert_ids, model(x).routing[0].expert_ids)


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_load_restores_every_tensor_of_every_router(tmp_path, router: str) -> None:
    # load() builds on the meta device and allocates uninitialised memory: every parameter and
    # buffer must come back bit for bit from the file, nothing left from the allocation
    kw = {"router": router, "vocab_size": V} if router == "hash" else {"router": router}
    if router == "deepseek":
        kw |= {"n_group": 2, "topk_group": 1}
    if router == "switch":
        kw["top_k"] = 1
    model = make("causal", moe_kw=kw)
    model.save(tmp_path)
    loaded = MoETransformer.load(tmp_path)
    want, got = model.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
        assert got[name].device.type == "cpu", name
    x = ids(2, 7)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(ModelError, match="config.json is missing"):
        MoETransformer.load(tmp_path)
    make().save(tmp_path / "a")
    make(n_layers=3).save(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").replace(tmp_path / "a" / "model.safetensors")
    with pytest.raises(ModelError, match="does not match"):
        MoETransformer.load(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        MoETransformer.load(tmp_path / "a")


# ---------------------------------------------------------------------- generate
def test_generate_with_cache_equals_without() -> None:
    model = make("causal", n_kv_heads=1)
    prompt = ids(2, 5)
    a = model.generate(prompt, 12, use_cache=True)
    b = model.generate(prompt, 12, use_cache=False)
    assert a.shape == (2, 17) and torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)
    # step-by-step cached logits equal the full forward's logits
    cache = KVCache()
    step = [model(a[:, :5], cache=cache).logits[:, -1]]
    for t in range(5, 16):
        step.append(model(a[:, t : t + 1], cache=cache).logits[:, -1])
    full = model(a[:, :16]).logits[:, 4:]
    torch.testing.assert_close(torch.stack(step, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 16


def test_chunked_prefill_with_cache_equals_full_forward() -> None:
    model = make("causal")
    x = ids(2, 9)
    cache = KVCache()
    a = model(x[:, :5], cache=cache).logits
    b = model(x[:, 5:], cache=cache, attention_mask=torch.ones(2, 9)).logits  # 4 queries, 9 keys
    torch.testing.assert_close(torch.cat([a, b], dim=1), model(x).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="cover the cached 9"):
        model(x[:, :1], cache=cache, attention_mask=torch.ones(2, 1))


def test_sampling_is_seeded_and_mlm_cannot_generate() -> None:
    model = make("causal")
    p = ids(1, 3)
    s1 = model.generate(p, 8, greedy=False, seed=5)
    s2 = model.generate(p, 8, greedy=False, seed=5)
    assert torch.equal(s1, s2)
    with pytest.raises(ModelError, match="causal"):
        make("mlm").generate(p, 2)
    with pytest.raises(InputError, match="max_seq_len"):
        model.generate(p, 30)
