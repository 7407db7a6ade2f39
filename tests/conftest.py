"""Suite-wide fixtures: a tiny training setup (python-code corpus, always present; a very small
MoE) used by tests/train and tests/parallel, tokenised once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from moelab.data.prepare import prepare_data

TINY: dict[str, Any] = {
    "corpus": "python-code",
    "max_bytes": 60_000,
    "vocab_size": 512,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 2,
    "d_ff": 32,
    "num_experts": 4,
    "top_k": 2,
    "seq_len": 32,
    "batch_size": 4,
    "lr": 3e-3,
    "max_steps": 12,
    "warmup_steps": 2,
    "eval_every": 6,
    "eval_batches": 2,
    "log_every": 3,
    "checkpoint_every": 4,
    "progress": False,
    "tensorboard": False,
    "threads": 1,
    "seed": 0,
}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared data folder shared by the training tests (tokenised once)."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    prepare_data(
        TINY["corpus"], root, vocab_size=TINY["vocab_size"], seed=0, max_bytes=TINY["max_bytes"]
    )
    return root


@pytest.fixture()
def tiny(tiny_data: Path, tmp_path: Path) -> dict[str, Any]:
    """Config values of a tiny run writing into a fresh folder."""
    return {**TINY, "data_dir": str(tiny_data), "out_dir": str(tmp_path / "run")}
