"""The embedded store: one SQLite file, reached through the stdlib sqlite3 module on one worker thread.

Every statement runs on a single dedicated thread (a one-worker executor), so the event loop never
blocks on disk and the connection is only ever used by that thread. The file is opened in WAL mode
with synchronous=NORMAL, a busy timeout for other processes holding the write lock, and foreign keys
enforced. Writes that change a key run in one BEGIN IMMEDIATE transaction with their audit entry.

Timestamps are stored as fixed-width ISO-8601 UTC text ('2024-05-01T12:00:00.000000Z'), so text
order is time order and values round-trip to the microsecond. List fields and audit changes are JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from gateway.keys.model import AuditEntry, KeyRecord
from gateway.store.base import KeyStore, StoreUnavailable
from gateway.store.migrate import (
    AUDIT_COLUMNS,
    KEY_COLUMNS,
    MUTABLE_KEY_COLUMNS,
    dump_json,
    list_migrations,
    require_aware,
)

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


class SQLiteStore(KeyStore):
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

    async def update_key(self, record: KeyRecord, audit: AuditEntry | None) -> None:
        update_params = _update_params(record)
        audit_params = _audit_params(audit) if audit is not None else None

        def update(conn: sqlite3.Connection) -> int | None:
            with _write(conn):
                _update_key(conn, record, update_params)
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
                _update_key(conn, old, old_params)
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


def _update_key(conn: sqlite3.Connection, record: KeyRecord, params: tuple[Any, ...]) -> None:
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
