"""Fixtures for the end-to-end tests: every process a test starts is stopped when it ends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.support import Launcher


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.fixture(scope="module")
def module_launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """A launcher shared by one test module, for a gateway that several tests use."""
    launcher = Launcher(tmp_path_factory.mktemp("e2e"))
    try:
        yield launcher
    finally:
        launcher.close()
