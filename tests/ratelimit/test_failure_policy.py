"""The Redis backend failing, through the whole gateway: `local`, `open` and `closed`, a Redis that
answers too slowly, one that refuses writes, and recovery once Redis is back."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.clock import Clock, FakeClock
from gateway.ratelimit.base import Counters
from gateway.ratelimit.failover import RETRY_AFTER_FAILURE, FailoverLimiter
from gateway.ratelimit.redis import RedisLimiter
from tests.helpers.gateway import RunningGateway, start_gateway
from tests.helpers.net import free_port
from tests.helpers.upstream import RecordingUpstream
from tests.keys.support import Resp, bearer, call, config_data, problem, validate

from .conftest import RedisServer

Start = Callable[..., Awaitable[RunningGateway]]
BAD_KEY = "sk_live_thisisnotakeythatexists0000000000"
BUDGET = 0.5  # seconds: far above a 50 ms limiter timeout, far below a client's patience


class Blackhole:
    """A "Redis" that accepts connections and reads requests but never answers."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0
        self.bytes = 0

    async def start(self) -> Blackhole:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while chunk := await reader.read(65536):
                self.bytes += len(chunk)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def start(tmp_path: Path, up: RecordingUpstream, clock: FakeClock) -> AsyncIterator[Start]:
    """`await start(backend, policy, ...)`: a gateway on the test's store (shared by all it starts)."""
    running: list[RunningGateway] = []
    fake = clock

    async def factory(backend: str, policy: str, replicas: int = 2, timeout: str = "50ms",
                      clock: Clock | None = None, **top: Any) -> RunningGateway:
        routes = [
            {"name": "orders", "path": "/orders", "upstream": up.url, "ratelimit": ["10/minute"]},
            {"name": "free", "path": "/free", "upstream": up.url},
        ]
        rl = {"backend": backend, "on_backend_error": policy, "replicas": replicas, "timeout": timeout}
        data = config_data(f"sqlite:///{tmp_path / 'keys.db'}", up.url, routes, ratelimit=rl, **top)
        gw = await start_gateway(validate(data), clock=clock or fake)
        running.append(gw)
        return gw

    try:
        yield factory
    finally:
        for gw in running:
            await gw.close()


@pytest.fixture
async def blackhole() -> AsyncIterator[Blackhole]:
    b = await Blackhole().start()
    try:
        yield b
    finally:
        await b.close()


def closed_port_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def degraded(gw: RunningGateway) -> float:
    return gw.services.metrics.registry.get_sample_value("gateway_ratelimit_degraded") or 0.0


def owner() -> str:
    return "o" + uuid.uuid4().hex[:12]  # Redis outlives a test: counters of a fresh owner


async def timed(gw: RunningGateway, path: str, key: str | None) -> tuple[Resp, float]:
    t = time.monotonic()
    r = await call(gw, "GET", path, bearer(key) if key else [])
    return r, time.monotonic() - t


async def authentication_still_works(gw: RunningGateway) -> None:
    """Whatever the limiter does: a bad or missing key is a 401, a key without limits is served."""
    problem(await call(gw, "GET", "/orders/x", bearer(BAD_KEY)), 401, "invalid_api_key")
    problem(await call(gw, "GET", "/orders/x"), 401, "missing_api_key")
    _, free = await gw.services.keys.create(owner())
    for _ in range(3):
        r, took = await timed(gw, "/free/x", free)
        assert r.status == 200 and took < BUDGET


async def test_local_enforces_this_replicas_share(start: Start, up: RecordingUpstream) -> None:
    gw = await start(closed_port_url(), "local", replicas=2)
    _, key = await gw.services.keys.create(owner())
    answers = [await timed(gw, "/orders/x", key) for _ in range(8)]
    assert [r.status for r, _ in answers] == [200] * 5 + [429] * 3, "10/minute over 2 replicas: 5 here"
    assert all(took < BUDGET for _, took in answers), [took for _, took in answers]
    assert answers[0][0].header("RateLimit-Policy") == '"minute";q=5;w=60'
    problem(answers[-1][0], 429, "rate_limited")
    assert degraded(gw) == 1
    assert len(up.requests) == 5
    await authentication_still_works(gw)


