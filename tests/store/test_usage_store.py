"""The UsageStore contract: every test runs on SQLite and on PostgreSQL (fixture `store`).

Expected reports are computed here in Python from the records written. Latency percentiles follow
PostgreSQL's percentile_cont (linear interpolation between the closest ranks, statistics.quantiles'
"inclusive" method), which the SQLite store reproduces operation for operation: both stores must
return exactly the reference values whenever a group's rows are all still raw (or all in one
rollup bucket). Once raw rows are rolled up and purged, counts, errors, refusals and bytes stay
exact and percentiles become approximations (request-weighted means of bucket percentiles).
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.store import KeyStore, StoreUnavailable
from gateway.store.base import UsageReport, UsageStore
from gateway.usage.record import UsageRecord
from tests.store.conftest import StoreFactory

DAY1 = datetime(2024, 5, 1, tzinfo=UTC)
D1 = DAY1.timestamp()
HOUR = 3600.0
DAY = 86400.0
BYS = ("key", "owner", "route", "day")


@pytest.fixture
def usage(store: KeyStore) -> UsageStore:
    assert isinstance(store, UsageStore)
    return store


def rec(
    n: int,
    at: float,
    *,
    key: str | None = "k1",
    owner: str | None = "alice",
    route: str | None = "orders",
    status: int = 200,
    latency: float = 10.0,
    code: str | None = None,
    bytes_in: int = 100,
    bytes_out: int = 1000,
) -> UsageRecord:
    return UsageRecord(
        request_id=f"0190a0b0-0000-7000-8000-{n:012d}",
        at=at,
        key_id=key,
        owner=owner,
        env="test" if key is not None else None,
        route=route,
        method="GET",
        status=status,
        upstream_status=None if code else status,
        latency_ms=latency,
        upstream_ms=None if code else latency * 0.75,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        client_ip="192.0.2.10",
        error_code=code,
    )


# --- the reference --------------------------------------------------------------------------------


def percentile_cont(values: list[float], p: float) -> float:
    """PostgreSQL's percentile_cont: v[floor x] + (v[ceil x] - v[floor x]) * (x - floor x), x = p (n - 1)."""
    v = sorted(values)
    x = p * (len(v) - 1)
    lo, hi = math.floor(x), math.ceil(x)
    if hi == lo:
        return v[lo]
    return v[lo] + (v[hi] - v[lo]) * (x - lo)


def group_of(r: UsageRecord, by: str) -> str:
    if by == "day":
        return datetime.fromtimestamp(r.at, UTC).strftime("%Y-%m-%d")
    value = {"key": r.key_id, "owner": r.owner, "route": r.route}[by]
    return "-" if value is None else value


def expected(
    records: list[UsageRecord],
    by: str,
    since: datetime = DAY1 - timedelta(days=30),
    key_id: str | None = None,
    owner: str | None = None,
) -> list[UsageReport]:
    groups: dict[str, list[UsageRecord]] = defaultdict(list)
    for r in records:
        if r.at < since.timestamp():
            continue
        if (key_id is not None and r.key_id != key_id) or (owner is not None and r.owner != owner):
            continue
        groups[group_of(r, by)].append(r)
    rows = []
    for group, rs in groups.items():
        latencies = [r.latency_ms for r in rs]
        rows.append(
            UsageReport(
                group=group,
                requests=len(rs),
                errors=sum(1 for r in rs if r.status >= 500),
                refusals=dict(Counter(r.error_code for r in rs if r.error_code is not None)),
                bytes_in=sum(r.bytes_in for r in rs),
                bytes_out=sum(r.bytes_out for r in rs),
                p50_ms=percentile_cont(latencies, 0.5),
                p95_ms=percentile_cont(latencies, 0.95),
                p99_ms=percentile_cont(latencies, 0.99),
            )
        )
    if by == "day":
        return sorted(rows, key=lambda row: row.group)
    return sorted(rows, key=lambda row: (-row.requests, row.group))


def counts(rows: list[UsageReport]) -> list[tuple[object, ...]]:
    """What a rollup must keep exact: everything but the percentiles."""
    return [(r.group, r.requests, r.errors, r.refusals, r.bytes_in, r.bytes_out) for r in rows]


