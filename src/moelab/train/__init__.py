"""Training: TrainConfig, the resumable training loop, MoE-vs-dense comparison, topic histograms."""

from moelab.train.config import TrainConfig, load_train_config, quick_overrides
from moelab.train.loop import TrainResult, evaluate, train

__all__ = [
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "load_train_config",
    "quick_overrides",
    "train",
]
