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
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from gateway.keys.model import AuditEntry, KeyRecord
from gateway.store.base import KeyStore, StaleKey, StoreUnavailable, UsageReport, UsageStore
from gateway.store.migrate import (
    AUDIT_COLUMNS,
    KEY_COLUMNS,
    MUTABLE_KEY_COLUMNS,
    dump_json,
    list_migrations,
    require_aware,
)
from gateway.usage.record import FIELDS, UsageRecord

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

# --- usage statements ------------------------------------------------------------------------------
# Batches are copied into a temporary staging table of the connection, dropped at commit; `at` stays
# epoch seconds there and becomes timestamptz in the INSERT … SELECT, so the event loop only encodes
# the records.
_STAGING_TYPES = {
    "request_id": "text",
    "at": "double precision",
    "key_id": "text",
    "owner": "text",
    "env": "text",
    "route": "text",
    "method": "text",
    "status": "integer",
    "upstream_status": "integer",
    "latency_ms": "double precision",
    "upstream_ms": "double precision",
    "bytes_in": "bigint",
    "bytes_out": "bigint",
    "client_ip": "text",
    "error_code": "text",
}
assert tuple(_STAGING_TYPES) == FIELDS, "the staging table must follow the UsageRecord fields"
_STAGE_USAGE = (
    "CREATE TEMP TABLE usage_staging ("
    + ", ".join(f"{name} {kind}" for name, kind in _STAGING_TYPES.items())
    + ") ON COMMIT DROP"
)
# The new rows, then the hours and days they fall in marked for the next rollup. The marks are
# locked in a fixed order (ON CONFLICT DO UPDATE locks an existing mark even when WHERE false skips
# the update) until commit, so a concurrent rollup that takes a mark waits for this batch and sees
# its rows; a mark taken by a rollup before is inserted again once that rollup commits.
_INSERT_USAGE = (
    f"WITH added AS (INSERT INTO usage_records ({', '.join(FIELDS)}) "  # noqa: S608
    f"SELECT {', '.join('to_timestamp(at)' if f == 'at' else f for f in FIELDS)} FROM usage_staging "
    "ON CONFLICT (request_id) DO NOTHING RETURNING at) "
    "INSERT INTO usage_rollup_pending (grain, bucket) "
    "SELECT DISTINCT g.grain, date_trunc(g.grain, a.at, 'UTC') FROM added AS a "
    "CROSS JOIN (VALUES ('day'), ('hour')) AS g (grain) ORDER BY 1, 2 "
    "ON CONFLICT (grain, bucket) DO UPDATE SET grain = EXCLUDED.grain WHERE false"
)
# The marks of the hours and days a rollup folds, taken (locked in the writers' order, then deleted).
_TAKE_PENDING = (
    "DELETE FROM usage_rollup_pending WHERE (grain, bucket) IN (SELECT grain, bucket FROM usage_rollup_pending "
    "WHERE (grain = 'hour' AND bucket < $1) OR (grain = 'day' AND bucket < $2) ORDER BY grain, bucket FOR UPDATE) "
    "RETURNING grain, bucket"
)
_ROLLUP_KEYS = "bucket, key_id, owner, route"
_ROLLUP_COLUMNS = f"{_ROLLUP_KEYS}, requests, errors, bytes_in, bytes_out, p50_ms, p95_ms, p99_ms"
_PERCENTILES = ("p50_ms", "p95_ms", "p99_ms")


def _stats(source: str, keys: str) -> str:
    """Requests, 5xx errors, bytes and latency percentiles (percentile_cont: linear interpolation
    between the two closest ranks) of the rows of `source`, one row per group of `keys`."""
    return (
        f"SELECT {keys}, requests, errors, bytes_in, bytes_out, pct[1] AS p50_ms, pct[2] AS p95_ms, "  # noqa: S608
        f"pct[3] AS p99_ms FROM (SELECT {keys}, count(*) AS requests, "
        "count(*) FILTER (WHERE status >= 500) AS errors, sum(bytes_in) AS bytes_in, sum(bytes_out) AS bytes_out, "
        "percentile_cont(ARRAY[0.5, 0.95, 0.99]::float8[]) WITHIN GROUP (ORDER BY latency_ms) AS pct "
        f"FROM {source} GROUP BY {keys}) AS stats"
    )


