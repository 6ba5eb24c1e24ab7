"""The plain-SQL migrations shipped as package data, and what both SQL backends share about them.

Migrations live in gateway/store/migrations/<dialect>/NNNN_name.sql. They are applied in file-name
order, each in its own transaction together with its row in `schema_migrations`, which the runner of
each backend creates and maintains (the files themselves never touch it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from importlib import resources

DIALECTS = ("sqlite", "postgres")

_NAME = re.compile(r"(\d{4}_[a-z0-9_]+)\.sql")

# The api_keys columns in KeyRecord field order; the migrations define them.
KEY_COLUMNS = (
    "id",
    "owner",
    "name",
    "env",
    "digest",
    "pepper_version",
    "hint",
    "scopes",
    "allow_ips",
    "limits",
    "status",
    "created_at",
    "expires_at",
    "revoked_at",
    "revoke_reason",
    "rotated_to",
    "rotated_from",
    "grace_until",
    "last_used_at",
)

# What update_key writes: everything but the identity and the creation time. last_used_at is written
# separately, never moving back (see touch).
MUTABLE_KEY_COLUMNS = tuple(c for c in KEY_COLUMNS if c not in ("id", "created_at", "last_used_at"))

AUDIT_COLUMNS = ("id", "at", "action", "actor", "source_ip", "key_id", "change")


@dataclass(frozen=True, slots=True)
class Migration:
    name: str  # the file name without .sql, as recorded in schema_migrations
    sql: str


def list_migrations(dialect: str) -> list[Migration]:
    """The migrations for a dialect ("sqlite" or "postgres"), in the order they must be applied."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown migration dialect {dialect!r}")
    folder = resources.files("gateway.store").joinpath("migrations").joinpath(dialect)
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _NAME.fullmatch(entry.name)
        if match is None or not entry.is_file():
            continue
        found.append(Migration(match.group(1), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.name)
    if not found:
        raise RuntimeError(f"no {dialect} migrations found in the package: is it installed with its data?")
    return found


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dump_json(value: object) -> str:
    """JSON text for a list field or an audit change (datetimes become ISO-8601 text)."""
    return json.dumps(value, default=_json_default, ensure_ascii=False, separators=(",", ":"))


def require_aware(value: datetime, what: str) -> datetime:
    """The datetime itself, if it carries a time zone; the store never guesses one."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime")
    return value
