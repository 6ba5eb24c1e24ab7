"""The embedded store: one SQLite file, reached through the stdlib sqlite3 module on one worker thread.

Every statement runs on a single dedicated thread (a one-worker executor), so the event loop never
blocks on disk and the connection is only ever used by that thread. The file is opened in WAL mode
with synchronous=NORMAL, a busy timeout for other processes holding the write lock, and foreign keys
enforced. Writes that change a key run in one BEGIN IMMEDIATE transaction with their audit entry.

Timestamps are stored as fixed-width ISO-8601 UTC text ('2024-05-01T12:00:00.000000Z'), so text
order is time order and values round-trip to the microsecond. List fields and audit changes are JSON.

Usage records are written with executemany on the worker thread. Reports and rollups are computed in
SQL: latency percentiles come from window functions (row_number over latency_ms within a group) with
the linear interpolation of PostgreSQL's percentile_cont, so both stores report the same numbers.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

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

T = TypeVar("T")

BUSY_TIMEOUT = 5.0  # seconds to wait for another process's write lock
MEMORY = ":memory:"

# Statements built from the fixed column lists in gateway.store.migrate; values are always parameters.
_KEY_LIST = ", ".join(KEY_COLUMNS)
_KEY_MARKS = ", ".join("?" * len(KEY_COLUMNS))
# Every mutable column, then last_used_at, which never moves back; parameters: the mutable values,
# the new last_used_at three times, the id.
_KEY_SETS = ", ".join(f"{c} = ?" for c in MUTABLE_KEY_COLUMNS)
_KEY_SETS += ", last_used_at = CASE WHEN last_used_at IS NULL THEN ? WHEN ? > last_used_at THEN ? ELSE last_used_at END"
_SELECT_KEY = f"SELECT {_KEY_LIST} FROM api_keys"  # noqa: S608
_INSERT_KEY = f"INSERT INTO api_keys ({_KEY_LIST}) VALUES ({_KEY_MARKS})"  # noqa: S608
_UPDATE_KEY = f"UPDATE api_keys SET {_KEY_SETS} WHERE id = ?"  # noqa: S608
_SELECT_AUDIT = f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit_log"  # noqa: S608
_INSERT_AUDIT = (
    "INSERT INTO audit_log (at, action, actor, source_ip, key_id, change) VALUES (?, ?, ?, ?, ?, ?)"
)
_TOUCH = "UPDATE api_keys SET last_used_at = ? WHERE id = ? AND (last_used_at IS NULL OR last_used_at < ?)"
_MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT NOT NULL PRIMARY KEY, applied_at TEXT NOT NULL)"
)

# --- usage statements ------------------------------------------------------------------------------
# A bucket is the text of its start: the hour or day prefix of a timestamp, completed with zeros.
_HOUR_OF = "substr({}, 1, 13) || ':00:00.000000Z'"
_DAY_OF = "substr({}, 1, 10) || 'T00:00:00.000000Z'"
# Idempotent on request_id only: INSERT OR IGNORE would also skip a row breaking NOT NULL, silently.
_INSERT_USAGE = (
    f"INSERT INTO usage_records ({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))}) "  # noqa: S608
    "ON CONFLICT (request_id) DO NOTHING"
)
_MARK_USAGE = "INSERT OR IGNORE INTO usage_rollup_pending (grain, bucket) VALUES (?, ?)"
_PENDING = "FROM usage_rollup_pending WHERE (grain = 'hour' AND bucket < ?) OR (grain = 'day' AND bucket < ?)"
_ROLLUP_KEYS = "bucket, key_id, owner, route"
_ROLLUP_COLUMNS = f"{_ROLLUP_KEYS}, requests, errors, bytes_in, bytes_out, p50_ms, p95_ms, p99_ms"
_PERCENTILES = (("p50_ms", "0.5"), ("p95_ms", "0.95"), ("p99_ms", "0.99"))


def _percentile(p: str) -> str:
    """percentile_cont(p) of latency_ms over a group, as PostgreSQL computes it: with the rows of the
    group ranked 0..m_ by latency (i_), x = p * m_; the result is v[floor x] + (v[ceil x] - v[floor x])
    * (x - floor x). The same double-precision operations in the same order, so the same value."""
    x = f"({p} * m_)"
    lo = f"CAST({x} AS INTEGER)"  # floor: x is never negative
    lo_v = f"max(CASE WHEN i_ = {lo} THEN latency_ms END)"
    hi_v = f"max(CASE WHEN i_ = {lo} + ({x} > {lo}) THEN latency_ms END)"
    return f"({lo_v} + ({hi_v} - {lo_v}) * max({x} - {lo}))"


def _stats(source: str, keys: str) -> str:
    """Requests, 5xx errors, bytes and latency percentiles of the rows of `source` (which has the
    columns `keys`, status, bytes_in, bytes_out, latency_ms), one row per group of `keys`."""
    percentiles = ", ".join(f"{_percentile(p)} AS {name}" for name, p in _PERCENTILES)
    return (
        f"SELECT {keys}, count(*) AS requests, sum(status >= 500) AS errors, sum(bytes_in) AS bytes_in, "  # noqa: S608
        f"sum(bytes_out) AS bytes_out, {percentiles} "
        f"FROM (SELECT *, row_number() OVER (PARTITION BY {keys} ORDER BY latency_ms) - 1 AS i_, "
        f"count(*) OVER (PARTITION BY {keys}) - 1 AS m_ FROM {source}) GROUP BY {keys}"
    )


def _combined(column: str) -> str:
    """A percentile over several pieces (rollup buckets, raw rows): exact when there is one piece,
    otherwise approximated by the request-weighted mean of the pieces' percentiles."""
    return f"CASE WHEN count(*) = 1 THEN max({column}) ELSE sum({column} * requests) / sum(requests) END"


