"""Two linear experts split the plane: the Jacobs et al. (1991) mixture on a 2-D XOR problem.

The label is 1 iff x0*x1 > 0 (opposite quadrants), which no single line separates. A softmax
gate learns one dividing line and each linear (logistic) expert handles one half-plane.
Prints test accuracy for a single linear expert, the 2-expert mixture under both of the paper's
losses (Eq. 1.2 competitive, Eq. 1.3 mixture NLL) and a 2x2 hierarchical mixture (Jordan &
Jacobs 1994), and saves a plot of the gate's partition to out/classic_mixture_2d.png.

Run:  .venv/bin/python examples/classic_mixture_2d.py [--out out/classic_mixture_2d.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from moelab._io import atomic_write_with  # noqa: E402
from moelab.layers.classic import (  # noqa: E402
    HierarchicalMoE,
    MixtureOfExperts,
    fit,
    quadrant_dataset,
)


def run(out: Path, n: int = 1000, epochs: int = 300, seed: int = 0) -> dict[str, float]:
    """Fit the models, save the partition plot to `out`, return test accuracies."""
    x, y = quadrant_dataset(n, seed=seed)
    xt, yt = quadrant_dataset(n, seed=seed + 1)
    single = MixtureOfExperts(2, 2, 1, task="classification", seed=seed)
    fit(single, x, y, epochs=epochs, lr=0.1, seed=seed, progress=True)
    acc = {"single linear expert": single.accuracy(xt, yt)}
    mix = None
    for loss in ("competitive", "mixture_nll"):
        m = MixtureOfExperts(2, 2, 2, task="classification", seed=seed)
        fit(m, x, y, loss=loss, epochs=epochs, lr=0.1, seed=seed, progress=True)
        acc[f"2 linear experts, {loss} loss"] = m.accuracy(xt, yt)
        mix = m if loss == "mixture_nll" else mix
    hme = HierarchicalMoE(2, 2, 2, 2, task="classification", seed=seed)
    fit(hme, x, y, epochs=epochs, lr=0.1, seed=seed, progress=True)
    acc["hierarchical 2x2 experts"] = hme.accuracy(xt, yt)

    g = torch.linspace(-1, 1, 200)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    with torch.no_grad():
        gate, _ = mix(grid)
        pred = mix.predict(grid)[:, 1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    ax = axes[0]
    ax.contourf(gx, gy, gate[:, 0].reshape(200, 200), levels=20, cmap="coolwarm", alpha=0.8)
    ax.contour(gx, gy, gate[:, 0].reshape(200, 200), levels=[0.5], colors="k")
    ax.scatter(xt[:, 0], xt[:, 1], c=yt, s=4, cmap="binary", alpha=0.6)
    ax.set_title("gate p_1(x): which expert owns each region")
    ax = axes[1]
    ax.contourf(gx, gy, pred.reshape(200, 200), levels=20, cmap="PiYG", alpha=0.8)
    ax.contour(gx, gy, pred.reshape(200, 200), levels=[0.5], colors="k")
    ax.set_title(f"mixture P(y=1|x), test acc {acc['2 linear experts, mixture_nll loss']:.3f}")
    for ax in axes:
        ax.set_xlabel("x0")
        ax.set_ylabel("x1")
        ax.set_aspect("equal")
    fig.suptitle("Jacobs et al. (1991) mixture of 2 linear experts on XOR quadrants")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(out, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
    return acc


def main() -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/classic_mixture_2d.png"))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    acc = run(a.out, a.n, a.epochs, a.seed)
    for k, v in acc.items():
        print(f"{k:36s} test accuracy {v:.3f}")
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
