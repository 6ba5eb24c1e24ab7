"""Fixtures for the anomaly tests through the proxy: a gateway on a SQLite file, a recording
upstream, a fake clock starting on a window boundary, and the CLI as a subprocess."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import FakeClock
from gateway.config.schema import GatewayConfig
from tests.helpers.gateway import RunningGateway, start_gateway
from tests.helpers.upstream import RecordingUpstream

from .support import config_data

Start = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()  # 1_800_000_000: a multiple of the 60 s window


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "gateway.db"


@pytest.fixture
async def start(db: Path, up: RecordingUpstream, clock: FakeClock) -> AsyncIterator[Start]:
    """`await start(anomalies={...})`: a gateway on the test's SQLite file, upstream and clock."""
    running: list[RunningGateway] = []

    async def factory(anomalies: dict[str, Any] | None = None) -> RunningGateway:
        config = GatewayConfig.model_validate(config_data(db, up.url, anomalies))
        gw = await start_gateway(config, clock=clock)
        running.append(gw)
        return gw

    try:
        yield factory
    finally:
        for gw in running:
            await gw.close()


@pytest.fixture(autouse=True)
def no_internal_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Recording an anomaly never fails (it would log an error)."""
    caplog.set_level(logging.WARNING, logger="gateway")
    yield
    bad = [r for r in caplog.get_records("call") if r.name.startswith("gateway") and r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]
