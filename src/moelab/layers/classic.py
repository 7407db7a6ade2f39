"""Classic dense mixtures of experts for small regression and classification problems.

- `MixtureOfExperts`: Jacobs, Jordan, Nowlan & Hinton (1991), "Adaptive Mixtures of Local
  Experts", Neural Computation 3(1). A softmax gate p_i(x) weighs every expert's output o_i(x)
  (dense: all experts run). The paper's error functions, per case c:
    Eq. 1.1 (cooperative)   E = || d - sum_i p_i o_i ||^2
    Eq. 1.2 (competitive)   E = sum_i p_i || d - o_i ||^2
    Eq. 1.3 (mixture NLL)   E = -log sum_i p_i exp(-1/2 || d - o_i ||^2)
  Eq. 1.2 and 1.3 make the experts compete (each expert is pulled toward d in proportion to
  its gate, and in 1.3 to its posterior responsibility), which is what localises them.
  For classification the experts output class probabilities; Eq. 1.3 then becomes the
  multinomial mixture likelihood -log sum_i p_i P_i(y | x) (the form Jordan & Jacobs use).
- `HierarchicalMoE`: Jordan & Jacobs (1994), "Hierarchical Mixtures of Experts and the EM
  Algorithm", Neural Computation 6(2): a two-level tree, mu = sum_i g_i sum_j g_{j|i} mu_ij
  (Eq. 1-4) with likelihood P(y|x) = sum_i g_i sum_j g_{j|i} P_ij(y|x) (Eq. 6); trained here by
  gradient descent on the negative log-likelihood (the paper's EM/IRLS is an alternative
  optimiser for the same objective); `posteriors` gives the E-step responsibilities h_i, h_{j|i}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from moelab.errors import ConfigError, InputError

TASKS = ("regression", "classification")
LOSSES = ("competitive", "mixture_nll", "cooperative")


def _mlp(d_in: int, d_out: int, hidden: int) -> nn.Module:
    """Linear map (hidden == 0) or one-hidden-layer tanh MLP."""
    if hidden == 0:
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


def _check_xy(x: torch.Tensor, y: torch.Tensor | None, d_in: int, where: str) -> None:
    if x.dim() != 2 or x.shape[1] != d_in:
        raise InputError(f"{where}: x must be [N, d_in={d_in}], got {tuple(x.shape)}")
    if y is not None and y.shape[0] != x.shape[0]:
        raise InputError(f"{where}: y has {y.shape[0]} rows but x has {x.shape[0]}")


class _Base(nn.Module):
    def __init__(self, d_in: int, d_out: int, task: str) -> None:
        super().__init__()
        if task not in TASKS:
            raise ConfigError(f"task={task!r}; expected one of {TASKS}")
        if d_in < 1 or d_out < 1:
            raise ConfigError(f"d_in={d_in}, d_out={d_out}: both must be >= 1")
        if task == "classification" and d_out < 2:
            raise ConfigError(f"d_out={d_out}: classification needs >= 2 classes")
        self.d_in, self.d_out, self.task = d_in, d_out, task

    def _targets(self, y: torch.Tensor) -> torch.Tensor:
        """Targets d as float vectors [N, d_out] (one-hot for class labels)."""
        if self.task == "classification":
            if y.dim() != 1 or y.dtype not in (torch.int64, torch.int32):
                raise InputError(f"classification targets must be int class ids [N], got {y.dtype}")
            if int(y.min()) < 0 or int(y.max()) >= self.d_out:
                raise InputError(f"class ids must lie in [0, {self.d_out}), got {int(y.max())}")
            return F.one_hot(y.long(), self.d_out).to(torch.get_default_dtype())
        return y.reshape(y.shape[0], -1)

    def _expert_loglik(self, out: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """log P_i(d | x) up to a constant: [N, E...] from outputs [N, E..., d_out]."""
        if self.task == "classification":
            return (
                torch.log(out.clamp_min(1e-12)) * d.view(d.shape[0], *[1] * (out.dim() - 2), -1)
            ).sum(-1)
        diff = d.view(d.shape[0], *[1] * (out.dim() - 2), -1) - out
        return -0.5 * (diff**2).sum(-1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Fraction of correctly classified rows (classification only)."""
        if self.task != "classification":
            raise ConfigError("accuracy() is for task='classification'")
        with torch.no_grad():
            return float((self.predict(x).argmax(-1) == y).float().mean())


class MixtureOfExperts(_Base):
    """Jacobs et al. (1991) dense mixture: softmax gate over `num_experts` experts."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        num_experts: int,
        task: str = "regression",
        expert_hidden: int = 0,
        gate_hidden: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(d_in, d_out, task)
        if num_experts < 1:
            raise ConfigError(f"num_experts={num_experts}: must be >= 1")
        self.num_experts = num_experts
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.experts = nn.ModuleList(
                _mlp(d_in, d_out, expert_hidden) for _ in range(num_experts)
            )
            self.gate = _mlp(d_in, num_experts, gate_hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate probabilities p [N, E], expert outputs o [N, E, d_out]); classification
        outputs are class probabilities."""
        _check_xy(x, None, self.d_in, type(self).__name__)
        p = F.softmax(self.gate(x), dim=-1)
        o = torch.stack([ex(x) for ex in self.experts], dim=1)
        if self.task == "classification":
            o = F.softmax(o, dim=-1)
        return p, o

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Mixture output sum_i p_i o_i [N, d_out] (class probabilities for classification)."""
        p, o = self(x)
        return (p.unsqueeze(-1) * o).sum(1)

    def loss(self, x: torch.Tensor, y: torch.Tensor, kind: str = "mixture_nll") -> torch.Tensor:
        """Mean over cases of Eq. 1.1 ('cooperative'), 1.2 ('competitive') or 1.3 ('mixture_nll')."""
        if kind not in LOSSES:
            raise ConfigError(f"loss kind={kind!r}; expected one of {LOSSES}")
        _check_xy(x, y, self.d_in, f"{type(self).__name__}.loss")
        d = self._targets(y)
        p, o = self(x)
        if kind == "cooperative":
            return ((d - (p.unsqueeze(-1) * o).sum(1)) ** 2).sum(-1).mean()
        if kind == "competitive":
            return (p * ((d.unsqueeze(1) - o) ** 2).sum(-1)).sum(-1).mean()
        return -torch.logsumexp(
            torch.log(p.clamp_min(1e-30)) + self._expert_loglik(o, d), -1
        ).mean()

    def responsibilities(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Posterior h_i = p_i P_i(d) / sum_j p_j P_j(d) [N, E] (which expert explains each case)."""
        with torch.no_grad():
            p, o = self(x)
            return F.softmax(
                torch.log(p.clamp_min(1e-30)) + self._expert_loglik(o, self._targets(y)), -1
            )


