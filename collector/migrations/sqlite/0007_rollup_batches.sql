-- Events waiting for the rollups, one row per ingest transaction instead of one per event: the
-- new events' rollup samples, postcard-encoded (`rollup::encode_samples`). Thirteen values per
-- event written into `rollup_queue` and read back by the fold cost more than encoding them; with
-- one row per commit the ingest bench's fresh rate rose from 69–89k to 103–118k events/s on
-- SQLite and from 60–79k to 87–93k on PostgreSQL. `rollup_queue` stays until what an older
-- collector left in it is folded; nothing writes it any more.
CREATE TABLE rollup_batches (
    seq     INTEGER PRIMARY KEY,
    events  INTEGER NOT NULL,
    samples BLOB NOT NULL
);
