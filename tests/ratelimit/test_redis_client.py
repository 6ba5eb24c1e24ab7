"""The Redis limiter's own connection (gateway/ratelimit/resp.py): what redis-py used to do for it.

URL options (database, password), commands reused from the per-plan cache, many batches in flight on
one connection, and a server that talks nonsense: always a decision or LimiterUnavailable, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.ratelimit.base import Counters, LimiterUnavailable
from gateway.ratelimit.policy import Decision, Limit
from gateway.ratelimit.redis import RedisLimiter
from tests.helpers.net import free_port, wait_listening
from tests.helpers.pki import Certs, make_certs

from .conftest import RedisServer, counters, unique_owner


async def decide(limiter: RedisLimiter, plan: Counters) -> Decision:
    d = await limiter.hit(plan)
    assert isinstance(d, Decision)
    return d


@contextlib.asynccontextmanager
async def fake_redis(
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], timeout: float
) -> AsyncIterator[RedisLimiter]:
    """A limiter talking to `serve` instead of Redis: for the misbehaviours a real server never shows."""
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    limiter = RedisLimiter(f"redis://127.0.0.1:{port}/0", timeout=timeout)
    try:
        yield limiter
    finally:
        await limiter.close()
        server.close()
        await server.wait_closed()


async def test_counters_go_to_the_database_named_in_the_url(redis_url: str) -> None:
    base = redis_url.rsplit("/", 1)[0]
    limiter = RedisLimiter(base + "/5", timeout=2.0)
    owner = unique_owner()
    db0, db5 = aioredis.Redis.from_url(base + "/0"), aioredis.Redis.from_url(base + "/5")
    try:
        assert (await decide(limiter, counters(owner, Limit("minute", 5, 60)))).allowed
        assert [k async for k in db5.scan_iter(match=f"*{{{owner}}}*")] != []
        assert [k async for k in db0.scan_iter(match=f"*{{{owner}}}*")] == []
    finally:
        for c in (db0, db5):
            await c.aclose()
        await limiter.close()


@pytest.fixture
async def password_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    port = free_port()
    conf = tmp_path / "redis.conf"
    conf.write_text(f"bind 127.0.0.1\nport {port}\nsave \"\"\nappendonly no\ndaemonize yes\n"
                    f"requirepass s3cret\ndir {tmp_path}\npidfile {tmp_path / 'redis.pid'}\n")
    server = RedisServer(f"redis://:s3cret@127.0.0.1:{port}/0", port, str(conf))
    try:
        server.start()
        yield server
    finally:
        subprocess.run(["redis-cli", "-p", str(port), "-a", "s3cret", "--no-auth-warning", "shutdown", "nosave"],
                       capture_output=True, timeout=10, check=False)


async def test_a_password_in_the_url_is_sent_and_a_wrong_one_is_a_failure(password_redis: RedisServer) -> None:
    good = RedisLimiter(password_redis.url, timeout=2.0)
    bad = RedisLimiter(password_redis.url.replace("s3cret", "wrong"), timeout=2.0)
    anonymous = RedisLimiter(f"redis://127.0.0.1:{password_redis.port}/0", timeout=2.0)
    plan = counters(unique_owner(), Limit("minute", 2, 60))
    try:
        assert [(await decide(good, plan)).allowed for _ in range(3)] == [True, True, False]
        for limiter in (bad, anonymous):
            with pytest.raises(LimiterUnavailable):
                await limiter.hit(plan)  # type: ignore[misc]
    finally:
        for limiter in (good, bad, anonymous):
            await limiter.close()


async def test_a_changed_plan_is_encoded_again(redis_url: str) -> None:
    """Commands are kept on the counters object: a key whose limits changed gets a new one, and the
    new limit decides, on Redis's own clock (the production path)."""
    limiter = RedisLimiter(redis_url, timeout=2.0)
    owner = unique_owner()
    old = counters(owner, Limit("minute", 3, 60))
    try:
        assert [(await decide(limiter, old)).outcomes[0].remaining for _ in range(2)] == [2, 1]
        kept = old.encoded
        assert kept is not None and (await decide(limiter, old)).outcomes[0].remaining == 0
        assert old.encoded is kept  # encoded once, then reused
        new = counters(owner, Limit("minute", 10, 60))  # same storage key, a higher limit
        d = await decide(limiter, new)
        assert d.allowed and d.outcomes[0].remaining == 6 and d.outcomes[0].limit.count == 10
        assert (await decide(limiter, old)).outcomes[0].remaining == 0
        assert new.encoded is not None and new.encoded != kept
    finally:
        await limiter.close()


