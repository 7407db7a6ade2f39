"""Tiny MoE models for the experts tests."""

from __future__ import annotations

from moelab.layers.config import MoEConfig
from moelab.models import MoETransformer, MoETransformerConfig

WORDS = (
    "the a cat dog house river runs sleeps quickly green old small man woman sees takes "
    "and or but in on under with big red tree walks eats slowly happy"
).split()


def tiny_moe(
    vocab: int = 97,
    seed: int = 0,
    num_experts: int = 6,
    top_k: int = 2,
    n_layers: int = 2,
    **moe_kw,
) -> MoETransformer:
    """A random-init causal MoE LM (d_model 32) with non-trivial weights."""
    moe = MoEConfig(d_model=32, d_ff=16, num_experts=num_experts, top_k=top_k, **moe_kw)
    cfg = MoETransformerConfig(
        vocab_size=vocab, d_model=32, n_layers=n_layers, n_heads=4, d_ff=top_k * 16,
        max_seq_len=64, moe=moe, init_std=0.1, pad_token_id=0, bos_token_id=1,
    )  # fmt: skip
    return MoETransformer(cfg, seed=seed).eval()


def sentences(rng, n: int) -> str:
    out = []
    for _ in range(n):
        k = int(rng.integers(4, 10))
        out.append(
            " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), k)).capitalize() + "."
        )
    return " ".join(out)
