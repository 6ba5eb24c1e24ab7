"""The shared store: PostgreSQL through an asyncpg connection pool.

open() creates the pool and applies pending migrations; several gateway processes may start at once,
so each migration runs in its own transaction under a transaction-level advisory lock. Timestamps are
timestamptz (microseconds, returned in UTC), list fields text[], audit changes jsonb.

Connection failures, timeouts and server shutdowns surface as StoreUnavailable; constraint
violations as ValueError, whose message never carries the stored values (PostgreSQL's DETAIL would
show the digest).

Usage batches are copied (COPY, binary) into a temporary staging table and inserted from there with
ON CONFLICT (request_id) DO NOTHING, in one transaction. Reports and rollups are computed in SQL,
latency percentiles with percentile_cont.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from gateway.keys.model import AuditEntry, KeyRecord
from gateway.store.base import KeyStore, StoreUnavailable, UsageStore
from gateway.store.migrate import (
    AUDIT_COLUMNS,
    KEY_COLUMNS,
    MUTABLE_KEY_COLUMNS,
    dump_json,
    list_migrations,
    require_aware,
)

POOL_MIN = 1
POOL_MAX = 10
COMMAND_TIMEOUT = 5.0  # seconds for one statement
CONNECT_TIMEOUT = 5.0  # seconds to open one connection
ACQUIRE_TIMEOUT = 5.0  # seconds to wait for a free pooled connection
CLOSE_TIMEOUT = 5.0  # seconds for a graceful pool close before connections are terminated
MIGRATION_TIMEOUT = 300.0  # seconds for one migration statement (or waiting for another process's)
ROLLUP_TIMEOUT = 300.0  # seconds for one rollup statement (or waiting for another process's rollup)
REPORT_TIMEOUT = 60.0  # seconds for a usage report

# pg_advisory_xact_lock key serialising migrations across processes: the first 8 bytes of
# sha256("keygate schema migrations"), as a signed bigint.
MIGRATION_LOCK = -0x2A8E_0FC2_345B_2375
# pg_advisory_xact_lock key serialising usage rollups across processes (an arbitrary constant).
ROLLUP_LOCK = 0x7573_6167_6572_6F6C

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.InterfaceError,  # connection closed, pool closing
    asyncpg.exceptions.OperatorInterventionError,  # class 57: shutdown, cannot connect now, cancelled
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: too many connections, disk full
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a standby after failover
)
# Refused, timed out, unknown database, authentication failed: not reachable for us.
_OPEN_ERRORS: tuple[type[BaseException], ...] = (*_UNAVAILABLE, asyncpg.PostgresError)

# Statements built from the fixed column lists in gateway.store.migrate; values are always parameters.
_KEY_LIST = ", ".join(KEY_COLUMNS)
_KEY_MARKS = ", ".join(f"${i}" for i in range(1, len(KEY_COLUMNS) + 1))
# $1 is the id, $2… the mutable columns, then last_used_at, which never moves back.
_KEY_SETS = ", ".join(f"{c} = ${i}" for i, c in enumerate(MUTABLE_KEY_COLUMNS, start=2))
_KEY_SETS += f", last_used_at = GREATEST(last_used_at, ${len(MUTABLE_KEY_COLUMNS) + 2}::timestamptz)"
_SELECT_KEY = f"SELECT {_KEY_LIST} FROM api_keys"  # noqa: S608
_INSERT_KEY = f"INSERT INTO api_keys ({_KEY_LIST}) VALUES ({_KEY_MARKS})"  # noqa: S608
_UPDATE_KEY = f"UPDATE api_keys SET {_KEY_SETS} WHERE id = $1 RETURNING id"  # noqa: S608
_SELECT_AUDIT = f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit_log"  # noqa: S608
_INSERT_AUDIT = (
    "INSERT INTO audit_log (at, action, actor, source_ip, key_id, change) "
    "VALUES ($1, $2, $3, $4, $5, $6::jsonb) RETURNING id"
)
_TOUCH = (
    "UPDATE api_keys AS k SET last_used_at = GREATEST(k.last_used_at, u.at) "
    "FROM unnest($1::text[], $2::timestamptz[]) AS u(id, at) "
    "WHERE k.id = u.id AND (k.last_used_at IS NULL OR k.last_used_at < u.at)"
)
_MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations "
    "(name text NOT NULL PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
)


def _describe(exc: BaseException) -> str:
    """The error's kind and first line, without PostgreSQL's DETAIL (which can quote row values)."""
    text = str(exc.args[0]) if exc.args else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _where(url: str) -> str:
    """host:port/database of a URL, for messages: never its user or password."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path or ''}"