async def test_many_batches_in_flight_are_answered_in_order(redis_url: str) -> None:
    limiter = RedisLimiter(redis_url, timeout=5.0)
    plan = counters(unique_owner(), Limit("hour", 1500, 3600))
    try:
        await decide(limiter, counters(unique_owner(), Limit("minute", 1, 60)))  # connected
        trips = limiter.round_trips
        futures = []
        for _ in range(40):  # 40 ticks of 50: 40 writes before the first reply is read
            futures += [limiter.hit(plan) for _ in range(50)]
            await asyncio.sleep(0)
        decisions = await asyncio.gather(*futures)  # type: ignore[call-overload]
        assert [d.allowed for d in decisions] == [True] * 1500 + [False] * 500
        assert [d.outcomes[0].remaining for d in decisions[:1500]] == list(range(1499, -1, -1))
        assert limiter.round_trips - trips == 40
    finally:
        await limiter.close()


async def test_a_server_that_talks_nonsense_is_a_failure_not_a_hang() -> None:
    async def nonsense(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"?this is not RESP\r\n")
        await writer.drain()
        await reader.read()  # keep the connection open: only the parser can tell
        writer.close()

    async with fake_redis(nonsense, timeout=5.0) as limiter:
        fut = limiter.hit(counters("o", Limit("minute", 5, 60)))
        with pytest.raises(LimiterUnavailable):
            await asyncio.wait_for(fut, 2.0)  # type: ignore[arg-type]


async def test_close_fails_what_is_queued(redis_url: str) -> None:
    limiter = RedisLimiter(redis_url, timeout=2.0)
    fut = limiter.hit(counters(unique_owner(), Limit("minute", 5, 60)))
    await limiter.close()
    with pytest.raises(LimiterUnavailable):
        await fut


async def test_a_batch_that_timed_out_is_not_sent_again() -> None:
    """A slow Redis may still run what it was sent: sending it again could count it twice."""
    received = bytearray()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.extend(data)
        writer.close()

    async with fake_redis(silent, timeout=0.05) as limiter:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(LimiterUnavailable, match="TimeoutError"):
            await limiter.hit(counters("o", Limit("minute", 5, 60)))  # type: ignore[misc]
        assert loop.time() - started < 0.5
        await asyncio.sleep(0.1)
        assert received.count(b"EVALSHA") == 1


def test_a_url_that_cannot_be_used_is_refused_at_load_without_quoting_it(tmp_path: Path) -> None:
    from gateway.config.loader import ConfigError, load_config

    for url in ("redis://:s3cr/et@127.0.0.1:6379/0", "redis://127.0.0.1:port/0"):
        path = tmp_path / "gateway.yaml"
        path.write_text(f'ratelimit:\n  backend: "{url}"\nroutes: []\n')
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert str(e.value) == (
            f"{path}:2: ratelimit.backend: not a usable Redis URL: check the port, and percent-encode the password"
        )
        with pytest.raises(ValueError) as v:
            RedisLimiter(url, timeout=1.0)
        assert str(v.value) == "not a usable Redis URL: check the port, and percent-encode the password"


async def test_a_hit_after_close_fails_at_once(redis_url: str) -> None:
    limiter = RedisLimiter(redis_url, timeout=2.0)
    await decide(limiter, counters(unique_owner(), Limit("minute", 5, 60)))
    await limiter.close()
    with pytest.raises(LimiterUnavailable, match="closed"):
        await asyncio.wait_for(limiter.hit(counters(unique_owner(), Limit("minute", 5, 60))), 1.0)  # type: ignore[arg-type]


