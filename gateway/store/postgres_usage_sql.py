"""The usage SQL of the PostgreSQL store: staging and inserting records, rolling them up, reports.

Reports and rollups are computed in SQL, latency percentiles with percentile_cont.
"""

from __future__ import annotations

from gateway.store.rollups import report_groups
from gateway.usage.record import FIELDS

# Batches are copied into a temporary staging table of the connection, dropped at commit; `at` stays
# epoch seconds there and becomes timestamptz in the INSERT … SELECT, so the event loop only encodes
# the records.
_STAGING_TYPES = {
    "request_id": "text",
    "at": "double precision",
    "key_id": "text",
    "owner": "text",
    "env": "text",
    "route": "text",
    "method": "text",
    "status": "integer",
    "upstream_status": "integer",
    "latency_ms": "double precision",
    "upstream_ms": "double precision",
    "bytes_in": "bigint",
    "bytes_out": "bigint",
    "client_ip": "text",
    "error_code": "text",
}
assert tuple(_STAGING_TYPES) == FIELDS, "the staging table must follow the UsageRecord fields"
STAGE_USAGE = (
    "CREATE TEMP TABLE usage_staging ("
    + ", ".join(f"{name} {kind}" for name, kind in _STAGING_TYPES.items())
    + ") ON COMMIT DROP"
)
# The new rows, then the hours and days they fall in marked for the next rollup. The marks are
# locked in a fixed order (ON CONFLICT DO UPDATE locks an existing mark even when WHERE false skips
# the update) until commit, so a concurrent rollup that takes a mark waits for this batch and sees
# its rows; a mark taken by a rollup before is inserted again once that rollup commits.
INSERT_USAGE = (
    f"WITH added AS (INSERT INTO usage_records ({', '.join(FIELDS)}) "  # noqa: S608
    f"SELECT {', '.join('to_timestamp(at)' if f == 'at' else f for f in FIELDS)} FROM usage_staging "
    "ON CONFLICT (request_id) DO NOTHING RETURNING at) "
    "INSERT INTO usage_rollup_pending (grain, bucket) "
    "SELECT DISTINCT g.grain, date_trunc(g.grain, a.at, 'UTC') FROM added AS a "
    "CROSS JOIN (VALUES ('day'), ('hour')) AS g (grain) ORDER BY 1, 2 "
    "ON CONFLICT (grain, bucket) DO UPDATE SET grain = EXCLUDED.grain WHERE false"
)
# The marks of the hours and days a rollup folds, taken (locked in the writers' order, then deleted).
TAKE_PENDING = (
    "DELETE FROM usage_rollup_pending WHERE (grain, bucket) IN (SELECT grain, bucket FROM usage_rollup_pending "
    "WHERE (grain = 'hour' AND bucket < $1) OR (grain = 'day' AND bucket < $2) ORDER BY grain, bucket FOR UPDATE) "
    "RETURNING grain, bucket"
)
_ROLLUP_KEYS = "bucket, key_id, owner, route"
_ROLLUP_COLUMNS = f"{_ROLLUP_KEYS}, requests, errors, bytes_in, bytes_out, p50_ms, p95_ms, p99_ms"
_PERCENTILES = ("p50_ms", "p95_ms", "p99_ms")


def _stats(source: str, keys: str) -> str:
    """Requests, 5xx errors, bytes and latency percentiles (percentile_cont: linear interpolation
    between the two closest ranks) of the rows of `source`, one row per group of `keys`."""
    return (
        f"SELECT {keys}, requests, errors, bytes_in, bytes_out, pct[1] AS p50_ms, pct[2] AS p95_ms, "  # noqa: S608
        f"pct[3] AS p99_ms FROM (SELECT {keys}, count(*) AS requests, "
        "count(*) FILTER (WHERE status >= 500) AS errors, sum(bytes_in) AS bytes_in, sum(bytes_out) AS bytes_out, "
        "percentile_cont(ARRAY[0.5, 0.95, 0.99]::float8[]) WITHIN GROUP (ORDER BY latency_ms) AS pct "
        f"FROM {source} GROUP BY {keys}) AS stats"
    )