class PostgresStore(KeyStore, UsageStore):
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
        self.where = _where(url)
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
        except _OPEN_ERRORS as exc:
            raise StoreUnavailable(f"PostgreSQL at {self.where} unavailable: {_describe(exc)}") from exc
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
        except _UNAVAILABLE:  # includes the close timeout
            pool.terminate()

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
            raise ValueError(f"the change violates a store constraint: {_describe(exc)}") from None
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL at {self.where} unavailable: {_describe(exc)}") from exc

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

    # --- keys ------------------------------------------------------------------------------------

    async def find_by_digests(self, digests: list[bytes]) -> KeyRecord | None:
        if not digests:
            return None
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"{_SELECT_KEY} WHERE digest = ANY($1::bytea[]) ORDER BY created_at, id LIMIT 1",
                [bytes(d) for d in digests],
            )
        return _key_from_row(row) if row is not None else None

    async def get_key(self, key_id: str) -> KeyRecord | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(f"{_SELECT_KEY} WHERE id = $1", key_id)
        return _key_from_row(row) if row is not None else None

    async def list_keys(self, owner: str | None = None) -> list[KeyRecord]:
        async with self._connection() as conn:
            if owner is None:
                rows = await conn.fetch(f"{_SELECT_KEY} ORDER BY created_at, id")
            else:
                rows = await conn.fetch(f"{_SELECT_KEY} WHERE owner = $1 ORDER BY created_at, id", owner)
        return [_key_from_row(r) for r in rows]

    async def insert_key(self, record: KeyRecord, audit: AuditEntry) -> None:
        key_params = _key_params(record)
        audit_params = _audit_params(audit)
        async with self._connection() as conn, conn.transaction():
            await _insert_key(conn, record, key_params)
            audit_id = await conn.fetchval(_INSERT_AUDIT, *audit_params)
        audit.id = int(audit_id)

    async def update_key(self, record: KeyRecord, audit: AuditEntry | None) -> None:
        update_params = _update_params(record)
        audit_params = _audit_params(audit) if audit is not None else None
        audit_id = None
        async with self._connection() as conn, conn.transaction():
            await _update_key(conn, record, update_params)
            if audit_params is not None:
                audit_id = await conn.fetchval(_INSERT_AUDIT, *audit_params)
        if audit is not None and audit_id is not None:
            audit.id = int(audit_id)

    async def rotate(self, old: KeyRecord, new: KeyRecord, audit: AuditEntry) -> None:
        new_params = _key_params(new)
        old_params = _update_params(old)
        audit_params = _audit_params(audit)
        async with self._connection() as conn, conn.transaction():
            await _insert_key(conn, new, new_params)
            await _update_key(conn, old, old_params)
            audit_id = await conn.fetchval(_INSERT_AUDIT, *audit_params)
        audit.id = int(audit_id)

    async def set_digest(self, key_id: str, digest: bytes, pepper_version: int) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE api_keys SET digest = $1, pepper_version = $2 WHERE id = $3", digest, pepper_version, key_id
            )

    async def touch(self, last_used: dict[str, datetime]) -> None:
        if not last_used:
            return
        ids = list(last_used)
        times = [require_aware(last_used[i], "last_used_at") for i in ids]
        async with self._connection() as conn:
            await conn.execute(_TOUCH, ids, times)

    # --- audit -----------------------------------------------------------------------------------

    async def add_audit(self, entry: AuditEntry) -> None:
        params = _audit_params(entry)
        async with self._connection() as conn:
            entry_id = await conn.fetchval(_INSERT_AUDIT, *params)
        entry.id = int(entry_id)

    async def list_audit(
        self, since: datetime | None = None, key_id: str | None = None, limit: int = 1000
    ) -> list[AuditEntry]:
        if limit <= 0:
            return []
        where: list[str] = []
        params: list[Any] = []
        if since is not None:
            params.append(require_aware(since, "since"))
            where.append(f"at >= ${len(params)}")
        if key_id is not None:
            params.append(key_id)
            where.append(f"key_id = ${len(params)}")
        sql = _SELECT_AUDIT
        if where:
            sql += " WHERE " + " AND ".join(where)
        params.append(limit)
        sql += f" ORDER BY at DESC, id DESC LIMIT ${len(params)}"
        async with self._connection() as conn:
            rows = await conn.fetch(sql, *params)
        return [_audit_from_row(r) for r in rows]


