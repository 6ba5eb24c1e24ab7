"""The services the suite runs against answer: PostgreSQL, Redis and the httpbin upstream."""

from __future__ import annotations

import aiohttp
import asyncpg
import redis.asyncio as redis


async def test_postgres_answers(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url, timeout=10)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT current_database()") == "gateway_test"
    finally:
        await conn.close()


async def test_redis_answers(redis_url: str) -> None:
    client = redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_httpbin_echoes_request(httpbin_url: str) -> None:
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{httpbin_url}/get", params={"probe": "1"}, headers={"X-Probe": "yes"}) as resp,
    ):
        assert resp.status == 200
        body = await resp.json()
    assert body["args"] == {"probe": "1"}
    assert body["headers"]["X-Probe"] == "yes"
