"""The keys and the audit trail of the PostgreSQL store: a mixin of PostgresStore, with their SQL.

Every write that changes a key is one transaction together with its audit entry. List fields are
text[], timestamps timestamptz, audit changes jsonb.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from gateway.keys.model import AuditEntry, KeyRecord
from gateway.store.base import StaleKey
from gateway.store.migrate import KEY_COLUMNS, MUTABLE_KEY_COLUMNS, require_aware
from gateway.store.postgres_pool import PostgresPool, describe
from gateway.store.rows import (
    SELECT_KEY,
    as_is,
    audit_from_row,
    audit_query,
    audit_values,
    insert_key_sql,
    key_conflict,
    key_from_row,
    key_values,
)


def _mark(n: int) -> str:
    """The placeholder of the nth parameter."""
    return f"${n}"


# Statements built from the fixed column lists in gateway.store.migrate; values are always parameters.
_INSERT_KEY = insert_key_sql(_mark)
# $1 is the id, $2… the mutable columns, then last_used_at, which never moves back.
_KEY_SETS = ", ".join(f"{c} = ${i}" for i, c in enumerate(MUTABLE_KEY_COLUMNS, start=2))
_KEY_SETS += f", last_used_at = GREATEST(last_used_at, ${len(MUTABLE_KEY_COLUMNS) + 2}::timestamptz)"
_UPDATE_KEY = f"UPDATE api_keys SET {_KEY_SETS} WHERE id = $1 RETURNING id"  # noqa: S608
_INSERT_AUDIT = (
    "INSERT INTO audit_log (at, action, actor, source_ip, key_id, change) "
    "VALUES ($1, $2, $3, $4, $5, $6::jsonb) RETURNING id"
)
_TOUCH = (
    "UPDATE api_keys AS k SET last_used_at = GREATEST(k.last_used_at, u.at) "
    "FROM unnest($1::text[], $2::timestamptz[]) AS u(id, at) "
    "WHERE k.id = u.id AND (k.last_used_at IS NULL OR k.last_used_at < u.at)"
)


class PostgresKeys(PostgresPool):
    """The KeyStore methods of PostgresStore."""

    # --- keys ------------------------------------------------------------------------------------

    async def find_by_digests(self, digests: list[bytes]) -> KeyRecord | None:
        if not digests:
            return None
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"{SELECT_KEY} WHERE digest = ANY($1::bytea[]) ORDER BY created_at, id LIMIT 1",
                [bytes(d) for d in digests],
            )
        return _key_from_row(row) if row is not None else None

    async def get_key(self, key_id: str) -> KeyRecord | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(f"{SELECT_KEY} WHERE id = $1", key_id)
        return _key_from_row(row) if row is not None else None

    async def list_keys(self, owner: str | None = None) -> list[KeyRecord]:
        async with self._connection() as conn:
            if owner is None:
                rows = await conn.fetch(f"{SELECT_KEY} ORDER BY created_at, id")
            else:
                rows = await conn.fetch(f"{SELECT_KEY} WHERE owner = $1 ORDER BY created_at, id", owner)
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
        sql, params = audit_query(since, key_id, limit, as_is, _mark)
        async with self._connection() as conn:
            rows = await conn.fetch(sql, *params)
        return [_audit_from_row(r) for r in rows]


    async def key_changes(self, after_id: int, limit: int = 1000) -> list[tuple[int, str, float]]:
        async with self._connection() as conn:
            if after_id < 0:
                return [(int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM audit_log")), "", 0.0)]
            rows = await conn.fetch(
                "SELECT id, key_id, at FROM audit_log WHERE id > $1 ORDER BY id LIMIT $2", after_id, limit
            )
        return [(int(r["id"]), r["key_id"] or "", r["at"].timestamp()) for r in rows]

    async def key_changes_among(self, ids: list[int]) -> list[tuple[int, str, float]]:
        if not ids:
            return []
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id, key_id, at FROM audit_log WHERE id = ANY($1::bigint[]) ORDER BY id", ids
            )
        return [(int(r["id"]), r["key_id"] or "", r["at"].timestamp()) for r in rows]


# --- helpers ---------------------------------------------------------------------------------------


def _conflict(exc: asyncpg.IntegrityConstraintViolationError, record: KeyRecord) -> ValueError:
    """A clear error for a key that clashes with a stored one; never shows the digest."""
    constraint = getattr(exc, "constraint_name", None) or ""
    clash = None
    if isinstance(exc, asyncpg.UniqueViolationError) and constraint == "api_keys_digest_key":
        clash = "digest"
    elif isinstance(exc, asyncpg.UniqueViolationError) and constraint == "api_keys_pkey":
        clash = "id"
    elif isinstance(exc, asyncpg.ForeignKeyViolationError):
        clash = "reference"
    return key_conflict(record.id, clash, describe(exc))


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


def _key_params(r: KeyRecord) -> tuple[Any, ...]:
    return key_values(r, as_is, list)


def _update_params(r: KeyRecord) -> tuple[Any, ...]:
    values = dict(zip(KEY_COLUMNS, _key_params(r), strict=True))
    return (r.id, *(values[c] for c in MUTABLE_KEY_COLUMNS), values["last_used_at"])


def _key_from_row(row: Any) -> KeyRecord:
    return key_from_row(row, as_is, list)


def _audit_params(e: AuditEntry) -> tuple[Any, ...]:
    return audit_values(e, as_is)


def _audit_from_row(row: Any) -> AuditEntry:
    return audit_from_row(row, as_is)
