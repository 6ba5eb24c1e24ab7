"""Fixtures for the key tests: every request-level test runs on SQLite and on PostgreSQL.

SQLite gets a fresh file under tmp_path. PostgreSQL gets a fresh schema of its own in the throwaway
database of `pg_url` (selected through search_path, dropped afterwards), so each test starts from
empty tables without disturbing other tests using the same database.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import FakeClock
from tests.helpers.configs import write_config
from tests.helpers.gateway import RunningGateway, start_gateway
from tests.helpers.upstream import RecordingUpstream

from .support import config_data, validate

Start = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
def pg_schema(store_url: str) -> str | None:
    """The PostgreSQL schema of the test's store, or None on SQLite."""
    if "search_path=" not in store_url:
        return None
    return store_url.rsplit("search_path=", 1)[1]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def start(store_url: str, up: RecordingUpstream, clock: FakeClock) -> AsyncIterator[Start]:
    """`await start(routes=None, keys={...}, **top)`: a gateway on the test's store and upstream,
    on the test's fake clock unless `clock=` says otherwise; all are closed at teardown."""
    running: list[RunningGateway] = []

    async def factory(routes: list[dict[str, Any]] | None = None, *, keys: dict[str, Any] | None = None,
                      clock: Any = clock, **top: Any) -> RunningGateway:
        gw = await start_gateway(validate(config_data(store_url, up.url, routes, keys, **top)), clock=clock)
        running.append(gw)
        return gw

    try:
        yield factory
    finally:
        for gw in running:
            await gw.close()


@pytest.fixture
async def gw(start: Start) -> RunningGateway:
    """A gateway with the default routes and a fake clock."""
    return await start()


@pytest.fixture
def config_file(tmp_path: Path, store_url: str, up: RecordingUpstream) -> Path:
    """gateway.yaml for the CLI, on the same store as `gw` (default routes and key settings)."""
    return write_config(tmp_path / "gateway.yaml", config_data(store_url, up.url))


@pytest.fixture(autouse=True)
def no_internal_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """No request a test sends may make the gateway log an internal error."""
    caplog.set_level(logging.ERROR, logger="gateway")
    yield
    bad = [r for r in caplog.get_records("call") if r.name.startswith("gateway") and r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]
