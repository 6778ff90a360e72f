-- Tollgate collector, SQLite (the embedded engine). See collector/README.md for the rationale.
-- Times are integers: events.ts in microseconds since the epoch, everything else in seconds.

CREATE TABLE orgs (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    plan       TEXT,
    created_at INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    hash       TEXT NOT NULL UNIQUE,      -- sha256 hex of the secret; the secret is never stored
    org        TEXT NOT NULL,             -- '*' for admin and ingest keys that span every org
    role       TEXT NOT NULL CHECK (role IN ('admin', 'reader', 'ingest')),
    name       TEXT,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);

-- Raw events: the idempotency record and the audit trail, kept for the retention period.
-- WITHOUT ROWID keyed by the UUIDv7 id, so inserts append at the right edge of one B-tree.
CREATE TABLE events (
    id             BLOB NOT NULL PRIMARY KEY,
    ts             INTEGER NOT NULL,
    org            TEXT NOT NULL,
    user_id        TEXT,
    plan           TEXT NOT NULL,
    method         TEXT NOT NULL,
    route          TEXT NOT NULL,
    status         INTEGER NOT NULL,
    latency_us     INTEGER NOT NULL,
    request_bytes  INTEGER NOT NULL,
    response_bytes INTEGER NOT NULL,
    cost           INTEGER NOT NULL,
    decision       TEXT NOT NULL,
    rule           TEXT,
    edge           TEXT NOT NULL,
    node           TEXT NOT NULL,
    dimensions     TEXT,
    metrics        TEXT,
    fingerprint    TEXT,
    received_at    INTEGER NOT NULL
) WITHOUT ROWID;

-- Retention deletes by time.
CREATE INDEX events_ts ON events (ts);

-- Events stored but not yet folded into the rollups: written in the ingest transaction (only
-- for events that were new), deleted in the transaction that folds them. Together the two make
-- every event count exactly once in the rollups, whatever crashes in between.
CREATE TABLE rollup_queue (
    seq            INTEGER PRIMARY KEY,
    ts             INTEGER NOT NULL,      -- seconds since the epoch
    org            TEXT NOT NULL,
    user_id        TEXT NOT NULL,
    route          TEXT NOT NULL,
    method         TEXT NOT NULL,
    status         INTEGER NOT NULL,
    decision       TEXT NOT NULL,
    latency_us     INTEGER NOT NULL,
    request_bytes  INTEGER NOT NULL,
    response_bytes INTEGER NOT NULL,
    cost           INTEGER NOT NULL
);

-- Rollups: one row per (granularity, bucket, org, user, route, method, status class, decision).
-- key_hash is a 64-bit hash of that whole key, so the row is found through one short index.
CREATE TABLE rollups (
    org            TEXT NOT NULL,
    key_hash       INTEGER NOT NULL,
    granularity    INTEGER NOT NULL,      -- 0 minute, 1 hour, 2 day
    bucket         INTEGER NOT NULL,      -- bucket start, seconds since the epoch
    user_id        TEXT NOT NULL,         -- '' when the event had none
    route          TEXT NOT NULL,
    method         TEXT NOT NULL,
    status_class   INTEGER NOT NULL,      -- 1..5 for 1xx..5xx
    decision       TEXT NOT NULL,
    calls          INTEGER NOT NULL,
    errors         INTEGER NOT NULL,
    cost           INTEGER NOT NULL,
    request_bytes  INTEGER NOT NULL,
    response_bytes INTEGER NOT NULL,
    latency_sketch BLOB,                  -- HdrHistogram V2, 2 significant digits
    PRIMARY KEY (org, key_hash)
) WITHOUT ROWID;

CREATE INDEX rollups_scan ON rollups (org, granularity, bucket);
