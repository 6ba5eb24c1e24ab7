"""Fixtures for the proxy tests: a recording upstream, a gateway factory, and a guard that no
request made the gateway log an internal error (nothing a client sends may produce a 500)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from .wire import Harness, start


@pytest.fixture
async def gateway() -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    """`await gateway(routes, **top_level_config)` starts a gateway; all are closed at teardown."""
    running: list[Harness] = []

    async def factory(routes: list[dict[str, Any]], **top: Any) -> Harness:
        h = await start(routes, **top)
        running.append(h)
        return h

    try:
        yield factory
    finally:
        for h in running:
            await h.close()


@pytest.fixture(autouse=True)
def no_internal_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.ERROR, logger="gateway")
    yield
    # asyncio logs what escapes a protocol callback ("Fatal error: protocol.data_received() call failed")
    bad = [
        r
        for r in caplog.get_records("call")
        if r.name.startswith(("gateway", "asyncio")) and r.levelno >= logging.ERROR
    ]
    assert not bad, [r.getMessage() for r in bad]