async def test_a_reply_of_the_wrong_shape_is_a_failure_not_a_hang() -> None:
    """A server that answers every command, but not with what the script returns."""
    async def wrong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            for _ in range(data.count(b"\r\n*") + data.startswith(b"*")):
                writer.write(b"*1\r\n:1\r\n")
            await writer.drain()
        writer.close()

    async with fake_redis(wrong, timeout=2.0) as limiter:
        with pytest.raises(LimiterUnavailable, match="unexpected reply"):
            await asyncio.wait_for(limiter.hit(counters("o", Limit("minute", 5, 60))), 1.0)  # type: ignore[arg-type]


async def test_a_caller_that_went_away_does_not_disturb_the_rest_of_its_batch(redis_url: str) -> None:
    limiter = RedisLimiter(redis_url, timeout=2.0)
    owner = unique_owner()
    plan = counters(owner, Limit("minute", 10, 60))
    try:
        futures = [limiter.hit(plan) for _ in range(3)]
        futures[1].cancel()  # type: ignore[union-attr]  # a client that disconnected mid-request
        # Bounded: a reply handler that broke on the cancelled one would leave the others waiting forever.
        first, third = await asyncio.wait_for(asyncio.gather(futures[0], futures[2]), 5)  # type: ignore[arg-type]
        assert isinstance(first, Decision) and isinstance(third, Decision)
        # The cancelled call still ran in Redis (it was sent): it counts, as a request that reached us does.
        assert [first.outcomes[0].remaining, third.outcomes[0].remaining] == [9, 7]
        assert (await decide(limiter, plan)).outcomes[0].remaining == 6
    finally:
        await limiter.close()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Certs]]:
    """A Redis serving TLS only, with a certificate from a CA of its own (not the system's)."""
    certs = make_certs(tmp_path)
    port = free_port()
    subprocess.run(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certs.cert),
         "--tls-key-file", str(certs.key), "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no",
         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "yes",
         "--dir", str(tmp_path), "--pidfile", str(tmp_path / "redis.pid")],
        capture_output=True, timeout=10, check=True,
    )
    try:
        wait_listening(port, 10)  # the daemonized server may take a moment
        yield port, certs
    finally:
        pid = tmp_path / "redis.pid"
        if pid.exists():
            os.kill(int(pid.read_text()), signal.SIGTERM)


async def test_rediss_verifies_the_server_with_the_ca_the_url_names(tls_redis: tuple[int, Certs]) -> None:
    port, certs = tls_redis
    limiter = RedisLimiter(f"rediss://localhost:{port}/0?ssl_ca_certs={certs.ca}", timeout=2.0)
    untrusted = RedisLimiter(f"rediss://localhost:{port}/0", timeout=2.0)  # the system CAs only
    plan = counters(unique_owner(), Limit("minute", 2, 60))
    try:
        d = await decide(limiter, plan)
        assert d.allowed and d.outcomes[0].remaining == 1
        with pytest.raises(LimiterUnavailable):
            await untrusted.hit(plan)  # type: ignore[misc]
    finally:
        await limiter.close()
        await untrusted.close()


def test_url_options_that_would_be_ignored_are_refused_without_quoting_the_url(tmp_path: Path) -> None:
    for url, message in [
        ("redis://:s3cret@127.0.0.1:6379/0?socket_timeout=3", "socket_timeout not supported here"),
        ("redis://:s3cret@127.0.0.1:6379/0?ssl_ca_certs=/ca.pem", "ssl_ca_certs not supported here"),
        (f"rediss://:s3cret@127.0.0.1:6379/0?ssl_ca_certs={tmp_path}/none.pem", "ssl_ca_certs in the Redis URL"),
        ("rediss://:s3cret@127.0.0.1:6379/0?ssl_cert_reqs=maybe", "ssl_cert_reqs in the Redis URL must be"),
    ]:
        with pytest.raises(ValueError, match=message) as e:
            RedisLimiter(url, timeout=1.0)
        assert "s3cret" not in str(e.value) and "none.pem" not in str(e.value) and "maybe" not in str(e.value)


def test_the_password_is_kept_out_of_the_endpoint_repr() -> None:
    where = RedisLimiter("redis://user:s3cret@127.0.0.1:6379/2", timeout=1.0).endpoint
    assert where.first and b"s3cret" in where.first[0]  # sent to Redis, as AUTH
    assert "s3cret" not in repr(where) and "s3cret" not in str(where)
