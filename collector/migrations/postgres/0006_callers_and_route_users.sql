-- Two narrower ways to count callers, for the 30-day reports at 10M events:
--  * The caller cube (7): one row per org, user and bucket (hour, day, week), without the user
--    cube's split by decision and rule (about 4.5 rows per caller per bucket). Top users and
--    distinct-user counts read it, index-only: `rollups_callers` over every org,
--    `rollups_org_callers` within one.
--  * A users sketch on the route cube's rows (4): distinct users per route are the merged
--    sketches of the route's rows, instead of a distinct count over the route-and-user cube (6),
--    whose rows were one per route, user and bucket. `rollups_routes` holds the route rows'
--    counters (not the sketches: index entries are capped at ~2.7 kB), so one org's route
--    counters are read without visiting a heap page per row.
-- Rows folded before this migration have neither: the collector fills them from the user cube
-- and the route-and-user cube when it starts (`Storage::backfill_callers`), then drops cube 6.
ALTER TABLE rollups ADD COLUMN users_sketch BYTEA;

DROP INDEX rollups_users;
CREATE INDEX rollups_callers ON rollups (granularity, bucket)
    INCLUDE (org, user_id, calls, errors, cost, request_bytes, response_bytes)
    WHERE cube = 7;
CREATE INDEX rollups_org_callers ON rollups (org, granularity, bucket)
    INCLUDE (user_id, calls, errors, cost, request_bytes, response_bytes)
    WHERE cube = 7;
CREATE INDEX rollups_routes ON rollups (org, granularity, bucket)
    INCLUDE (route, method, calls, errors, cost, request_bytes, response_bytes)
    WHERE cube = 4;

-- Backfills the collector still owes at start, one row each; it deletes the row in the same
-- transaction that fills. Only a database with rollups has anything to fill.
CREATE TABLE rollup_backfills (name TEXT PRIMARY KEY);
INSERT INTO rollup_backfills (name) SELECT 'callers' WHERE EXISTS (SELECT 1 FROM rollups);
