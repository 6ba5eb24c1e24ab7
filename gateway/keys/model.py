"""The stored key record and the principal a request carries once authenticated."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import UTC, datetime

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class KeyRecord:
    """A key as stored: never its raw value, only its digest and a display hint."""

    id: str
    owner: str
    name: str
    env: str
    digest: bytes
    pepper_version: int
    hint: str
    # Tuples, not lists: a tuple of strings drops out of the garbage collector's sight, and a
    # process with 10^5 cached keys would otherwise walk three more containers per key in each
    # full collection (bench `keys_100k`).
    scopes: tuple[str, ...] = ()
    allow_ips: tuple[str, ...] = ()
    limits: tuple[str, ...] = ()
    status: str = "active"  # active | suspended | revoked
    created_at: datetime = field(default_factory=utcnow)
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    revoke_reason: str | None = None
    rotated_to: str | None = None
    rotated_from: str | None = None
    grace_until: datetime | None = None
    last_used_at: datetime | None = None

    def effective_expiry(self) -> datetime | None:
        """A rotated key dies at the end of its grace, never after its own expiry."""
        ends = [t for t in (self.expires_at, self.grace_until) if t is not None]
        return min(ends) if ends else None

    def public(self) -> dict[str, object]:
        """The fields shown by `keys list|show` and the admin API: no digest, no secret."""
        exp = self.effective_expiry()
        return {
            "id": self.id,
            "name": self.name,
            "owner": self.owner,
            "env": self.env,
            "scopes": list(self.scopes),
            "allow_ips": list(self.allow_ips),
            "limits": list(self.limits),
            "status": self.display_status(),
            "hint": self.hint,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(exp),
            "revoked_at": _iso(self.revoked_at),
            "revoke_reason": self.revoke_reason,
            "rotated_to": self.rotated_to,
            "rotated_from": self.rotated_from,
            "last_used_at": _iso(self.last_used_at),
        }

    def display_status(self, now: datetime | None = None) -> str:
        if self.status in ("revoked", "suspended"):
            return self.status
        exp = self.effective_expiry()
        if exp is not None and exp <= (now or utcnow()):
            return "expired"
        if self.rotated_to:
            return "rotating"
        return "active"


def _iso(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t else None


@dataclass(slots=True)
class AuditEntry:
    action: str  # create | update | revoke | rotate | auth_failed
    actor: str
    source_ip: str
    key_id: str | None
    change: dict[str, object]
    at: datetime = field(default_factory=utcnow)
    id: int | None = None

    def public(self) -> dict[str, object]:
        return {
            "id": self.id,
            "at": _iso(self.at),
            "action": self.action,
            "actor": self.actor,
            "source_ip": self.source_ip,
            "key_id": self.key_id,
            "change": self.change,
        }
