"""MLM masking statistics (BERT 15% with 80/10/10) and invariants."""

from __future__ import annotations

import pytest
import torch

from moelab.data.mlm import IGNORE_INDEX, mask_tokens
from moelab.errors import ConfigError, InputError

V, MASK, SPECIAL = 1000, 4, [0, 1, 2, 3, 4]


def sample(n: int = 200_000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, V, (n // 100, 100), generator=g)
    x[:, 0] = 1  # <bos> at every row start
    x[:, -5:] = 0  # padding at the end
    return x


def test_masking_statistics_and_invariants() -> None:
    x = sample()
    attn = (x != 0).long()
    out, labels = mask_tokens(
        x, MASK, V, SPECIAL, attention_mask=attn, generator=torch.Generator().manual_seed(1)
    )
    eligible = (x >= 5) & attn.bool()
    sel = labels != IGNORE_INDEX
    # never special tokens or padding, labels equal the original ids where selected
    assert not (sel & ~eligible).any()
    assert torch.equal(labels[sel], x[sel])
    assert torch.equal(out[~sel], x[~sel])
    rate = sel.sum().item() / eligible.sum().item()
    assert abs(rate - 0.15) < 0.005
    n = sel.sum().item()
    masked = (out == MASK) & sel
    changed = (out != x) & sel & ~masked
    kept = (out == x) & sel
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    # random replacements equal to the original token count as "kept" (1/995 chance)
    assert abs(changed.sum().item() / n - 0.1) < 0.01
    assert abs(kept.sum().item() / n - 0.1) < 0.01
    # random replacements never produce special tokens
    assert not torch.isin(out[changed], torch.tensor(SPECIAL)).any()
    # input untouched, reproducible with the same generator, different with another
    assert (x >= 0).all() and not (x == MASK).any()
    again, _ = mask_tokens(
        x, MASK, V, SPECIAL, attention_mask=attn, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(again, out)
    other, _ = mask_tokens(
        x, MASK, V, SPECIAL, attention_mask=attn, generator=torch.Generator().manual_seed(2)
    )
    assert not torch.equal(other, out)


def test_masking_errors() -> None:
    x = sample(1000)
    with pytest.raises(ConfigError, match="mlm_prob"):
        mask_tokens(x, MASK, V, SPECIAL, mlm_prob=0.0)
    with pytest.raises(ConfigError, match="mask_token_id"):
        mask_tokens(x, V + 3, V, SPECIAL)
    with pytest.raises(InputError, match="integer"):
        mask_tokens(x.float(), MASK, V, SPECIAL)