def _combined(column: str, weight: str = "requests") -> str:
    """A percentile over several pieces (rollup buckets, raw rows): exact when there is one piece,
    otherwise approximated by the request-weighted mean of the pieces' percentiles."""
    return (
        f"CASE WHEN count(*) = 1 THEN max({column}) "
        f"ELSE sum({column} * {weight}::float8) / sum({weight}::float8) END"
    )


def _rollup_statements(table: str, step: str) -> tuple[str, ...]:
    """Replace the rows of usage_hourly or usage_daily for the buckets $1 with ones from raw rows."""
    source = (
        "(SELECT b.bucket, coalesce(r.key_id, '') AS key_id, coalesce(r.owner, '') AS owner, "  # noqa: S608
        "coalesce(r.route, '') AS route, r.status, r.error_code, r.bytes_in, r.bytes_out, r.latency_ms "
        "FROM unnest($1::timestamptz[]) AS b (bucket) "
        f"JOIN usage_records AS r ON r.at >= b.bucket AND r.at < b.bucket + interval '{step}') AS src"
    )
    return (
        f"DELETE FROM {table} WHERE bucket = ANY($1::timestamptz[])",  # noqa: S608
        f"DELETE FROM {table}_refusals WHERE bucket = ANY($1::timestamptz[])",  # noqa: S608
        f"INSERT INTO {table} ({_ROLLUP_COLUMNS}) {_stats(source, _ROLLUP_KEYS)}",
        f"INSERT INTO {table}_refusals ({_ROLLUP_KEYS}, error_code, requests) "  # noqa: S608
        f"SELECT {_ROLLUP_KEYS}, error_code, count(*) FROM {source} "
        f"WHERE error_code IS NOT NULL GROUP BY {_ROLLUP_KEYS}, error_code",
    )


