"""Key and audit rows as both SQL stores write and read them, in the column order of gateway.store.migrate.

Each store passes how its dialect holds a time (fixed-width UTC text for SQLite, timestamptz for
PostgreSQL) and a list field (JSON text, text[]), and how it marks a parameter (? or $n); everything
else is written, read and queried the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from gateway.keys.model import AuditEntry, KeyRecord
from gateway.store.migrate import AUDIT_COLUMNS, KEY_COLUMNS, dump_json, require_aware

# An aware datetime as the dialect stores it, and back (None stays None).
Stamp = Callable[[datetime], Any]
FromStamp = Callable[[Any], datetime | None]

# A placeholder of the dialect: its text for the nth parameter (1-based).
Mark = Callable[[int], str]

# Statements built from the fixed column lists in gateway.store.migrate; values are always parameters.
SELECT_KEY = f"SELECT {', '.join(KEY_COLUMNS)} FROM api_keys"  # noqa: S608
_SELECT_AUDIT = f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit_log"  # noqa: S608


def as_is(value: Any) -> Any:
    """For a dialect whose driver stores and returns the value itself."""
    return value


def insert_key_sql(mark: Mark) -> str:
    """The INSERT of a new api_keys row; parameters: the key_values."""
    marks = ", ".join(mark(i) for i in range(1, len(KEY_COLUMNS) + 1))
    return f"INSERT INTO api_keys ({', '.join(KEY_COLUMNS)}) VALUES ({marks})"  # noqa: S608


def key_values(r: KeyRecord, stamp: Stamp, listed: Callable[[list[str]], Any]) -> tuple[Any, ...]:
    """The api_keys values of a record, in KEY_COLUMNS order; ValueError for a naive datetime."""

    def optional(value: datetime | None, what: str) -> Any:
        return None if value is None else stamp(require_aware(value, what))

    return (
        r.id,
        r.owner,
        r.name,
        r.env,
        bytes(r.digest),
        r.pepper_version,
        r.hint,
        listed(list(r.scopes)),
        listed(list(r.allow_ips)),
        listed(list(r.limits)),
        r.status,
        stamp(require_aware(r.created_at, "created_at")),
        optional(r.expires_at, "expires_at"),
        optional(r.revoked_at, "revoked_at"),
        r.revoke_reason,
        r.rotated_to,
        r.rotated_from,
        optional(r.grace_until, "grace_until"),
        optional(r.last_used_at, "last_used_at"),
    )


def key_from_row(row: Iterable[Any], when: FromStamp, listed: Callable[[Any], list[str]]) -> KeyRecord:
    """The record of an api_keys row selected in KEY_COLUMNS order."""
    v = dict(zip(KEY_COLUMNS, row, strict=True))
    created = when(v["created_at"])
    assert created is not None
    return KeyRecord(
        id=v["id"],
        owner=v["owner"],
        name=v["name"],
        env=v["env"],
        digest=bytes(v["digest"]),
        pepper_version=int(v["pepper_version"]),
        hint=v["hint"],
        scopes=tuple(listed(v["scopes"])),
        allow_ips=tuple(listed(v["allow_ips"])),
        limits=tuple(listed(v["limits"])),
        status=v["status"],
        created_at=created,
        expires_at=when(v["expires_at"]),
        revoked_at=when(v["revoked_at"]),
        revoke_reason=v["revoke_reason"],
        rotated_to=v["rotated_to"],
        rotated_from=v["rotated_from"],
        grace_until=when(v["grace_until"]),
        last_used_at=when(v["last_used_at"]),
    )


def audit_values(e: AuditEntry, stamp: Stamp) -> tuple[Any, ...]:
    """The values of an audit_log insert: at, action, actor, source_ip, key_id, change."""
    return (
        stamp(require_aware(e.at, "audit time")),
        e.action,
        e.actor,
        e.source_ip,
        e.key_id,
        dump_json(e.change),
    )


def audit_from_row(row: Iterable[Any], when: FromStamp) -> AuditEntry:
    """The entry of an audit_log row selected in AUDIT_COLUMNS order."""
    entry_id, at, action, actor, source_ip, key_id, change = row
    stamped = when(at)
    assert stamped is not None
    return AuditEntry(
        id=int(entry_id),
        at=stamped,
        action=action,
        actor=actor,
        source_ip=source_ip,
        key_id=key_id,
        change=json.loads(change),
    )


def audit_query(
    since: datetime | None, key_id: str | None, limit: int, stamp: Stamp, mark: Mark
) -> tuple[str, list[Any]]:
    """The audit_log query of list_audit (newest first; since a time, of one key, if given) and its
    parameters."""
    where: list[str] = []
    params: list[Any] = []
    if since is not None:
        params.append(stamp(require_aware(since, "since")))
        where.append(f"at >= {mark(len(params))}")
    if key_id is not None:
        params.append(key_id)
        where.append(f"key_id = {mark(len(params))}")
    sql = _SELECT_AUDIT
    if where:
        sql += " WHERE " + " AND ".join(where)
    params.append(limit)
    sql += f" ORDER BY at DESC, id DESC LIMIT {mark(len(params))}"
    return sql, params


def key_conflict(key_id: str, clash: str | None, detail: str) -> ValueError:
    """A clear error for a key that clashes with a stored one ("digest", "id" or "reference" for a
    rotated_to/rotated_from naming no key; None: another constraint, told by `detail`). Never shows
    the digest."""
    if clash == "digest":
        return ValueError(f"cannot store key {key_id!r}: a key with the same digest already exists")
    if clash == "id":
        return ValueError(f"a key with id {key_id!r} already exists")
    if clash == "reference":
        return ValueError(f"key {key_id!r}: rotated_to/rotated_from name a key that does not exist")
    return ValueError(f"key {key_id!r} violates a store constraint: {detail}")
