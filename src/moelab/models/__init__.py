"""MoE transformer models: config, model (causal LM / MLM), stats, save/load, HF export, calculator."""

from moelab.models.config import MoETransformerConfig, dense_baseline
from moelab.models.transformer import KVCache, ModelOutput, ModelStats, MoETransformer

__all__ = [
    "KVCache",
    "ModelOutput",
    "ModelStats",
    "MoETransformer",
    "MoETransformerConfig",
    "dense_baseline",
]
