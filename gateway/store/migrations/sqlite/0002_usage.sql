-- Usage (SQLite): one raw row per request, and hourly and daily rollups that outlive the raw rows.
--
-- Times are the store's fixed-width ISO-8601 UTC text, 'YYYY-MM-DDTHH:MM:SS.ffffffZ', so text order
-- is time order and range filters are plain comparisons; a bucket is the text of its start
-- ('2024-05-01T12:00:00.000000Z' for an hour, '2024-05-01T00:00:00.000000Z' for a day).
--
-- usage_records holds the raw rows for the retention period; writes are idempotent on request_id.
-- The rollups are keyed by the bucket start and key, owner and route, with '' for a request that had
-- none (a refusal before authentication), as in the PostgreSQL schema. Percentiles of a bucket are
-- computed from the latency_ms of that bucket's raw rows with the interpolation of percentile_cont;
-- only a day whose first hours were purged already, and rows arriving after their hour was purged,
-- are merged in as request-weighted means of percentiles (an approximation).
-- Refusals are counted per code in the *_refusals tables, one row per code.
--
-- usage_rollup_state remembers how far rollups went: raw rows older than raw_from were folded into
-- the rollups and deleted, so reports read the rollups before raw_from and the raw rows after it.
-- usage_rollup_pending lists the hours and days that received raw rows since they were last rolled
-- up; every write marks its buckets, so rows arriving late (a replayed spool) are rolled up too.

CREATE TABLE usage_records (
    request_id      TEXT    NOT NULL PRIMARY KEY,
    at              TEXT    NOT NULL,
    key_id          TEXT,
    owner           TEXT,
    env             TEXT,
    route           TEXT,
    method          TEXT    NOT NULL,
    status          INTEGER NOT NULL,
    upstream_status INTEGER,
    latency_ms      REAL    NOT NULL,
    upstream_ms     REAL,
    bytes_in        INTEGER NOT NULL,
    bytes_out       INTEGER NOT NULL,
    client_ip       TEXT    NOT NULL,
    error_code      TEXT
);

CREATE INDEX usage_records_at_idx ON usage_records (at);
CREATE INDEX usage_records_key_id_at_idx ON usage_records (key_id, at);
CREATE INDEX usage_records_owner_at_idx ON usage_records (owner, at);
CREATE INDEX usage_records_route_at_idx ON usage_records (route, at);

CREATE TABLE usage_hourly (
    bucket    TEXT    NOT NULL,
    key_id    TEXT    NOT NULL,
    owner     TEXT    NOT NULL,
    route     TEXT    NOT NULL,
    requests  INTEGER NOT NULL,
    errors    INTEGER NOT NULL,
    bytes_in  INTEGER NOT NULL,
    bytes_out INTEGER NOT NULL,
    p50_ms    REAL    NOT NULL,
    p95_ms    REAL    NOT NULL,
    p99_ms    REAL    NOT NULL,
    PRIMARY KEY (bucket, key_id, owner, route)
);

CREATE INDEX usage_hourly_key_id_idx ON usage_hourly (key_id, bucket);
CREATE INDEX usage_hourly_owner_idx ON usage_hourly (owner, bucket);

CREATE TABLE usage_hourly_refusals (
    bucket     TEXT    NOT NULL,
    key_id     TEXT    NOT NULL,
    owner      TEXT    NOT NULL,
    route      TEXT    NOT NULL,
    error_code TEXT    NOT NULL,
    requests   INTEGER NOT NULL,
    PRIMARY KEY (bucket, key_id, owner, route, error_code)
);

CREATE TABLE usage_daily (
    bucket    TEXT    NOT NULL,
    key_id    TEXT    NOT NULL,
    owner     TEXT    NOT NULL,
    route     TEXT    NOT NULL,
    requests  INTEGER NOT NULL,
    errors    INTEGER NOT NULL,
    bytes_in  INTEGER NOT NULL,
    bytes_out INTEGER NOT NULL,
    p50_ms    REAL    NOT NULL,
    p95_ms    REAL    NOT NULL,
    p99_ms    REAL    NOT NULL,
    PRIMARY KEY (bucket, key_id, owner, route)
);

CREATE INDEX usage_daily_key_id_idx ON usage_daily (key_id, bucket);
CREATE INDEX usage_daily_owner_idx ON usage_daily (owner, bucket);

CREATE TABLE usage_daily_refusals (
    bucket     TEXT    NOT NULL,
    key_id     TEXT    NOT NULL,
    owner      TEXT    NOT NULL,
    route      TEXT    NOT NULL,
    error_code TEXT    NOT NULL,
    requests   INTEGER NOT NULL,
    PRIMARY KEY (bucket, key_id, owner, route, error_code)
);

CREATE TABLE usage_rollup_state (
    id       INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    hours_to TEXT,  -- the last rollup folded every hour before this (later rows: pending)
    days_to  TEXT,  -- the same for days
    raw_from TEXT   -- raw rows before this were folded into the rollups and deleted
);

INSERT INTO usage_rollup_state (id) VALUES (1);

CREATE TABLE usage_rollup_pending (
    grain  TEXT NOT NULL CHECK (grain IN ('day', 'hour')),
    bucket TEXT NOT NULL,
    PRIMARY KEY (grain, bucket)
);
