"""Training-time measurements: unigram baseline perplexity and per-layer expert load.

Expert load per MoE layer is the fraction of routed (token, slot) assignments each expert
received; "max load / uniform" is max_e f_e * E (1 = perfectly balanced, E = collapse onto one
expert) and dead experts received no token in the window -- the collapse symptoms the
load-balancing loss of Shazeer et al. 2017 (Eq. 6-7) and Fedus et al. 2022 (Eq. 4) prevents.
The unigram baseline predicts every token with its add-one smoothed training-split frequency;
a language model must beat it to have learned anything beyond token counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from moelab.errors import InputError
from moelab.layers.types import RoutingResult

__all__ = ["unigram_logprobs", "unigram_perplexity", "ExpertLoad"]


def unigram_logprobs(train_ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """log p(token) from add-one smoothed counts of the training tokens, [V] float64."""
    if train_ids.size == 0:
        raise InputError("unigram_logprobs: no training tokens")
    if int(train_ids.max()) >= vocab_size or int(train_ids.min()) < 0:
        raise InputError(f"unigram_logprobs: token ids outside [0, {vocab_size})")
    counts = np.bincount(train_ids.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


def unigram_perplexity(logprobs: np.ndarray, targets: np.ndarray) -> float:
    """exp(mean negative log-likelihood) of `targets` under the unigram model (ignores -100)."""
    t = np.asarray(targets).reshape(-1)
    t = t[t >= 0]
    if t.size == 0:
        raise InputError("unigram_perplexity: no target tokens")
    return float(math.exp(-float(logprobs[t].mean())))


class ExpertLoad:
    """Accumulates per-MoE-layer expert assignment counts between log points."""

    def __init__(self, layer_indices: Sequence[int], num_experts: int) -> None:
        self.layers = list(layer_indices)
        self.num_experts = num_experts
        self.counts = torch.zeros(len(self.layers), num_experts, dtype=torch.int64)

    def update(self, routing: Sequence[RoutingResult | None]) -> None:
        """Add the assignments of one forward pass (routing: one entry per transformer layer)."""
        for j, layer in enumerate(self.layers):
            r = routing[layer]
            if r is None:
                continue
            ids = r.expert_ids.detach().reshape(-1)
            if r.dropped is not None:
                ids = ids[~r.dropped.reshape(-1)]
            ids = ids[ids >= 0].to("cpu")
            self.counts[j] += torch.bincount(ids, minlength=self.num_experts)[: self.num_experts]

    def summary(self) -> dict[str, list[float] | list[int]]:
        """Per layer: load fractions, max load / uniform, dead-expert count."""
        c = self.counts.double()
        tot = c.sum(1, keepdim=True).clamp_min(1)
        frac = c / tot
        return {
            "layers": self.layers,
            "load": frac.tolist(),
            "max_over_uniform": (frac.max(1).values * self.num_experts).tolist(),
            "dead": (self.counts == 0).sum(1).tolist(),
        }

    def reset(self) -> None:
        """Start a new window."""
        self.counts.zero_()
