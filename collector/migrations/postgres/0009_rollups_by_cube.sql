-- Rollups partitioned by cube, with room on each page for an updated row.
--
-- Why: a fold updates every rollup row it touches, and PostgreSQL can update a row in place
-- on its page without touching any index (a HOT update) only when no index holds a column the
-- update changes and the page has room. The covering indexes of the caller and route cubes
-- (0006) hold the counters, so on one table every update of every cube wrote a new entry into
-- every index and left dead index entries behind: folds slowed with each one until vacuum.
-- As partitions, those indexes exist on their own cube's partition only, and the full cube's
-- updates (most of a fold's rows) change no indexed column. In the ingest bench's fold-alone
-- phase this took a 50,000-event fold from 288-294 ms to 202-211 ms, flat from one fold to
-- the next instead of growing.
--
-- The key gains the cube (a partitioned table's unique keys hold its partition key); the key
-- hash already covered it. The table still leads with org, so it can still be distributed by
-- org (ARCHITECTURE.md).
CREATE TABLE rollups_by_cube (LIKE rollups INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY LIST (cube);
CREATE TABLE rollups_cube0 PARTITION OF rollups_by_cube FOR VALUES IN (0)
    WITH (fillfactor = 70);
CREATE TABLE rollups_cube4 PARTITION OF rollups_by_cube FOR VALUES IN (4)
    WITH (fillfactor = 70);
CREATE TABLE rollups_cube7 PARTITION OF rollups_by_cube FOR VALUES IN (7)
    WITH (fillfactor = 70);
CREATE TABLE rollups_cubes PARTITION OF rollups_by_cube DEFAULT WITH (fillfactor = 70);
INSERT INTO rollups_by_cube SELECT * FROM rollups;
DROP TABLE rollups;
ALTER TABLE rollups_by_cube RENAME TO rollups;

ALTER TABLE rollups ADD PRIMARY KEY (org, cube, key_hash);
CREATE INDEX rollups_scan ON rollups (org, cube, granularity, bucket);
CREATE INDEX rollups_cross ON rollups (cube, granularity, bucket);
-- 0006's covering indexes, each on its cube's partition only (see above).
CREATE INDEX rollups_callers ON rollups_cube7 (granularity, bucket)
    INCLUDE (org, user_id, calls, errors, cost, request_bytes, response_bytes);
CREATE INDEX rollups_org_callers ON rollups_cube7 (org, granularity, bucket)
    INCLUDE (user_id, calls, errors, cost, request_bytes, response_bytes);
CREATE INDEX rollups_routes ON rollups_cube4 (org, granularity, bucket)
    INCLUDE (route, method, calls, errors, cost, request_bytes, response_bytes);
