"""The rate-limit stage through the proxy (memory backend, fake clock): which limits apply to a key,
the IETF header fields on allowed and refused answers, the 429 problem, and the metric."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from gateway.clock import FakeClock
from gateway.keys.inputs import InvalidInput
from tests.helpers.gateway import RunningGateway, start_gateway
from tests.helpers.upstream import RecordingUpstream
from tests.keys.support import Resp, bearer, call, config_data, problem, validate

Start = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()  # starts on a minute boundary


@pytest.fixture
async def start(tmp_path: Path, up: RecordingUpstream, clock: FakeClock) -> AsyncIterator[Start]:
    """`await start(routes, **top)`: a gateway on a fresh SQLite store, the memory limiter and the fake clock."""
    running: list[RunningGateway] = []

    async def factory(routes: list[dict[str, Any]], **top: Any) -> RunningGateway:
        data = config_data(f"sqlite:///{tmp_path / 'keys.db'}", up.url, routes, **top)
        gw = await start_gateway(validate(data), clock=clock)
        running.append(gw)
        return gw

    try:
        yield factory
    finally:
        for gw in running:
            await gw.close()


def route(up: RecordingUpstream, name: str = "orders", path: str = "/orders", **kw: Any) -> dict[str, Any]:
    return {"name": name, "path": path, "upstream": up.url, **kw}


def parse_state(value: str) -> dict[str, tuple[int, int]]:
    """`"minute";r=2;t=60, "hour";r=9;t=3600` -> {name: (r, t)}."""
    out = {}
    for item in value.split(","):
        m = re.fullmatch(r'\s*"([^"]+)";r=(\d+);t=(\d+)\s*', item)
        assert m, value
        out[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return out


async def get(gw: RunningGateway, key: str, path: str = "/orders/x", headers: list[tuple[str, str]] | None = None
              ) -> Resp:
    return await call(gw, "GET", path, bearer(key) + (headers or []))


async def test_route_limit_admits_n_then_429_with_the_ietf_fields(
    start: Start, up: RecordingUpstream, clock: FakeClock
) -> None:
    gw = await start([route(up, ratelimit=["3/minute"])])
    _, key = await gw.services.keys.create("alice")
    answers = [await get(gw, key) for _ in range(5)]
    assert [r.status for r in answers] == [200, 200, 200, 429, 429]
    assert len(up.requests) == 3, "a refused request reached the upstream"
    for i, r in enumerate(answers):
        assert r.header("RateLimit-Policy") == '"minute";q=3;w=60', r.headers
        state = parse_state(r.header("RateLimit") or "")
        remaining, reset = state["minute"]
        assert remaining == max(0, 2 - i)
        assert 0 < reset <= 60 + 60 // 20
    refused = answers[3]
    doc = problem(refused, 429, "rate_limited")
    assert '"minute"' in doc["detail"] and "3" in doc["detail"], doc
    retry = int(refused.header("Retry-After") or "0")
    assert retry >= parse_state(refused.header("RateLimit") or "")["minute"][1] > 0
    assert answers[0].header("Retry-After") is None
    # Retry-After is honest: one second short of it, still refused; at it, served again
    clock.advance(retry - 1)
    problem(await get(gw, key), 429, "rate_limited")
    clock.advance(1)
    r = await get(gw, key)
    assert r.status == 200
    assert parse_state(r.header("RateLimit") or "")["minute"][0] == 2
    assert len(up.requests) == 4


async def test_several_windows_in_the_headers(start: Start, up: RecordingUpstream) -> None:
    gw = await start([route(up, ratelimit=["2/second", "100/hour"])])
    _, key = await gw.services.keys.create("alice")
    r = await get(gw, key)
    assert r.header("RateLimit-Policy") == '"second";q=2;w=1, "hour";q=100;w=3600'
    state = parse_state(r.header("RateLimit") or "")
    assert state["second"][0] == 1 and state["hour"][0] == 99
    await get(gw, key)
    r = await get(gw, key)
    doc = problem(r, 429, "rate_limited")
    assert '"second"' in doc["detail"] and '"hour"' not in doc["detail"]
    assert parse_state(r.header("RateLimit") or "")["hour"][0] == 98, "the refusal took from the hour"
    assert r.header("Retry-After") == "2"  # 1 s and one sub-window, rounded up: never early


async def test_a_keys_own_limits_override_the_routes(start: Start, up: RecordingUpstream) -> None:
    gw = await start([route(up, ratelimit=["3/minute"])])
    _, own = await gw.services.keys.create("alice", limits=["5/minute"])
    _, plain = await gw.services.keys.create("alice")
    statuses = [(await get(gw, own)).status for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    r = await get(gw, own)
    assert r.header("RateLimit-Policy") == '"minute";q=5;w=60'
    # the other key of the same owner has the route's limit, on a counter of its own
    assert [(await get(gw, plain)).status for _ in range(4)] == [200, 200, 200, 429]


async def test_a_keys_own_limits_apply_on_a_route_without_defaults(start: Start, up: RecordingUpstream) -> None:
    gw = await start([route(up)])
    _, key = await gw.services.keys.create("alice", limits=["2/hour"])
    assert [(await get(gw, key)).status for _ in range(3)] == [200, 200, 429]


async def test_two_own_limits_of_one_period_each_count_once(start: Start, up: RecordingUpstream) -> None:
    """The service refuses two limits of one period, but a record stored with them (written before that
    check, or straight into the store) must still bind with the tighter one, each request counting once
    (not once per limit on a shared counter)."""
    gw = await start([route(up)])
    with pytest.raises(InvalidInput):
        await gw.services.keys.create("alice", limits=["5/minute", "3/minute"])
    record, key = await gw.services.keys.create("alice", limits=["3/minute"])
    record.limits = ("5/minute", "3/minute")
    await gw.services.store.update_key(record, None)
    gw.services.cache.invalidate(record.id)
    answers = [await get(gw, key) for _ in range(4)]
    assert [r.status for r in answers] == [200, 200, 200, 429]
    policy = answers[0].header("RateLimit-Policy") or ""
    names = re.findall(r'"([^"]+)"', policy)
    assert len(names) == len(set(names)), policy


async def test_owner_limits_are_shared_by_the_owners_keys_only(start: Start, up: RecordingUpstream) -> None:
    gw = await start([route(up)], ratelimit={"owner_limits": ["4/minute"]})
    _, a1 = await gw.services.keys.create("alice")
    _, a2 = await gw.services.keys.create("alice")
    _, b1 = await gw.services.keys.create("bob")
    assert [(await get(gw, a1)).status for _ in range(3)] == [200, 200, 200]
    r = await get(gw, a2)
    assert r.status == 200
    assert r.header("RateLimit-Policy") == '"owner-minute";q=4;w=60'
    assert parse_state(r.header("RateLimit") or "")["owner-minute"][0] == 0
    doc = problem(await get(gw, a2), 429, "rate_limited")
    assert "owner-minute" in doc["detail"]
    problem(await get(gw, a1), 429, "rate_limited")
    assert [(await get(gw, b1)).status for _ in range(5)] == [200] * 4 + [429]


async def test_owner_and_key_limits_together(start: Start, up: RecordingUpstream) -> None:
    gw = await start([route(up, ratelimit=["2/minute"])], ratelimit={"owner_limits": ["3/minute"]})
    _, a1 = await gw.services.keys.create("alice")
    _, a2 = await gw.services.keys.create("alice")
    r = await get(gw, a1)
    assert r.header("RateLimit-Policy") == '"minute";q=2;w=60, "owner-minute";q=3;w=60'
    assert parse_state(r.header("RateLimit") or "") == {"minute": (1, 63), "owner-minute": (2, 63)}
    await get(gw, a1)
    problem(await get(gw, a1), 429, "rate_limited")  # its own route limit; the owner's keeps 1
    assert (await get(gw, a2)).status == 200
    doc = problem(await get(gw, a2), 429, "rate_limited")
    assert "owner-minute" in doc["detail"]
    assert len(up.requests) == 3


async def test_legacy_headers_behind_the_flag(start: Start, up: RecordingUpstream) -> None:
    gw = await start([route(up, ratelimit=["3/minute", "10/hour"])], ratelimit={"legacy_headers": True})
    _, key = await gw.services.keys.create("alice")
    r = await get(gw, key)
    assert r.header("X-RateLimit-Limit") == "3"
    assert r.header("X-RateLimit-Remaining") == "2"
    assert 0 < int(r.header("X-RateLimit-Reset") or "0") <= 63
    for _ in range(3):
        r = await get(gw, key)
    assert r.status == 429
    assert (r.header("X-RateLimit-Limit"), r.header("X-RateLimit-Remaining")) == ("3", "0")
    assert r.header("RateLimit-Policy") is not None


async def test_no_legacy_headers_by_default(start: Start, up: RecordingUpstream) -> None:
    gw = await start([route(up, ratelimit=["3/minute"])])
    _, key = await gw.services.keys.create("alice")
    r = await get(gw, key)
    assert r.header("RateLimit") is not None
    assert not [n for n, _ in r.headers if n.lower().startswith("x-ratelimit")]


async def test_refusals_are_counted_per_route(start: Start, up: RecordingUpstream) -> None:
    gw = await start([route(up, ratelimit=["1/minute"]), route(up, "reports", "/reports", ratelimit=["1/minute"])])
    _, key = await gw.services.keys.create("alice")
    for _ in range(4):
        await get(gw, key)
    await get(gw, key, "/reports/x")
    text = generate_latest(gw.services.metrics.registry).decode()
    assert 'gateway_ratelimited_total{route="orders"} 3.0' in text, text
    assert 'gateway_ratelimited_total{route="reports"} 0.0' in text
    await get(gw, key, "/reports/x")
    text = generate_latest(gw.services.metrics.registry).decode()
    assert 'gateway_ratelimited_total{route="reports"} 1.0' in text


async def test_no_limits_no_headers(start: Start, up: RecordingUpstream) -> None:
    gw = await start([route(up)])
    _, key = await gw.services.keys.create("alice")
    for _ in range(50):
        r = await get(gw, key)
        assert r.status == 200
        assert r.header("RateLimit") is None and r.header("RateLimit-Policy") is None


async def test_auth_failures_are_not_rate_limit_answers(start: Start, up: RecordingUpstream) -> None:
    """A missing or bad key is refused by authentication before any limit is looked at."""
    gw = await start([route(up, ratelimit=["1/minute"])])
    r = await call(gw, "GET", "/orders/x")
    problem(r, 401, "missing_api_key")
    assert r.header("RateLimit") is None
    r = await call(gw, "GET", "/orders/x", bearer("sk_live_notakey"))
    problem(r, 401, "invalid_api_key")
    assert r.header("RateLimit") is None


async def test_limits_are_per_route_for_route_defaults(start: Start, up: RecordingUpstream) -> None:
    gw = await start([route(up, ratelimit=["2/minute"]), route(up, "reports", "/reports", ratelimit=["2/minute"])])
    _, key = await gw.services.keys.create("alice")
    assert [(await get(gw, key)).status for _ in range(3)] == [200, 200, 429]
    assert [(await get(gw, key, "/reports/x")).status for _ in range(3)] == [200, 200, 429]
