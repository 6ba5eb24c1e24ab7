"""`gateway run --workers 2` with the embedded memory:// limiter: a key's limits hold across workers.

Each worker used to count on its own, and the kernel spreads a client's connections over the workers,
so a key limited to 5 a minute got up to 10. The supervisor now holds the counters.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from tests.e2e.support import Launcher, children, listeners, socket_owners
from tests.e2e.test_lifecycle import gateway_cli

TIMEOUT = aiohttp.ClientTimeout(total=20)


async def test_a_key_limit_is_exact_across_workers(launch: Launcher) -> None:
    up = launch.server()
    gw = await asyncio.to_thread(
        launch.gateway,
        [
            {"name": "api", "path": "/api", "upstream": up.url, "auth": "required", "ratelimit": ["5/minute"]},
            {"name": "open", "path": "/open", "upstream": up.url, "auth": "none"},
        ],
        workers=2,
    )
    workers = listeners(children(gw.pid), gw.port)
    assert len(workers) == 2
    made = await asyncio.to_thread(gateway_cli, "keys", "create", "-c", str(gw.config_path), "--owner", "o", "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]

    async def one(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        # a connection of its own each time: the kernel spreads new connections over the workers
        conn = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=conn) as s, s.get(gw.url + path, headers=headers) as r:
            return r.status, dict(r.headers), await r.read()

    # Both workers take connections (their upstream connections show it)...
    opened = await asyncio.gather(*(one(f"/open/{i}", {}) for i in range(24)))
    ports = {json.loads(body)["peer_port"] for status, _, body in opened if status == 200}
    assert set(socket_owners(workers, ports).values()) == set(workers)
    # ...and the key's 24 requests over as many connections are admitted 5 times in all.
    results = await asyncio.gather(*(one(f"/api/{i}", {"X-API-Key": key}) for i in range(24)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 5 + [429] * 19, statuses
    for status, headers, body in results:
        assert headers["RateLimit-Policy"] == '"minute";q=5;w=60'
        if status == 429:
            assert json.loads(body)["code"] == "rate_limited"
            assert int(headers["Retry-After"]) >= 1
            assert headers["RateLimit"].startswith('"minute";r=0;')


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_failed_authentications_are_counted_across_workers(
    launch: Launcher, backend: str, request: pytest.FixtureRequest
) -> None:
    """Whatever holds the limits: the failed-auth count lives in the limits process."""
    up = launch.server()
    url = "memory://" if backend == "memory" else str(request.getfixturevalue("redis_url"))
    gw = await asyncio.to_thread(
        launch.gateway,
        [{"name": "api", "path": "/api", "upstream": up.url, "auth": "required"}],
        workers=2,
        auth={"max_failures": 3, "window": "60s", "cooldown": "300s"},
        ratelimit={"backend": url},
    )
    made = await asyncio.to_thread(gateway_cli, "keys", "create", "-c", str(gw.config_path), "--owner", "o", "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]
    bad = key[:-8] + ("A" if key[-8] != "A" else "B") + key[-7:]

    async def one(k: str) -> tuple[int, dict[str, str]]:
        conn = aiohttp.TCPConnector(force_close=True)  # a new connection, so either worker may take it
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=conn) as s, s.get(
            gw.url + "/api/x", headers={"X-API-Key": k}
        ) as r:
            return r.status, dict(r.headers)

    assert (await one(key))[0] == 200
    # four failures, spread over the workers by the kernel: past 3, counted together
    assert [(await one(bad))[0] for _ in range(4)] == [401] * 4
    blocked_at = time.monotonic()
    # The address now cools down on every worker, even with the right key, though each worker alone
    # saw at most 3 of the failures. The supervisor's notice takes well under a millisecond here; a
    # loaded machine gets 5 s.
    while True:
        after = await asyncio.gather(*(one(key) for _ in range(16)))
        if all(status == 429 for status, _ in after):
            break
        assert time.monotonic() - blocked_at < 5, [status for status, _ in after]
    waited = time.monotonic() - blocked_at
    assert all(300 - waited - 1 <= int(headers["Retry-After"]) <= 300 for _, headers in after)


async def test_anomalies_are_detected_over_all_workers(launch: Launcher) -> None:
    """Eight client addresses for one key, spread over two workers: past shared_key.max_addresses (6)
    together, though each worker alone saw fewer. One anomaly, recorded once."""
    up = launch.server()
    token = "admin-token-for-anomaly-tests-0123456789"
    gw = await asyncio.to_thread(
        launch.gateway,
        [{"name": "api", "path": "/api", "upstream": up.url, "auth": "required"}],
        workers=2,
        trusted_proxies=["127.0.0.1/32"],
        anomalies={"shared_key": {"max_addresses": 6}},
        admin={"token": token},
    )
    made = await asyncio.to_thread(gateway_cli, "keys", "create", "-c", str(gw.config_path), "--owner", "o", "--json")
    assert made.returncode == 0, made.stderr
    key, key_id = json.loads(made.stdout)["key"], json.loads(made.stdout)["id"]

    async def one(ip: str) -> int:
        conn = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=conn) as s, s.get(
            gw.url + "/api/x", headers={"X-API-Key": key, "X-Forwarded-For": ip}
        ) as r:
            return r.status

    assert [await one(f"198.51.100.{i}") for i in range(8)] == [200] * 8
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + 10
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        while True:
            async with s.get(gw.admin_url + "/admin/anomalies", headers=headers) as r:
                found = [a for a in (await r.json())["anomalies"] if a["change"]["kind"] == "shared_key"]
            if found or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # a second record would have come by now
        async with s.get(gw.admin_url + "/admin/anomalies", headers=headers) as r:
            found = [a for a in (await r.json())["anomalies"] if a["change"]["kind"] == "shared_key"]
    assert len(found) == 1, found
    assert found[0]["key_id"] == key_id and found[0]["change"]["addresses"] == 7