async def test_local_with_three_replicas_rounds_the_share_up(start: Start) -> None:
    gw = await start(closed_port_url(), "local", replicas=3)
    _, key = await gw.services.keys.create(owner())
    statuses = [(await call(gw, "GET", "/orders/x", bearer(key))).status for _ in range(6)]
    assert statuses == [200] * 4 + [429] * 2  # ceil(10 / 3)


async def test_open_admits_everything(start: Start, up: RecordingUpstream) -> None:
    gw = await start(closed_port_url(), "open")
    _, key = await gw.services.keys.create(owner())
    answers = [await timed(gw, "/orders/x", key) for _ in range(25)]
    assert all(r.status == 200 for r, _ in answers)
    assert all(took < BUDGET for _, took in answers)
    assert len(up.requests) == 25
    assert degraded(gw) == 1
    await authentication_still_works(gw)


async def test_closed_answers_503(start: Start, up: RecordingUpstream) -> None:
    gw = await start(closed_port_url(), "closed")
    _, key = await gw.services.keys.create(owner())
    for _ in range(5):
        r, took = await timed(gw, "/orders/x", key)
        problem(r, 503, "service_unavailable")
        assert took < BUDGET
    assert not up.requests
    assert degraded(gw) == 1
    await authentication_still_works(gw)


@pytest.mark.parametrize("policy", ["local", "open", "closed"])
async def test_a_redis_slower_than_the_timeout_is_a_failure(
    start: Start, blackhole: Blackhole, clock: FakeClock, policy: str
) -> None:
    gw = await start(f"redis://127.0.0.1:{blackhole.port}/0", policy, timeout="50ms")
    _, key = await gw.services.keys.create(owner())
    first, took = await timed(gw, "/orders/x", key)
    assert blackhole.bytes > 0, "the limiter never talked to the slow Redis"
    assert took < BUDGET, f"the first request waited {took:.3f}s on a Redis that never answers"
    assert degraded(gw) == 1
    expected = {"local": 200, "open": 200, "closed": 503}[policy]
    assert first.status == expected
    # within the second after a failure Redis is not asked again: no latency at all
    for _ in range(3):
        r, took = await timed(gw, "/orders/x", key)
        assert r.status in (expected, 429) and took < BUDGET
    # past it, Redis is tried again, times out again, and the answer still comes in time
    clock.advance(RETRY_AFTER_FAILURE + 0.01)
    r, took = await timed(gw, "/orders/x", key)
    assert r.status in (expected, 429) and took < BUDGET
    assert degraded(gw) == 1
    await authentication_still_works(gw)


async def test_a_redis_refusing_writes_is_a_failure(start: Start, redis_url: str) -> None:
    """`maxmemory` reached with noeviction: the script's writes fail; the policy applies, not a 500."""
    client = aioredis.Redis.from_url(redis_url)
    gw = await start(redis_url, "local", replicas=2)
    _, key = await gw.services.keys.create(owner())
    old = await client.config_get("maxmemory*")
    try:
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", "1")
        statuses = [(await call(gw, "GET", "/orders/x", bearer(key))).status for _ in range(7)]
    finally:
        await client.config_set("maxmemory", old["maxmemory"])
        await client.config_set("maxmemory-policy", old["maxmemory-policy"])
        await client.aclose()
    assert statuses == [200] * 5 + [429] * 2
    assert degraded(gw) == 1


