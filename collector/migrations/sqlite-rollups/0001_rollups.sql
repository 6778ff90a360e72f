-- The rollups' own file (`<database>.rollups`), which every connection to the database attaches
-- as `rollupdb` (`Storage::connect`). SQLite has one write lock per file: while the rollups
-- shared the events' file, a fold held the lock that ingest commits need for 100–450 ms at a
-- time, 43 % of the ingest bench's fresh phase. In their own file a fold writes rollups while
-- ingest commits events. Queries name the tables unqualified; SQLite finds them here.
--
-- The tables are those the database's migrations 0001–0007 built (see them for the why of
-- each); a database that had them moves their rows here once (`sqlite::move_rollups`).

CREATE TABLE rollups (
    cube            INTEGER NOT NULL,      -- see rollup::Cube
    granularity     INTEGER NOT NULL,      -- 0 minute, 1 hour, 2 day, 3 week
    bucket          INTEGER NOT NULL,      -- bucket start, seconds since the epoch
    org             TEXT NOT NULL,
    key_hash        INTEGER NOT NULL,
    user_id         TEXT NOT NULL,
    route           TEXT NOT NULL,
    method          TEXT NOT NULL,
    status_class    INTEGER NOT NULL,
    decision        TEXT NOT NULL,
    rule            TEXT NOT NULL,
    calls           INTEGER NOT NULL,
    errors          INTEGER NOT NULL,
    cost            INTEGER NOT NULL,
    request_bytes   INTEGER NOT NULL,
    response_bytes  INTEGER NOT NULL,
    latency_sketch  BLOB,
    dimension       TEXT NOT NULL DEFAULT '',
    dimension_value TEXT NOT NULL DEFAULT '',
    users_sketch    BLOB,
    PRIMARY KEY (org, cube, granularity, bucket, key_hash)
) WITHOUT ROWID;
CREATE INDEX rollups_time ON rollups (cube, granularity, bucket);
CREATE INDEX rollups_callers ON rollups (granularity, bucket, org, user_id, calls, errors, cost,
    request_bytes, response_bytes) WHERE cube = 7;

CREATE TABLE rollup_epochs (
    granularity INTEGER PRIMARY KEY,
    since       INTEGER NOT NULL           -- first bucket start whose rows are complete
);

CREATE TABLE rollup_backfills (name TEXT PRIMARY KEY);

-- The last seq of each queue in the events' file (`batches`: rollup_batches, `queue`: the older
-- rollup_queue) whose events the rollups hold. Written in the transaction that writes the rows:
-- a transaction over two WAL files is atomic in each file but not across both after a crash,
-- so the fold never writes both files in one; it deletes folded batches afterwards, and what a
-- crash left behind is skipped by this mark and deleted by the next fold.
CREATE TABLE fold_progress (
    name TEXT PRIMARY KEY,
    seq  INTEGER NOT NULL
);
