"""Shared fixtures for trace tests (helpers live in trace_testutil.py and trace_tiny.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init Mixtral saved with save_pretrained (shared by the store tests)."""
    import trace_tiny

    return trace_tiny.build("mixtral", tmp_path_factory.mktemp("models") / "mixtral")
