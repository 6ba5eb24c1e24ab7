"""The accuracy test, on real processes: two gateways sharing one Redis and one key store, 200
concurrent clients on one key limited to N per minute.

1. Redis up: exactly N admitted, every other request refused (no overshoot, no false refusal).
2. Redis stopped while traffic flows (`on_backend_error: local`, 2 replicas, 50 ms timeout):
   answers keep coming quickly, no 5xx, and each gateway enforces its share, N / 2.
3. Redis started again: after the retry interval the limits are shared again, exactly N.

A minute cannot be faked across processes, so each phase uses a key of its own instead of waiting
for the window to pass.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gateway.config.schema import GatewayConfig
from gateway.services import Services
from tests.e2e.support import GatewayProcess, Server

from .conftest import RedisServer

N = 100
CLIENTS = 200
ATTEMPTS = 3  # fresh keys for an exact burst (see exactly_n)
PEPPER = "pepper-for-the-accuracy-test-0123456789"


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path)
    try:
        yield srv
    finally:
        srv.stop()


async def create_keys(store: str, owner: str, limits: dict[str, str]) -> dict[str, str]:
    """Keys written to the shared store before the gateways start: name -> raw key."""
    config = GatewayConfig.model_validate({"store": store, "keys": {"pepper": PEPPER}})
    services = await Services.open(config)
    try:
        return {name: (await services.keys.create(owner, name=name, limits=[rate]))[1]
                for name, rate in limits.items()}
    finally:
        await services.close()


@dataclass
class Answer:
    gateway: int  # index of the gateway that answered
    status: int
    seconds: float
    quota: int  # q of RateLimit-Policy: N when Redis decided, N / 2 when this replica's share did


async def burst(urls: list[str], key: str, n: int) -> list[Answer]:
    """n concurrent requests spread over the gateways.

    Every connection is open before the first request is written, so the requests arrive together
    and the gateways spend the burst deciding, not accepting connections.
    """
    ports = [int(u.rsplit(":", 1)[1]) for u in urls]
    conns = await asyncio.gather(*[asyncio.open_connection("127.0.0.1", ports[i % len(ports)]) for i in range(n)])
    request = (f"GET /api/burst HTTP/1.1\r\nHost: gateway.test\r\nAuthorization: Bearer {key}\r\n"
               "Connection: close\r\n\r\n").encode()

    async def one(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Answer:
        t = time.monotonic()
        writer.write(request)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
            await asyncio.wait_for(reader.read(), 20)
        finally:
            writer.close()
        seconds = time.monotonic() - t
        m = re.search(rb'(?im)^RateLimit-Policy: "minute";q=(\d+);w=60\r$', head)
        assert m, head
        return Answer(i % len(ports), int(head.split(b" ", 2)[1]), seconds, int(m.group(1)))

    return list(await asyncio.gather(*[one(i, r, w) for i, (r, w) in enumerate(conns)]))


async def steady(session: aiohttp.ClientSession, urls: list[str], key: str, stop: asyncio.Event,
                 out: list[tuple[int, float]], workers: int = 8) -> None:
    """Requests back to back from a few clients until `stop`: (status, seconds) each."""

    async def worker(w: int) -> None:
        i = 0
        while not stop.is_set():
            t = time.monotonic()
            url = f"{urls[(w + i) % len(urls)]}/api/steady"
            async with session.get(url, headers={"Authorization": f"Bearer {key}"}) as r:
                await r.read()
                out.append((r.status, time.monotonic() - t))
            i += 1

    await asyncio.gather(*[worker(w) for w in range(workers)])


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, math.ceil(len(ordered) * 0.99) - 1)]


async def get_ok(session: aiohttp.ClientSession, url: str, key: str) -> None:
    async with session.get(f"{url}/api/warm", headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200, await r.text()


async def degraded(session: aiohttp.ClientSession, admin_url: str) -> float:
    async with session.get(f"{admin_url}/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith("gateway_ratelimit_degraded "):
            return float(line.split()[1])
    raise AssertionError("no gateway_ratelimit_degraded in /metrics")


async def back_on_redis(session: aiohttp.ClientSession, gateways: list[GatewayProcess], key: str) -> None:
    """Wait out the retry interval after a failure until every gateway decides on Redis again."""
    deadline = time.monotonic() + 10
    while True:
        await asyncio.sleep(1.1)  # past failover.RETRY_AFTER_FAILURE: the next call goes to Redis
        for g in gateways:
            await get_ok(session, g.url, key)
        if all([await degraded(session, g.admin_url) == 0 for g in gateways]):
            return
        assert time.monotonic() < deadline, "the gateways did not go back to Redis"


async def exactly_n(session: aiohttp.ClientSession, gateways: list[GatewayProcess], keys: list[str],
                    steady_key: str) -> None:
    """200 concurrent requests on a fresh key limited to N: exactly N admitted, the rest refused.

    Exactness is promised while Redis answers within `ratelimit.timeout`. On a machine busy enough
    for one call to overrun the 50 ms, that replica applies its local share for a moment (visible
    in the answers' RateLimit-Policy, q=N/2): then the failure policy's bound is checked instead
    and the burst is repeated on the next fresh key. At least one burst must be decided by Redis
    alone, and that one must be exact.
    """
    urls = [g.url for g in gateways]
    for key in keys:
        answers = await burst(urls, key, CLIENTS)
        assert not [a for a in answers if a.status not in (200, 429)], Counter(a.status for a in answers)
        if all(a.quota == N for a in answers):
            statuses = Counter(a.status for a in answers)
            assert statuses == {200: N, 429: CLIENTS - N}, statuses
            for g in gateways:
                assert await degraded(session, g.admin_url) == 0
            return
        assert {a.quota for a in answers} <= {N, N // 2}
        assert sum(a.status == 200 for a in answers if a.quota == N) <= N, "Redis admitted more than N"
        for gw in range(len(gateways)):
            assert sum(a.status == 200 for a in answers if a.quota == N // 2 and a.gateway == gw) <= N // 2
        await back_on_redis(session, gateways, steady_key)
    pytest.fail(f"in each of {len(keys)} bursts a Redis call overran the 50 ms timeout: the machine is too busy")


async def test_two_gateways_one_redis_exact_then_degraded_then_exact_again(
    tmp_path: Path, redis_server: RedisServer, upstream: Server
) -> None:
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    owner = "acc" + uuid.uuid4().hex[:10]
    limits = {"outage": f"{N}/minute", "steady": "1000000/minute"}
    limits |= {f"exact{i}": f"{N}/minute" for i in range(ATTEMPTS)}
    limits |= {f"resumed{i}": f"{N}/minute" for i in range(ATTEMPTS)}
    keys = await create_keys(store, owner, limits)
    common = {
        "store": store,
        "keys": {"pepper": PEPPER},
        "ratelimit": {"backend": redis_server.url, "on_backend_error": "local", "replicas": 2, "timeout": "50ms"},
        "auth": {"max_failures": 1_000_000},
    }
    routes = [{"name": "api", "path": "/api", "upstream": upstream.url}]
    gateways = [GatewayProcess(tmp_path, routes, wait=False, **common) for _ in range(2)]
    try:
        for g in gateways:
            g.wait_ready()
        urls = [g.url for g in gateways]
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=20)) as session:
            for url in urls:  # each gateway connected to Redis, with the script loaded
                await get_ok(session, url, keys["steady"])

            # -- 1. Redis up: exactly N of 200, whichever gateway each request went through ------------
            await exactly_n(session, gateways, [keys[f"exact{i}"] for i in range(ATTEMPTS)], keys["steady"])

            # -- 2. Redis stopped under load: quick answers, no 5xx, each gateway its share -------------
            stop = asyncio.Event()
            steady_results: list[tuple[int, float]] = []
            load = asyncio.ensure_future(steady(session, urls, keys["steady"], stop, steady_results))
            try:
                await asyncio.sleep(0.3)
                before_stop = len(steady_results)
                await asyncio.to_thread(redis_server.stop)
                await asyncio.sleep(1.5)  # past one retry interval: Redis is tried again, and fails again
                outage = await burst(urls, keys["outage"], CLIENTS)
                await asyncio.sleep(0.3)
            finally:
                stop.set()
                await load
            during = steady_results[before_stop:]
            assert len(during) > 50, "too little traffic during the outage to judge it"
            assert all(s == 200 for s, _ in steady_results), Counter(s for s, _ in steady_results)
            assert p99([t for _, t in during]) < 1.0, sorted(t for _, t in during)[-5:]
            assert not [a for a in outage if a.status >= 500], Counter(a.status for a in outage)
            assert p99([a.seconds for a in outage]) < 1.0
            assert {a.quota for a in outage} == {N // 2}, "decided by this replica's share, and saying so"
            for gw in (0, 1):
                mine = Counter(a.status for a in outage if a.gateway == gw)
                assert mine == {200: N // 2, 429: CLIENTS // 2 - N // 2}, (gw, mine)
            for g in gateways:
                assert await degraded(session, g.admin_url) == 1

            # -- 3. Redis back: after the retry interval, shared and exact again ------------------------
            await asyncio.to_thread(redis_server.start)
            await back_on_redis(session, gateways, keys["steady"])
            await exactly_n(session, gateways, [keys[f"resumed{i}"] for i in range(ATTEMPTS)], keys["steady"])
    finally:
        for g in gateways:
            g.stop()
    for g in gateways:
        assert "Traceback" not in g.log(), g.log()[-3000:]
