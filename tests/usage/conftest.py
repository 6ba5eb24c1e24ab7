"""Fixtures for the usage tests: in-process gateways on SQLite and on PostgreSQL.

SQLite gets a fresh file under tmp_path; PostgreSQL a fresh schema of its own in the throwaway
database of `pg_url` (selected through search_path, dropped afterwards). Every gateway a test starts
is closed at teardown, and its `gateway_usage_dropped_total` must still be 0 then: only a test that
configures `on_spool_full: drop` and fills the spool may lose records (it says so with
`expect_drops=True`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import Clock
from tests.helpers.gateway import RunningGateway, metric, start_gateway
from tests.helpers.upstream import RecordingUpstream
from tests.usage.support import config_data, validate

Start = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


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
                losses.append(metric(gw, "gateway_usage_dropped_total"))
            await gw.close()
        assert all(n == 0 for n in losses), f"usage records were dropped: {losses}"