def test_reference_is_statistics_inclusive_quantiles() -> None:
    data = [12.5, 3.0, 7.25, 40.0, 18.0, 9.5, 21.0, 0.5]
    cuts = statistics.quantiles(data, n=100, method="inclusive")
    for p in (50, 95, 99):
        assert percentile_cont(data, p / 100) == pytest.approx(cuts[p - 1], rel=1e-12)


# --- writing ---------------------------------------------------------------------------------------


async def test_write_batch_and_count(usage: UsageStore) -> None:
    assert await usage.count_usage() == 0
    await usage.write_usage([])
    batch = [rec(i, D1 + i) for i in range(25)]
    await usage.write_usage(batch)
    assert await usage.count_usage() == 25
    assert await usage.usage_report(DAY1, "key") == expected(batch, "key")


async def test_rewriting_a_batch_stores_nothing_twice(usage: UsageStore) -> None:
    first = [rec(i, D1 + i, latency=float(i)) for i in range(10)]
    await usage.write_usage(first)
    await usage.write_usage(first)  # a replayed batch
    assert await usage.count_usage() == 10
    overlapping = first[5:] + [rec(i, D1 + i, latency=float(i)) for i in range(10, 15)]
    await usage.write_usage(overlapping)
    assert await usage.count_usage() == 15
    await usage.write_usage([rec(20, D1 + 20), rec(20, D1 + 20)])  # a duplicate inside one batch
    assert await usage.count_usage() == 16
    everything = [*first, *overlapping[5:], rec(20, D1 + 20)]
    assert await usage.usage_report(DAY1, "key") == expected(everything, "key")


async def test_a_batch_of_ten_thousand_is_fast(usage: UsageStore) -> None:
    batch = [
        rec(i, D1 + i * 0.25, key=f"k{i % 7}", latency=(i % 500) / 4, status=503 if i % 97 == 0 else 200)
        for i in range(10_000)
    ]
    await asyncio.wait_for(usage.write_usage(batch), timeout=15)
    assert await usage.count_usage() == 10_000
    await asyncio.wait_for(usage.write_usage(batch), timeout=15)  # all conflicts
    assert await usage.count_usage() == 10_000
    report = await usage.usage_report(DAY1, "key")
    assert report == expected(batch, "key")
    assert sum(r.requests for r in report) == 10_000


async def test_a_failed_batch_stores_nothing_and_shows_no_record(usage: UsageStore) -> None:
    good = rec(1, D1)
    bad = rec(2, D1)._replace(method=None, request_id="req-Secret-77", client_ip="203.0.113.77")
    with pytest.raises(StoreUnavailable) as caught:
        await usage.write_usage([good, bad])
    message = str(caught.value)
    for secret in ("req-Secret-77", "203.0.113.77", good.request_id):
        assert secret not in message
    assert caught.value.__cause__ is None  # the driver's error (which may quote values) is not chained
    assert await usage.count_usage() == 0


async def test_time_is_stored_to_the_microsecond_in_utc(usage: UsageStore) -> None:
    before = rec(1, D1 + DAY - 0.000001)  # 23:59:59.999999 on day 1
    after = rec(2, D1 + DAY)  # 00:00:00 on day 2
    await usage.write_usage([before, after])
    report = await usage.usage_report(DAY1, "day")
    assert [(r.group, r.requests) for r in report] == [("2024-05-01", 1), ("2024-05-02", 1)]
    since = datetime.fromtimestamp(D1 + DAY, UTC)
    assert [r.group for r in await usage.usage_report(since, "day")] == ["2024-05-02"]


# --- reports ---------------------------------------------------------------------------------------


