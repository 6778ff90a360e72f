-- Rollups keyed by org, cube and time: PRIMARY KEY (org, cube, granularity, bucket, key_hash).
--  * A report of one org reads each segment of its range as one contiguous run of the table
--    (the key used to end in the hash: a 30-day report looked up every row through an index).
--  * A fold writes the newest buckets: with time before the hash in the key its rows land
--    together at the end of each (org, cube, granularity) run instead of at random places
--    through an org's whole history, so the pages a fold touches stay few and cached.
--  * Reports over every org (admins) read rollups_time; the busiest of them, top users, reads
--    rollups_users, which holds everything it needs (no lookup into the table per row).
-- Also week buckets (granularity 3, Monday 00:00 UTC): a 30-day report reads 4 weeks and a few
-- days per group. Rows folded before this migration have no week rows, so `rollup_epochs`
-- records the first week whose week rows are complete; reports read days before it.

CREATE TABLE rollups_by_org_and_time (
    cube           INTEGER NOT NULL,      -- 0 full, 1 endpoint, 2 user, 3 org, 4 route
    granularity    INTEGER NOT NULL,      -- 0 minute, 1 hour, 2 day, 3 week
    bucket         INTEGER NOT NULL,      -- bucket start, seconds since the epoch
    org            TEXT NOT NULL,
    key_hash       INTEGER NOT NULL,
    user_id        TEXT NOT NULL,
    route          TEXT NOT NULL,
    method         TEXT NOT NULL,
    status_class   INTEGER NOT NULL,
    decision       TEXT NOT NULL,
    rule           TEXT NOT NULL,
    calls          INTEGER NOT NULL,
    errors         INTEGER NOT NULL,
    cost           INTEGER NOT NULL,
    request_bytes  INTEGER NOT NULL,
    response_bytes INTEGER NOT NULL,
    latency_sketch BLOB,
    PRIMARY KEY (org, cube, granularity, bucket, key_hash)
) WITHOUT ROWID;

INSERT INTO rollups_by_org_and_time
SELECT cube, granularity, bucket, org, key_hash, user_id, route, method, status_class, decision,
       rule, calls, errors, cost, request_bytes, response_bytes, latency_sketch
FROM rollups;

-- Week buckets are complete from the week after the last day that has rows (if any).
CREATE TABLE rollup_epochs (
    granularity INTEGER PRIMARY KEY,
    since       INTEGER NOT NULL          -- first bucket start whose rows are complete
);
INSERT INTO rollup_epochs (granularity, since)
SELECT 3, COALESCE(((MAX(bucket) - 345600) / 604800 + 1) * 604800 + 345600, -4611686018427387904)
FROM rollups WHERE granularity = 2;

DROP TABLE rollups;
ALTER TABLE rollups_by_org_and_time RENAME TO rollups;

CREATE INDEX rollups_time ON rollups (cube, granularity, bucket);
CREATE INDEX rollups_users ON rollups (granularity, bucket, org, user_id, decision, rule, calls,
    errors, cost, request_bytes, response_bytes) WHERE cube = 2;