HOURLY_FROM_RAW = _rollup_statements("usage_hourly", "1 hour")
DAILY_FROM_RAW = _rollup_statements("usage_daily", "24 hours")  # not '1 day': DST in the connection's TimeZone
# A day whose first raw rows are gone already: summed from its hourly rollups.
_DAY_OF_HOURS = (
    "FROM unnest($1::timestamptz[]) AS d (bucket) JOIN {} AS h "
    "ON h.bucket >= d.bucket AND h.bucket < d.bucket + interval '24 hours'"
)
DAILY_FROM_HOURLY = (
    *DAILY_FROM_RAW[:2],
    f"INSERT INTO usage_daily ({_ROLLUP_COLUMNS}) SELECT d.bucket, h.key_id, h.owner, h.route, "
    "sum(h.requests), sum(h.errors), sum(h.bytes_in), sum(h.bytes_out), "
    + ", ".join(_combined(f"h.{name}", "h.requests") for name in _PERCENTILES)
    + f" {_DAY_OF_HOURS.format('usage_hourly')} GROUP BY d.bucket, h.key_id, h.owner, h.route",
    "INSERT INTO usage_daily_refusals (bucket, key_id, owner, route, error_code, requests) "
    "SELECT d.bucket, h.key_id, h.owner, h.route, h.error_code, sum(h.requests) "
    f"{_DAY_OF_HOURS.format('usage_hourly_refusals')} GROUP BY d.bucket, h.key_id, h.owner, h.route, h.error_code",
)
# Raw rows older than raw_from arrived after their hour was folded and purged (a late spool replay):
# deleted and, in the same statement, added to the hourly rollups (percentiles merged as a
# request-weighted mean).
FOLD_LATE = (
    "WITH gone AS (DELETE FROM usage_records WHERE at < $1 RETURNING date_trunc('hour', at, 'UTC') AS bucket, "  # noqa: S608
    "coalesce(key_id, '') AS key_id, coalesce(owner, '') AS owner, coalesce(route, '') AS route, "
    "status, error_code, bytes_in, bytes_out, latency_ms), "
    f"refused AS (INSERT INTO usage_hourly_refusals AS t ({_ROLLUP_KEYS}, error_code, requests) "
    f"SELECT {_ROLLUP_KEYS}, error_code, count(*) FROM gone WHERE error_code IS NOT NULL "
    f"GROUP BY {_ROLLUP_KEYS}, error_code "
    f"ON CONFLICT ({_ROLLUP_KEYS}, error_code) DO UPDATE SET requests = t.requests + EXCLUDED.requests) "
    f"INSERT INTO usage_hourly AS t ({_ROLLUP_COLUMNS}) {_stats('gone', _ROLLUP_KEYS)} "
    f"ON CONFLICT ({_ROLLUP_KEYS}) DO UPDATE SET requests = t.requests + EXCLUDED.requests, "
    "errors = t.errors + EXCLUDED.errors, bytes_in = t.bytes_in + EXCLUDED.bytes_in, "
    "bytes_out = t.bytes_out + EXCLUDED.bytes_out, "
    + ", ".join(
        f"{name} = (t.{name} * t.requests + EXCLUDED.{name} * EXCLUDED.requests) / (t.requests + EXCLUDED.requests)"
        for name in _PERCENTILES
    )
)
# Purged: raw rows before the new raw_from, except those of an hour marked again meanwhile (rows a
# writer committed during this rollup, which no rollup has folded yet).
PURGE_USAGE = (
    "DELETE FROM usage_records AS r WHERE r.at < $1 AND NOT EXISTS (SELECT 1 FROM usage_rollup_pending AS p "
    "WHERE p.grain = 'hour' AND p.bucket = date_trunc('hour', r.at, 'UTC'))"
)
# Report groups, over raw rows and over rollup rows.
_RAW_GROUPS, _ROLLUP_GROUPS = report_groups(
    "to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "to_char(bucket AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
)


def report_sql(by: str, key_id: str | None, owner: str | None) -> str:
    """The report query; parameters: since, h0, raw_from, d0, d1 (see rollups.rollup_range), then
    the key id and owner filters that are given."""
    if by not in _RAW_GROUPS:
        raise ValueError(f"a usage report is grouped by key, owner, route or day, not {by!r}")
    filters = ""
    n = 5
    for column, value in (("key_id", key_id), ("owner", owner)):
        if value is not None:
            n += 1
            filters += f" AND {column} = ${n}"
    group = _ROLLUP_GROUPS[by]
    daily = f"FROM usage_daily{{}} WHERE bucket >= $4 AND bucket < $5{filters}"
    hourly = f"FROM usage_hourly{{}} WHERE bucket >= $2 AND bucket < $3 AND (bucket < $4 OR bucket >= $5){filters}"
    stats = f"SELECT {group}, requests, errors, bytes_in, bytes_out, p50_ms, p95_ms, p99_ms "
    refused = f"SELECT {group}, error_code, requests "
    percentiles = ", ".join(f"{_combined(name)} AS {name}" for name in _PERCENTILES)
    order = "t.grp" if by == "day" else "t.requests DESC, t.grp"
    # Raw rows since `since` (including late ones older than raw_from, which no rollup holds yet),
    # plus the rollups for the range the raw table no longer covers.
    return (
        f"WITH raw AS (SELECT {_RAW_GROUPS[by]} AS grp, status, error_code, bytes_in, bytes_out, latency_ms "  # noqa: S608
        f"FROM usage_records WHERE at >= $1{filters}), "
        f"pieces AS ({_stats('raw', 'grp')} UNION ALL {stats}{daily.format('')} "
        f"UNION ALL {stats}{hourly.format('')}), "
        "totals AS (SELECT grp, sum(requests)::bigint AS requests, sum(errors)::bigint AS errors, "
        f"sum(bytes_in)::bigint AS bytes_in, sum(bytes_out)::bigint AS bytes_out, {percentiles} "
        "FROM pieces GROUP BY grp), "
        "refused AS (SELECT grp, error_code, sum(n)::bigint AS n FROM ("
        "SELECT grp, error_code, count(*) AS n FROM raw WHERE error_code IS NOT NULL GROUP BY grp, error_code "
        f"UNION ALL {refused}{daily.format('_refusals')} UNION ALL {refused}{hourly.format('_refusals')}"
        ") AS r GROUP BY grp, error_code), "
        "refusals AS (SELECT grp, json_object_agg(error_code, n) AS refusals FROM refused GROUP BY grp) "
        "SELECT t.grp, t.requests, t.errors, t.bytes_in, t.bytes_out, t.p50_ms, t.p95_ms, t.p99_ms, f.refusals "
        f"FROM totals AS t LEFT JOIN refusals AS f ON f.grp = t.grp ORDER BY {order}"
    )
