"""The usage records, reports and rollups of the SQLite store: a mixin of SQLiteStore.

Usage records are written with executemany on the worker thread; the statements and the report
query are in sqlite_usage_sql.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.store.base import StoreUnavailable, UsageReport
from gateway.store.migrate import require_aware
from gateway.store.rollups import floor_hour, rollup_bounds, rollup_range
from gateway.store.sqlite_usage_process import UsageProcess
from gateway.store.sqlite_usage_sql import (
    DAILY_FROM_HOURLY,
    DAILY_FROM_RAW,
    FOLD_LATE,
    HOURLY_FROM_RAW,
    INSERT_USAGE,
    MARK_USAGE,
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

        rows = await self._run(report)
        return [
            UsageReport(
                group=str(group),
                requests=int(requests),
                errors=int(errors),
                refusals={str(k): int(v) for k, v in json.loads(refusals or "{}").items()},
                bytes_in=int(bytes_in),
                bytes_out=int(bytes_out),
                p50_ms=p50,
                p95_ms=p95,
                p99_ms=p99,
            )
            for group, requests, errors, bytes_in, bytes_out, p50, p95, p99, refusals in rows
        ]

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


CHUNK = 100  # records: about a millisecond of inserting


def _no_pause() -> None:
    return None


def write_records(
    conn: sqlite3.Connection, records: list[UsageRecord], path: str, pause: Callable[[], None] = _no_pause
) -> None:
    """One batch in one transaction; runs on the store's thread or in the usage writer process,
    which passes a `pause` to call between chunks of CHUNK records."""
    try:
        with write_transaction(conn):
            for i in range(0, len(records), CHUNK):
                conn.executemany(INSERT_USAGE, records[i : i + CHUNK])
                pause()
            conn.executemany(MARK_USAGE, _marks(records))
    except (sqlite3.Error, ValueError, TypeError, OverflowError) as exc:
        # Only the kind of error: the message could quote a record.
        raise StoreUnavailable(
            f"SQLite store {path}: a usage batch of {len(records)} records was not stored ({type(exc).__name__})"
        ) from None


def _second(at: float) -> int:
    """The stored time's whole second: the fraction rounded to the microsecond may carry."""
    whole = int(at)
    return whole + (round((at - whole) * 1e6) >= 1_000_000)


def _marks(records: list[UsageRecord]) -> list[tuple[str, str]]:
    """The hour and day buckets the records fall in, rounded to the microsecond as INSERT_USAGE
    stores their time. Records of a batch share one or two hours: one cheap pass over their times."""
    hours = {_second(r[1]) // 3600 for r in records}
    texts = {ts(datetime.fromtimestamp(h * 3600, UTC)) for h in hours}
    days = {t[:10] + "T00:00:00.000000Z" for t in texts}
    return sorted([("day", d) for d in days] + [("hour", h) for h in texts])


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
    # Buckets whose raw rows are all still stored are computed from them; older hours got their late
    # rows above, and a day that lost raw rows already is summed from its hours.
    hours = sorted(b for g, b in taken if g == "hour" and (raw_from is None or b >= raw_from))
    _refold(conn, "usage_hourly", hours, timedelta(hours=1), HOURLY_FROM_RAW)
    days = sorted(b for g, b in taken if g == "day")
    whole = [d for d in days if raw_from is None or d >= raw_from]
    _refold(conn, "usage_daily", whole, timedelta(days=1), DAILY_FROM_RAW)
    _refold(conn, "usage_daily", [d for d in days if d not in whole], timedelta(days=1), DAILY_FROM_HOURLY)
    new_from = raw_from
    if cutoff is not None and (raw_from is None or ts(cutoff) > raw_from):
        new_from = ts(cutoff)
        conn.execute("DELETE FROM usage_records WHERE at < ?", (new_from,))
    conn.execute(
        "UPDATE usage_rollup_state SET hours_to = ?, days_to = ?, raw_from = ? WHERE id = 1",
        (max(old_hours or bounds[0], bounds[0]), max(old_days or bounds[1], bounds[1]), new_from),
    )