async def test_recovery_when_redis_comes_back(
    start: Start, redis_server: RedisServer, clock: FakeClock, up: RecordingUpstream
) -> None:
    gw = await start(redis_server.url, "local", replicas=2, timeout="200ms")
    limiter = gw.services.limiter
    assert isinstance(limiter, FailoverLimiter) and isinstance(limiter.primary, RedisLimiter)
    rec, key = await gw.services.keys.create(owner())

    def remaining(r: Resp) -> int:
        return int((r.header("RateLimit") or "").split(";r=")[1].split(";")[0])

    # Redis up: the shared counter (10/minute) decides
    for expected in (9, 8, 7):
        r = await call(gw, "GET", "/orders/x", bearer(key))
        assert r.status == 200 and remaining(r) == expected
    assert degraded(gw) == 0

    redis_server.stop()
    try:
        r = await call(gw, "GET", "/orders/x", bearer(key))
        assert r.status == 200 and remaining(r) == 4, "this replica's share, 5, counted from scratch"
        assert degraded(gw) == 1
        # still down after the retry interval: tried again, still the local share
        clock.advance(RETRY_AFTER_FAILURE + 0.01)
        r = await call(gw, "GET", "/orders/x", bearer(key))
        assert r.status == 200 and remaining(r) == 3
        assert degraded(gw) == 1
    finally:
        redis_server.start()

    # Back: within the retry interval the local share still applies...
    r = await call(gw, "GET", "/orders/x", bearer(key))
    assert remaining(r) == 2 and degraded(gw) == 1
    # ...and once it has passed, decisions come from Redis again (restarted empty: `save ""`)
    clock.advance(RETRY_AFTER_FAILURE + 0.01)
    trips = limiter.primary.round_trips
    r = await call(gw, "GET", "/orders/x", bearer(key))
    assert r.status == 200 and remaining(r) == 9, r.headers
    assert r.header("RateLimit-Policy") == '"minute";q=10;w=60'
    assert degraded(gw) == 0
    assert limiter.primary.round_trips > trips
    statuses = [(await call(gw, "GET", "/orders/x", bearer(key))).status for _ in range(11)]
    assert statuses == [200] * 9 + [429] * 2
    assert len(up.requests) == 3 + 2 + 1 + 1 + 9
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        [counter] = [k async for k in client.scan_iter(match=f"*{{{rec.owner}}}*")]
        fields = await client.hgetall(counter)
        assert sum(int(v) for f, v in fields.items() if int(f) >= 0) == 10  # the sub-windows
        assert int(fields[b"-1"]) == 10  # and their total
    finally:
        await client.aclose()


async def test_recovery_when_redis_starts_late(start: Start, clock: FakeClock, tmp_path: Path) -> None:
    """A Redis that was never there, started on the configured port after the gateway: picked up."""
    port = free_port()
    gw = await start(f"redis://127.0.0.1:{port}/0", "closed", timeout="200ms")
    _, key = await gw.services.keys.create(owner())
    problem(await call(gw, "GET", "/orders/x", bearer(key)), 503, "service_unavailable")
    assert degraded(gw) == 1
    subprocess.run(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                    "--daemonize", "yes", "--dir", str(tmp_path), "--pidfile", str(tmp_path / "late.pid")],
                   check=True, capture_output=True, timeout=10)
    server = RedisServer(f"redis://127.0.0.1:{port}/0", port, "")
    try:
        deadline = time.monotonic() + 10
        while not server.ping():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        problem(await call(gw, "GET", "/orders/x", bearer(key)), 503, "service_unavailable")  # within 1 s
        clock.advance(RETRY_AFTER_FAILURE + 0.01)
        r = await call(gw, "GET", "/orders/x", bearer(key))
        assert r.status == 200 and '"minute";r=9;' in (r.header("RateLimit") or ""), r.headers
        assert degraded(gw) == 0
    finally:
        server.stop()


