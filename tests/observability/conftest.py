"""Fixtures for the observability tests: the usage tests' in-process gateway, on SQLite only.

Metrics, logs and the access log do not depend on the store; the usage tests cover both stores.
`start` (from tests/usage/conftest.py) checks at teardown that no usage record was dropped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.usage.conftest import spool_dir, start  # noqa: F401 - fixtures shared with the usage tests


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'gateway.db'}"
