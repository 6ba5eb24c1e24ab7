"""The usage SQL of the SQLite store: inserting records, rolling them up, reports.

Reports and rollups are computed in SQL: latency percentiles come from window functions (row_number
over latency_ms within a group) with the linear interpolation of PostgreSQL's percentile_cont, so
both stores report the same numbers.
"""

from __future__ import annotations

from gateway.store.rollups import report_groups
from gateway.usage.record import FIELDS

# A bucket is the text of its start: the hour or day prefix of a timestamp, completed with zeros.
_HOUR_OF = "substr({}, 1, 13) || ':00:00.000000Z'"
# A record is bound as it is, its epoch time (parameter 2) made the stored text here, to the
# microsecond: converting it in Python cost a third of a write. Whole seconds and the fraction are
# rounded apart, as datetime.fromtimestamp does, and a half goes to the even neighbour as there
# (SQLite's round() takes it away from zero): at today's epoch, time * 1e6 falls on a .5 tie often.
_SECONDS = "CAST(?2 AS INTEGER)"
_FRACTION = f"((?2 - {_SECONDS}) * 1000000)"
_FLOOR = f"CAST({_FRACTION} AS INTEGER)"
_MICROS = (  # 0..1000000: 1000000 carries into the seconds
    f"(CASE WHEN {_FRACTION} - {_FLOOR} = 0.5 THEN {_FLOOR} + {_FLOOR} % 2 "
    f"ELSE CAST(round({_FRACTION}) AS INTEGER) END)"
)
_AT_TEXT = (
    f"strftime('%Y-%m-%dT%H:%M:%S', {_SECONDS} + {_MICROS} / 1000000, 'unixepoch') "
    f"|| printf('.%06dZ', {_MICROS} % 1000000)"
)
# Idempotent on request_id only: INSERT OR IGNORE would also skip a row breaking NOT NULL, silently.
INSERT_USAGE = (
    f"INSERT INTO usage_records ({', '.join(FIELDS)}) "  # noqa: S608
    f"VALUES (?1, {_AT_TEXT}, {', '.join(f'?{i}' for i in range(3, len(FIELDS) + 1))}) "
    "ON CONFLICT (request_id) DO NOTHING"
)
MARK_USAGE = "INSERT OR IGNORE INTO usage_rollup_pending (grain, bucket) VALUES (?, ?)"
PENDING = "FROM usage_rollup_pending WHERE (grain = 'hour' AND bucket < ?) OR (grain = 'day' AND bucket < ?)"
_ROLLUP_KEYS = "bucket, key_id, owner, route"
_ROLLUP_COLUMNS = f"{_ROLLUP_KEYS}, requests, errors, bytes_in, bytes_out, p50_ms, p95_ms, p99_ms"
_PERCENTILES = (("p50_ms", "0.5"), ("p95_ms", "0.95"), ("p99_ms", "0.99"))


def _percentile(p: str) -> str:
    """percentile_cont(p) of latency_ms over a group, as PostgreSQL computes it: with the rows of the
    group ranked 0..m_ by latency (i_), x = p * m_; the result is v[floor x] + (v[ceil x] - v[floor x])
    * (x - floor x). The same double-precision operations in the same order, so the same value."""
    x = f"({p} * m_)"
    lo = f"CAST({x} AS INTEGER)"  # floor: x is never negative
    lo_v = f"max(CASE WHEN i_ = {lo} THEN latency_ms END)"
    hi_v = f"max(CASE WHEN i_ = {lo} + ({x} > {lo}) THEN latency_ms END)"
    return f"({lo_v} + ({hi_v} - {lo_v}) * max({x} - {lo}))"


def _stats(source: str, keys: str) -> str:
    """Requests, 5xx errors, bytes and latency percentiles of the rows of `source` (which has the
    columns `keys`, status, bytes_in, bytes_out, latency_ms), one row per group of `keys`."""
    percentiles = ", ".join(f"{_percentile(p)} AS {name}" for name, p in _PERCENTILES)
    return (
        f"SELECT {keys}, count(*) AS requests, sum(status >= 500) AS errors, sum(bytes_in) AS bytes_in, "  # noqa: S608
        f"sum(bytes_out) AS bytes_out, {percentiles} "
        f"FROM (SELECT *, row_number() OVER (PARTITION BY {keys} ORDER BY latency_ms) - 1 AS i_, "
        f"count(*) OVER (PARTITION BY {keys}) - 1 AS m_ FROM {source}) GROUP BY {keys}"
    )


def _combined(column: str) -> str:
    """A percentile over several pieces (rollup buckets, raw rows): exact when there is one piece,
    otherwise approximated by the request-weighted mean of the pieces' percentiles."""
    return f"CASE WHEN count(*) = 1 THEN max({column}) ELSE sum({column} * requests) / sum(requests) END"


def _raw_source(bucket: str, where: str) -> str:
    """Raw rows with the rollup keys ('' for a missing key, owner or route)."""
    return (
        f"(SELECT {bucket} AS bucket, coalesce(key_id, '') AS key_id, coalesce(owner, '') AS owner, "  # noqa: S608
        "coalesce(route, '') AS route, status, error_code, bytes_in, bytes_out, latency_ms "
        f"FROM usage_records WHERE {where})"
    )


def _refusals_from(source: str) -> str:
    return (
        f"SELECT {_ROLLUP_KEYS}, error_code, count(*) FROM {source} "  # noqa: S608
        f"WHERE error_code IS NOT NULL GROUP BY {_ROLLUP_KEYS}, error_code"
    )


