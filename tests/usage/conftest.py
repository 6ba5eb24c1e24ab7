"""Fixtures for the usage tests: in-process gateways on SQLite and on PostgreSQL.

SQLite gets a fresh file under tmp_path; PostgreSQL a fresh schema of its own in the throwaway
database of `pg_url` (selected through search_path, dropped afterwards). Every gateway a test starts
is closed at teardown, and its `gateway_usage_dropped_total` must still be 0 then: only a test that
configures `on_spool_full: drop` and fills the spool may lose records (it says so with
`expect_drops=True`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.clock import Clock
from tests.helpers.gateway import RunningGateway, start_gateway
from tests.helpers.upstream import RecordingUpstream
from tests.usage.support import config_data, validate

Start = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def with_search_path(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}search_path={schema}"


async def _pg_schema(pg_url: str) -> tuple[str, str]:
    schema = f"u_{uuid.uuid4().hex}"
    conn = await asyncpg.connect(pg_url, timeout=10)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()
    return schema, with_search_path(pg_url, schema)


async def _drop_schema(pg_url: str, schema: str) -> None:
    conn = await asyncpg.connect(pg_url, timeout=30)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def store_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty store of the backend under test."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'gateway.db'}"
        return
    pg_url: str = request.getfixturevalue("pg_url")
    schema, url = await _pg_schema(pg_url)
    try:
        yield url
    finally:
        await _drop_schema(pg_url, schema)


@pytest.fixture
async def pg_store_url(pg_url: str) -> AsyncIterator[str]:
    """An empty PostgreSQL store (for the tests that only make sense there)."""
    schema, url = await _pg_schema(pg_url)
    try:
        yield url
    finally:
        await _drop_schema(pg_url, schema)


@pytest.fixture
async def up() -> AsyncIterator[RecordingUpstream]:
    upstream = await RecordingUpstream().start()
    try:
        yield upstream
    finally:
        await upstream.close()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def dropped(gw: RunningGateway) -> float:
    return float(gw.services.metrics.registry.get_sample_value("gateway_usage_dropped_total") or 0.0)


def background(gw: RunningGateway) -> None:
    """start_gateway opens the services without their background tasks: start them (once)."""
    if gw.services.usage is not None and gw.services.usage._task is None:
        gw.services.start_background()


def once(gw: RunningGateway) -> None:
    """Let a test close a gateway itself; the fixture's close then does nothing."""
    close = gw.close
    done = False

    async def close_once() -> None:
        nonlocal done
        if not done:
            done = True
            await close()

    gw.close = close_once  # type: ignore[method-assign]


@pytest.fixture
async def start(store_url: str, up: RecordingUpstream, spool_dir: Path) -> AsyncIterator[Start]:
    """`await start(routes=None, usage={...}, store=URL, expect_drops=False, clock=None, setup=None, **top)`.

    `setup(gw)` runs before the background tasks (the usage writer) start: the place to wrap the store.
    """
    running: list[tuple[RunningGateway, bool]] = []

    async def factory(routes: list[dict[str, Any]] | None = None, *, usage: dict[str, Any] | None = None,
                      store: str | None = None, expect_drops: bool = False, clock: Clock | None = None,
                      setup: Callable[[RunningGateway], None] | None = None, **top: Any) -> RunningGateway:
        usage = {"spool_dir": str(spool_dir), **(usage or {})}
        config = validate(config_data(store or store_url, up.url, routes, usage, **top))
        gw = await start_gateway(config, clock=clock)
        running.append((gw, expect_drops))
        once(gw)
        if setup is not None:
            setup(gw)
        background(gw)
        return gw

    try:
        yield factory
    finally:
        losses = []
        for gw, expect_drops in running:
            if not expect_drops:
                losses.append(dropped(gw))
            await gw.close()
        assert all(n == 0 for n in losses), f"usage records were dropped: {losses}"
