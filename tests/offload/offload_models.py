"""tiny_model, shared by the offload tests (a module of its own: `from conftest import ...`
resolved to another directory's conftest when several test directories ran in one pytest call)."""

import torch

from moelab.layers.config import MoEConfig
from moelab.models import MoETransformer, MoETransformerConfig


def tiny_model(seed: int = 0, experts: int = 8, layers: int = 2, shared: int = 0) -> MoETransformer:
    """A 2-layer d_model-32 MoE LM with 8 experts, top-2."""
    torch.manual_seed(seed)
    moe = MoEConfig(d_model=32, d_ff=64, num_experts=experts, top_k=2, num_shared_experts=shared)
    cfg = MoETransformerConfig(
        vocab_size=97, d_model=32, n_layers=layers, n_heads=4, d_ff=64, moe=moe
    )
    return MoETransformer(cfg, seed=seed).eval()
