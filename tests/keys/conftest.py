"""Fixtures for the key tests: every request-level test runs on SQLite and on PostgreSQL.

SQLite gets a fresh file under tmp_path. PostgreSQL gets a fresh schema of its own in the throwaway
database of `pg_url` (selected through search_path, dropped afterwards), so each test starts from
empty tables without disturbing other tests using the same database.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.clock import FakeClock
from tests.helpers.gateway import RunningGateway, start_gateway
from tests.helpers.upstream import RecordingUpstream

from .support import config_data, validate, write_config

Start = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def with_search_path(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}search_path={schema}"


@pytest.fixture
async def store_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty store of the backend under test."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'keys.db'}"
        return
    pg_url: str = request.getfixturevalue("pg_url")
    schema = f"k_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(pg_url, timeout=10)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        yield with_search_path(pg_url, schema)
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


@pytest.fixture
def pg_schema(store_url: str) -> str | None:
    """The PostgreSQL schema of the test's store, or None on SQLite."""
    if "search_path=" not in store_url:
        return None
    return store_url.rsplit("search_path=", 1)[1]


@pytest.fixture
async def up() -> AsyncIterator[RecordingUpstream]:
    upstream = await RecordingUpstream().start()
    try:
        yield upstream
    finally:
        await upstream.close()


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