def _raw_source(bucket: str, where: str) -> str:
    """Raw rows with the rollup keys ('' for a missing key, owner or route)."""
    return (
        f"(SELECT {bucket} AS bucket, coalesce(key_id, '') AS key_id, coalesce(owner, '') AS owner, "  # noqa: S608
        "coalesce(route, '') AS route, status, error_code, bytes_in, bytes_out, latency_ms "
        f"FROM usage_records WHERE {where})"
    )


def _refusals_from(source: str) -> str:
    return (
        f"SELECT {_ROLLUP_KEYS}, error_code, count(*) FROM {source} "  # noqa: S608
        f"WHERE error_code IS NOT NULL GROUP BY {_ROLLUP_KEYS}, error_code"
    )


def _rollup_statements(table: str) -> tuple[str, str]:
    """Roll one bucket of usage_hourly or usage_daily (:bucket, raw rows in [:lo, :hi)) up from raw rows."""
    source = _raw_source(":bucket", "at >= :lo AND at < :hi")
    return (
        f"INSERT INTO {table} ({_ROLLUP_COLUMNS}) {_stats(source, _ROLLUP_KEYS)}",
        f"INSERT INTO {table}_refusals ({_ROLLUP_KEYS}, error_code, requests) {_refusals_from(source)}",
    )