def hand_made() -> list[UsageRecord]:
    t = D1 + 10 * HOUR
    rows = [
        # k1 (alice, orders): 7 requests, two 5xx, one refused
        rec(1, t + 1, latency=12.5, bytes_in=10, bytes_out=200),
        rec(2, t + 2, latency=3.0, bytes_in=20, bytes_out=300),
        rec(3, t + 3, latency=7.25, status=502, bytes_in=30, bytes_out=0),
        rec(4, t + 4, latency=40.0, bytes_in=40, bytes_out=400),
        rec(5, t + 5, latency=18.0, status=503, bytes_in=50, bytes_out=0),
        rec(6, t + 6, latency=9.5, bytes_in=60, bytes_out=600),
        rec(7, t + 7, latency=21.0, status=429, code="rate_limited", bytes_in=70, bytes_out=90),
        # k2 (alice, search): 3 requests
        rec(8, t + 8, key="k2", route="search", latency=100.0, bytes_in=1, bytes_out=5000),
        rec(9, t + 9, key="k2", route="search", latency=250.0, status=500, bytes_in=2, bytes_out=10),
        rec(10, t + 10, key="k2", route="search", latency=175.5, status=403, code="scope_denied", bytes_in=3),
        # no key: refused before authentication
        rec(11, t + 11, key=None, owner=None, latency=0.5, status=401, code="key_missing", bytes_out=60),
        rec(12, t + 12, key=None, owner=None, latency=0.25, status=401, code="key_missing", bytes_out=60),
        rec(13, t + 13, key=None, owner=None, route=None, latency=0.1, status=404, code="route_not_found"),
    ]
    # k3 (bob, orders) on the next day: latencies 1..11, refusals of two codes
    for i in range(11):
        code = "rate_limited" if i in (3, 8) else "quota_exceeded" if i == 5 else None
        status = 429 if code else 200
        rows.append(rec(20 + i, D1 + DAY + i * 60, key="k3", owner="bob", latency=float(i + 1), status=status, code=code))
    return rows


async def test_report_by_key(usage: UsageStore) -> None:
    data = hand_made()
    await usage.write_usage(data)
    report = await usage.usage_report(DAY1, "key")
    assert report == expected(data, "key")
    assert [r.group for r in report] == ["k3", "k1", "-", "k2"]  # by requests, then by name
    k3, k1, nokey, k2 = report
    assert (k1.requests, k1.errors, k1.refusals, k1.bytes_in, k1.bytes_out) == (7, 2, {"rate_limited": 1}, 280, 1590)
    # k1 latencies sorted: 3, 7.25, 9.5, 12.5, 18, 21, 40
    assert k1.p50_ms == 12.5
    assert k1.p95_ms == pytest.approx(21 + 0.7 * 19)  # rank 5.7
    assert k1.p99_ms == pytest.approx(21 + 0.94 * 19)  # rank 5.94
    assert (k2.requests, k2.errors, k2.refusals) == (3, 1, {"scope_denied": 1})
    assert (k2.p50_ms, k2.p95_ms) == (175.5, pytest.approx(175.5 + 0.9 * 74.5))
    assert (k3.requests, k3.errors, k3.refusals) == (11, 0, {"rate_limited": 2, "quota_exceeded": 1})
    assert (k3.p50_ms, k3.p95_ms, k3.p99_ms) == (6.0, 10.5, pytest.approx(10.9))
    assert (nokey.requests, nokey.refusals) == (3, {"key_missing": 2, "route_not_found": 1})
    assert nokey.p50_ms == 0.25


async def test_report_by_owner_route_and_day(usage: UsageStore) -> None:
    data = hand_made()
    await usage.write_usage(data)
    for by in ("owner", "route", "day"):
        assert await usage.usage_report(DAY1, by) == expected(data, by), by
    by_owner = {r.group: r for r in await usage.usage_report(DAY1, "owner")}
    assert by_owner["alice"].requests == 10
    assert by_owner["alice"].refusals == {"rate_limited": 1, "scope_denied": 1}
    assert by_owner["-"].requests == 3
    by_route = {r.group: r.requests for r in await usage.usage_report(DAY1, "route")}
    assert by_route == {"orders": 20, "search": 3, "-": 1}
    by_day = await usage.usage_report(DAY1, "day")
    assert [(r.group, r.requests, r.errors) for r in by_day] == [("2024-05-01", 13, 3), ("2024-05-02", 11, 0)]


