"""Helpers shared by the trace tests: pre-tokenized documents and a tiny moelab checkpoint."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np


def make_docs(
    n: int = 7, seed: int = 0, vocab: int = 300, max_len: int = 40
) -> list[SimpleNamespace]:
    """Pre-tokenized documents of varied length and two domains."""
    rng = np.random.default_rng(seed)
    return [
        SimpleNamespace(
            doc_id=f"doc{i}",
            domain=["prose", "code"][i % 2],
            token_ids=rng.integers(3, vocab, int(rng.integers(3, max_len))).tolist(),
        )
        for i in range(n)
    ]


def build_moelab(tmp: Path, first_k_dense: int = 1, seed: int = 0) -> Path:
    """Tiny moelab MoETransformer checkpoint (3 layers, first dense) with spread-out routers."""
    import torch

    from moelab.layers.config import MoEConfig
    from moelab.models.config import MoETransformerConfig
    from moelab.models.transformer import MoETransformer

    cfg = MoETransformerConfig(
        vocab_size=300,
        d_model=32,
        n_layers=3,
        n_heads=4,
        d_ff=64,
        max_seq_len=64,
        moe=MoEConfig(d_model=32, d_ff=32, num_experts=6, top_k=2),
        first_k_dense=first_k_dense,
        bos_token_id=2,
    )
    model = MoETransformer(cfg, seed=seed)
    with torch.no_grad():
        for b in model.blocks:
            if hasattr(b.ffn, "router"):
                b.ffn.router.gate.weight.normal_(0, 0.5)
    return model.save(tmp / "ckpt")
