"""The keys and the audit trail of the SQLite store: a mixin of SQLiteStore, with their SQL.

Every write that changes a key runs in one BEGIN IMMEDIATE transaction with its audit entry. List
fields and audit changes are stored as JSON text, timestamps as fixed-width UTC text.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from typing import Any

from gateway.keys.model import AuditEntry, KeyRecord
from gateway.store.base import StaleKey
from gateway.store.migrate import KEY_COLUMNS, MUTABLE_KEY_COLUMNS, dump_json, require_aware
from gateway.store.rows import (
    SELECT_KEY,
    audit_from_row,
    audit_query,
    audit_values,
    insert_key_sql,
    key_conflict,
    key_from_row,
    key_values,
)
from gateway.store.sqlite_worker import SQLiteWorker, from_ts, ts, write_transaction


def _mark(n: int) -> str:
    """The placeholder of the nth parameter."""
    return "?"


# Statements built from the fixed column lists in gateway.store.migrate; values are always parameters.
_INSERT_KEY = insert_key_sql(_mark)
# Every mutable column, then last_used_at, which never moves back; parameters: the mutable values,
# the new last_used_at three times, the id.
_KEY_SETS = ", ".join(f"{c} = ?" for c in MUTABLE_KEY_COLUMNS)
_KEY_SETS += ", last_used_at = CASE WHEN last_used_at IS NULL THEN ? WHEN ? > last_used_at THEN ? ELSE last_used_at END"
_UPDATE_KEY = f"UPDATE api_keys SET {_KEY_SETS} WHERE id = ?"  # noqa: S608
_INSERT_AUDIT = (
    "INSERT INTO audit_log (at, action, actor, source_ip, key_id, change) VALUES (?, ?, ?, ?, ?, ?)"
)
_TOUCH = "UPDATE api_keys SET last_used_at = ? WHERE id = ? AND (last_used_at IS NULL OR last_used_at < ?)"


class SQLiteKeys(SQLiteWorker):
    """The KeyStore methods of SQLiteStore."""

    # --- keys ------------------------------------------------------------------------------------

    async def find_by_digests(self, digests: list[bytes]) -> KeyRecord | None:
        if not digests:
            return None
        wanted = [bytes(d) for d in digests]

        def find(conn: sqlite3.Connection) -> KeyRecord | None:
            marks = ", ".join("?" * len(wanted))
            sql = f"{SELECT_KEY} WHERE digest IN ({marks}) ORDER BY created_at, id LIMIT 1"
            row = conn.execute(sql, wanted).fetchone()
            return _key_from_row(row) if row is not None else None

        return await self._read(find)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        def get(conn: sqlite3.Connection) -> KeyRecord | None:
            row = conn.execute(f"{SELECT_KEY} WHERE id = ?", (key_id,)).fetchone()
            return _key_from_row(row) if row is not None else None

        return await self._run(get)

    async def list_keys(self, owner: str | None = None) -> list[KeyRecord]:
        def list_(conn: sqlite3.Connection) -> list[KeyRecord]:
            if owner is None:
                rows = conn.execute(f"{SELECT_KEY} ORDER BY created_at, id").fetchall()
            else:
                rows = conn.execute(
                    f"{SELECT_KEY} WHERE owner = ? ORDER BY created_at, id", (owner,)
                ).fetchall()
            return [_key_from_row(r) for r in rows]

        return await self._run(list_)

    async def insert_key(self, record: KeyRecord, audit: AuditEntry) -> None:
        key_params = _key_params(record)
        audit_params = _audit_params(audit)

        def insert(conn: sqlite3.Connection) -> int:
            with write_transaction(conn):
                _insert_key(conn, record, key_params)
                return _insert_audit(conn, audit_params)

        audit.id = await self._run(insert)

    async def update_key(
        self, record: KeyRecord, audit: AuditEntry | None, expect_status: str | None = None
    ) -> None:
        update_params = _update_params(record)
        audit_params = _audit_params(audit) if audit is not None else None

        def update(conn: sqlite3.Connection) -> int | None:
            with write_transaction(conn):
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
            with write_transaction(conn):
                _insert_key(conn, new, new_params)
                _update_key(conn, old, old_params, "active")
                return _insert_audit(conn, audit_params)

        audit.id = await self._run(rotate)

    async def set_digest(self, key_id: str, digest: bytes, pepper_version: int) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with write_transaction(conn):
                conn.execute(
                    "UPDATE api_keys SET digest = ?, pepper_version = ? WHERE id = ?", (digest, pepper_version, key_id)
                )

        await self._run(write)

    async def touch(self, last_used: dict[str, datetime]) -> None:
        if not last_used:
            return
        rows = []
        for key_id, at in last_used.items():
            stamp = ts(require_aware(at, "last_used_at"))
            rows.append((stamp, key_id, stamp))

        def touch(conn: sqlite3.Connection) -> None:
            with write_transaction(conn):
                conn.executemany(_TOUCH, rows)

        await self._run(touch)

    # --- audit -----------------------------------------------------------------------------------

    async def add_audit(self, entry: AuditEntry) -> None:
        params = _audit_params(entry)

        def add(conn: sqlite3.Connection) -> int:
            with write_transaction(conn):
                return _insert_audit(conn, params)

        entry.id = await self._run(add)

    async def list_audit(
        self, since: datetime | None = None, key_id: str | None = None, limit: int = 1000
    ) -> list[AuditEntry]:
        if limit <= 0:
            return []
        sql, params = audit_query(since, key_id, limit, ts, _mark)

        def list_(conn: sqlite3.Connection) -> list[AuditEntry]:
            return [_audit_from_row(r) for r in conn.execute(sql, params).fetchall()]

        return await self._run(list_)


    async def key_changes(self, after_id: int, limit: int = 1000) -> list[tuple[int, str, float]]:
        def read(conn: sqlite3.Connection) -> list[tuple[int, str, float]]:
            if after_id < 0:
                return [(conn.execute("SELECT coalesce(max(id), 0) FROM audit_log").fetchone()[0], "", 0.0)]
            rows = conn.execute(
                "SELECT id, key_id, at FROM audit_log WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
            ).fetchall()
            return _changes(rows)

        return await self._run(read)

    async def key_changes_among(self, ids: list[int]) -> list[tuple[int, str, float]]:
        def read(conn: sqlite3.Connection) -> list[tuple[int, str, float]]:
            rows: list[Any] = []
            for i in range(0, len(ids), 500):  # SQLite's bound on parameters
                chunk = ids[i : i + 500]
                rows += conn.execute(
                    f"SELECT id, key_id, at FROM audit_log WHERE id IN ({', '.join('?' * len(chunk))}) ORDER BY id",  # noqa: S608
                    chunk,
                ).fetchall()
            return _changes(rows)

        return await self._run(read) if ids else []


# --- helpers (they run on the worker thread) -------------------------------------------------------


def _conflict(exc: sqlite3.IntegrityError, record: KeyRecord) -> ValueError:
    """A clear error for a key that clashes with a stored one; never shows the digest."""
    message = str(exc)
    clash = None
    if "api_keys.digest" in message:
        clash = "digest"
    elif "api_keys.id" in message:
        clash = "id"
    elif "FOREIGN KEY" in message:
        clash = "reference"
    return key_conflict(record.id, clash, message)


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


def _changes(rows: list[Any]) -> list[tuple[int, str, float]]:
    return [(int(i), k or "", datetime.fromisoformat(at).timestamp()) for i, k, at in rows]


def _insert_audit(conn: sqlite3.Connection, params: tuple[Any, ...]) -> int:
    cursor = conn.execute(_INSERT_AUDIT, params)
    row_id = cursor.lastrowid
    assert row_id is not None
    return row_id


def _from_list(value: str) -> list[str]:
    items = json.loads(value)
    return [str(i) for i in items]


def _key_params(r: KeyRecord) -> tuple[Any, ...]:
    return key_values(r, ts, dump_json)


def _update_params(r: KeyRecord) -> tuple[Any, ...]:
    values = dict(zip(KEY_COLUMNS, _key_params(r), strict=True))
    last_used = values["last_used_at"]
    return (*(values[c] for c in MUTABLE_KEY_COLUMNS), last_used, last_used, last_used, r.id)


def _key_from_row(row: tuple[Any, ...]) -> KeyRecord:
    return key_from_row(row, from_ts, _from_list)


def _audit_params(e: AuditEntry) -> tuple[Any, ...]:
    return audit_values(e, ts)


def _audit_from_row(row: tuple[Any, ...]) -> AuditEntry:
    return audit_from_row(row, from_ts)