async def test_report_filters_and_since(usage: UsageStore) -> None:
    data = hand_made()
    await usage.write_usage(data)
    assert await usage.usage_report(DAY1, "route", key_id="k1") == expected(data, "route", key_id="k1")
    assert await usage.usage_report(DAY1, "key", owner="alice") == expected(data, "key", owner="alice")
    assert await usage.usage_report(DAY1, "day", key_id="k2", owner="bob") == []
    # since: in another time zone, the same instant
    since = datetime(2024, 5, 1, 12, 0, 5, tzinfo=timezone(timedelta(hours=2)))  # 10:00:05Z
    report = await usage.usage_report(since, "key")
    assert report == expected(data, "key", since=since)
    assert {r.group: r.requests for r in report} == {"k3": 11, "k1": 3, "-": 3, "k2": 3}
    assert await usage.usage_report(DAY1 + timedelta(days=3), "key") == []


async def test_report_rejects_bad_arguments(usage: UsageStore) -> None:
    with pytest.raises(ValueError):
        await usage.usage_report(DAY1, "month")
    with pytest.raises(ValueError):
        await usage.usage_report(datetime(2024, 5, 1), "key")  # naive
    with pytest.raises(ValueError):
        await usage.rollup_usage(DAY1, -1)


# --- rollups ---------------------------------------------------------------------------------------


def spread(first: int, count: int, start: float, seconds: float, seed: int) -> list[UsageRecord]:
    """Records at random times in [start, start + seconds), over four keys (one of them missing)."""
    rng = random.Random(seed)
    keys = [("k1", "alice", "orders"), ("k2", "alice", "search"), ("k3", "bob", "orders"), (None, None, "orders")]
    rows = []
    for n in range(first, first + count):
        key, owner, route = rng.choice(keys)
        code = rng.choice([None, None, None, "rate_limited", "quota_exceeded"]) if key else "key_missing"
        status = (429 if code != "key_missing" else 401) if code else rng.choice([200, 200, 200, 201, 500, 502])
        rows.append(
            rec(
                n,
                start + round(rng.uniform(0, seconds), 3),
                key=key,
                owner=owner,
                route=route,
                status=status,
                code=code,
                latency=round(rng.uniform(0.5, 900), 2),
                bytes_in=rng.randint(0, 5000),
                bytes_out=rng.randint(0, 50000),
            )
        )
    return rows


def assert_sane_percentiles(rows: list[UsageReport], data: list[UsageRecord], by: str) -> None:
    for row in rows:
        latencies = [r.latency_ms for r in data if group_of(r, by) == row.group]
        assert row.p50_ms is not None and row.p95_ms is not None and row.p99_ms is not None
        assert min(latencies) <= row.p50_ms <= row.p95_ms <= row.p99_ms <= max(latencies)


async def test_rollup_keeps_every_request_after_the_raw_rows_are_purged(usage: UsageStore) -> None:
    data = spread(0, 900, D1, 3 * DAY, seed=1)  # three days
    # k7 is used on day 1 only, from one owner and route: one row of the daily rollup
    data += [rec(5000 + i, D1 + 600 + i * 997, key="k7", owner="dave", latency=(i * 37) % 101 + 0.5) for i in range(40)]
    await usage.write_usage(data)
    since = DAY1
    before = {by: await usage.usage_report(since, by) for by in BYS}
    for by in BYS:
        assert before[by] == expected(data, by)

    now = DAY1 + timedelta(days=3, minutes=30)
    await usage.rollup_usage(now, 36 * HOUR)  # raw rows kept from day 2, 12:00
    raw_from = D1 + DAY + 12 * HOUR
    kept = [r for r in data if r.at >= raw_from]
    assert 0 < await usage.count_usage() == len(kept) < len(data)

    after = {by: await usage.usage_report(since, by) for by in BYS}
    for by in BYS:
        assert counts(after[by]) == counts(expected(data, by)), by
        assert_sane_percentiles(after[by], data, by)
    # Day 1 comes from the daily rollups, computed from its raw rows: one daily row holds all of
    # k7, so its percentiles are exact. Day 3 is all raw: exact too.
    k7 = next(r for r in after["key"] if r.group == "k7")
    assert k7 == next(r for r in expected(data, "key") if r.group == "k7")
    assert after["day"][2] == expected(data, "day")[2]
    # the raw part alone is still exact
    raw_since = datetime.fromtimestamp(raw_from, UTC)
    assert await usage.usage_report(raw_since, "key") == expected(data, "key", since=raw_since)

    # rolling up again changes nothing
    await usage.rollup_usage(now, 36 * HOUR)
    assert await usage.count_usage() == len(kept)
    assert {by: await usage.usage_report(since, by) for by in BYS} == after


