"""The kill switch from outside: `gateway keys revoke` (or the admin API) returns, and from then on
every gateway process sharing the store refuses the key: both workers of one gateway and another
gateway beside it, though each had the key cached (keys.cache_ttl 30 s)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.e2e.support import GatewayProcess, Launcher
from tests.e2e.test_lifecycle import gateway_cli

TIMEOUT = aiohttp.ClientTimeout(total=20)
TOKEN = "admin-token-for-revocation-tests-0123456789"


async def statuses(gw: GatewayProcess, key: str, n: int = 16) -> list[int]:
    """n requests, each on a connection of its own: the kernel spreads them over the workers."""

    async def one() -> int:
        conn = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=conn) as s, s.get(
            gw.url + "/api/x", headers={"X-API-Key": key}
        ) as r:
            return r.status

    return list(await asyncio.gather(*(one() for _ in range(n))))


def create_key(gw: GatewayProcess) -> dict[str, Any]:
    made = gateway_cli("keys", "create", "-c", str(gw.config_path), "--owner", "o", "--json")
    assert made.returncode == 0, made.stderr
    doc: dict[str, Any] = json.loads(made.stdout)
    return doc


async def test_a_revoked_key_is_refused_everywhere_once_revoke_returns(launch: Launcher) -> None:
    up = launch.server()
    routes = [{"name": "api", "path": "/api", "upstream": up.url, "auth": "required"}]
    # The brute-force throttle would answer 429 to the many refused requests from this one address.
    top = {"admin": {"token": TOKEN}, "auth": {"max_failures": 1_000_000}}
    workers = await asyncio.to_thread(launch.gateway, routes, workers=2, **top)
    single = await asyncio.to_thread(launch.gateway, routes, **top)  # another replica, same store
    by_cli, by_admin = await asyncio.to_thread(create_key, workers), await asyncio.to_thread(create_key, workers)
    for key in (by_cli["key"], by_admin["key"]):
        for gw in (workers, single):
            assert await statuses(gw, key) == [200] * 16  # cached in every process now

    revoked = await asyncio.to_thread(
        gateway_cli, "keys", "revoke", by_cli["id"], "-c", str(single.config_path), "--reason", "leaked"
    )
    assert revoked.returncode == 0, revoked.stderr
    for gw in (workers, single):
        assert await statuses(gw, by_cli["key"]) == [401] * 16

    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.post(
        workers.admin_url + f"/admin/keys/{by_admin['id']}/revoke",
        headers={"Authorization": f"Bearer {TOKEN}"},
        json={"reason": "leaked"},
    ) as r:
        assert r.status == 200, await r.text()
    for gw in (workers, single):
        assert await statuses(gw, by_admin["key"]) == [401] * 16