def _rollup_statements(table: str) -> tuple[str, str]:
    """Roll one bucket of usage_hourly or usage_daily (:bucket, raw rows in [:lo, :hi)) up from raw rows."""
    source = _raw_source(":bucket", "at >= :lo AND at < :hi")
    return (
        f"INSERT INTO {table} ({_ROLLUP_COLUMNS}) {_stats(source, _ROLLUP_KEYS)}",
        f"INSERT INTO {table}_refusals ({_ROLLUP_KEYS}, error_code, requests) {_refusals_from(source)}",
    )


HOURLY_FROM_RAW = _rollup_statements("usage_hourly")
DAILY_FROM_RAW = _rollup_statements("usage_daily")
# A day whose first raw rows are gone already: summed from its hourly rollups.
DAILY_FROM_HOURLY = (
    f"INSERT INTO usage_daily ({_ROLLUP_COLUMNS}) SELECT :bucket, key_id, owner, route, sum(requests), "  # noqa: S608
    "sum(errors), sum(bytes_in), sum(bytes_out), "
    + ", ".join(_combined(name) for name, _ in _PERCENTILES)
    + " FROM usage_hourly WHERE bucket >= :lo AND bucket < :hi GROUP BY key_id, owner, route",
    "INSERT INTO usage_daily_refusals (bucket, key_id, owner, route, error_code, requests) "
    "SELECT :bucket, key_id, owner, route, error_code, sum(requests) FROM usage_hourly_refusals "
    "WHERE bucket >= :lo AND bucket < :hi GROUP BY key_id, owner, route, error_code",
)
# Raw rows older than raw_from arrived after their hour was folded and purged (a late spool replay):
# added to the hourly rollups (percentiles merged as a request-weighted mean), then deleted.
_LATE_SOURCE = _raw_source(_HOUR_OF.format("at"), "at < :raw_from")
FOLD_LATE = (
    f"INSERT INTO usage_hourly ({_ROLLUP_COLUMNS}) {_stats(_LATE_SOURCE, _ROLLUP_KEYS)} "
    f"ON CONFLICT ({_ROLLUP_KEYS}) DO UPDATE SET requests = requests + excluded.requests, "
    "errors = errors + excluded.errors, bytes_in = bytes_in + excluded.bytes_in, "
    "bytes_out = bytes_out + excluded.bytes_out, "
    + ", ".join(
        f"{name} = ({name} * requests + excluded.{name} * excluded.requests) / (requests + excluded.requests)"
        for name, _ in _PERCENTILES
    ),
    f"INSERT INTO usage_hourly_refusals ({_ROLLUP_KEYS}, error_code, requests) {_refusals_from(_LATE_SOURCE)} "
    f"ON CONFLICT ({_ROLLUP_KEYS}, error_code) DO UPDATE SET requests = requests + excluded.requests",
    "DELETE FROM usage_records WHERE at < :raw_from",
)
# Report groups, over raw rows and over rollup rows.
_RAW_GROUPS, _ROLLUP_GROUPS = report_groups("substr(at, 1, 10)", "substr(bucket, 1, 10)")


def report_sql(by: str, key_id: str | None, owner: str | None) -> str:
    if by not in _RAW_GROUPS:
        raise ValueError(f"a usage report is grouped by key, owner, route or day, not {by!r}")
    filters = (" AND key_id = :key_id" if key_id is not None else "") + (
        " AND owner = :owner" if owner is not None else ""
    )
    group = _ROLLUP_GROUPS[by]
    daily = f"FROM usage_daily{{}} WHERE bucket >= :d0 AND bucket < :d1{filters}"
    hourly = f"FROM usage_hourly{{}} WHERE bucket >= :h0 AND bucket < :raw_from AND (bucket < :d0 OR bucket >= :d1){filters}"
    stats = f"SELECT {group}, requests, errors, bytes_in, bytes_out, p50_ms, p95_ms, p99_ms "
    refused = f"SELECT {group}, error_code, requests "
    percentiles = ", ".join(_combined(name) for name, _ in _PERCENTILES)
    order = "grp" if by == "day" else "2 DESC, grp"
    # Raw rows since `since` (including late ones older than raw_from, which no rollup holds yet),
    # plus the rollups for the range the raw table no longer covers.
    return (
        f"WITH raw AS (SELECT {_RAW_GROUPS[by]} AS grp, status, error_code, bytes_in, bytes_out, latency_ms "  # noqa: S608
        f"FROM usage_records WHERE at >= :since{filters}), "
        f"pieces AS ({_stats('raw', 'grp')} UNION ALL {stats}{daily.format('')} "
        f"UNION ALL {stats}{hourly.format('')}), "
        "refused AS (SELECT grp, error_code, sum(n) AS n FROM ("
        "SELECT grp, error_code, count(*) AS n FROM raw WHERE error_code IS NOT NULL GROUP BY grp, error_code "
        f"UNION ALL {refused}{daily.format('_refusals')} UNION ALL {refused}{hourly.format('_refusals')}) "
        "GROUP BY grp, error_code) "
        f"SELECT grp, sum(requests), sum(errors), sum(bytes_in), sum(bytes_out), {percentiles}, "
        "(SELECT json_group_object(error_code, n) FROM refused AS r WHERE r.grp = pieces.grp) "
        f"FROM pieces GROUP BY grp ORDER BY {order}"
    )