async def test_rollup_is_incremental_and_counts_late_rows(usage: UsageStore) -> None:
    data = spread(0, 400, D1, 2 * DAY, seed=2)
    await usage.write_usage(data)
    first = DAY1 + timedelta(days=2, minutes=30)
    await usage.rollup_usage(first, 12 * HOUR)  # raw rows kept from day 2, 12:00

    # A spool replayed late: rows older than the purge, rows of an hour rolled up already, new rows.
    late = [
        rec(1000, D1 + 5 * HOUR + 10, key="k1", latency=1.5, code="rate_limited", status=429),
        rec(1001, D1 + 5 * HOUR + 20, key="k9", owner="carol", latency=2.5, status=503),
        rec(1002, D1 + DAY + 13 * HOUR, key="k2", owner="alice", route="search", latency=3.5),
    ]
    fresh = spread(2000, 50, D1 + 2 * DAY, HOUR, seed=3)
    await usage.write_usage(late + fresh)
    await usage.write_usage(late)  # replayed twice while still raw: no effect
    everything = data + late + fresh
    for by in BYS:
        assert counts(await usage.usage_report(DAY1, by)) == counts(expected(everything, by)), by

    second = DAY1 + timedelta(days=2, hours=2, minutes=10)
    await usage.rollup_usage(second, 12 * HOUR)  # raw rows kept from day 2, 14:00
    raw_from = D1 + DAY + 14 * HOUR
    assert await usage.count_usage() == sum(1 for r in everything if r.at >= raw_from)
    after = {by: await usage.usage_report(DAY1, by) for by in BYS}
    for by in BYS:
        assert counts(after[by]) == counts(expected(everything, by)), by
        assert_sane_percentiles(after[by], everything, by)
    assert {r.group for r in after["owner"]} >= {"carol"}

    await usage.rollup_usage(second, 12 * HOUR)
    assert {by: await usage.usage_report(DAY1, by) for by in BYS} == after


async def test_rollup_of_an_empty_store_and_a_since_inside_the_rollups(usage: UsageStore) -> None:
    await usage.rollup_usage(DAY1, 0)
    assert await usage.usage_report(DAY1, "key") == []
    data = [rec(i, D1 + i * 600, latency=float(i)) for i in range(12)]  # two hours of day 1
    await usage.write_usage(data)
    await usage.rollup_usage(DAY1 + timedelta(hours=5), 0)  # everything before 05:00 is rolled up
    assert await usage.count_usage() == 0
    assert counts(await usage.usage_report(DAY1, "key")) == counts(expected(data, "key"))
    # A since inside a rolled-up hour counts that whole hour (a rollup does not know the minutes).
    inside = DAY1 + timedelta(hours=1, minutes=30)
    assert [r.requests for r in await usage.usage_report(inside, "key")] == [6]
    # An hour's rollup is one piece, so its percentiles are that hour's exact ones.
    second_hour = DAY1 + timedelta(hours=1)
    assert await usage.usage_report(second_hour, "key") == expected(data, "key", since=second_hour)


async def test_rollups_running_during_writes_lose_nothing(new_store: StoreFactory) -> None:
    writer, roller = new_store(), new_store()  # two stores on one database, as two gateway processes
    await writer.open()
    await roller.open()
    assert isinstance(writer, UsageStore) and isinstance(roller, UsageStore)
    now = DAY1 + timedelta(days=3)
    batches = [spread(i * 40, 40, D1, 3 * DAY, seed=100 + i) for i in range(30)]  # late rows too

    async def write() -> None:
        for batch in batches:
            await writer.write_usage(batch)
            await asyncio.sleep(0)

    async def roll() -> None:
        for _ in range(15):
            await roller.rollup_usage(now, 36 * HOUR)
            await asyncio.sleep(0.001)

    await asyncio.gather(write(), roll())
    await roller.rollup_usage(now, 36 * HOUR)
    everything = [r for batch in batches for r in batch]
    assert await roller.count_usage() == sum(1 for r in everything if r.at >= D1 + DAY + 12 * HOUR)
    for by in BYS:
        assert counts(await roller.usage_report(DAY1, by)) == counts(expected(everything, by)), by
