-- The rollups now live in a file of their own (see migrations/sqlite-rollups), and the fold
-- records there the last `rollup_batches` seq it folded, deleting folded batches from this file
-- afterwards. That mark needs seqs that are never handed out twice: without AUTOINCREMENT,
-- SQLite gives a new row the largest seq left plus one, which after the queue empties is a seq
-- already folded.
CREATE TABLE rollup_batches_new (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    events  INTEGER NOT NULL,
    samples BLOB NOT NULL
);
INSERT INTO rollup_batches_new (seq, events, samples)
SELECT seq, events, samples FROM rollup_batches;
DROP TABLE rollup_batches;
ALTER TABLE rollup_batches_new RENAME TO rollup_batches;
