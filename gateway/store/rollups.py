"""What both SQL stores share about the usage rollups and the reports read from them.

A rollup folds whole hours and days before the current ones and purges raw rows by whole hours; a
report reads the raw rows it still has and the rollups for the range they no longer cover, grouped
the same way over both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.store.base import UsageReport
from gateway.store.migrate import require_aware


def floor_hour(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def floor_day(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def rollup_bounds(now: datetime, retention_seconds: float) -> tuple[datetime, datetime, datetime | None]:
    """The hours and days a rollup at `now` may fold (those before the current hour and day), and
    where raw rows start to be kept: the hour of now - retention (None: a retention beyond the
    calendar keeps everything). Purging whole hours keeps the rollups and the raw rows disjoint."""
    now = require_aware(now, "now")
    if not math.isfinite(retention_seconds) or retention_seconds < 0:
        raise ValueError("the usage retention must be a finite number of seconds, zero or more")
    try:
        cutoff: datetime | None = floor_hour(now - timedelta(seconds=retention_seconds))
    except OverflowError:
        cutoff = None
    return floor_hour(now), floor_day(now), cutoff


def rollup_range(first_hour: datetime, raw_from: datetime | None) -> dict[str, datetime]:
    """The part of a report that comes from rollups: the hours [h0, raw_from) the raw table no longer
    covers, of which the whole days [d0, d1) are read from the daily rollups. A `since` inside a
    rolled-up hour counts that whole hour."""
    end = raw_from if raw_from is not None and raw_from > first_hour else first_hour
    d0 = floor_day(first_hour)
    if d0 < first_hour:
        d0 += timedelta(days=1)
    d1 = floor_day(end)
    if d1 <= d0:
        d0 = d1 = first_hour  # no whole day: everything from the hourly rollups
    return {"h0": first_hour, "raw_from": end, "d0": d0, "d1": d1}


def report_groups(raw_day: str, rollup_day: str) -> tuple[dict[str, str], dict[str, str]]:
    """The SQL of each report group ("key", "owner", "route", "day") over raw rows and over rollup
    rows ('' there is a missing key, owner or route), given the dialect's YYYY-MM-DD of a raw row's
    `at` and of a rollup row's `bucket`."""
    raw = {
        "key": "coalesce(key_id, '-')",
        "owner": "coalesce(owner, '-')",
        "route": "coalesce(route, '-')",
        "day": raw_day,
    }
    rollup = {
        "key": "coalesce(nullif(key_id, ''), '-')",
        "owner": "coalesce(nullif(owner, ''), '-')",
        "route": "coalesce(nullif(route, ''), '-')",
        "day": rollup_day,
    }
    return raw, rollup


def split_taken(taken: Iterable[Sequence[Any]], raw_from: Any) -> tuple[list[Any], list[Any], list[Any]]:
    """The (grain, bucket) pairs a rollup took, as (hours, whole days, partial days). A bucket is its
    start: a datetime in PostgreSQL, its fixed-width text in SQLite; both compare in time order.
    Hours and days whose raw rows are all still stored are computed from them; a day that lost raw
    rows already is summed from its hours. (Older hours got their late rows from FOLD_LATE.)"""
    hours = sorted(b for g, b in taken if g == "hour" and (raw_from is None or b >= raw_from))
    days = sorted(b for g, b in taken if g == "day")
    whole = [d for d in days if raw_from is None or d >= raw_from]
    return hours, whole, [d for d in days if d not in whole]


def reports(rows: Iterable[Sequence[Any]]) -> list[UsageReport]:
    """Report rows of either store's report query: group, requests, errors, bytes in and out, the
    three latency percentiles, and the refusals per code as a JSON object."""
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
