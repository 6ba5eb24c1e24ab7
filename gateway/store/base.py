"""The KeyStore interface. Every implementation passes the same contract tests (tests/store/)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from datetime import datetime
from typing import NamedTuple

from gateway.keys.model import AuditEntry, KeyRecord
from gateway.usage.record import UsageRecord


class StaleKey(Exception):
    """The key's status changed since it was read (a revoke elsewhere, say): the write was not made."""


class StoreUnavailable(Exception):
    """The store could not be reached or did not answer; callers decide whether stale data may serve."""


class UsageReport(NamedTuple):
    """One row of a usage report, grouped by key, owner, route or day."""

    group: str
    requests: int
    errors: int  # 5xx answers
    refusals: dict[str, int]  # refusal code -> count
    bytes_in: int
    bytes_out: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class KeyStore(ABC):
    """Keys by digest and id, and the audit trail. Every write that changes a key is one transaction
    together with its audit entry: either both are stored or neither is."""

    @abstractmethod
    async def open(self) -> None:
        """Connect and apply pending migrations."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def migrate(self) -> list[str]:
        """Apply the plain-SQL migrations not yet applied, in order; return their names."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""

    @abstractmethod
    async def find_by_digests(self, digests: list[bytes]) -> KeyRecord | None:
        """The key whose stored digest is one of these (one per pepper version), or None."""

    @abstractmethod
    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    @abstractmethod
    async def list_keys(self, owner: str | None = None) -> list[KeyRecord]:
        """Keys ordered by creation time, oldest first."""

    @abstractmethod
    async def insert_key(self, record: KeyRecord, audit: AuditEntry) -> None:
        """Store a new key and its audit entry; ValueError if the id or digest exists."""

    @abstractmethod
    async def update_key(
        self, record: KeyRecord, audit: AuditEntry | None, expect_status: str | None = None
    ) -> None:
        """Write every mutable field of an existing key (and the audit entry, if any); KeyError if absent.

        With `expect_status`, the write happens only if the stored status is still that one (checked
        and written in one transaction); otherwise StaleKey, and nothing is written."""

    @abstractmethod
    async def rotate(self, old: KeyRecord, new: KeyRecord, audit: AuditEntry) -> None:
        """Insert the successor and update the old key in one transaction; StaleKey unless the old key
        is still active."""

    @abstractmethod
    async def set_digest(self, key_id: str, digest: bytes, pepper_version: int) -> None:
        """Move one key to another pepper, touching no other field (a concurrent revoke must stand)."""

    @abstractmethod
    async def touch(self, last_used: dict[str, datetime]) -> None:
        """Record last use per key id, batched; a stored later time is never moved back."""

    @abstractmethod
    async def add_audit(self, entry: AuditEntry) -> None: ...

    @abstractmethod
    async def list_audit(
        self, since: datetime | None = None, key_id: str | None = None, limit: int = 1000
    ) -> list[AuditEntry]:
        """Entries newest first."""

    @abstractmethod
    async def key_changes(self, after_id: int, limit: int = 1000) -> list[tuple[int, str, float]]:
        """(audit id, key id or "", epoch time written) of the audit entries with an id past
        `after_id`, oldest first, at most `limit`: every change to a key is audited in its own
        transaction, so this is the feed other processes read changes from (keys/changes.py).
        `after_id` -1: the newest entry's id only, as (id, "", 0.0), where a reader starts."""

    @abstractmethod
    async def key_changes_among(self, ids: list[int]) -> list[tuple[int, str, float]]:
        """The same, for the entries with these ids that exist by now (ids a reader skipped: taken by
        a transaction that had not committed yet, or by one that rolled back)."""


class UsageStore(ABC):
    """Usage records, reports and rollups; the key stores implement it beside KeyStore."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""

    async def start_usage_writes(self) -> None:  # noqa: B027 - most stores need nothing
        """Get ready for write_usage before traffic comes (SQLite starts its writer process)."""

    @abstractmethod
    async def write_usage(self, records: list[UsageRecord]) -> None:
        """Store a batch in one transaction, off the event loop's critical path (a child process
        for SQLite, COPY for PostgreSQL). Idempotent: a record whose request_id is stored already is
        skipped, so replaying a batch after a crash never doubles it. Raise StoreUnavailable on
        failure."""

    @abstractmethod
    async def usage_report(
        self,
        since: datetime,
        by: str,
        key_id: str | None = None,
        owner: str | None = None,
    ) -> list[UsageReport]:
        """Requests, 5xx errors, refusals by code, bytes and latency percentiles since `since`,
        grouped `by` "key" | "owner" | "route" | "day", computed in SQL. Periods older than the raw
        retention come from the hourly/daily rollups."""

    @abstractmethod
    async def rollup_usage(self, now: datetime, retention_seconds: float) -> None:
        """Fold raw records into hourly and daily rollups (idempotent), then delete raw records older
        than the retention; rollups are kept."""

    @abstractmethod
    async def count_usage(self) -> int:
        """Raw records stored (tests and operators checking that nothing was lost)."""

