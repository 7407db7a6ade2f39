"""Weight-only int8/int4 expert weights: round-trip error bounds, kernels vs float reference,
quantised stores read back exactly, and the stand-in mode's bookkeeping."""

import copy

import pytest
import torch
from offload_models import tiny_model

from moelab.errors import ConfigError, OffloadError
from moelab.offload.cache import ExpertCache
from moelab.offload.live import OffloadedModel
from moelab.offload.prefetch import Prefetcher
from moelab.offload.quant import (
    QuantWeight,
    check_precision,
    dequantize,
    expert_nbytes,
    int4_layout_probe,
    kernels_available,
    qmm,
    quantize_int4,
    quantize_int8,
)
from moelab.offload.store import ExpertStore

needs_int4 = pytest.mark.skipif(not kernels_available()["int4"], reason="no CPU int4 kernel")


def _w(n=48, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.linspace(0.1, 2.0, n)[:, None]


def test_int8_round_trip_within_half_a_step():
    w = _w()
    q = quantize_int8(w)
    assert q.q.dtype == torch.int8 and q.q.shape == (48, 64) and q.scales.shape == (48,)
    deq = dequantize(q)
    step = q.scales.float()[:, None]
    assert ((w - deq).abs() <= 0.5 * step + 1e-6).all()
    assert (q.q.abs() <= 127).all() and (q.q.abs().amax(1) >= 126).all()  # full range used


@needs_int4
def test_int4_round_trip_within_group_step():
    w = _w(k=128)
    q = quantize_int4(w, group=32)
    assert q.q.dtype == torch.uint8 and q.q.numel() == 48 * 128 // 2
    assert q.scales.shape == (128 // 32, 48, 2)
    deq = dequantize(q)
    scale = q.scales[..., 0].float().t().repeat_interleave(32, 1)  # [N, K]
    # half a step, plus the bf16 rounding of scale/zero (< 2^-8 of the 15-step range)
    assert ((w - deq).abs() <= 0.6 * scale + 1e-6).all()
    rel = (w - deq).norm() / w.norm()
    assert 0.01 < rel < 0.12  # int4 is lossy, but not garbage


@pytest.mark.parametrize("kind", ["int8", pytest.param("int4", marks=needs_int4)])
def test_kernel_matches_float_reference(kind):
    w, x = _w(64, 128, 1), torch.randn(5, 128, generator=torch.Generator().manual_seed(2))
    q = quantize_int8(w) if kind == "int8" else quantize_int4(w, 64)
    y = qmm(x, q)
    assert y.dtype == torch.float32 and y.shape == (5, 64)
    ref = x.to(torch.bfloat16).float() @ dequantize(q).t()  # bf16 activations, exact weights
    # bf16 output rounding: 2^-8 relative, summed over K=128 terms
    assert torch.allclose(y, ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))
    full = x @ w.t()
    err = float((y - full).norm() / full.norm())
    assert err < (0.02 if kind == "int8" else 0.15)


def test_bad_inputs_raise():
    with pytest.raises(ConfigError, match="int3"):
        check_precision("int3")
    with pytest.raises(ConfigError, match="group"):
        quantize_int4(_w(k=48), group=32)
    with pytest.raises(ConfigError, match="2-D"):
        quantize_int8(torch.zeros(3, 4, 5))
    with pytest.raises(OffloadError, match="columns"):
        qmm(torch.zeros(2, 7), quantize_int8(_w()))
    with pytest.raises(ConfigError, match="precision"):
        ExpertStore.write(tiny_model(), "/nonexistent/never", precision="fp8")


@needs_int4
def test_layout_probe_is_stable_and_nbytes_formula():
    assert int4_layout_probe() == int4_layout_probe() != ""
    shapes = {"gate_up_proj": (128, 32), "down_proj": (32, 64)}
    for prec in ("int8", "int4"):
        f = quantize_int8 if prec == "int8" else (lambda w: quantize_int4(w, 32))
        got = sum(f(torch.randn(*s)).nbytes for s in shapes.values())
        assert expert_nbytes(shapes, prec, group=32) == got
    assert expert_nbytes(shapes, "full") == (128 * 32 + 32 * 64) * 4


@pytest.mark.parametrize("prec", ["int8", pytest.param("int4", marks=needs_int4)])
def test_quantised_store_reads_back_exactly(tmp_path, prec):
    m = tiny_model()
    d = ExpertStore.write(m, tmp_path / prec, precision=prec, group=32)
    with ExpertStore(d, tier="auto") as st:
        assert st.precision == prec
        full = 4 * sum(torch.tensor(s).prod().item() for s in st._shapes[0].values())
        assert st.expert_nbytes(0) < full / (3.5 if prec == "int8" else 6)
        bank = m.blocks[1].ffn.experts
        got = st.read(1, 3)
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(bank, name)[3].detach()
            want = quantize_int8(w) if prec == "int8" else quantize_int4(w, 32)
            assert isinstance(got[name], QuantWeight)
            assert torch.equal(got[name].q, want.q)
            assert torch.equal(got[name].scales, want.scales)


def _offloaded(m, store_dir, slots, standin=None, pred=None):
    st = ExpertStore(store_dir, tier="ram")
    cache = ExpertCache(
        slots, "lru", num_layers=2, num_experts=8, expert_bytes=st.expert_nbytes(0), top_k=2
    )
    pf = Prefetcher(st, cache, pred)
    return OffloadedModel(m, st, cache, pf, standin=standin), pf, st


@pytest.mark.parametrize("prec", ["int8", pytest.param("int4", marks=needs_int4)])
def test_quantised_experts_compute_like_dequantised_weights(tmp_path, prec):
    m = tiny_model()
    ref = copy.deepcopy(m)
    d = ExpertStore.write(m, tmp_path / prec, precision=prec, group=32)
    with ExpertStore(d, tier="ram") as st:  # reference: dequantised weights in the model itself
        for s_i, blk in enumerate(b for b in ref.blocks):
            bank = blk.ffn.experts
            for e in range(8):
                w = st.read(s_i, e)
                with torch.no_grad():
                    bank.gate_up_proj[e] = dequantize(w["gate_up_proj"])
                    bank.down_proj[e] = dequantize(w["down_proj"])
    om, pf, st = _offloaded(m, d, 8)
    x = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = m(x).logits
        want = ref(x).logits
    om.close(), pf.close(), st.close()
    assert torch.allclose(got, want, atol=2e-2 * float(want.abs().max()))
    assert not torch.equal(got, want)  # really went through the bf16 kernels


@pytest.mark.parametrize("prec", ["int8", pytest.param("int4", marks=needs_int4)])
def test_exact_arithmetic_is_the_dequantised_model_on_both_evaluation_paths(tmp_path, prec):
    """Within exact_arithmetic() an offloaded quantised model is the model with dequantised
    weights, scored full-sequence or teacher-forced alike (the bf16 kernels are not)."""
    from moelab.offload.measure import teacher_forced
    from moelab.offload.quant import exact_arithmetic

    m = tiny_model()
    ref = copy.deepcopy(m)
    d = ExpertStore.write(m, tmp_path / prec, precision=prec, group=32)
    with ExpertStore(d, tier="ram") as st:
        for s_i, blk in enumerate(ref.blocks):
            for e in range(8):
                w = st.read(s_i, e)
                with torch.no_grad():
                    blk.ffn.experts.gate_up_proj[e] = dequantize(w["gate_up_proj"])
                    blk.ffn.experts.down_proj[e] = dequantize(w["down_proj"])
    toks = torch.randint(0, 97, (16,), generator=torch.Generator().manual_seed(3))
    om, pf, st = _offloaded(m, d, 3)  # misses and evictions on the way: same weights served
    with torch.no_grad():
        want = torch.log_softmax(ref(toks[None]).logits[0, :-1], -1)
        want = want.gather(1, toks[1:, None])[:, 0]
        with exact_arithmetic():
            om.new_sequence()
            full = torch.log_softmax(m(toks[None]).logits[0, :-1], -1).gather(1, toks[1:, None])
            _, dec = teacher_forced(m, toks.numpy(), om)
        _, kern = teacher_forced(m, toks.numpy(), om)
    om.close(), pf.close(), st.close()
    assert torch.allclose(full[:, 0], want, atol=1e-5)
    assert torch.allclose(dec, want, atol=1e-4)
    assert not torch.equal(kern, dec) and torch.allclose(kern, dec, atol=0.1)  # the bf16 kernels


def test_window_losses_and_live_runs_refuse_non_finite_experts(tmp_path):
    from moelab.offload.measure import run_live, window_losses

    m = tiny_model()
    with torch.no_grad():
        m.blocks[-1].ffn.experts.down_proj.fill_(float("nan"))  # the last layer: no router after it
    d = ExpertStore.write(m, tmp_path / "int8", precision="int8")
    toks = [torch.randint(0, 97, (8,), generator=torch.Generator().manual_seed(5)).numpy()]
    with pytest.raises(OffloadError, match=r"window\(s\) \[0\] scored a non-finite"):
        window_losses(tiny_model, d, toks)
    with pytest.raises(OffloadError, match=r"live decode \(int8\).*window\(s\) \[0\]"):
        run_live(tiny_model, {"int8": d}, toks, "int8", "lru", "none", 4, tier="ram")


@needs_int4
def test_standin_serves_misses_and_counts_add_up(tmp_path):
    from moelab.offload.measure import teacher_forced

    m, ref = tiny_model(), tiny_model()
    full = ExpertStore.write(m, tmp_path / "full")
    low = ExpertStore(
        ExpertStore.write(m, tmp_path / "int4", precision="int4", group=32), tier="ram"
    )
    om, pf, st = _offloaded(m, full, 2, standin=low)
    toks = torch.randint(0, 97, (20,), generator=torch.Generator().manual_seed(1)).numpy()
    p, lp = teacher_forced(m, toks, om)
    s = om.stats()
    om.close(), pf.close(), st.close(), low.close()
    for ph in ("prefill", "decode"):
        d = s[ph]
        assert d["timely"] + d["late"] + d["misses"] + d["standin"] == d["needed"]
    assert s["decode"]["standin"] > 0 and s["prefetch"]["enqueued"] > 0
    rp, rlp = teacher_forced(ref, toks)
    assert p.shape == rp.shape and torch.isfinite(lp).all()
    assert float((lp - rlp).abs().max()) < 1.0  # a low-precision copy, not noise
    # with every expert resident at full precision no stand-in is used: exact again
    m2 = tiny_model()
    om2, pf2, st2 = _offloaded(m2, full, 8, standin=ExpertStore(tmp_path / "int4", tier="ram"))
    for layer in range(2):
        for e in range(8):
            om2.cache.preload((layer, e), st2.read(layer, e))
    p2, lp2 = teacher_forced(m2, toks, om2)
    assert om2.stats()["decode"]["standin"] == 0
    om2.close(), pf2.close(), st2.close()
    assert torch.equal(p2, rp) and torch.equal(lp2, rlp)
