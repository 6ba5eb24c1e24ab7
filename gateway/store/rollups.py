"""What both SQL stores share about the usage rollups and the reports read from them.

A rollup folds whole hours and days before the current ones and purges raw rows by whole hours; a
report reads the raw rows it still has and the rollups for the range they no longer cover, grouped
the same way over both.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

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
