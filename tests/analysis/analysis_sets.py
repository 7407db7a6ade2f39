"""random_sets, shared by the analysis tests (a module of its own, see offload_models.py)."""

from __future__ import annotations

import numpy as np


def random_sets(
    rng: np.random.Generator, n: int, num_layers: int, num_experts: int, k: int
) -> np.ndarray:
    """[n, L, k] uniform random top-k sets (distinct experts per row)."""
    g = rng.random((n, num_layers, num_experts))
    return np.argsort(g, axis=-1)[..., :k].astype(np.int16)
