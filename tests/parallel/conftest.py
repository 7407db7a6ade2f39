"""Expert-parallel tests train the suite's tiny setup (tests/conftest.py) with every step logged."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture()
def tiny(tiny: dict[str, Any]) -> dict[str, Any]:
    """The suite's tiny run config, logging every step (the loss curves are compared step by step)."""
    return {**tiny, "log_every": 1}
