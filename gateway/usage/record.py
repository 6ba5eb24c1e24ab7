"""The usage record: one per request that reached the gateway, allowed or refused."""

from __future__ import annotations

from typing import NamedTuple


class UsageRecord(NamedTuple):
    request_id: str  # UUIDv7, also sent upstream as X-Request-ID; writes are idempotent on it
    at: float  # epoch seconds when the response ended
    key_id: str | None
    owner: str | None
    env: str | None
    route: str | None
    method: str
    status: int
    upstream_status: int | None
    latency_ms: float
    upstream_ms: float | None
    bytes_in: int
    bytes_out: int
    client_ip: str
    error_code: str | None


FIELDS = UsageRecord._fields
