-- A rollup batch's samples (~100 bytes an event, one row per ingest transaction) are far over
-- the 2 kB at which PostgreSQL compresses a value before storing it out of line, and the
-- default compression, pglz, is slow: in the ingest bench at 100k events/s, pglz_compress took
-- about half of the CPU of the backend it ran in, inside the ingest transactions whose commits
-- the acknowledgements wait for. lz4 is several times faster at it (with it, the ingest
-- bench's ack p99 59.1 / 62.3 / 37.2 ms against 69.6 / 64.8 / 76.7 with pglz, three alternating
-- PostgreSQL-only runs). A server built without lz4 keeps pglz (a notice, not an error).
DO $$
BEGIN
    ALTER TABLE rollup_batches ALTER COLUMN samples SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'this server has no lz4: rollup_batches.samples keeps pglz';
END
$$;
