"""The brute-force throttle: failed authentications per client IP, a cool-down past `auth.max_failures`,
the client IP as derived from `trusted_proxies`, bounded state."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import FakeClock
from tests.helpers.gateway import RunningGateway, start_gateway
from tests.helpers.upstream import RecordingUpstream
from tests.keys.support import Resp, bearer, call, config_data, problem, validate

Start = Callable[..., Awaitable[RunningGateway]]

MAX_FAILURES = 3
COOLDOWN = 300
BAD_KEY = "sk_live_thisisnotakeythatexists0000000000"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def start(tmp_path: Path, up: RecordingUpstream, clock: FakeClock) -> AsyncIterator[Start]:
    running: list[RunningGateway] = []

    async def factory(*, trusted: bool = False, **auth: Any) -> RunningGateway:
        throttle = {"max_failures": MAX_FAILURES, "window": "60s", "cooldown": f"{COOLDOWN}s", **auth}
        routes = [{"name": "orders", "path": "/orders", "upstream": up.url}]
        data = config_data(f"sqlite:///{tmp_path / 'keys.db'}", up.url, routes, auth=throttle,
                           trusted_proxies=["127.0.0.1/32"] if trusted else [])
        gw = await start_gateway(validate(data), clock=clock)
        running.append(gw)
        return gw

    try:
        yield factory
    finally:
        for gw in running:
            await gw.close()


async def get(gw: RunningGateway, key: str | None, ip: str | None = None) -> Resp:
    headers = bearer(key) if key else []
    if ip is not None:
        headers.append(("X-Forwarded-For", ip))
    return await call(gw, "GET", "/orders/x", headers)


async def lock_out(gw: RunningGateway, ip: str | None = None) -> list[int]:
    """Fail until the throttle answers 429; return the statuses seen (asserting the cool-down starts in time)."""
    statuses = []
    for _ in range(MAX_FAILURES + 2):
        statuses.append((await get(gw, BAD_KEY, ip)).status)
    assert statuses[:MAX_FAILURES] == [401] * MAX_FAILURES, statuses
    assert statuses[-1] == 429, statuses
    return statuses


async def test_past_max_failures_the_ip_cools_down(start: Start, up: RecordingUpstream, clock: FakeClock) -> None:
    gw = await start()
    _, good = await gw.services.keys.create("alice")
    await lock_out(gw)
    r = await get(gw, BAD_KEY)
    problem(r, 429, "rate_limited")
    retry = int(r.header("Retry-After") or "0")
    assert COOLDOWN - 1 <= retry <= COOLDOWN
    # a valid key from the same address is refused too: otherwise guessing could go on between tries
    problem(await get(gw, good), 429, "rate_limited")
    assert not up.requests
    clock.advance(retry - 1)
    r = await get(gw, good)
    problem(r, 429, "rate_limited")
    assert r.header("Retry-After") == "1"
    clock.advance(1)
    assert (await get(gw, good)).status == 200
    assert len(up.requests) == 1


async def test_failures_spread_over_windows_do_not_add_up(start: Start, clock: FakeClock) -> None:
    gw = await start()
    for _ in range(5):
        for _ in range(MAX_FAILURES):
            problem(await get(gw, BAD_KEY), 401, "invalid_api_key")
        clock.advance(61)


async def test_other_ips_are_unaffected(start: Start, up: RecordingUpstream) -> None:
    gw = await start(trusted=True)
    _, good = await gw.services.keys.create("alice")
    await lock_out(gw, "203.0.113.7")
    problem(await get(gw, good, "203.0.113.7"), 429, "rate_limited")
    assert (await get(gw, good, "203.0.113.8")).status == 200
    problem(await get(gw, BAD_KEY, "203.0.113.8"), 401, "invalid_api_key")
    assert (await get(gw, good, "2001:db8::1")).status == 200
    # the proxy's own address is not the one cooling down either
    assert (await get(gw, good)).status == 200


async def test_rotating_spoofed_forwarded_for_does_not_evade_it(start: Start) -> None:
    gw = await start(trusted=False)
    _, good = await gw.services.keys.create("alice")
    statuses = [(await get(gw, BAD_KEY, f"198.51.100.{i}")).status for i in range(MAX_FAILURES + 5)]
    assert statuses[:MAX_FAILURES] == [401] * MAX_FAILURES
    assert statuses[-4:] == [429] * 4, statuses
    problem(await get(gw, good, "198.51.100.200"), 429, "rate_limited")


async def test_requests_without_a_key_do_not_count(start: Start) -> None:
    gw = await start()
    _, good = await gw.services.keys.create("alice")
    for _ in range(MAX_FAILURES * 10):
        problem(await get(gw, None), 401, "missing_api_key")
    assert (await get(gw, good)).status == 200


async def test_successes_do_not_count(start: Start) -> None:
    gw = await start()
    _, good = await gw.services.keys.create("alice")
    for _ in range(MAX_FAILURES * 10):
        assert (await get(gw, good)).status == 200


async def test_state_is_bounded(start: Start) -> None:
    gw = await start(trusted=True, max_tracked=100)
    throttle = gw.services.throttle
    for i in range(350):
        problem(await get(gw, BAD_KEY, f"10.0.{i // 256}.{i % 256}"), 401, "invalid_api_key")
        assert len(throttle.state) <= 100
    # the most recent addresses are still counted
    ip = "10.0.1.93"  # the last one above
    await get(gw, BAD_KEY, ip)
    await get(gw, BAD_KEY, ip)
    statuses = [(await get(gw, BAD_KEY, ip)).status for _ in range(2)]
    assert statuses[-1] == 429
