"""Fixtures of the explore tests: one tiny store, its numpy reference, explorer and client."""

from __future__ import annotations

from pathlib import Path

import pytest
from explore_testutil import Ref, build_store


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    return build_store(tmp_path_factory.mktemp("explore") / "store")


@pytest.fixture(scope="session")
def ref(store) -> Ref:
    return Ref(store)


@pytest.fixture(scope="session")
def explorer(store):
    from moelab.explore.queries import open_explorer

    return open_explorer(store, threads=1)


@pytest.fixture(scope="session")
def client(explorer):
    from fastapi.testclient import TestClient

    from moelab.explore.app import create_app

    return TestClient(create_app(explorer))