class HierarchicalMoE(_Base):
    """Jordan & Jacobs (1994) two-level HME: `branches` top-level gates x `experts_per_branch`."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        branches: int = 2,
        experts_per_branch: int = 2,
        task: str = "regression",
        expert_hidden: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(d_in, d_out, task)
        if branches < 1 or experts_per_branch < 1:
            raise ConfigError(
                f"branches={branches}, experts_per_branch={experts_per_branch}: both must be >= 1"
            )
        self.branches, self.experts_per_branch = branches, experts_per_branch
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.top_gate = nn.Linear(d_in, branches)
            self.branch_gates = nn.Linear(d_in, branches * experts_per_branch)
            self.experts = nn.ModuleList(
                _mlp(d_in, d_out, expert_hidden) for _ in range(branches * experts_per_branch)
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(g_i [N, B], g_{j|i} [N, B, M], expert outputs mu_ij [N, B, M, d_out])."""
        _check_xy(x, None, self.d_in, type(self).__name__)
        B, M = self.branches, self.experts_per_branch
        g_top = F.softmax(self.top_gate(x), -1)
        g_low = F.softmax(self.branch_gates(x).view(-1, B, M), -1)
        mu = torch.stack([ex(x) for ex in self.experts], 1).view(x.shape[0], B, M, self.d_out)
        if self.task == "classification":
            mu = F.softmax(mu, -1)
        return g_top, g_low, mu

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """mu = sum_i g_i sum_j g_{j|i} mu_ij [N, d_out] (Eq. 1-4)."""
        g_top, g_low, mu = self(x)
        return ((g_top.unsqueeze(-1) * g_low).unsqueeze(-1) * mu).sum((1, 2))

    def loss(self, x: torch.Tensor, y: torch.Tensor, kind: str = "mixture_nll") -> torch.Tensor:
        """Mean negative log-likelihood -log sum_i g_i sum_j g_{j|i} P_ij(y|x) (Eq. 6)."""
        if kind != "mixture_nll":
            raise ConfigError(f"HierarchicalMoE.loss: kind={kind!r}; only 'mixture_nll' is defined")
        _check_xy(x, y, self.d_in, f"{type(self).__name__}.loss")
        g_top, g_low, mu = self(x)
        logp = torch.log(g_top.clamp_min(1e-30)).unsqueeze(-1) + torch.log(g_low.clamp_min(1e-30))
        return -torch.logsumexp(
            (logp + self._expert_loglik(mu, self._targets(y))).flatten(1), -1
        ).mean()

    def posteriors(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E-step responsibilities (h_i [N, B], h_{j|i} [N, B, M]) of Jordan & Jacobs Eq. 10-12."""
        with torch.no_grad():
            g_top, g_low, mu = self(x)
            joint = (
                torch.log(g_top.clamp_min(1e-30)).unsqueeze(-1)
                + torch.log(g_low.clamp_min(1e-30))
                + self._expert_loglik(mu, self._targets(y))
            )
            h_top = F.softmax(torch.logsumexp(joint, -1), -1)
            return h_top, F.softmax(joint, -1)


@dataclass
class FitResult:
    """Loss per epoch of a `fit` call."""

    losses: list[float]


def fit(
    model: MixtureOfExperts | HierarchicalMoE,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str = "mixture_nll",
    epochs: int = 300,
    lr: float = 0.05,
    seed: int = 0,
    progress: bool = False,
) -> FitResult:
    """Full-batch Adam on `model.loss(x, y, loss)`; returns the loss history."""
    if epochs < 1 or not lr > 0:
        raise ConfigError(f"fit: epochs={epochs} must be >= 1 and lr={lr} > 0")
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in tqdm(range(epochs), disable=not progress, desc=f"fit {type(model).__name__}"):
        opt.zero_grad(set_to_none=True)
        val = model.loss(x, y, loss)
        v = float(val.detach())
        if not math.isfinite(v):
            raise InputError(f"fit: loss became {v}; lower lr={lr} or rescale x")
        val.backward()
        opt.step()
        losses.append(v)
    return FitResult(losses)


def quadrant_dataset(
    n: int = 1000, noise: float = 0.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D XOR-of-quadrants classification (label 1 iff x0*x1 > 0): no single line separates it,
    two linear experts split by a linear gate do. Returns (x [n, 2], y [n] int64)."""
    if n < 1:
        raise ConfigError(f"quadrant_dataset: n={n} must be >= 1")
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 2 - 1
    y = ((x[:, 0] * x[:, 1]) > 0).long()
    if noise > 0:
        flip = torch.rand(n, generator=g) < noise
        y = torch.where(flip, 1 - y, y)
    return x, y
