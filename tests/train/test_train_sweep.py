"""`moelab sweep`: equal tokens and active FLOPs over E, held-out test loss, the Clark et al. law
fitted with uncertainty, a held-out E predicted, resumable per run; and the fit itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from moelab.errors import InputError
from moelab.train.scaling import design_row, fit_scaling_law
from moelab.train.sweep import QUICK, sweep


def test_fit_recovers_known_coefficients_with_honest_errors() -> None:
    rng = np.random.default_rng(0)
    truth = np.array([-0.05, -0.02, 0.001, 1.9])  # a, b, c, d
    n = [2e4, 2e4, 2e4, 2e4, 8e4, 8e4, 8e4, 8e4, 3e5, 3e5, 3e5, 3e5]
    e = [1, 2, 8, 16] * 3
    logl = [design_row(a, b) @ truth + rng.normal(0, 0.002) for a, b in zip(n, e, strict=True)]
    fit = fit_scaling_law(n, e, [math.exp(v) for v in logl])
    assert fit.dof == 8 and fit.n_points == 12
    for k, t in zip("abcd", truth, strict=True):
        assert abs(fit.coef[k] - t) < 4 * fit.stderr[k], k
    assert 0.0005 < fit.resid_std < 0.005
    p = fit.predict(8e4, 4)
    true4 = math.exp(design_row(8e4, 4) @ truth)
    assert p["loss_lo"] < true4 < p["loss_hi"]
    # noiseless data: exact coefficients
    exact = fit_scaling_law(
        n, e, [math.exp(design_row(a, b) @ truth) for a, b in zip(n, e, strict=True)]
    )
    np.testing.assert_allclose([exact.coef[k] for k in "abcd"], truth, atol=1e-9)
    with pytest.raises(InputError, match="at least 5"):
        fit_scaling_law(n[:4], e[:4], [1.0] * 4)
    with pytest.raises(InputError, match="two sizes"):
        fit_scaling_law([1e4] * 6, [1, 2, 4, 8, 16, 32], [2.0] * 6)


def test_sweep_quick_runs_fits_predicts_and_resumes(tmp_path: Path) -> None:
    base = {**QUICK, "threads": 1, "seed": 0}
    kw = dict(experts=[1, 2, 4, 8], sizes=[16, 32], budget=10 * 4 * 32, holdout=4, base=base,
              test_blocks=8)  # fmt: skip
    res = sweep(out_dir=tmp_path, **kw)
    runs = res["runs"]
    assert len(runs) == 8 and res["heldout_split"] == "test"
    for d in (16, 32):
        rs = [r for r in runs if r["d_model"] == d]
        assert len({r["dense_params"] for r in rs}) == 1  # one N per size
        assert len({r["flops_per_token_fwd"] - r["router_flops_per_token"] for r in rs}) == 1
        assert len({r["train_tokens"] for r in rs}) == 1 and rs[0]["train_tokens"] == 10 * 4 * 32
        assert [r["total_params"] for r in rs] == sorted(r["total_params"] for r in rs)
    assert runs[0]["dense_params"] < runs[-1]["dense_params"]
    assert all(math.isfinite(r["heldout_loss"]) and r["heldout_tokens"] > 0 for r in runs)
    fa = res["fit_all"]
    assert fa["n_points"] == 8 and fa["dof"] == 4
    assert all(math.isfinite(fa["coef"][k]) and fa["stderr"][k] > 0 for k in "abcd")
    preds = res["holdout"]["predictions"]
    assert [p["d_model"] for p in preds] == [16, 32] and res["holdout"]["fit"]["n_points"] == 6
    for p in preds:
        assert p["loss_lo"] < p["loss"] < p["loss_hi"]
        assert p["within_interval"] == (
            abs(math.log(p["observed"]) - p["log_loss"]) <= p["log_halfwidth"]
        )
    assert (tmp_path / "sweep.png").stat().st_size > 5000
    assert json.loads((tmp_path / "sweep.json").read_text())["runs"] == runs
    # resumable: finished runs are skipped (their records untouched), the result is the same
    marker = tmp_path / "d16-E2" / "sweep_run.json"
    before = marker.stat().st_mtime_ns
    again = sweep(out_dir=tmp_path, **kw)
    assert marker.stat().st_mtime_ns == before
    assert again["fit_all"] == res["fit_all"]
