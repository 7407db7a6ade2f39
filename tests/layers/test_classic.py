"""Classic mixtures: Jacobs et al. (1991) losses by hand, HME forward/posteriors, and the 2-D
XOR problem where two linear experts clearly beat one."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.errors import ConfigError, InputError
from moelab.layers.classic import (
    HierarchicalMoE,
    MixtureOfExperts,
    fit,
    quadrant_dataset,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread avoids OpenMP barrier overhead on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_mixture_losses_match_paper_equations():
    torch.manual_seed(0)
    m = MixtureOfExperts(3, 2, 4, task="regression", seed=1)
    x, d = torch.randn(5, 3), torch.randn(5, 2)
    p, o = m(x)
    assert p.shape == (5, 4) and o.shape == (5, 4, 2)
    torch.testing.assert_close(p.sum(-1), torch.ones(5))
    comp = sum(p[:, i] * ((d - o[:, i]) ** 2).sum(-1) for i in range(4)).mean()  # Eq. 1.2
    nll = -torch.log(
        sum(p[:, i] * torch.exp(-0.5 * ((d - o[:, i]) ** 2).sum(-1)) for i in range(4))
    ).mean()  # Eq. 1.3
    coop = ((d - (p.unsqueeze(-1) * o).sum(1)) ** 2).sum(-1).mean()  # Eq. 1.1
    torch.testing.assert_close(m.loss(x, d, "competitive"), comp)
    torch.testing.assert_close(m.loss(x, d, "mixture_nll"), nll)
    torch.testing.assert_close(m.loss(x, d, "cooperative"), coop)
    h = m.responsibilities(x, d)
    torch.testing.assert_close(h.sum(-1), torch.ones(5))
    # the expert closest to the target gets the largest posterior-to-prior ratio
    dist = ((d.unsqueeze(1) - o) ** 2).sum(-1)
    assert torch.equal((h / p).argmax(-1), dist.argmin(-1))


def test_classification_mixture_nll_is_multinomial_mixture():
    m = MixtureOfExperts(2, 3, 2, task="classification", seed=0)
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    p, o = m(x)
    torch.testing.assert_close(o.sum(-1), torch.ones(6, 2))
    ref = -torch.log((p * o[torch.arange(6), :, y]).sum(-1)).mean()
    torch.testing.assert_close(m.loss(x, y, "mixture_nll"), ref)
    torch.testing.assert_close(m.predict(x).sum(-1), torch.ones(6))


def test_hme_matches_two_level_formula_and_posteriors():
    h = HierarchicalMoE(2, 1, branches=2, experts_per_branch=3, seed=0)
    x, d = torch.randn(7, 2), torch.randn(7, 1)
    g, gl, mu = h(x)
    assert g.shape == (7, 2) and gl.shape == (7, 2, 3) and mu.shape == (7, 2, 3, 1)
    pred = sum(g[:, i, None] * gl[:, i, j, None] * mu[:, i, j] for i in range(2) for j in range(3))
    torch.testing.assert_close(h.predict(x), pred)
    lik = sum(
        g[:, i] * gl[:, i, j] * torch.exp(-0.5 * ((d - mu[:, i, j]) ** 2).sum(-1))
        for i in range(2)
        for j in range(3)
    )
    torch.testing.assert_close(h.loss(x, d), -torch.log(lik).mean())
    h_top, h_low = h.posteriors(x, d)
    torch.testing.assert_close(h_top.sum(-1), torch.ones(7))
    torch.testing.assert_close(h_low.sum(-1), torch.ones(7, 2))
    # Eq. 10: h_i = g_i sum_j g_j|i P_ij / sum_i (...)
    per_branch = sum(
        gl[:, :, j] * torch.exp(-0.5 * ((d.unsqueeze(1) - mu[:, :, j]) ** 2).sum(-1))
        for j in range(3)
    )
    torch.testing.assert_close(h_top, g * per_branch / (g * per_branch).sum(-1, keepdim=True))


@pytest.mark.parametrize("loss", ["competitive", "mixture_nll"])
def test_two_linear_experts_beat_one_on_xor(loss):
    x, y = quadrant_dataset(400, seed=0)
    xt, yt = quadrant_dataset(400, seed=1)
    single = MixtureOfExperts(2, 2, 1, task="classification", seed=0)
    fit(single, x, y, epochs=300, lr=0.1, seed=0)
    mix = MixtureOfExperts(2, 2, 2, task="classification", seed=0)
    hist = fit(mix, x, y, loss=loss, epochs=300, lr=0.1, seed=0)
    assert hist.losses[-1] < hist.losses[0]
    acc1, acc2 = single.accuracy(xt, yt), mix.accuracy(xt, yt)
    assert acc1 < 0.8, acc1  # no line separates XOR quadrants
    assert acc2 > 0.93, acc2
    # the gate splits the plane: each expert owns about half of it
    with torch.no_grad():
        share = mix(xt)[0].argmax(-1).float().mean().item()
    assert 0.25 < share < 0.75


def test_hme_learns_xor():
    x, y = quadrant_dataset(400, seed=0)
    h = HierarchicalMoE(2, 2, 2, 2, task="classification", seed=0)
    fit(h, x, y, epochs=150, lr=0.1, seed=0)
    assert h.accuracy(*quadrant_dataset(400, seed=1)) > 0.9


def test_classic_bad_inputs():
    m = MixtureOfExperts(2, 2, 2, task="classification")
    with pytest.raises(InputError, match="d_in=2"):
        m(torch.randn(3, 5))
    with pytest.raises(InputError, match="class ids"):
        m.loss(torch.randn(3, 2), torch.tensor([0, 1, 5]))
    with pytest.raises(ConfigError, match="loss kind"):
        m.loss(torch.randn(3, 2), torch.tensor([0, 1, 1]), "hinge")
    with pytest.raises(ConfigError, match="task"):
        MixtureOfExperts(2, 2, 2, task="ranking")
    with pytest.raises(ConfigError, match="epochs"):
        fit(m, torch.randn(3, 2), torch.tensor([0, 1, 1]), epochs=0)
    with pytest.raises(ConfigError, match="accuracy"):
        MixtureOfExperts(2, 1, 2).accuracy(torch.randn(3, 2), torch.zeros(3))
    assert not math.isnan(m.loss(torch.randn(3, 2), torch.tensor([0, 1, 1])).item())


def test_example_script_saves_partition_plot(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "classic_mixture_2d.py"
    spec = importlib.util.spec_from_file_location("classic_mixture_2d", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "partition.png"
    acc = mod.run(out, n=300, epochs=120, seed=0)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert acc["2 linear experts, mixture_nll loss"] > acc["single linear expert"] + 0.15
