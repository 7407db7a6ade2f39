"""Families without a dedicated adapter work through the generic transformers router adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import trace_tiny as tiny
from test_trace_adapters import check_family


@pytest.mark.parametrize("family", list(tiny.extra_configs()))
def test_generic_family_matches_model_router_outputs(family: str, tmp_path: Path) -> None:
    check_family(family, tmp_path)
