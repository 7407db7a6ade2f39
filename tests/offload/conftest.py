"""Tiny models and stores shared by the offload tests."""

import copy

import pytest
from offload_models import tiny_model

from moelab.offload.store import ExpertStore


@pytest.fixture
def model_and_store(tmp_path):
    """(offloadable model, untouched reference copy, store directory)."""
    m = tiny_model()
    ref = copy.deepcopy(m)
    d = ExpertStore.write(m, tmp_path / "store")
    return m, ref, d
