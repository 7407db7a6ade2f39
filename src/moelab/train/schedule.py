"""Learning-rate schedule: linear warmup then cosine decay to a floor (Loshchilov & Hutter 2017,
SGDR, Eq. 5 without restarts; the GPT/nanoGPT schedule)."""

from __future__ import annotations

import math

import torch

from moelab.errors import ConfigError

__all__ = ["lr_factor", "warmup_cosine"]


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): warmup, then cosine to min_ratio."""
    if max_steps <= 0 or warmup_steps < 0 or not 0.0 <= min_ratio <= 1.0:
        raise ConfigError(
            f"lr schedule: need max_steps > 0 (got {max_steps}), warmup_steps >= 0 (got {warmup_steps}),"
            f" 0 <= min_ratio <= 1 (got {min_ratio})"
        )
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, min_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying `lr_factor`; its state_dict is checkpointed with the optimizer."""
    lr_factor(0, warmup_steps, max_steps, min_ratio)  # validate now
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, max_steps, min_ratio)
    )
