"""The usage records, reports and rollups of the SQLite store: a mixin of SQLiteStore.

Usage batches are written by a child process (sqlite_usage_process); reports and rollups run on the
writer thread. The statements and the report query are in sqlite_usage_sql.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta
from typing import Any

from gateway.store.base import StoreUnavailable, UsageReport
from gateway.store.migrate import require_aware
from gateway.store.rollups import floor_hour, reports, rollup_bounds, rollup_range, split_taken
from gateway.store.sqlite_usage_process import UsageProcess, write_records
from gateway.store.sqlite_usage_sql import (
    DAILY_FROM_HOURLY,
    DAILY_FROM_RAW,
    FOLD_LATE,
    HOURLY_FROM_RAW,
    PENDING,
    report_sql,
)
from gateway.store.sqlite_worker import MEMORY, SQLiteWorker, from_ts, ts, write_transaction
from gateway.usage.record import UsageRecord


class SQLiteUsage(SQLiteWorker):
    """The UsageStore methods of SQLiteStore."""

    _usage_process: UsageProcess | None = None

    def _usage_writer(self) -> UsageProcess:
        # Batches go to a child process: a writer thread here, however little of the GIL it took,
        # stalled the event loop for milliseconds per batch (bench/usage_micro.py).
        if self._writer is None:
            raise StoreUnavailable("the SQLite store is not open")
        if self._usage_process is None:
            self._usage_process = UsageProcess(self.path, self.busy_timeout)
        return self._usage_process

    async def start_usage_writes(self) -> None:
        if self.path != MEMORY:  # an in-memory database cannot be shared with another process
            await self._usage_writer().start()

    async def write_usage(self, records: list[UsageRecord]) -> None:
        if not records:
            return
        if self.path != MEMORY:
            await self._usage_writer().write(records)  # starts the child if need be
            return
        path = self.path
        await self._run(lambda conn: write_records(conn, records, path))

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

        def report(conn: sqlite3.Connection) -> list[Any]:
            conn.execute("BEGIN")  # one snapshot for the state and the report
            try:
                raw_from = from_ts(_rollup_state(conn)[2])
                params = {
                    "since": ts(since),
                    "key_id": key_id,
                    "owner": owner,
                    **{k: ts(v) for k, v in rollup_range(first_hour, raw_from).items()},
                }
                return conn.execute(sql, params).fetchall()
            finally:
                conn.execute("COMMIT")

        return reports(await self._run(report))

    async def rollup_usage(self, now: datetime, retention_seconds: float) -> None:
        hours_to, days_to, cutoff = rollup_bounds(now, retention_seconds)

        def rollup(conn: sqlite3.Connection) -> None:
            with write_transaction(conn):
                _rollup(conn, hours_to, days_to, cutoff)

        await self._run(rollup)

    async def count_usage(self) -> int:
        def count(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT count(*) FROM usage_records").fetchone()[0])

        return await self._run(count)


# --- helpers (they run on the worker thread) -------------------------------------------------------


def _rollup_state(conn: sqlite3.Connection) -> tuple[str | None, str | None, str | None]:
    row = conn.execute("SELECT hours_to, days_to, raw_from FROM usage_rollup_state WHERE id = 1").fetchone()
    return (row[0], row[1], row[2]) if row is not None else (None, None, None)


def _refold(
    conn: sqlite3.Connection, table: str, buckets: list[str], step: timedelta, statements: tuple[str, ...]
) -> None:
    """Replace the rollup rows of these buckets with ones computed by `statements`."""
    if not buckets:
        return
    keys = [(b,) for b in buckets]
    conn.executemany(f"DELETE FROM {table} WHERE bucket = ?", keys)  # noqa: S608
    conn.executemany(f"DELETE FROM {table}_refusals WHERE bucket = ?", keys)  # noqa: S608
    params = [{"bucket": b, "lo": b, "hi": ts(datetime.fromisoformat(b) + step)} for b in buckets]
    for statement in statements:
        conn.executemany(statement, params)


def _rollup(conn: sqlite3.Connection, hours_to: datetime, days_to: datetime, cutoff: datetime | None) -> None:
    """One rollup, inside a write transaction (so no write runs concurrently)."""
    old_hours, old_days, raw_from = _rollup_state(conn)
    bounds = (ts(hours_to), ts(days_to))
    taken = conn.execute(f"SELECT grain, bucket {PENDING}", bounds).fetchall()
    conn.execute(f"DELETE {PENDING}", bounds)
    if raw_from is not None:
        for statement in FOLD_LATE:
            conn.execute(statement, {"raw_from": raw_from})
    hours, whole, partial = split_taken(taken, raw_from)
    _refold(conn, "usage_hourly", hours, timedelta(hours=1), HOURLY_FROM_RAW)
    _refold(conn, "usage_daily", whole, timedelta(days=1), DAILY_FROM_RAW)
    _refold(conn, "usage_daily", partial, timedelta(days=1), DAILY_FROM_HOURLY)
    new_from = raw_from
    if cutoff is not None and (raw_from is None or ts(cutoff) > raw_from):
        new_from = ts(cutoff)
        conn.execute("DELETE FROM usage_records WHERE at < ?", (new_from,))
    conn.execute(
        "UPDATE usage_rollup_state SET hours_to = ?, days_to = ?, raw_from = ? WHERE id = 1",
        (max(old_hours or bounds[0], bounds[0]), max(old_days or bounds[1], bounds[1]), new_from),
    )
