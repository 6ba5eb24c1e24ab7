"""Key management, shared by the CLI and the admin API: validate, change, audit, evict from the cache.

Every input is validated before anything is written, and each change is stored together with its
audit entry in one transaction, so a refused or failed call leaves nothing half-written.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Concatenate, ParamSpec, TypeVar

from gateway.clock import Clock
from gateway.keys.cache import KeyCache
from gateway.keys.digest import Peppers
from gateway.keys.format import ALPHABET, generate, hint
from gateway.keys.inputs import (
    Conflict,
    InvalidInput,
    KeyNotFound,
    check_duration,
    check_env,
    check_ips,
    check_key_id,
    check_limits,
    check_name,
    check_owner,
    check_scopes,
    parse_grace,
)
from gateway.keys.model import AuditEntry, KeyRecord
from gateway.store.base import KeyStore, StaleKey


def new_key_id() -> str:
    return "key_" + "".join(secrets.choice(ALPHABET) for _ in range(20))


P = ParamSpec("P")
R = TypeVar("R")


def _serialised(
    method: Callable[Concatenate[KeyService, P], Awaitable[R]],
) -> Callable[Concatenate[KeyService, P], Awaitable[R]]:
    """One read-modify-write of a key at a time in this process: each writes the whole record, so
    a revoke interleaved between another change's read and write would otherwise be undone."""

    async def serialised(service: KeyService, /, *args: P.args, **kwargs: P.kwargs) -> R:
        async with service._lock:
            return await method(service, *args, **kwargs)

    functools.update_wrapper(serialised, method)
    return serialised


