-- Custom dimensions: the policy file's `dimensions` list names event dimensions (model,
-- feature, …) that the rollups keep, so reports can group by them. The queue carries the
-- declared ones an event has (a JSON object, NULL when none); each becomes a row of the custom
-- cube (5) per hour, day and week bucket, keyed by org, dimension name and value. Rows of every
-- other cube have both columns ''.
ALTER TABLE rollup_queue ADD COLUMN dimensions TEXT;
ALTER TABLE rollups ADD COLUMN dimension TEXT NOT NULL DEFAULT '';
ALTER TABLE rollups ADD COLUMN dimension_value TEXT NOT NULL DEFAULT '';
