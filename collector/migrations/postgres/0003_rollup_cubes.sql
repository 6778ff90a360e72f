-- Cubes: besides the full row (cube 0: org, user, route, method, status class, decision, rule),
-- every event is folded into narrower projections of the same key — by endpoint (1), by user
-- (2), by org (3) and latency by endpoint (4) — stored in the same table with the dropped
-- dimensions empty. A report reads the narrowest cube holding the dimensions it groups and
-- filters by: a 30-day overview of a busy org reads a few thousand endpoint rows instead of a
-- row per (user, route, …) per day, which is about one row per event. See collector/README.md.
-- Rows folded before this migration exist in cube 0 only.

ALTER TABLE rollups ADD COLUMN cube SMALLINT NOT NULL DEFAULT 0;

DROP INDEX rollups_scan;
CREATE INDEX rollups_scan ON rollups (org, cube, granularity, bucket);
-- Admin reports over every org.
CREATE INDEX rollups_cross ON rollups (cube, granularity, bucket);