def _combined(column: str, weight: str = "requests") -> str:
    """A percentile over several pieces (rollup buckets, raw rows): exact when there is one piece,
    otherwise approximated by the request-weighted mean of the pieces' percentiles."""
    return (
        f"CASE WHEN count(*) = 1 THEN max({column}) "
        f"ELSE sum({column} * {weight}::float8) / sum({weight}::float8) END"
    )


def _rollup_statements(table: str, step: str) -> tuple[str, ...]:
    """Replace the rows of usage_hourly or usage_daily for the buckets $1 with ones from raw rows."""
    source = (
        "(SELECT b.bucket, coalesce(r.key_id, '') AS key_id, coalesce(r.owner, '') AS owner, "  # noqa: S608
        "coalesce(r.route, '') AS route, r.status, r.error_code, r.bytes_in, r.bytes_out, r.latency_ms "
        "FROM unnest($1::timestamptz[]) AS b (bucket) "
        f"JOIN usage_records AS r ON r.at >= b.bucket AND r.at < b.bucket + interval '{step}') AS src"
    )
    return (
        f"DELETE FROM {table} WHERE bucket = ANY($1::timestamptz[])",  # noqa: S608
        f"DELETE FROM {table}_refusals WHERE bucket = ANY($1::timestamptz[])",  # noqa: S608
        f"INSERT INTO {table} ({_ROLLUP_COLUMNS}) {_stats(source, _ROLLUP_KEYS)}",
        f"INSERT INTO {table}_refusals ({_ROLLUP_KEYS}, error_code, requests) "  # noqa: S608
        f"SELECT {_ROLLUP_KEYS}, error_code, count(*) FROM {source} "
        f"WHERE error_code IS NOT NULL GROUP BY {_ROLLUP_KEYS}, error_code",
    )