_HOURLY_FROM_RAW = _rollup_statements("usage_hourly")
_DAILY_FROM_RAW = _rollup_statements("usage_daily")
# A day whose first raw rows are gone already: summed from its hourly rollups.
_DAILY_FROM_HOURLY = (
    f"INSERT INTO usage_daily ({_ROLLUP_COLUMNS}) SELECT :bucket, key_id, owner, route, sum(requests), "  # noqa: S608
    "sum(errors), sum(bytes_in), sum(bytes_out), "
    + ", ".join(_combined(name) for name, _ in _PERCENTILES)
    + " FROM usage_hourly WHERE bucket >= :lo AND bucket < :hi GROUP BY key_id, owner, route",
    "INSERT INTO usage_daily_refusals (bucket, key_id, owner, route, error_code, requests) "
    "SELECT :bucket, key_id, owner, route, error_code, sum(requests) FROM usage_hourly_refusals "
    "WHERE bucket >= :lo AND bucket < :hi GROUP BY key_id, owner, route, error_code",
)
# Raw rows older than raw_from arrived after their hour was folded and purged (a late spool replay):
# added to the hourly rollups (percentiles merged as a request-weighted mean), then deleted.
_LATE_SOURCE = _raw_source(_HOUR_OF.format("at"), "at < :raw_from")
_FOLD_LATE = (
    f"INSERT INTO usage_hourly ({_ROLLUP_COLUMNS}) {_stats(_LATE_SOURCE, _ROLLUP_KEYS)} "
    f"ON CONFLICT ({_ROLLUP_KEYS}) DO UPDATE SET requests = requests + excluded.requests, "
    "errors = errors + excluded.errors, bytes_in = bytes_in + excluded.bytes_in, "
    "bytes_out = bytes_out + excluded.bytes_out, "
    + ", ".join(
        f"{name} = ({name} * requests + excluded.{name} * excluded.requests) / (requests + excluded.requests)"
        for name, _ in _PERCENTILES
    ),
    f"INSERT INTO usage_hourly_refusals ({_ROLLUP_KEYS}, error_code, requests) {_refusals_from(_LATE_SOURCE)} "
    f"ON CONFLICT ({_ROLLUP_KEYS}, error_code) DO UPDATE SET requests = requests + excluded.requests",
    "DELETE FROM usage_records WHERE at < :raw_from",
)
# Report groups, over raw rows and over rollup rows ('' there is a missing key, owner or route).
_RAW_GROUPS = {
    "key": "coalesce(key_id, '-')",
    "owner": "coalesce(owner, '-')",
    "route": "coalesce(route, '-')",
    "day": "substr(at, 1, 10)",
}
_ROLLUP_GROUPS = {
    "key": "coalesce(nullif(key_id, ''), '-')",
    "owner": "coalesce(nullif(owner, ''), '-')",
    "route": "coalesce(nullif(route, ''), '-')",
    "day": "substr(bucket, 1, 10)",
}


