"""What every part of the PostgreSQL store runs on: an asyncpg connection pool, and how its errors surface.

Connection failures, timeouts and server shutdowns surface as StoreUnavailable; constraint
violations as ValueError, whose message never carries the stored values (PostgreSQL's DETAIL would
show the digest). PostgresStore creates and closes the pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from gateway.store.base import StoreUnavailable

ACQUIRE_TIMEOUT = 5.0  # seconds to wait for a free pooled connection

UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.InterfaceError,  # connection closed, pool closing
    asyncpg.exceptions.OperatorInterventionError,  # class 57: shutdown, cannot connect now, cancelled
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: too many connections, disk full
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a standby after failover
    asyncpg.exceptions.InternalClientError,  # a connection left mid-operation as the server went away
)
# Refused, timed out, unknown database, authentication failed: not reachable for us.
OPEN_ERRORS: tuple[type[BaseException], ...] = (*UNAVAILABLE, asyncpg.PostgresError)


def describe(exc: BaseException) -> str:
    """The error's kind and first line, without PostgreSQL's DETAIL (which can quote row values)."""
    text = str(exc.args[0]) if exc.args else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def location(url: str) -> str:
    """host:port/database of a URL, for messages: never its user or password."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path or ''}"


class PostgresPool:
    """The pool, shared by the key and usage parts of PostgresStore."""

    where: str  # location() of the URL, for messages
    _pool: asyncpg.Pool | None

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection; outage errors become StoreUnavailable, constraint errors ValueError."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailable("the PostgreSQL store is not open")
        try:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                yield conn
        except ValueError:
            raise  # ours, or a value asyncpg cannot encode (its DataError): not an outage
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise ValueError(f"the change violates a store constraint: {describe(exc)}") from None
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL at {self.where} unavailable: {describe(exc)}") from exc