_HOURLY_FROM_RAW = _rollup_statements("usage_hourly", "1 hour")
_DAILY_FROM_RAW = _rollup_statements("usage_daily", "24 hours")  # not '1 day': DST in the connection's TimeZone
# A day whose first raw rows are gone already: summed from its hourly rollups.
_DAY_OF_HOURS = (
    "FROM unnest($1::timestamptz[]) AS d (bucket) JOIN {} AS h "
    "ON h.bucket >= d.bucket AND h.bucket < d.bucket + interval '24 hours'"
)
_DAILY_FROM_HOURLY = (
    *_DAILY_FROM_RAW[:2],
    f"INSERT INTO usage_daily ({_ROLLUP_COLUMNS}) SELECT d.bucket, h.key_id, h.owner, h.route, "
    "sum(h.requests), sum(h.errors), sum(h.bytes_in), sum(h.bytes_out), "
    + ", ".join(_combined(f"h.{name}", "h.requests") for name in _PERCENTILES)
    + f" {_DAY_OF_HOURS.format('usage_hourly')} GROUP BY d.bucket, h.key_id, h.owner, h.route",
    "INSERT INTO usage_daily_refusals (bucket, key_id, owner, route, error_code, requests) "
    "SELECT d.bucket, h.key_id, h.owner, h.route, h.error_code, sum(h.requests) "
    f"{_DAY_OF_HOURS.format('usage_hourly_refusals')} GROUP BY d.bucket, h.key_id, h.owner, h.route, h.error_code",
)
# Raw rows older than raw_from arrived after their hour was folded and purged (a late spool replay):
# deleted and, in the same statement, added to the hourly rollups (percentiles merged as a
# request-weighted mean).
_FOLD_LATE = (
    "WITH gone AS (DELETE FROM usage_records WHERE at < $1 RETURNING date_trunc('hour', at, 'UTC') AS bucket, "  # noqa: S608
    "coalesce(key_id, '') AS key_id, coalesce(owner, '') AS owner, coalesce(route, '') AS route, "
    "status, error_code, bytes_in, bytes_out, latency_ms), "
    f"refused AS (INSERT INTO usage_hourly_refusals AS t ({_ROLLUP_KEYS}, error_code, requests) "
    f"SELECT {_ROLLUP_KEYS}, error_code, count(*) FROM gone WHERE error_code IS NOT NULL "
    f"GROUP BY {_ROLLUP_KEYS}, error_code "
    f"ON CONFLICT ({_ROLLUP_KEYS}, error_code) DO UPDATE SET requests = t.requests + EXCLUDED.requests) "
    f"INSERT INTO usage_hourly AS t ({_ROLLUP_COLUMNS}) {_stats('gone', _ROLLUP_KEYS)} "
    f"ON CONFLICT ({_ROLLUP_KEYS}) DO UPDATE SET requests = t.requests + EXCLUDED.requests, "
    "errors = t.errors + EXCLUDED.errors, bytes_in = t.bytes_in + EXCLUDED.bytes_in, "
    "bytes_out = t.bytes_out + EXCLUDED.bytes_out, "
    + ", ".join(
        f"{name} = (t.{name} * t.requests + EXCLUDED.{name} * EXCLUDED.requests) / (t.requests + EXCLUDED.requests)"
        for name in _PERCENTILES
    )
)
# Purged: raw rows before the new raw_from, except those of an hour marked again meanwhile (rows a
# writer committed during this rollup, which no rollup has folded yet).
_PURGE_USAGE = (
    "DELETE FROM usage_records AS r WHERE r.at < $1 AND NOT EXISTS (SELECT 1 FROM usage_rollup_pending AS p "
    "WHERE p.grain = 'hour' AND p.bucket = date_trunc('hour', r.at, 'UTC'))"
)
# Report groups, over raw rows and over rollup rows ('' there is a missing key, owner or route).
_RAW_GROUPS = {
    "key": "coalesce(key_id, '-')",
    "owner": "coalesce(owner, '-')",
    "route": "coalesce(route, '-')",
    "day": "to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
}
_ROLLUP_GROUPS = {
    "key": "coalesce(nullif(key_id, ''), '-')",
    "owner": "coalesce(nullif(owner, ''), '-')",
    "route": "coalesce(nullif(route, ''), '-')",
    "day": "to_char(bucket AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
}


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

    async def update_key(
        self, record: KeyRecord, audit: AuditEntry | None, expect_status: str | None = None
    ) -> None:
        update_params = _update_params(record)
        audit_params = _audit_params(audit) if audit is not None else None
        audit_id = None
        async with self._connection() as conn, conn.transaction():
            await _update_key(conn, record, update_params, expect_status)
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
            await _update_key(conn, old, old_params, "active")
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

    # --- usage -----------------------------------------------------------------------------------

    async def write_usage(self, records: list[UsageRecord]) -> None:
        if not records:
            return
        try:
            async with self._connection() as conn, conn.transaction():
                await conn.execute(_STAGE_USAGE)
                await conn.copy_records_to_table("usage_staging", records=records, columns=FIELDS)
                await conn.execute(_INSERT_USAGE)
        except StoreUnavailable:
            raise
        except Exception as exc:
            # Only the kind of error: a message (asyncpg's encoding errors, PostgreSQL's DETAIL) could
            # quote a record.
            raise StoreUnavailable(
                f"PostgreSQL at {self.where}: a usage batch of {len(records)} records was not stored "
                f"({type(exc).__name__})"
            ) from None

    async def usage_report(
        self,
        since: datetime,
        by: str,
        key_id: str | None = None,
        owner: str | None = None,
    ) -> list[UsageReport]:
        sql = _report_sql(by, key_id, owner)
        since = require_aware(since, "since")
        first_hour = _floor_hour(since)
        filters = [v for v in (key_id, owner) if v is not None]
        async with self._connection() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            raw_from = await conn.fetchval("SELECT raw_from FROM usage_rollup_state WHERE id = 1")
            span = _rollup_range(first_hour, raw_from)
            rows = await conn.fetch(
                sql, since, span["h0"], span["raw_from"], span["d0"], span["d1"], *filters, timeout=REPORT_TIMEOUT
            )
        return [
            UsageReport(
                group=str(r["grp"]),
                requests=int(r["requests"]),
                errors=int(r["errors"]),
                refusals={str(k): int(v) for k, v in json.loads(r["refusals"] or "{}").items()},
                bytes_in=int(r["bytes_in"]),
                bytes_out=int(r["bytes_out"]),
                p50_ms=r["p50_ms"],
                p95_ms=r["p95_ms"],
                p99_ms=r["p99_ms"],
            )
            for r in rows
        ]

    async def rollup_usage(self, now: datetime, retention_seconds: float) -> None:
        hours_to, days_to, cutoff = _rollup_bounds(now, retention_seconds)
        try:
            await self._rollup_usage(hours_to, days_to, cutoff)
        except asyncpg.PostgresError as exc:  # a deadlock, a serialization failure: try again later
            raise StoreUnavailable(f"PostgreSQL at {self.where}: usage rollup failed: {_describe(exc)}") from exc

    async def _rollup_usage(self, hours_to: datetime, days_to: datetime, cutoff: datetime | None) -> None:
        """One rollup transaction; rollups of several processes run one after the other."""
        t = ROLLUP_TIMEOUT
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", ROLLUP_LOCK, timeout=t)
            state = await conn.fetchrow(
                "SELECT hours_to, days_to, raw_from FROM usage_rollup_state WHERE id = 1 FOR UPDATE", timeout=t
            )
            raw_from: datetime | None = state["raw_from"]
            taken = await conn.fetch(_TAKE_PENDING, hours_to, days_to, timeout=t)
            if raw_from is not None:
                await conn.execute(_FOLD_LATE, raw_from, timeout=t)
            # Buckets whose raw rows are all still stored are computed from them; older hours got
            # their late rows above, and a day that lost raw rows already is summed from its hours.
            hours = sorted(b for g, b in taken if g == "hour" and (raw_from is None or b >= raw_from))
            days = sorted(b for g, b in taken if g == "day")
            whole = [d for d in days if raw_from is None or d >= raw_from]
            partial = [d for d in days if d not in whole]
            for buckets, statements in (
                (hours, _HOURLY_FROM_RAW),
                (whole, _DAILY_FROM_RAW),
                (partial, _DAILY_FROM_HOURLY),
            ):
                if buckets:
                    for statement in statements:
                        await conn.execute(statement, buckets, timeout=t)
            new_from = raw_from
            if cutoff is not None and (raw_from is None or cutoff > raw_from):
                new_from = cutoff
                await conn.execute(_PURGE_USAGE, new_from, timeout=t)
            await conn.execute(
                "UPDATE usage_rollup_state SET hours_to = GREATEST(hours_to, $1), "
                "days_to = GREATEST(days_to, $2), raw_from = $3 WHERE id = 1",
                hours_to,
                days_to,
                new_from,
                timeout=t,
            )

    async def count_usage(self) -> int:
        async with self._connection() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM usage_records"))


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