def parse_sqlite_url(url: str) -> str:
    """The file path of sqlite:///relative/path.db, sqlite:////absolute/path.db or sqlite:///:memory:."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ValueError(f"not a sqlite URL (scheme {parts.scheme!r})")
    if parts.netloc:
        raise ValueError(
            "a sqlite URL has no host: use sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    if parts.query or parts.fragment:
        raise ValueError("a sqlite URL takes no query or fragment")
    path = unquote(parts.path)
    if not path.startswith("/") or len(path) < 2:
        raise ValueError(
            "a sqlite URL needs a file: sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    path = path[1:]
    return path if path == MEMORY else os.path.abspath(path)


class SQLiteStore(KeyStore, UsageStore):
    def __init__(self, url: str, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = parse_sqlite_url(url)
        self.busy_timeout = busy_timeout
        self.migrations_applied: list[str] = []  # what the last open() applied
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # used only on the executor's thread

    # --- running on the worker thread ------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        executor = self._executor
        if executor is None:
            raise StoreUnavailable("the SQLite store is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise StoreUnavailable("the SQLite store is not open")
        try:
            return fn(conn)
        except sqlite3.IntegrityError as exc:
            raise ValueError(f"the change violates a store constraint: {exc}") from exc
        except sqlite3.DataError as exc:
            raise ValueError(f"a value does not fit the store: {exc}") from exc
        except (sqlite3.OperationalError, sqlite3.InternalError, sqlite3.NotSupportedError) as exc:
            raise StoreUnavailable(f"SQLite store {self.path} unavailable: {exc}") from exc
        except sqlite3.ProgrammingError:
            raise  # a bug in this module, not an outage
        except (sqlite3.DatabaseError, OSError) as exc:  # "file is not a database", I/O errors
            raise StoreUnavailable(f"SQLite store {self.path} unavailable: {exc}") from exc

    # --- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-sqlite")
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._connect)
            self.migrations_applied = await self.migrate()
        except BaseException:
            await self.close()
            raise

    def _connect(self) -> None:
        try:
            if self.path != MEMORY:
                _create_private_file(self.path)
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open SQLite store {self.path}: {exc}") from exc
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            conn.close()
            raise StoreUnavailable(f"cannot open SQLite store {self.path}: {exc}") from exc
        self._conn = conn

    async def close(self) -> None:
        executor = self._executor
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(executor, self._disconnect)
        finally:
            self._executor = None
            executor.shutdown(wait=False)

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    async def migrate(self) -> list[str]:
        return await self._run(_migrate)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT count(*) FROM schema_migrations").fetchone())

    # --- keys ------------------------------------------------------------------------------------

    async def find_by_digests(self, digests: list[bytes]) -> KeyRecord | None:
        if not digests:
            return None
        wanted = [bytes(d) for d in digests]

        def find(conn: sqlite3.Connection) -> KeyRecord | None:
            marks = ", ".join("?" * len(wanted))
            sql = f"{_SELECT_KEY} WHERE digest IN ({marks}) ORDER BY created_at, id LIMIT 1"
            row = conn.execute(sql, wanted).fetchone()
            return _key_from_row(row) if row is not None else None

        return await self._run(find)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        def get(conn: sqlite3.Connection) -> KeyRecord | None:
            row = conn.execute(f"{_SELECT_KEY} WHERE id = ?", (key_id,)).fetchone()
            return _key_from_row(row) if row is not None else None

        return await self._run(get)

    async def list_keys(self, owner: str | None = None) -> list[KeyRecord]:
        def list_(conn: sqlite3.Connection) -> list[KeyRecord]:
            if owner is None:
                rows = conn.execute(f"{_SELECT_KEY} ORDER BY created_at, id").fetchall()
            else:
                rows = conn.execute(
                    f"{_SELECT_KEY} WHERE owner = ? ORDER BY created_at, id", (owner,)
                ).fetchall()
            return [_key_from_row(r) for r in rows]

        return await self._run(list_)

    async def insert_key(self, record: KeyRecord, audit: AuditEntry) -> None:
        key_params = _key_params(record)
        audit_params = _audit_params(audit)

        def insert(conn: sqlite3.Connection) -> int:
            with _write(conn):
                _insert_key(conn, record, key_params)
                return _insert_audit(conn, audit_params)

        audit.id = await self._run(insert)

    async def update_key(
        self, record: KeyRecord, audit: AuditEntry | None, expect_status: str | None = None
    ) -> None:
        update_params = _update_params(record)
        audit_params = _audit_params(audit) if audit is not None else None

        def update(conn: sqlite3.Connection) -> int | None:
            with _write(conn):
                _update_key(conn, record, update_params, expect_status)
                return _insert_audit(conn, audit_params) if audit_params is not None else None

        audit_id = await self._run(update)
        if audit is not None:
            audit.id = audit_id

    async def rotate(self, old: KeyRecord, new: KeyRecord, audit: AuditEntry) -> None:
        new_params = _key_params(new)
        old_params = _update_params(old)
        audit_params = _audit_params(audit)

        def rotate(conn: sqlite3.Connection) -> int:
            with _write(conn):
                _insert_key(conn, new, new_params)
                _update_key(conn, old, old_params, "active")
                return _insert_audit(conn, audit_params)

        audit.id = await self._run(rotate)

    async def set_digest(self, key_id: str, digest: bytes, pepper_version: int) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with _write(conn):
                conn.execute(
                    "UPDATE api_keys SET digest = ?, pepper_version = ? WHERE id = ?", (digest, pepper_version, key_id)
                )

        await self._run(write)

    async def touch(self, last_used: dict[str, datetime]) -> None:
        if not last_used:
            return
        rows = []
        for key_id, at in last_used.items():
            ts = _ts(require_aware(at, "last_used_at"))
            rows.append((ts, key_id, ts))

        def touch(conn: sqlite3.Connection) -> None:
            with _write(conn):
                conn.executemany(_TOUCH, rows)

        await self._run(touch)

    # --- audit -----------------------------------------------------------------------------------

    async def add_audit(self, entry: AuditEntry) -> None:
        params = _audit_params(entry)

        def add(conn: sqlite3.Connection) -> int:
            with _write(conn):
                return _insert_audit(conn, params)

        entry.id = await self._run(add)

    async def list_audit(
        self, since: datetime | None = None, key_id: str | None = None, limit: int = 1000
    ) -> list[AuditEntry]:
        if limit <= 0:
            return []
        where: list[str] = []
        params: list[Any] = []
        if since is not None:
            where.append("at >= ?")
            params.append(_ts(require_aware(since, "since")))
        if key_id is not None:
            where.append("key_id = ?")
            params.append(key_id)
        sql = _SELECT_AUDIT
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY at DESC, id DESC LIMIT ?"
        params.append(limit)

        def list_(conn: sqlite3.Connection) -> list[AuditEntry]:
            return [_audit_from_row(r) for r in conn.execute(sql, params).fetchall()]

        return await self._run(list_)

    # --- usage -----------------------------------------------------------------------------------

    async def write_usage(self, records: list[UsageRecord]) -> None:
        if not records:
            return
        count = len(records)

        def write(conn: sqlite3.Connection) -> None:
            try:
                rows = [(r[0], _epoch_ts(r[1]), *r[2:]) for r in records]
                marks: set[tuple[str, str]] = set()
                for row in rows:
                    at = row[1]
                    marks.add(("hour", at[:13] + ":00:00.000000Z"))
                    marks.add(("day", at[:10] + "T00:00:00.000000Z"))
                with _write(conn):
                    conn.executemany(_INSERT_USAGE, rows)
                    conn.executemany(_MARK_USAGE, sorted(marks))
            except (sqlite3.Error, ValueError, TypeError, OverflowError) as exc:
                # Only the kind of error: the message could quote a record.
                raise StoreUnavailable(
                    f"SQLite store {self.path}: a usage batch of {count} records was not stored "
                    f"({type(exc).__name__})"
                ) from None

        await self._run(write)

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

        def report(conn: sqlite3.Connection) -> list[Any]:
            conn.execute("BEGIN")  # one snapshot for the state and the report
            try:
                raw_from = _from_ts(_rollup_state(conn)[2])
                params = {
                    "since": _ts(since),
                    "key_id": key_id,
                    "owner": owner,
                    **{k: _ts(v) for k, v in _rollup_range(first_hour, raw_from).items()},
                }
                return conn.execute(sql, params).fetchall()
            finally:
                conn.execute("COMMIT")

        rows = await self._run(report)
        return [
            UsageReport(
                group=str(group),
                requests=int(requests),
                errors=int(errors),
                refusals={str(k): int(v) for k, v in json.loads(refusals or "{}").items()},
                bytes_in=int(bytes_in),
                bytes_out=int(bytes_out),
                p50_ms=p50,
                p95_ms=p95,
                p99_ms=p99,
            )
            for group, requests, errors, bytes_in, bytes_out, p50, p95, p99, refusals in rows
        ]

    async def rollup_usage(self, now: datetime, retention_seconds: float) -> None:
        hours_to, days_to, cutoff = _rollup_bounds(now, retention_seconds)

        def rollup(conn: sqlite3.Connection) -> None:
            with _write(conn):
                _rollup(conn, hours_to, days_to, cutoff)

        await self._run(rollup)

    async def count_usage(self) -> int:
        def count(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT count(*) FROM usage_records").fetchone()[0])

        return await self._run(count)


# --- helpers (the connection ones run on the worker thread) ----------------------------------------


def _create_private_file(path: str) -> None:
    """Create the database file readable by its owner only, and its folder, if they are missing."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    os.close(fd)


@contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taking the write lock up front: all of it is committed or none."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        raise


def _statements(script: str) -> Iterator[str]:
    """The statements of a migration script, split where sqlite3 itself sees a complete statement."""
    pieces = script.split(";")
    buffer = ""
    for i, piece in enumerate(pieces):
        buffer += piece
        if i < len(pieces) - 1:
            buffer += ";"
        if sqlite3.complete_statement(buffer):
            yield buffer
            buffer = ""
    if buffer.strip():
        yield buffer


def _migrate(conn: sqlite3.Connection) -> list[str]:
    applied: list[str] = []
    for migration in list_migrations("sqlite"):
        with _write(conn):
            conn.execute(_MIGRATIONS_TABLE)
            done = conn.execute(
                "SELECT 1 FROM schema_migrations WHERE name = ?", (migration.name,)
            ).fetchone()
            if done is None:
                for statement in _statements(migration.sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                    (migration.name, _ts(datetime.now(UTC))),
                )
                applied.append(migration.name)
    return applied


def _conflict(exc: sqlite3.IntegrityError, record: KeyRecord) -> ValueError:
    """A clear error for a key that clashes with a stored one; never shows the digest."""
    message = str(exc)
    if "api_keys.digest" in message:
        return ValueError(f"cannot store key {record.id!r}: a key with the same digest already exists")
    if "api_keys.id" in message:
        return ValueError(f"a key with id {record.id!r} already exists")
    if "FOREIGN KEY" in message:
        return ValueError(f"key {record.id!r}: rotated_to/rotated_from name a key that does not exist")
    return ValueError(f"key {record.id!r} violates a store constraint: {message}")


