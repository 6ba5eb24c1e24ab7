"""The usage records, reports and rollups of the PostgreSQL store: a mixin of PostgresStore.

Usage batches are copied (COPY, binary) into a temporary staging table and inserted from there with
ON CONFLICT (request_id) DO NOTHING, in one transaction. Rollups of several processes run one after
the other, under a transaction-level advisory lock. The statements and the report query are in
postgres_usage_sql.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from gateway.store.base import StoreUnavailable, UsageReport
from gateway.store.migrate import require_aware
from gateway.store.postgres_pool import PostgresPool, describe
from gateway.store.postgres_usage_sql import (
    DAILY_FROM_HOURLY,
    DAILY_FROM_RAW,
    FOLD_LATE,
    HOURLY_FROM_RAW,
    INSERT_USAGE,
    PURGE_USAGE,
    STAGE_USAGE,
    TAKE_PENDING,
    report_sql,
)
from gateway.store.rollups import floor_hour, reports, rollup_bounds, rollup_range, split_taken
from gateway.usage.record import FIELDS, UsageRecord

ROLLUP_TIMEOUT = 300.0  # seconds for one rollup statement (or waiting for another process's rollup)
REPORT_TIMEOUT = 60.0  # seconds for a usage report

# pg_advisory_xact_lock key serialising usage rollups across processes (an arbitrary constant).
ROLLUP_LOCK = 0x7573_6167_6572_6F6C


class PostgresUsage(PostgresPool):
    """The UsageStore methods of PostgresStore."""

    async def write_usage(self, records: list[UsageRecord]) -> None:
        if not records:
            return
        try:
            async with self._connection() as conn, conn.transaction():
                await conn.execute(STAGE_USAGE)
                await conn.copy_records_to_table("usage_staging", records=records, columns=FIELDS)
                await conn.execute(INSERT_USAGE)
        except StoreUnavailable:
            raise
        except Exception as exc:
            # Only the kind of error: a message (asyncpg's encoding errors, PostgreSQL's DETAIL) could
            # quote a record.
            raise StoreUnavailable(
                f"PostgreSQL at {self.where}: a usage batch of {len(records)} records was not stored "
                f"({type(exc).__name__})"
            ) from None

    async def usage_report(
        self,
        since: datetime,
        by: str,
        key_id: str | None = None,
        owner: str | None = None,
    ) -> list[UsageReport]:
        sql = report_sql(by, key_id, owner)
        since = require_aware(since, "since")
        first_hour = floor_hour(since)
        filters = [v for v in (key_id, owner) if v is not None]
        async with self._connection() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            raw_from = await conn.fetchval("SELECT raw_from FROM usage_rollup_state WHERE id = 1")
            span = rollup_range(first_hour, raw_from)
            rows = await conn.fetch(
                sql, since, span["h0"], span["raw_from"], span["d0"], span["d1"], *filters, timeout=REPORT_TIMEOUT
            )
        return reports(rows)

    async def rollup_usage(self, now: datetime, retention_seconds: float) -> None:
        hours_to, days_to, cutoff = rollup_bounds(now, retention_seconds)
        try:
            await self._rollup_usage(hours_to, days_to, cutoff)
        except asyncpg.PostgresError as exc:  # a deadlock, a serialization failure: try again later
            raise StoreUnavailable(f"PostgreSQL at {self.where}: usage rollup failed: {describe(exc)}") from exc

    async def _rollup_usage(self, hours_to: datetime, days_to: datetime, cutoff: datetime | None) -> None:
        """One rollup transaction; rollups of several processes run one after the other."""
        t = ROLLUP_TIMEOUT
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", ROLLUP_LOCK, timeout=t)
            state = await conn.fetchrow(
                "SELECT hours_to, days_to, raw_from FROM usage_rollup_state WHERE id = 1 FOR UPDATE", timeout=t
            )
            raw_from: datetime | None = state["raw_from"]
            taken = await conn.fetch(TAKE_PENDING, hours_to, days_to, timeout=t)
            if raw_from is not None:
                await conn.execute(FOLD_LATE, raw_from, timeout=t)
            hours, whole, partial = split_taken(taken, raw_from)
            for buckets, statements in (
                (hours, HOURLY_FROM_RAW),
                (whole, DAILY_FROM_RAW),
                (partial, DAILY_FROM_HOURLY),
            ):
                if buckets:
                    for statement in statements:
                        await conn.execute(statement, buckets, timeout=t)
            new_from = raw_from
            if cutoff is not None and (raw_from is None or cutoff > raw_from):
                new_from = cutoff
                await conn.execute(PURGE_USAGE, new_from, timeout=t)
            await conn.execute(
                "UPDATE usage_rollup_state SET hours_to = GREATEST(hours_to, $1), "
                "days_to = GREATEST(days_to, $2), raw_from = $3 WHERE id = 1",
                hours_to,
                days_to,
                new_from,
                timeout=t,
            )

    async def count_usage(self) -> int:
        async with self._connection() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM usage_records"))
