-- Week buckets (granularity 3, Monday 00:00 UTC): a 30-day report reads 4 weeks and a few days
-- per group. Rows folded before this migration have no week rows, so `rollup_epochs` records
-- the first week whose week rows are complete; reports read days before it.
CREATE TABLE rollup_epochs (
    granularity SMALLINT PRIMARY KEY,
    since       BIGINT NOT NULL           -- first bucket start whose rows are complete
);
INSERT INTO rollup_epochs (granularity, since)
SELECT 3, COALESCE(((MAX(bucket) - 345600) / 604800 + 1) * 604800 + 345600, -4611686018427387904)
FROM rollups WHERE granularity = 2;

-- Top users over every org (admins) reads the user cube of a range: this index holds all it
-- needs, so the read is an index-only scan rather than a heap fetch per row.
CREATE INDEX rollups_users ON rollups (granularity, bucket)
    INCLUDE (org, user_id, decision, rule, calls, errors, cost, request_bytes, response_bytes)
    WHERE cube = 2;
