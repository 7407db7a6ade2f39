"""Masked-language-model corruption (Devlin et al. 2019, BERT, Sec. 3.1 "Task #1: Masked LM").

Each non-special token is selected with probability `mlm_prob` (15%); of the selected tokens
80% become ``<mask>``, 10% a random non-special token and 10% stay unchanged. Labels hold
the original id at selected positions and -100 elsewhere (ignored by the loss). Special tokens
and padding are never selected. Same semantics as transformers'
``DataCollatorForLanguageModeling``, but with an explicit generator for reproducibility.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moelab.errors import ConfigError, InputError

__all__ = ["IGNORE_INDEX", "mask_tokens"]

IGNORE_INDEX = -100


def mask_tokens(
    input_ids: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    special_ids: Sequence[int] = (),
    mlm_prob: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (corrupted input_ids, labels) for MLM; inputs are not modified in place."""
    if not 0.0 < mlm_prob < 1.0:
        raise ConfigError(f"mask_tokens: mlm_prob={mlm_prob} must be in (0, 1)")
    if mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1.0 + 1e-9:
        raise ConfigError(
            f"mask_tokens: mask_frac={mask_frac}, random_frac={random_frac} must be >= 0 with sum <= 1"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"mask_tokens: input_ids must be an integer tensor, got {input_ids.dtype}")
    if not 0 <= mask_token_id < vocab_size:
        raise ConfigError(
            f"mask_tokens: mask_token_id={mask_token_id} outside the vocabulary [0, {vocab_size})"
        )
    device = input_ids.device
    special = torch.tensor(
        sorted(set(special_ids) | {mask_token_id}), dtype=input_ids.dtype, device=device
    )
    eligible = ~torch.isin(input_ids, special)
    if attention_mask is not None:
        eligible &= attention_mask.bool()

    def uniform() -> torch.Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=device)

    selected = (uniform() < mlm_prob) & eligible
    u = uniform()  # one draw decides mask / random / keep
    to_mask = selected & (u < mask_frac)
    to_random = selected & (u >= mask_frac) & (u < mask_frac + random_frac)

    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    out = input_ids.clone()
    out[to_mask] = mask_token_id
    # random replacements are drawn from the non-special vocabulary
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    allowed[special[special < vocab_size].long()] = False
    pool = torch.nonzero(allowed).squeeze(1).to(input_ids.dtype)
    pick = torch.randint(0, pool.numel(), input_ids.shape, generator=generator, device=device)
    out[to_random] = pool[pick[to_random]]
    return out, labels
