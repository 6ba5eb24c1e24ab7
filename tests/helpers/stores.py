"""A private PostgreSQL schema per test, so tests sharing the throwaway database never see each other."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg


def with_search_path(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}search_path={schema}"


@asynccontextmanager
async def private_pg_schema(pg_url: str) -> AsyncIterator[str]:
    """Yield a store URL whose tables live in a new schema, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex}"
    conn = await asyncpg.connect(pg_url, timeout=10)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()
    try:
        yield with_search_path(pg_url, schema)
    finally:
        conn = await asyncpg.connect(pg_url, timeout=30)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
