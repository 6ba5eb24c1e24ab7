-- Usage (PostgreSQL): one raw row per request, and hourly and daily rollups that outlive the raw rows.
--
-- usage_records holds the raw rows for the retention period; writes are idempotent on request_id.
-- The rollups are keyed by the bucket start (UTC hour or day) and key, owner and route, with '' for a
-- request that had none (a refusal before authentication): primary key columns cannot be NULL.
-- Percentiles of a bucket are percentile_cont over the latency_ms of that bucket's raw rows; only a
-- day whose first hours were purged already, and rows arriving after their hour was purged, are
-- merged in as request-weighted means of percentiles (an approximation).
-- Refusals are counted per code in the *_refusals tables, one row per code.
--
-- usage_rollup_state remembers how far rollups went: raw rows older than raw_from were folded into
-- the rollups and deleted, so reports read the rollups before raw_from and the raw rows after it.
-- usage_rollup_pending lists the hours and days that received raw rows since they were last rolled
-- up; every write marks its buckets, so rows arriving late (a replayed spool) are rolled up too.

CREATE TABLE usage_records (
    request_id      text             NOT NULL PRIMARY KEY,
    at              timestamptz      NOT NULL,
    key_id          text,
    owner           text,
    env             text,
    route           text,
    method          text             NOT NULL,
    status          integer          NOT NULL,
    upstream_status integer,
    latency_ms      double precision NOT NULL,
    upstream_ms     double precision,
    bytes_in        bigint           NOT NULL,
    bytes_out       bigint           NOT NULL,
    client_ip       text             NOT NULL,
    error_code      text
);

CREATE INDEX usage_records_at_idx ON usage_records (at);
CREATE INDEX usage_records_key_id_at_idx ON usage_records (key_id, at);
CREATE INDEX usage_records_owner_at_idx ON usage_records (owner, at);
CREATE INDEX usage_records_route_at_idx ON usage_records (route, at);

CREATE TABLE usage_hourly (
    bucket    timestamptz      NOT NULL,
    key_id    text             NOT NULL,
    owner     text             NOT NULL,
    route     text             NOT NULL,
    requests  bigint           NOT NULL,
    errors    bigint           NOT NULL,
    bytes_in  bigint           NOT NULL,
    bytes_out bigint           NOT NULL,
    p50_ms    double precision NOT NULL,
    p95_ms    double precision NOT NULL,
    p99_ms    double precision NOT NULL,
    PRIMARY KEY (bucket, key_id, owner, route)
);

CREATE INDEX usage_hourly_key_id_idx ON usage_hourly (key_id, bucket);
CREATE INDEX usage_hourly_owner_idx ON usage_hourly (owner, bucket);

CREATE TABLE usage_hourly_refusals (
    bucket     timestamptz NOT NULL,
    key_id     text        NOT NULL,
    owner      text        NOT NULL,
    route      text        NOT NULL,
    error_code text        NOT NULL,
    requests   bigint      NOT NULL,
    PRIMARY KEY (bucket, key_id, owner, route, error_code)
);

CREATE TABLE usage_daily (
    bucket    timestamptz      NOT NULL,
    key_id    text             NOT NULL,
    owner     text             NOT NULL,
    route     text             NOT NULL,
    requests  bigint           NOT NULL,
    errors    bigint           NOT NULL,
    bytes_in  bigint           NOT NULL,
    bytes_out bigint           NOT NULL,
    p50_ms    double precision NOT NULL,
    p95_ms    double precision NOT NULL,
    p99_ms    double precision NOT NULL,
    PRIMARY KEY (bucket, key_id, owner, route)
);

CREATE INDEX usage_daily_key_id_idx ON usage_daily (key_id, bucket);
CREATE INDEX usage_daily_owner_idx ON usage_daily (owner, bucket);

CREATE TABLE usage_daily_refusals (
    bucket     timestamptz NOT NULL,
    key_id     text        NOT NULL,
    owner      text        NOT NULL,
    route      text        NOT NULL,
    error_code text        NOT NULL,
    requests   bigint      NOT NULL,
    PRIMARY KEY (bucket, key_id, owner, route, error_code)
);

CREATE TABLE usage_rollup_state (
    id         integer     NOT NULL PRIMARY KEY CHECK (id = 1),
    hours_to   timestamptz,  -- the last rollup folded every hour before this (later rows: pending)
    days_to    timestamptz,  -- the same for days
    raw_from   timestamptz   -- raw rows before this were folded into the rollups and deleted
);

INSERT INTO usage_rollup_state (id) VALUES (1);

CREATE TABLE usage_rollup_pending (
    grain  text        NOT NULL CHECK (grain IN ('day', 'hour')),
    bucket timestamptz NOT NULL,
    PRIMARY KEY (grain, bucket)
);