class KeyService:
    def __init__(
        self,
        store: KeyStore,
        peppers: Peppers,
        prefix: str,
        clock: Clock,
        default_ttl: float | None,
        cache: KeyCache | None = None,
        propagation: float = 0.0,
    ) -> None:
        # How long a revocation waits before it returns: every process reading key changes from the
        # same store (keys/changes.py) has read it by then, so the key is refused everywhere "from now on".
        self.propagation = propagation
        self.store = store
        self.peppers = peppers
        self.prefix = prefix
        self.clock = clock
        self.default_ttl = default_ttl
        self.cache = cache
        self._lock = asyncio.Lock()

    def _expiry(self, ttl: str | None, no_expiry: bool) -> datetime | None:
        if no_expiry:
            return None
        seconds = check_duration("ttl", ttl) if ttl is not None else self.default_ttl
        return self.clock.now() + timedelta(seconds=seconds) if seconds else None

    def _mint(self, env: str) -> tuple[str, bytes]:
        raw = generate(self.prefix, env)
        return raw, self.peppers.current.digest(raw.encode())

    async def create(
        self,
        owner: str,
        *,
        name: str = "",
        env: str = "live",
        scopes: list[str] | None = None,
        allow_ips: list[str] | None = None,
        limits: list[str] | None = None,
        ttl: str | None = None,
        no_expiry: bool = False,
        actor: str = "cli",
        source_ip: str = "",
    ) -> tuple[KeyRecord, str]:
        """Create a key; the raw key is returned this once and is never stored."""
        record = KeyRecord(
            id=new_key_id(),
            owner=check_owner(owner),
            name=check_name(name),
            env=check_env(env),
            digest=b"",
            pepper_version=self.peppers.current.version,
            hint="",
            scopes=check_scopes(scopes or []),
            allow_ips=check_ips(allow_ips or []),
            limits=check_limits(limits or []),
            created_at=self.clock.now(),
            expires_at=self._expiry(ttl, no_expiry),
        )
        raw, record.digest = self._mint(env)
        record.hint = hint(raw)
        change = {k: v for k, v in record.public().items() if k in ("owner", "name", "env", "scopes", "allow_ips", "limits", "expires_at")}
        await self.store.insert_key(record, AuditEntry("create", actor, source_ip, record.id, change, at=record.created_at))
        return record, raw

    async def get(self, key_id: str) -> KeyRecord:
        record = await self.store.get_key(check_key_id(key_id))
        if record is None:
            raise KeyNotFound(key_id)
        return record

    async def list_keys(self, owner: str | None = None) -> list[KeyRecord]:
        return await self.store.list_keys(owner)

    @_serialised
    async def update(
        self,
        key_id: str,
        *,
        name: str | None = None,
        scopes: list[str] | None = None,
        allow_ips: list[str] | None = None,
        limits: list[str] | None = None,
        ttl: str | None = None,
        no_expiry: bool = False,
        actor: str = "cli",
        source_ip: str = "",
    ) -> KeyRecord:
        """Replace each list given; `ttl` restarts the expiry from now."""
        values: dict[str, object] = {}
        if name is not None:
            values["name"] = check_name(name)
        if scopes is not None:
            values["scopes"] = check_scopes(scopes)
        if allow_ips is not None:
            values["allow_ips"] = check_ips(allow_ips)
        if limits is not None:
            values["limits"] = check_limits(limits)
        if ttl is not None or no_expiry:
            values["expires_at"] = self._expiry(ttl, no_expiry)
        record = await self.get(key_id)
        if record.status == "revoked":
            raise Conflict("a revoked key cannot be changed")
        before = record.public()
        for field, value in values.items():
            setattr(record, field, value)
        after = record.public()
        change: dict[str, object] = {k: {"from": before[k], "to": after[k]} for k in after if before[k] != after[k]}
        audit = AuditEntry("update", actor, source_ip, record.id, change, at=self.clock.now())
        await self._write(record, audit, record.status)
        self._evict(record.id)
        return record

    async def revoke(self, key_id: str, *, reason: str = "", actor: str = "cli", source_ip: str = "") -> KeyRecord:
        """The kill switch: refused from the next request on in this process at once, and in every
        other process sharing the store by the time this returns."""
        record, changed = await self._revoke(key_id, reason=reason, actor=actor, source_ip=source_ip)
        if changed and self.propagation:
            await asyncio.sleep(self.propagation)  # outside the lock: other changes need not wait
        return record

    @_serialised
    async def _revoke(self, key_id: str, *, reason: str, actor: str, source_ip: str) -> tuple[KeyRecord, bool]:
        if len(reason) > 500:
            raise InvalidInput("reason", "at most 500 characters")
        record = await self.get(key_id)
        if record.status == "revoked":
            return record, False
        was = record.status
        record.status = "revoked"
        record.revoked_at = self.clock.now()
        record.revoke_reason = reason or None
        audit = AuditEntry("revoke", actor, source_ip, record.id, {"reason": reason}, at=record.revoked_at)
        await self._write(record, audit, was)
        self._evict(record.id)
        return record, True

    @_serialised
    async def suspend(self, key_id: str, *, reason: str = "", actor: str = "cli", source_ip: str = "") -> KeyRecord:
        """Refuse the key with 403 key_suspended until an admin lifts it (anomaly action `suspend`)."""
        record = await self.get(key_id)
        if record.status != "active":
            return record
        record.status = "suspended"
        audit = AuditEntry("suspend", actor, source_ip, record.id, {"reason": reason[:500]}, at=self.clock.now())
        await self._write(record, audit, "active")
        self._evict(record.id)
        return record

    @_serialised
    async def unsuspend(self, key_id: str, *, actor: str = "cli", source_ip: str = "") -> KeyRecord:
        record = await self.get(key_id)
        if record.status != "suspended":
            raise Conflict(f"the key is {record.status}, not suspended")
        record.status = "active"
        await self._write(record, AuditEntry("unsuspend", actor, source_ip, record.id, {}, at=self.clock.now()), "suspended")
        self._evict(record.id)
        return record

    @_serialised
    async def rotate(
        self, key_id: str, *, grace: str = "24h", actor: str = "cli", source_ip: str = ""
    ) -> tuple[KeyRecord, str, KeyRecord]:
        """Issue a successor; the old key works until the grace ends, never past its own expiry."""
        grace_seconds = parse_grace(grace)
        old = await self.get(key_id)
        if old.status != "active":
            raise Conflict(f"a {old.status} key cannot be rotated")
        if old.rotated_to:
            raise Conflict(f"this key was already rotated to {old.rotated_to}; rotate that one")
        now = self.clock.now()
        new = KeyRecord(
            id=new_key_id(),
            owner=old.owner,
            name=old.name,
            env=old.env,
            digest=b"",
            pepper_version=self.peppers.current.version,
            hint="",
            scopes=old.scopes,
            allow_ips=old.allow_ips,
            limits=old.limits,
            created_at=now,
            expires_at=now + timedelta(seconds=self.default_ttl) if self.default_ttl and old.expires_at else None,
            rotated_from=old.id,
        )
        raw, new.digest = self._mint(old.env)
        new.hint = hint(raw)
        old.rotated_to = new.id
        old.grace_until = now + timedelta(seconds=grace_seconds)
        change = {"successor": new.id, "grace_until": old.public()["expires_at"]}
        try:
            await self.store.rotate(old, new, AuditEntry("rotate", actor, source_ip, old.id, change, at=now))
        except StaleKey as e:
            raise Conflict(f"{e}; nothing was changed") from None
        self._evict(old.id)
        return new, raw, old

    async def audit(
        self, since: str | None = None, key_id: str | None = None, limit: int = 1000, action: str | None = None
    ) -> list[AuditEntry]:
        start = self.clock.now() - timedelta(seconds=check_duration("since", since)) if since else None
        if action is None:
            return await self.store.list_audit(since=start, key_id=key_id, limit=limit)
        entries = await self.store.list_audit(since=start, key_id=key_id, limit=max(limit, 10_000))
        return [e for e in entries if e.action == action][:limit]

    async def _write(self, record: KeyRecord, audit: AuditEntry, expect_status: str) -> None:
        """Write unless another process changed the key's status since it was read."""
        try:
            await self.store.update_key(record, audit, expect_status)
        except StaleKey as e:
            raise Conflict(f"{e}; nothing was changed, read it again") from None

    def _evict(self, key_id: str) -> None:
        if self.cache is not None:
            self.cache.invalidate(key_id)
