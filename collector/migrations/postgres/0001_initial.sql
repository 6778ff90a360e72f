-- Tollgate collector, PostgreSQL (production). See collector/README.md for the rationale.

CREATE TABLE orgs (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    plan       TEXT,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    hash       TEXT NOT NULL UNIQUE,      -- sha256 hex of the secret; the secret is never stored
    org        TEXT NOT NULL,             -- '*' for admin and ingest keys that span every org
    role       TEXT NOT NULL CHECK (role IN ('admin', 'reader', 'ingest')),
    name       TEXT,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

-- Raw events, partitioned by day on the event time: retention is DROP TABLE of a partition
-- (no vacuum debt), and a late event lands in its own day's partition. A unique index on a
-- partitioned table must contain the partition key, so the idempotency key is (ts, id): a
-- retried event carries the same id and the same timestamp, so it still conflicts. Partitions
-- are created by the collector ahead of need (`events_pYYYYMMDD`).
CREATE TABLE events (
    id             UUID NOT NULL,
    ts             TIMESTAMPTZ NOT NULL,
    org            TEXT NOT NULL,
    user_id        TEXT,
    plan           TEXT NOT NULL,
    method         TEXT NOT NULL,
    route          TEXT NOT NULL,
    status         SMALLINT NOT NULL,
    latency_us     BIGINT NOT NULL,
    request_bytes  BIGINT NOT NULL,
    response_bytes BIGINT NOT NULL,
    cost           BIGINT NOT NULL,
    decision       TEXT NOT NULL,
    rule           TEXT,
    edge           TEXT NOT NULL,
    node           TEXT NOT NULL,
    dimensions     JSONB,
    metrics        JSONB,
    fingerprint    TEXT,
    received_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (ts, id)
) PARTITION BY RANGE (ts);

-- Events stored but not yet folded into the rollups: written in the ingest transaction (only
-- for events that were new), deleted in the transaction that folds them (FOR UPDATE SKIP
-- LOCKED, so folders on several replicas take disjoint rows). Every event counts exactly once.
CREATE TABLE rollup_queue (
    seq            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts             BIGINT NOT NULL,       -- seconds since the epoch
    org            TEXT NOT NULL,
    user_id        TEXT NOT NULL,
    route          TEXT NOT NULL,
    method         TEXT NOT NULL,
    status         SMALLINT NOT NULL,
    decision       TEXT NOT NULL,
    latency_us     BIGINT NOT NULL,
    request_bytes  BIGINT NOT NULL,
    response_bytes BIGINT NOT NULL,
    cost           BIGINT NOT NULL
);

-- Rollups: one row per (granularity, bucket, org, user, route, method, status class, decision),
-- found through (org, key_hash). Leading with org keeps the table distributable by org.
CREATE TABLE rollups (
    org            TEXT NOT NULL,
    key_hash       BIGINT NOT NULL,
    granularity    SMALLINT NOT NULL,     -- 0 minute, 1 hour, 2 day
    bucket         BIGINT NOT NULL,       -- bucket start, seconds since the epoch
    user_id        TEXT NOT NULL,         -- '' when the event had none
    route          TEXT NOT NULL,
    method         TEXT NOT NULL,
    status_class   SMALLINT NOT NULL,     -- 1..5 for 1xx..5xx
    decision       TEXT NOT NULL,
    calls          BIGINT NOT NULL,
    errors         BIGINT NOT NULL,
    cost           BIGINT NOT NULL,
    request_bytes  BIGINT NOT NULL,
    response_bytes BIGINT NOT NULL,
    latency_sketch BYTEA,                 -- HdrHistogram V2, 2 significant digits
    PRIMARY KEY (org, key_hash)
);

CREATE INDEX rollups_scan ON rollups (org, granularity, bucket);