async def _update_key(conn: Any, record: KeyRecord, params: tuple[Any, ...], expect_status: str | None = None) -> None:
    if expect_status is not None:
        status = await conn.fetchval("SELECT status FROM api_keys WHERE id = $1 FOR UPDATE", record.id)
        if status is not None and status != expect_status:
            raise StaleKey(f"key {record.id} is {status} now")
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


# --- usage helpers ---------------------------------------------------------------------------------


def _floor_hour(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _floor_day(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def _rollup_bounds(now: datetime, retention_seconds: float) -> tuple[datetime, datetime, datetime | None]:
    """The hours and days a rollup at `now` may fold (those before the current hour and day), and
    where raw rows start to be kept: the hour of now - retention (None: a retention beyond the
    calendar keeps everything). Purging whole hours keeps the rollups and the raw rows disjoint."""
    now = require_aware(now, "now")
    if not math.isfinite(retention_seconds) or retention_seconds < 0:
        raise ValueError("the usage retention must be a finite number of seconds, zero or more")
    try:
        cutoff: datetime | None = _floor_hour(now - timedelta(seconds=retention_seconds))
    except OverflowError:
        cutoff = None
    return _floor_hour(now), _floor_day(now), cutoff


def _rollup_range(first_hour: datetime, raw_from: datetime | None) -> dict[str, datetime]:
    """The part of a report that comes from rollups: the hours [h0, raw_from) the raw table no longer
    covers, of which the whole days [d0, d1) are read from the daily rollups. A `since` inside a
    rolled-up hour counts that whole hour."""
    end = raw_from if raw_from is not None and raw_from > first_hour else first_hour
    d0 = _floor_day(first_hour)
    if d0 < first_hour:
        d0 += timedelta(days=1)
    d1 = _floor_day(end)
    if d1 <= d0:
        d0 = d1 = first_hour  # no whole day: everything from the hourly rollups
    return {"h0": first_hour, "raw_from": end, "d0": d0, "d1": d1}


def _report_sql(by: str, key_id: str | None, owner: str | None) -> str:
    """The report query; parameters: since, h0, raw_from, d0, d1 (see _rollup_range), then the key
    id and owner filters that are given."""
    if by not in _RAW_GROUPS:
        raise ValueError(f"a usage report is grouped by key, owner, route or day, not {by!r}")
    filters = ""
    n = 5
    for column, value in (("key_id", key_id), ("owner", owner)):
        if value is not None:
            n += 1
            filters += f" AND {column} = ${n}"
    group = _ROLLUP_GROUPS[by]
    daily = f"FROM usage_daily{{}} WHERE bucket >= $4 AND bucket < $5{filters}"
    hourly = f"FROM usage_hourly{{}} WHERE bucket >= $2 AND bucket < $3 AND (bucket < $4 OR bucket >= $5){filters}"
    stats = f"SELECT {group}, requests, errors, bytes_in, bytes_out, p50_ms, p95_ms, p99_ms "
    refused = f"SELECT {group}, error_code, requests "
    percentiles = ", ".join(f"{_combined(name)} AS {name}" for name in _PERCENTILES)
    order = "t.grp" if by == "day" else "t.requests DESC, t.grp"
    # Raw rows since `since` (including late ones older than raw_from, which no rollup holds yet),
    # plus the rollups for the range the raw table no longer covers.
    return (
        f"WITH raw AS (SELECT {_RAW_GROUPS[by]} AS grp, status, error_code, bytes_in, bytes_out, latency_ms "  # noqa: S608
        f"FROM usage_records WHERE at >= $1{filters}), "
        f"pieces AS ({_stats('raw', 'grp')} UNION ALL {stats}{daily.format('')} "
        f"UNION ALL {stats}{hourly.format('')}), "
        "totals AS (SELECT grp, sum(requests)::bigint AS requests, sum(errors)::bigint AS errors, "
        f"sum(bytes_in)::bigint AS bytes_in, sum(bytes_out)::bigint AS bytes_out, {percentiles} "
        "FROM pieces GROUP BY grp), "
        "refused AS (SELECT grp, error_code, sum(n)::bigint AS n FROM ("
        "SELECT grp, error_code, count(*) AS n FROM raw WHERE error_code IS NOT NULL GROUP BY grp, error_code "
        f"UNION ALL {refused}{daily.format('_refusals')} UNION ALL {refused}{hourly.format('_refusals')}"
        ") AS r GROUP BY grp, error_code), "
        "refusals AS (SELECT grp, json_object_agg(error_code, n) AS refusals FROM refused GROUP BY grp) "
        "SELECT t.grp, t.requests, t.errors, t.bytes_in, t.bytes_out, t.p50_ms, t.p95_ms, t.p99_ms, f.refusals "
        f"FROM totals AS t LEFT JOIN refusals AS f ON f.grp = t.grp ORDER BY {order}"
    )
