"""Tiny models and stores shared by the offload tests."""

import copy

import pytest
import torch

from moelab.layers.config import MoEConfig
from moelab.models import MoETransformer, MoETransformerConfig
from moelab.offload.store import ExpertStore


def tiny_model(seed: int = 0, experts: int = 8, layers: int = 2, shared: int = 0) -> MoETransformer:
    """A 2-layer d_model-32 MoE LM with 8 experts, top-2."""
    torch.manual_seed(seed)
    moe = MoEConfig(d_model=32, d_ff=64, num_experts=experts, top_k=2, num_shared_experts=shared)
    cfg = MoETransformerConfig(
        vocab_size=97, d_model=32, n_layers=layers, n_heads=4, d_ff=64, moe=moe
    )
    return MoETransformer(cfg, seed=seed).eval()


@pytest.fixture
def model_and_store(tmp_path):
    """(offloadable model, untouched reference copy, store directory)."""
    m = tiny_model()
    ref = copy.deepcopy(m)
    d = ExpertStore.write(m, tmp_path / "store")
    return m, ref, d
