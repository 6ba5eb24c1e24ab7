"""Fixtures for the rate-limit tests: both limiter backends on one fake time, a Redis that a test may
stop and start again, and a recording upstream.

The Redis limiter normally reads Redis `TIME`; here its `now_ms` is set from the same fake clock the
memory limiter reads before every call, so one test drives both backends through the same instants
without sleeping.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from gateway.clock import FakeClock
from gateway.config.schema import AuthThrottleConfig
from gateway.ratelimit.base import Counters, Limiter
from gateway.ratelimit.host import LimiterHost
from gateway.ratelimit.memory import MemoryLimiter
from gateway.ratelimit.policy import Decision, Limit
from gateway.ratelimit.redis import RedisLimiter
from gateway.ratelimit.shared import SharedLimiter
from gateway.stages.throttle import AuthThrottle


class MsClock(FakeClock):
    """A fake clock set in whole milliseconds, so `int(time() * 1000)` is exactly the instant set."""

    @property
    def ms(self) -> int:
        return round(self.t * 1000)

    def set_ms(self, ms: int) -> None:
        self.t = ms / 1000

    def advance_ms(self, ms: int) -> None:
        self.set_ms(self.ms + ms)


class Backend:
    """One limiter under test, driven by `clock`."""

    name = ""

    def __init__(self, clock: MsClock, limiter: Limiter) -> None:
        self.clock = clock
        self.limiter = limiter

    async def hit(self, counters: Counters, cost: int = 1) -> Decision:
        raise NotImplementedError

    async def close(self) -> None:
        await self.limiter.close()


class MemoryBackend(Backend):
    name = "memory"

    def __init__(self, clock: MsClock, max_counters: int = 1_000_000) -> None:
        super().__init__(clock, MemoryLimiter(clock, max_counters=max_counters))

    async def hit(self, counters: Counters, cost: int = 1) -> Decision:
        d = self.limiter.hit(counters, cost)
        assert isinstance(d, Decision), "the memory limiter decides synchronously"
        return d


class SharedBackend(Backend):
    """A worker's limiter under `--workers N` (memory://): a MemoryLimiter in a "limits process" at the
    other end of a real socket pair, here in the same event loop."""

    name = "shared"
    limiter: SharedLimiter

    def __init__(self, clock: MsClock, timeout: float = 5.0, max_counters: int = 1_000_000) -> None:
        host_end, worker_end = socket.socketpair()
        self.host_sock = host_end
        self.host = LimiterHost(
            MemoryLimiter(clock, max_counters=max_counters), AuthThrottle(AuthThrottleConfig(), clock)
        )
        super().__init__(clock, SharedLimiter(worker_end, timeout))

    async def start(self) -> SharedBackend:
        await self.host.serve(self.host_sock)
        return self

    async def hit(self, counters: Counters, cost: int = 1) -> Decision:
        d = await self.limiter.hit(counters, cost)
        assert isinstance(d, Decision)
        return d

    async def close(self) -> None:
        await self.limiter.close()
        self.host.close()


class RedisBackend(Backend):
    name = "redis"
    limiter: RedisLimiter

    def __init__(self, clock: MsClock, url: str) -> None:
        # A generous timeout: these tests are about decisions, not about a slow Redis.
        super().__init__(clock, RedisLimiter(url, timeout=5.0, now_ms=clock.ms))

    def submit(self, counters: Counters, cost: int = 1) -> object:
        """Queue a hit at the fake clock's instant (the script is told the time instead of reading TIME)."""
        self.limiter.now_ms = self.clock.ms
        return self.limiter.hit(counters, cost)

    async def hit(self, counters: Counters, cost: int = 1) -> Decision:
        d = await self.submit(counters, cost)  # type: ignore[misc]
        assert isinstance(d, Decision)
        return d


def unique_owner() -> str:
    return "o" + uuid.uuid4().hex[:12]


def counters(owner: str, *limits: Limit, key: str = "k1") -> Counters:
    """A key's counters as the stage names them: the owner as hash tag, one per limit."""
    return Counters.of((f"rl:{{{owner}}}:k:{key}:{limit.name}", limit) for limit in limits)


@pytest.fixture
def clock() -> MsClock:
    return MsClock()


async def make_backend(kind: str, clock: MsClock, request: pytest.FixtureRequest) -> Backend:
    if kind == "memory":
        return MemoryBackend(clock)
    if kind == "shared":
        return await SharedBackend(clock).start()
    url: str = request.getfixturevalue("redis_url")
    return RedisBackend(clock, url)


@pytest.fixture(params=["memory", "shared", "redis"])
async def backend(request: pytest.FixtureRequest, clock: MsClock) -> AsyncIterator[Backend]:
    """Each backend in turn (`shared`: memory:// as a worker of `--workers N` reaches it); every test
    uses counter keys under an owner of its own."""
    b = await make_backend(str(request.param), clock, request)
    try:
        yield b
    finally:
        await b.close()


# --- a Redis that tests may stop and start again ------------------------------------------------------


@dataclass
class RedisServer:
    """The throwaway Redis of `make test`: its port and the config file that starts it again."""

    url: str
    port: int
    conf: str

    def ping(self) -> bool:
        """One PING on a fresh socket (no client library retrying a refused connection for seconds)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                # a server that wants a password is up too
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def stop(self) -> None:
        subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), "shutdown", "nosave"],
                       capture_output=True, timeout=10, check=False)
        deadline = time.monotonic() + 10
        while self.ping():
            assert time.monotonic() < deadline, "Redis did not stop"
            time.sleep(0.02)

    def start(self) -> None:
        if self.ping():
            return
        subprocess.run(["redis-server", self.conf], capture_output=True, timeout=10, check=False)
        deadline = time.monotonic() + 10
        while not self.ping():
            assert time.monotonic() < deadline, "Redis did not start again"
            time.sleep(0.02)


@pytest.fixture
def redis_server(redis_url: str) -> Iterator[RedisServer]:
    """The suite's Redis, restarted at teardown whatever the test did to it."""
    port = os.environ.get("GATEWAY_TEST_REDIS_PORT", "").strip()
    conf = os.environ.get("GATEWAY_TEST_REDIS_CONF", "").strip()
    if not port or not conf:
        pytest.skip("GATEWAY_TEST_REDIS_PORT and GATEWAY_TEST_REDIS_CONF are needed to stop and restart Redis")
    server = RedisServer(redis_url, int(port), conf)
    assert server.ping(), "the test Redis does not answer"
    try:
        yield server
    finally:
        server.start()