def _insert_key(conn: sqlite3.Connection, record: KeyRecord, params: tuple[Any, ...]) -> None:
    try:
        conn.execute(_INSERT_KEY, params)
    except sqlite3.IntegrityError as exc:
        raise _conflict(exc, record) from None


def _update_key(
    conn: sqlite3.Connection, record: KeyRecord, params: tuple[Any, ...], expect_status: str | None = None
) -> None:
    if expect_status is not None:
        # Inside the write transaction (BEGIN IMMEDIATE): nobody can change the row in between.
        row = conn.execute("SELECT status FROM api_keys WHERE id = ?", (record.id,)).fetchone()
        if row is not None and row[0] != expect_status:
            raise StaleKey(f"key {record.id} is {row[0]} now")
    try:
        cursor = conn.execute(_UPDATE_KEY, params)
    except sqlite3.IntegrityError as exc:
        raise _conflict(exc, record) from None
    if cursor.rowcount == 0:
        raise KeyError(record.id)


def _insert_audit(conn: sqlite3.Connection, params: tuple[Any, ...]) -> int:
    cursor = conn.execute(_INSERT_AUDIT, params)
    row_id = cursor.lastrowid
    assert row_id is not None
    return row_id


def _ts(value: datetime) -> str:
    utc = value.astimezone(UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds") + "Z"


def _opt_ts(value: datetime | None, what: str) -> str | None:
    return None if value is None else _ts(require_aware(value, what))


def _from_ts(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).astimezone(UTC)


def _from_list(value: str) -> list[str]:
    items = json.loads(value)
    return [str(i) for i in items]


def _key_params(r: KeyRecord) -> tuple[Any, ...]:
    return (
        r.id,
        r.owner,
        r.name,
        r.env,
        bytes(r.digest),
        r.pepper_version,
        r.hint,
        dump_json(list(r.scopes)),
        dump_json(list(r.allow_ips)),
        dump_json(list(r.limits)),
        r.status,
        _ts(require_aware(r.created_at, "created_at")),
        _opt_ts(r.expires_at, "expires_at"),
        _opt_ts(r.revoked_at, "revoked_at"),
        r.revoke_reason,
        r.rotated_to,
        r.rotated_from,
        _opt_ts(r.grace_until, "grace_until"),
        _opt_ts(r.last_used_at, "last_used_at"),
    )


def _update_params(r: KeyRecord) -> tuple[Any, ...]:
    values = dict(zip(KEY_COLUMNS, _key_params(r), strict=True))
    last_used = values["last_used_at"]
    return (*(values[c] for c in MUTABLE_KEY_COLUMNS), last_used, last_used, last_used, r.id)


def _key_from_row(row: tuple[Any, ...]) -> KeyRecord:
    (
        key_id,
        owner,
        name,
        env,
        digest,
        pepper_version,
        hint,
        scopes,
        allow_ips,
        limits,
        status,
        created_at,
        expires_at,
        revoked_at,
        revoke_reason,
        rotated_to,
        rotated_from,
        grace_until,
        last_used_at,
    ) = row
    created = _from_ts(created_at)
    assert created is not None
    return KeyRecord(
        id=key_id,
        owner=owner,
        name=name,
        env=env,
        digest=bytes(digest),
        pepper_version=int(pepper_version),
        hint=hint,
        scopes=_from_list(scopes),
        allow_ips=_from_list(allow_ips),
        limits=_from_list(limits),
        status=status,
        created_at=created,
        expires_at=_from_ts(expires_at),
        revoked_at=_from_ts(revoked_at),
        revoke_reason=revoke_reason,
        rotated_to=rotated_to,
        rotated_from=rotated_from,
        grace_until=_from_ts(grace_until),
        last_used_at=_from_ts(last_used_at),
    )


def _audit_params(e: AuditEntry) -> tuple[Any, ...]:
    return (
        _ts(require_aware(e.at, "audit time")),
        e.action,
        e.actor,
        e.source_ip,
        e.key_id,
        dump_json(e.change),
    )


def _audit_from_row(row: tuple[Any, ...]) -> AuditEntry:
    entry_id, at, action, actor, source_ip, key_id, change = row
    when = _from_ts(at)
    assert when is not None
    return AuditEntry(
        id=int(entry_id),
        at=when,
        action=action,
        actor=actor,
        source_ip=source_ip,
        key_id=key_id,
        change=json.loads(change),
    )


# --- usage helpers -------------------------------------------------------------------------------------


def _epoch_ts(at: float) -> str:
    return _ts(datetime.fromtimestamp(at, UTC))


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


def _rollup_state(conn: sqlite3.Connection) -> tuple[str | None, str | None, str | None]:
    row = conn.execute("SELECT hours_to, days_to, raw_from FROM usage_rollup_state WHERE id = 1").fetchone()
    return (row[0], row[1], row[2]) if row is not None else (None, None, None)


def _refold(
    conn: sqlite3.Connection, table: str, buckets: list[str], step: timedelta, statements: tuple[str, ...]
) -> None:
    """Replace the rollup rows of these buckets with ones computed by `statements`."""
    if not buckets:
        return
    keys = [(b,) for b in buckets]
    conn.executemany(f"DELETE FROM {table} WHERE bucket = ?", keys)  # noqa: S608
    conn.executemany(f"DELETE FROM {table}_refusals WHERE bucket = ?", keys)  # noqa: S608
    params = [{"bucket": b, "lo": b, "hi": _ts(datetime.fromisoformat(b) + step)} for b in buckets]
    for statement in statements:
        conn.executemany(statement, params)


def _rollup(conn: sqlite3.Connection, hours_to: datetime, days_to: datetime, cutoff: datetime | None) -> None:
    """One rollup, inside a write transaction (so no write runs concurrently)."""
    old_hours, old_days, raw_from = _rollup_state(conn)
    bounds = (_ts(hours_to), _ts(days_to))
    taken = conn.execute(f"SELECT grain, bucket {_PENDING}", bounds).fetchall()
    conn.execute(f"DELETE {_PENDING}", bounds)
    if raw_from is not None:
        for statement in _FOLD_LATE:
            conn.execute(statement, {"raw_from": raw_from})
    # Buckets whose raw rows are all still stored are computed from them; older hours got their late
    # rows above, and a day that lost raw rows already is summed from its hours.
    hours = sorted(b for g, b in taken if g == "hour" and (raw_from is None or b >= raw_from))
    _refold(conn, "usage_hourly", hours, timedelta(hours=1), _HOURLY_FROM_RAW)
    days = sorted(b for g, b in taken if g == "day")
    whole = [d for d in days if raw_from is None or d >= raw_from]
    _refold(conn, "usage_daily", whole, timedelta(days=1), _DAILY_FROM_RAW)
    _refold(conn, "usage_daily", [d for d in days if d not in whole], timedelta(days=1), _DAILY_FROM_HOURLY)
    new_from = raw_from
    if cutoff is not None and (raw_from is None or _ts(cutoff) > raw_from):
        new_from = _ts(cutoff)
        conn.execute("DELETE FROM usage_records WHERE at < ?", (new_from,))
    conn.execute(
        "UPDATE usage_rollup_state SET hours_to = ?, days_to = ?, raw_from = ? WHERE id = 1",
        (max(old_hours or bounds[0], bounds[0]), max(old_days or bounds[1], bounds[1]), new_from),
    )


def _report_sql(by: str, key_id: str | None, owner: str | None) -> str:
    if by not in _RAW_GROUPS:
        raise ValueError(f"a usage report is grouped by key, owner, route or day, not {by!r}")
    filters = (" AND key_id = :key_id" if key_id is not None else "") + (
        " AND owner = :owner" if owner is not None else ""
    )
    group = _ROLLUP_GROUPS[by]
    daily = f"FROM usage_daily{{}} WHERE bucket >= :d0 AND bucket < :d1{filters}"
    hourly = f"FROM usage_hourly{{}} WHERE bucket >= :h0 AND bucket < :raw_from AND (bucket < :d0 OR bucket >= :d1){filters}"
    stats = f"SELECT {group}, requests, errors, bytes_in, bytes_out, p50_ms, p95_ms, p99_ms "
    refused = f"SELECT {group}, error_code, requests "
    percentiles = ", ".join(_combined(name) for name, _ in _PERCENTILES)
    order = "grp" if by == "day" else "2 DESC, grp"
    # Raw rows since `since` (including late ones older than raw_from, which no rollup holds yet),
    # plus the rollups for the range the raw table no longer covers.
    return (
        f"WITH raw AS (SELECT {_RAW_GROUPS[by]} AS grp, status, error_code, bytes_in, bytes_out, latency_ms "  # noqa: S608
        f"FROM usage_records WHERE at >= :since{filters}), "
        f"pieces AS ({_stats('raw', 'grp')} UNION ALL {stats}{daily.format('')} "
        f"UNION ALL {stats}{hourly.format('')}), "
        "refused AS (SELECT grp, error_code, sum(n) AS n FROM ("
        "SELECT grp, error_code, count(*) AS n FROM raw WHERE error_code IS NOT NULL GROUP BY grp, error_code "
        f"UNION ALL {refused}{daily.format('_refusals')} UNION ALL {refused}{hourly.format('_refusals')}) "
        "GROUP BY grp, error_code) "
        f"SELECT grp, sum(requests), sum(errors), sum(bytes_in), sum(bytes_out), {percentiles}, "
        "(SELECT json_group_object(error_code, n) FROM refused AS r WHERE r.grp = pieces.grp) "
        f"FROM pieces GROUP BY grp ORDER BY {order}"
    )