async def test_the_first_calls_after_a_quiet_restart_do_not_fail(redis_server: RedisServer) -> None:
    """Redis restarted between two bursts, with no call in between: every pooled connection is dead.
    The next burst still gets its decisions from Redis, not a failure (a second of local limits)."""
    from gateway.ratelimit.base import LimiterUnavailable
    from gateway.ratelimit.policy import Limit

    limiter = RedisLimiter(redis_server.url, timeout=0.5)
    counters = Counters.of([(f"rl:{{{owner()}}}:k:x:minute", Limit("minute", 1000, 60))])

    async def burst() -> list[object]:
        futures = []
        for _ in range(6):  # several ticks: several pipelines in flight, several pooled connections
            futures += [limiter.hit(counters) for _ in range(5)]
            await asyncio.sleep(0)
        return list(await asyncio.gather(*futures, return_exceptions=True))  # type: ignore[call-overload]

    try:
        assert not [r for r in await burst() if isinstance(r, Exception)]
        redis_server.stop()
        redis_server.start()
        results = await burst()
        assert not [r for r in results if isinstance(r, LimiterUnavailable)], results
        # all 30 counted once each, on the fresh server (restarted empty)
        assert sorted(r.outcomes[0].remaining for r in results) == list(range(970, 1000))  # type: ignore[attr-defined]
    finally:
        await limiter.close()


async def test_a_reply_that_came_while_the_loop_was_busy_is_not_a_timeout(redis_url: str) -> None:
    """The timeout is for a slow Redis, not for a gateway whose loop was busy when the reply came."""
    from gateway.ratelimit.policy import Decision, Limit

    limiter = RedisLimiter(redis_url, timeout=0.05)
    counters = Counters.of([(f"rl:{{{owner()}}}:k:x:minute", Limit("minute", 10, 60))])
    try:
        await limiter.hit(counters)  # type: ignore[misc]  # connected, script loaded
        pending = limiter.hit(counters)
        for _ in range(10):  # the pipeline goes out...
            await asyncio.sleep(0)
        time.sleep(0.2)  # ...and the loop is stuck elsewhere while Redis answers
        d = await pending  # type: ignore[misc]
        assert isinstance(d, Decision) and d.allowed and d.outcomes[0].remaining == 8
    finally:
        await limiter.close()


async def test_replica_clocks_do_not_matter(start: Start, redis_url: str, up: RecordingUpstream) -> None:
    """Two replicas whose clocks disagree by more than a year share one window: the time is Redis's."""
    skewed = await start(redis_url, "closed")  # a fake clock, in 2027
    real = await start(redis_url, "closed", clock=Clock())
    _, key = await skewed.services.keys.create(owner())
    statuses = []
    for i in range(14):
        gw = (skewed, real)[i % 2]
        statuses.append((await call(gw, "GET", "/orders/x", bearer(key))).status)
    assert statuses == [200] * 10 + [429] * 4
    assert len(up.requests) == 10


async def test_a_route_may_choose_its_own_failure_policy(
    tmp_path: Path, up: RecordingUpstream, clock: FakeClock
) -> None:
    routes = [
        {"name": "orders", "path": "/orders", "upstream": up.url, "ratelimit": ["10/minute"]},
        {"name": "pay", "path": "/pay", "upstream": up.url, "ratelimit": ["10/minute"],
         "ratelimit_on_backend_error": "closed"},
        {"name": "feed", "path": "/feed", "upstream": up.url, "ratelimit": ["10/minute"],
         "ratelimit_on_backend_error": "open"},
    ]
    rl = {"backend": closed_port_url(), "on_backend_error": "local", "replicas": 2, "timeout": "50ms"}
    data = config_data(f"sqlite:///{tmp_path / 'keys.db'}", up.url, routes, ratelimit=rl)
    gw = await start_gateway(validate(data), clock=clock)
    try:
        _, key = await gw.services.keys.create(owner())
        pay = [(await call(gw, "GET", "/pay/x", bearer(key))) for _ in range(3)]
        for r in pay:
            problem(r, 503, "service_unavailable")
        assert [(await call(gw, "GET", "/feed/x", bearer(key))).status for _ in range(12)] == [200] * 12
        orders = [(await call(gw, "GET", "/orders/x", bearer(key))).status for _ in range(7)]
        assert orders == [200] * 5 + [429] * 2  # the global policy: this replica's share, 10 / 2
        assert degraded(gw) == 1
        assert not any(r.target.startswith(b"/pay") for r in up.requests)
    finally:
        await gw.close()
