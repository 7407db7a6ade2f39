"""The unified scaling law of routed language models (Clark et al. 2022, "Unified Scaling Laws
for Routed Language Models", Eq. 2 with the plain log E of their Eq. 1-2 rather than the
saturating transform of Eq. 10):

    log L(N, E) = a log N + b log E + c log N log E + d

with N the dense model's parameter count and E the number of experts (natural logarithms here).
Fitted by ordinary least squares; the coefficients' uncertainty is the OLS covariance
s^2 (X^T X)^-1 with s^2 the residual variance on n - 4 degrees of freedom, and a prediction for
unseen (N, E) carries a Student-t prediction interval sqrt(s^2 + x0^T Cov x0) * t(0.975, n - 4).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sstats

from moelab.errors import InputError

__all__ = ["ScalingFit", "fit_scaling_law", "design_row"]

COEFS = ("a", "b", "c", "d")


def design_row(n: float, e: float) -> np.ndarray:
    """[log N, log E, log N log E, 1]."""
    ln, le = math.log(n), math.log(e)
    return np.array([ln, le, ln * le, 1.0])


@dataclass
class ScalingFit:
    """Coefficients, their standard errors and covariance, residual scale, degrees of freedom."""

    coef: dict[str, float]
    stderr: dict[str, float]
    cov: list[list[float]]
    resid_std: float  # s, in log-loss units
    dof: int
    n_points: int
    in_sample_rmse: float  # in-sample: residuals of the points the law was fitted on

    def predict(self, n: float, e: float, level: float = 0.95) -> dict[str, float]:
        """Predicted loss at (N, E) with its `level` prediction interval (loss and log-loss)."""
        x = design_row(n, e)
        beta = np.array([self.coef[k] for k in COEFS])
        mu = float(x @ beta)
        cov = np.array(self.cov)
        se = math.sqrt(self.resid_std**2 + float(x @ cov @ x))
        q = float(sstats.t.ppf(0.5 + level / 2, self.dof))
        return {
            "log_loss": mu,
            "loss": math.exp(mu),
            "log_se": se,
            "log_halfwidth": q * se,
            "loss_lo": math.exp(mu - q * se),
            "loss_hi": math.exp(mu + q * se),
            "level": level,
        }

    def to_dict(self) -> dict:
        """Plain dict (JSON)."""
        return asdict(self)


def fit_scaling_law(n: list[float], e: list[float], loss: list[float]) -> ScalingFit:
    """OLS fit of log L = a log N + b log E + c log N log E + d over the given runs."""
    if not (len(n) == len(e) == len(loss)):
        raise InputError(
            f"fit_scaling_law: got {len(n)} N, {len(e)} E and {len(loss)} losses; need one each per run"
        )
    if len(loss) < 5:
        raise InputError(
            f"fit_scaling_law: {len(loss)} runs for 4 coefficients; need at least 5 to estimate "
            "the uncertainty (residual degrees of freedom >= 1)"
        )
    if len(set(n)) < 2 or len(set(e)) < 2:
        raise InputError(
            f"fit_scaling_law: needs at least two sizes N and two expert counts E, got "
            f"N={sorted(set(n))}, E={sorted(set(e))}"
        )
    bad = [v for v in (*n, *e, *loss) if not (math.isfinite(v) and v > 0)]
    if bad:
        raise InputError(f"fit_scaling_law: N, E and losses must be finite and > 0, got {bad[:3]}")
    X = np.stack([design_row(a, b) for a, b in zip(n, e, strict=True)])
    y = np.log(np.asarray(loss, dtype=np.float64))
    if np.linalg.matrix_rank(X) < 4:
        raise InputError(
            "fit_scaling_law: the runs do not determine the 4 coefficients (rank-deficient design)"
        )
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ beta
    dof = len(y) - 4
    s2 = float(resid @ resid) / dof
    cov = s2 * np.linalg.inv(X.T @ X)
    return ScalingFit(
        coef={k: float(v) for k, v in zip(COEFS, beta, strict=True)},
        stderr={k: float(math.sqrt(max(cov[i, i], 0.0))) for i, k in enumerate(COEFS)},
        cov=cov.tolist(),
        resid_std=math.sqrt(s2),
        dof=dof,
        n_points=len(y),
        in_sample_rmse=float(np.sqrt(np.mean(resid**2))),
    )