# --- helpers ---------------------------------------------------------------------------------------


def _conflict(exc: asyncpg.IntegrityConstraintViolationError, record: KeyRecord) -> ValueError:
    """A clear error for a key that clashes with a stored one; never shows the digest."""
    constraint = getattr(exc, "constraint_name", None) or ""
    if isinstance(exc, asyncpg.UniqueViolationError) and constraint == "api_keys_digest_key":
        return ValueError(f"cannot store key {record.id!r}: a key with the same digest already exists")
    if isinstance(exc, asyncpg.UniqueViolationError) and constraint == "api_keys_pkey":
        return ValueError(f"a key with id {record.id!r} already exists")
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return ValueError(f"key {record.id!r}: rotated_to/rotated_from name a key that does not exist")
    return ValueError(f"key {record.id!r} violates a store constraint: {_describe(exc)}")


async def _insert_key(conn: Any, record: KeyRecord, params: tuple[Any, ...]) -> None:
    try:
        await conn.execute(_INSERT_KEY, *params)
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise _conflict(exc, record) from None


async def _update_key(conn: Any, record: KeyRecord, params: tuple[Any, ...]) -> None:
    try:
        found = await conn.fetchval(_UPDATE_KEY, *params)
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise _conflict(exc, record) from None
    if found is None:
        raise KeyError(record.id)


def _opt(value: datetime | None, what: str) -> datetime | None:
    return None if value is None else require_aware(value, what)


def _key_params(r: KeyRecord) -> tuple[Any, ...]:
    return (
        r.id,
        r.owner,
        r.name,
        r.env,
        bytes(r.digest),
        r.pepper_version,
        r.hint,
        list(r.scopes),
        list(r.allow_ips),
        list(r.limits),
        r.status,
        require_aware(r.created_at, "created_at"),
        _opt(r.expires_at, "expires_at"),
        _opt(r.revoked_at, "revoked_at"),
        r.revoke_reason,
        r.rotated_to,
        r.rotated_from,
        _opt(r.grace_until, "grace_until"),
        _opt(r.last_used_at, "last_used_at"),
    )


def _update_params(r: KeyRecord) -> tuple[Any, ...]:
    values = dict(zip(KEY_COLUMNS, _key_params(r), strict=True))
    return (r.id, *(values[c] for c in MUTABLE_KEY_COLUMNS), values["last_used_at"])


def _key_from_row(row: Any) -> KeyRecord:
    return KeyRecord(
        id=row["id"],
        owner=row["owner"],
        name=row["name"],
        env=row["env"],
        digest=bytes(row["digest"]),
        pepper_version=int(row["pepper_version"]),
        hint=row["hint"],
        scopes=list(row["scopes"]),
        allow_ips=list(row["allow_ips"]),
        limits=list(row["limits"]),
        status=row["status"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        revoke_reason=row["revoke_reason"],
        rotated_to=row["rotated_to"],
        rotated_from=row["rotated_from"],
        grace_until=row["grace_until"],
        last_used_at=row["last_used_at"],
    )


def _audit_params(e: AuditEntry) -> tuple[Any, ...]:
    return (
        require_aware(e.at, "audit time"),
        e.action,
        e.actor,
        e.source_ip,
        e.key_id,
        dump_json(e.change),
    )


def _audit_from_row(row: Any) -> AuditEntry:
    return AuditEntry(
        id=int(row["id"]),
        at=row["at"],
        action=row["action"],
        actor=row["actor"],
        source_ip=row["source_ip"],
        key_id=row["key_id"],
        change=json.loads(row["change"]),
    )
