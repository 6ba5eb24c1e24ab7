"""The shared store: PostgreSQL through an asyncpg connection pool.

open() creates the pool and applies pending migrations; several gateway processes may start at once,
so each migration runs in its own transaction under a transaction-level advisory lock. Timestamps are
timestamptz (microseconds, returned in UTC), list fields text[], audit changes jsonb.

Connection failures, timeouts and server shutdowns surface as StoreUnavailable, constraint
violations as ValueError (see postgres_pool). This module opens, migrates and closes the store; the key and audit methods are in postgres_keys,
the usage records, reports and rollups in postgres_usage.
"""

from __future__ import annotations

import asyncio

import asyncpg

from gateway.store.base import KeyStore, StoreUnavailable, UsageStore
from gateway.store.migrate import list_migrations
from gateway.store.postgres_keys import PostgresKeys
from gateway.store.postgres_pool import OPEN_ERRORS, UNAVAILABLE, describe, location
from gateway.store.postgres_usage import PostgresUsage

POOL_MIN = 1
POOL_MAX = 10
COMMAND_TIMEOUT = 5.0  # seconds for one statement
CONNECT_TIMEOUT = 5.0  # seconds to open one connection
CLOSE_TIMEOUT = 5.0  # seconds for a graceful pool close before connections are terminated
MIGRATION_TIMEOUT = 300.0  # seconds for one migration statement (or waiting for another process's)

# pg_advisory_xact_lock key serialising migrations across processes: the first 8 bytes of
# sha256("keygate schema migrations"), as a signed bigint.
MIGRATION_LOCK = -0x2A8E_0FC2_345B_2375

_MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations "
    "(name text NOT NULL PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
)


class PostgresStore(PostgresKeys, PostgresUsage, KeyStore, UsageStore):
    def __init__(
        self,
        url: str,
        *,
        min_size: int = POOL_MIN,
        max_size: int = POOL_MAX,
        command_timeout: float = COMMAND_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self._url = url
        self.where = location(url)
        self.min_size = min_size
        self.max_size = max_size
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self.migrations_applied: list[str] = []  # what the last open() applied
        self._pool: asyncpg.Pool | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(
                dsn=self._url,
                min_size=self.min_size,
                max_size=self.max_size,
                command_timeout=self.command_timeout,
                timeout=self.connect_timeout,
            )
        except OPEN_ERRORS as exc:
            raise StoreUnavailable(f"PostgreSQL at {self.where} unavailable: {describe(exc)}") from exc
        try:
            self.migrations_applied = await self.migrate()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT)
        except UNAVAILABLE:  # includes the close timeout
            pool.terminate()

    async def migrate(self) -> list[str]:
        applied: list[str] = []
        async with self._connection() as conn:
            for migration in list_migrations("postgres"):
                async with conn.transaction():
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK, timeout=MIGRATION_TIMEOUT
                    )
                    await conn.execute(_MIGRATIONS_TABLE)
                    done = await conn.fetchval(
                        "SELECT 1 FROM schema_migrations WHERE name = $1", migration.name
                    )
                    if done is None:
                        await conn.execute(migration.sql, timeout=MIGRATION_TIMEOUT)
                        await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", migration.name)
                        applied.append(migration.name)
        return applied

    async def ping(self) -> None:
        async with self._connection() as conn:
            await conn.fetchval("SELECT 1")
