"""Neuron alignment, CKA and output/weight similarity of experts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from experts_tiny import tiny_moe

from moelab.errors import InputError
from moelab.experts.access import capture_router_inputs, expert_forward, layer_experts
from moelab.experts.similarity import (
    align_neurons,
    expert_similarity,
    linear_cka,
    output_cosine,
    permute_expert,
    plot_heatmaps,
    weight_similarity,
)


def _expert(seed: int, d: int = 12, f: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * f, d, generator=g), torch.randn(d, f, generator=g)


def test_alignment_recovers_the_permutation_of_a_permuted_expert_exactly() -> None:
    gu, dn = _expert(0)
    perm = np.random.default_rng(1).permutation(dn.shape[1])
    gu_p, dn_p = permute_expert(gu, dn, perm)
    # permuting hidden neurons leaves the function unchanged
    x = torch.randn(7, gu.shape[1])
    assert torch.allclose(
        expert_forward(gu, dn, "swiglu", x), expert_forward(gu_p, dn_p, "swiglu", x), atol=1e-5
    )
    found, corr = align_neurons(gu, dn, gu_p, dn_p)
    # neuron found[i] of the permuted copy is neuron i of the original: perm[found] = identity
    assert np.array_equal(perm[found], np.arange(dn.shape[1]))
    assert corr == pytest.approx(1.0, abs=1e-12)
    g2, d2 = permute_expert(gu_p, dn_p, found)
    assert torch.equal(g2, gu) and torch.equal(d2, dn)
    before, after = weight_similarity(gu, dn, gu_p, dn_p)
    assert after == pytest.approx(1.0, abs=1e-12)
    assert before < 0.5  # a random permutation hides the identity


def test_alignment_of_different_experts_is_partial() -> None:
    a, b = _expert(0), _expert(1)
    _, corr = align_neurons(*a, *b)
    before, after = weight_similarity(*a, *b)
    assert 0.0 < corr < 0.9
    assert after >= before - 1e-12  # alignment maximises matched correlation, rarely hurts cosine


def test_cka_of_identical_and_transformed_outputs() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-9)  # orthogonal + isotropic
    y = torch.randn(200, 16, generator=g)
    assert linear_cka(x, y) < 0.3
    assert output_cosine(x, x) == pytest.approx(1.0, abs=1e-12)
    assert output_cosine(x, -x) == pytest.approx(-1.0, abs=1e-12)
    # reference: CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear kernels (Kornblith eq. 3)
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    kx, ky = x.double() @ x.double().t(), y.double() @ y.double().t()
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)  # noqa: E731
    ref = hsic(kx, ky) / torch.sqrt(hsic(kx, kx) * hsic(ky, ky))
    assert linear_cka(x, y) == pytest.approx(float(ref), rel=1e-9)
    with pytest.raises(InputError):
        linear_cka(x, y[:10])


def test_expert_similarity_matrices_on_a_model(tmp_path) -> None:
    m = tiny_moe(num_experts=4, n_layers=2)
    with torch.no_grad():  # expert 1 of layer 0 := neuron-permuted copy of expert 0
        bank = m.blocks[0].ffn.experts
        perm = np.random.default_rng(0).permutation(bank.d_ff)
        gu, dn = permute_expert(bank.gate_up_proj[0], bank.down_proj[0], perm)
        bank.gate_up_proj[1].copy_(gu)
        bank.down_proj[1].copy_(dn)
    ids = torch.randint(2, 97, (4, 24), generator=torch.Generator().manual_seed(0))
    inputs = capture_router_inputs(m, ids)
    assert [tuple(x.shape) for x in inputs] == [(96, 32), (96, 32)]
    sim = expert_similarity(layer_experts(m), inputs)
    n = 2 * 4
    assert sim.output_cka.shape == (n, n)
    assert np.allclose(np.diag(sim.output_cka), 1.0)
    assert np.allclose(sim.output_cka, sim.output_cka.T)
    assert sim.weight_cos_aligned[0, 1] == pytest.approx(1.0, abs=1e-9)
    assert sim.output_cka[0, 1] == pytest.approx(1.0, abs=1e-5)
    assert sim.weight_cos_raw[0, 1] < 0.9
    off = sim.within_layer("weight_cos_aligned", 1)[~np.eye(4, dtype=bool)]
    assert (off < 0.9).all()
    s = sim.summary()
    assert set(s) >= {"output_cka", "weight_cos_aligned"}
    plot_heatmaps(sim, tmp_path / "sim.png")
    assert (tmp_path / "sim.png").stat().st_size > 1000
