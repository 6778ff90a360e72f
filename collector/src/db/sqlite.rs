//! SQLite's write path: prepared multi-row `INSERT`s in one transaction under the write lock
//! (the ids looked up first only for a chunk that turns out to hold a stored one), the new
//! events queued for the rollups in the same transaction; and the fold that moves queued events
//! into the rollup rows (read, merge, write).
//!
//! The rollups live in a second file (`<database>.rollups`, attached to every connection as
//! `rollupdb`), so a fold's writes and an ingest's writes take different write locks and run at
//! the same time. No transaction writes both files (SQLite does not make that atomic across a
//! crash): the fold writes the rollups and its progress mark together; the next ingest
//! transaction (or an idle fold) deletes the batches the mark covers, and until then every read
//! of the queue skips them.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, QueryBuilder, Sqlite, SqliteConnection, SqlitePool};
use tollgate_core::event::UsageEvent;
use uuid::Uuid;

use super::{edge_name, json_or_null, DbError};
use crate::rollup::{self, Delta, RollupKey, Sample, Sketches};

/// A stored sketch.
type Sketch = Option<Vec<u8>>;

/// The events' columns, after `INSERT` or `INSERT OR IGNORE`.
const COLUMNS: &str = " INTO events (id, ts, org, user_id, plan, method, route, status, \
    latency_us, request_bytes, response_bytes, cost, decision, rule, edge, node, dimensions, \
    metrics, fingerprint, received_at) ";

/// Rows per statement: 20 columns × 1,000 rows stays under SQLite's 32,766 bound parameters,
/// and every full chunk reuses one prepared statement.
const ROWS_PER_STATEMENT: usize = 1_000;

/// Options for a connection to one of the database's files: WAL, full durability.
pub(super) fn connect_options(path: &str) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(std::time::Duration::from_secs(10))
        // SQLite's default page cache is 2 MiB per connection: a fold touches more rollup pages
        // than that, and every miss was a read(2) of a page the OS had cached anyway. 64 MiB
        // per connection holds a fold's working set; reads of the rest go through a memory map
        // instead of copying each page.
        .pragma("cache_size", "-65536")
        .pragma("mmap_size", "1073741824")
}

/// Whether this build's SQLite keeps no memory statistics (`SQLITE_DEFAULT_MEMSTATUS=0`, set
/// for the workspace in `.cargo/config.toml`).
///
/// With them, every allocation and free inside SQLite takes one process-wide mutex, which the
/// writer's and the folder's threads (and the runtime's, dropping rows) contend for: in the
/// ingest bench that cost about a sixth of the fresh rate (collector/README.md). A build made
/// outside the workspace (`cargo install --git`) does not read that file.
pub(super) async fn keeps_no_memory_statistics(
    conn: &mut SqliteConnection,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT sqlite_compileoption_used('DEFAULT_MEMSTATUS=0')")
        .fetch_one(conn)
        .await
}

/// The rollups' file of the database at `path`.
pub(super) fn rollups_path(path: &str) -> String {
    format!("{path}.rollups")
}

/// Creates or updates the rollups' file's own schema (`migrations/sqlite-rollups`, recorded in
/// that file), before any connection attaches it.
pub(super) async fn migrate_rollups_file(path: &str) -> Result<(), DbError> {
    let mut conn = SqliteConnection::connect_with(&connect_options(path)).await?;
    sqlx::migrate!("./migrations/sqlite-rollups")
        .run(&mut conn)
        .await?;
    conn.close().await?;
    Ok(())
}

/// Attaches the rollups' file to a new connection, with the settings the main file gets.
pub(super) async fn attach_rollups(
    conn: &mut SqliteConnection,
    path: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("ATTACH DATABASE $1 AS rollupdb")
        .bind(path)
        .execute(&mut *conn)
        .await?;
    for pragma in [
        "PRAGMA rollupdb.synchronous = FULL",
        "PRAGMA rollupdb.cache_size = -65536",
        "PRAGMA rollupdb.mmap_size = 1073741824",
    ] {
        sqlx::query(pragma).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Moves the rollups of a database from before the rollups' file (migrations 0001–0007 built
/// them in the main file) into it, once. Two steps, each a transaction of one file, so a crash
/// between them is repaired by doing both again: copy (replacing whatever an interrupted copy
/// left), then drop the originals.
pub(super) async fn move_rollups(pool: &SqlitePool) -> Result<(), DbError> {
    // The fold's order: the lock, then a connection.
    let _guard = outside_folds().await;
    let mut conn = pool.acquire().await?;
    let in_main: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM main.sqlite_master WHERE type = 'table' AND name = 'rollups'",
    )
    .fetch_one(&mut *conn)
    .await?;
    if in_main == 0 {
        return Ok(());
    }
    let mut tx = conn.begin().await?;
    for statement in [
        "DELETE FROM rollupdb.rollups",
        // Not the full cube's days and weeks: no longer read (sqlite-rollups 0002).
        "INSERT INTO rollupdb.rollups (cube, granularity, bucket, org, key_hash, user_id, route, \
         method, status_class, decision, rule, calls, errors, cost, request_bytes, \
         response_bytes, latency_sketch, dimension, dimension_value, users_sketch) \
         SELECT cube, granularity, bucket, org, key_hash, user_id, route, method, status_class, \
         decision, rule, calls, errors, cost, request_bytes, response_bytes, latency_sketch, \
         dimension, dimension_value, users_sketch FROM main.rollups \
         WHERE NOT (cube = 0 AND granularity IN (2, 3))",
        "DELETE FROM rollupdb.rollup_epochs",
        "INSERT INTO rollupdb.rollup_epochs (granularity, since) \
         SELECT granularity, since FROM main.rollup_epochs",
        "DELETE FROM rollupdb.rollup_backfills",
        "INSERT INTO rollupdb.rollup_backfills (name) SELECT name FROM main.rollup_backfills",
        // The old fold deleted what it folded in the same file: what is queued is unfolded.
        "DELETE FROM rollupdb.fold_progress",
    ] {
        sqlx::query(statement).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    let mut tx = conn.begin().await?;
    for table in ["rollups", "rollup_epochs", "rollup_backfills"] {
        sqlx::query(&format!("DROP TABLE main.{table}"))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// New batches get seqs above the rollups' mark. They would not if the two files came from
/// different moments (a restore of a newer rollups file beside an older main file): new
/// batches would get seqs the mark already covers, and be deleted unfolded. At start, so the
/// next seq is past the mark.
pub(super) async fn seqs_past_the_mark(pool: &SqlitePool) -> Result<(), DbError> {
    let mut conn = pool.acquire().await?;
    let (_, batches_done) = fold_progress(&mut conn).await?;
    let next: Option<i64> =
        sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = 'rollup_batches'")
            .fetch_optional(&mut *conn)
            .await?;
    let highest: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM rollup_batches")
        .fetch_one(&mut *conn)
        .await?;
    if next.unwrap_or(0).max(highest) >= batches_done {
        return Ok(());
    }
    tracing::warn!(
        mark = batches_done,
        highest,
        "the rollups' file is ahead of the database's queue (files restored from different \
         moments?): new batches start past its mark"
    );
    let sql = if next.is_some() {
        "UPDATE sqlite_sequence SET seq = $1 WHERE name = 'rollup_batches'"
    } else {
        "INSERT INTO sqlite_sequence (name, seq) VALUES ('rollup_batches', $1)"
    };
    sqlx::query(sql)
        .bind(batches_done)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The fold's progress marks: the last `rollup_queue` and `rollup_batches` seqs the rollups hold.
async fn fold_progress(conn: &mut SqliteConnection) -> Result<(i64, i64), DbError> {
    let marks: Vec<(String, i64)> = sqlx::query_as("SELECT name, seq FROM rollupdb.fold_progress")
        .fetch_all(&mut *conn)
        .await?;
    let mark = |name: &str| {
        marks
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, seq)| *seq)
    };
    Ok((mark("queue"), mark("batches")))
}

/// Events queued and not yet in the rollups: past the progress marks.
pub(super) async fn queued_for_rollup(pool: &SqlitePool) -> Result<i64, DbError> {
    let mut conn = pool.acquire().await?;
    let (queue_done, batches_done) = fold_progress(&mut conn).await?;
    let n: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM rollup_queue WHERE seq > $1) \
         + (SELECT COALESCE(SUM(events), 0) FROM rollup_batches WHERE seq > $2)",
    )
    .bind(queue_done)
    .bind(batches_done)
    .fetch_one(&mut *conn)
    .await?;
    Ok(n)
}

pub(super) async fn write_events(
    pool: &SqlitePool,
    events: &[UsageEvent],
    received_at: DateTime<Utc>,
    rolled: &[String],
) -> Result<Vec<bool>, DbError> {
    let received = received_at.timestamp();
    // The first occurrence of an id is the one stored; a repeat in the same batch is a duplicate.
    let mut seen: HashSet<Uuid> = HashSet::with_capacity(events.len());
    let unique: Vec<&UsageEvent> = events.iter().filter(|e| seen.insert(e.id)).collect();
    // The main file's write lock is taken before the first read, so no other writer can store
    // an id while this transaction decides which ids are new: that decision needs neither
    // `ON CONFLICT` on the plain insert nor `RETURNING` (which sent every inserted id back
    // through sqlx's worker channel). Not with `BEGIN IMMEDIATE`, which would lock the attached
    // rollups' file too and wait for folds: a write statement locks only the file it writes.
    // The statement that takes the lock deletes the batches the rollups already hold (up to
    // the fold's mark, read from the rollups' file: a mark committed later only leaves more
    // for the next transaction).
    let mut tx = pool.begin().await?;
    sqlx::query(
        "DELETE FROM main.rollup_batches WHERE seq <= \
         COALESCE((SELECT seq FROM rollupdb.fold_progress WHERE name = 'batches'), 0)",
    )
    .execute(&mut *tx)
    .await?;
    let mut fresh: Vec<&UsageEvent> = Vec::with_capacity(unique.len());
    for chunk in unique.chunks(ROWS_PER_STATEMENT) {
        if insert_if_all_new(&mut tx, chunk, received).await? {
            fresh.extend_from_slice(chunk);
            continue;
        }
        // A resent chunk (every id stored) is answered by one row, not a row per id: sqlx hands
        // each row from SQLite's thread to the runtime separately, and in the ingest bench's
        // all-duplicate phase those hand-offs (futex wakes) were ~10 % of the samples.
        let stored: i64 = ids_in("SELECT COUNT(*) FROM events WHERE id IN (", chunk)
            .build_query_scalar()
            .fetch_one(&mut *tx)
            .await?;
        if usize::try_from(stored).is_ok_and(|n| n == chunk.len()) {
            continue;
        }
        let rows: Vec<(Vec<u8>,)> = ids_in("SELECT id FROM events WHERE id IN (", chunk)
            .build_query_as()
            .fetch_all(&mut *tx)
            .await?;
        let known: HashSet<Uuid> = rows
            .iter()
            .filter_map(|(b,)| Uuid::from_slice(b).ok())
            .collect();
        let new: Vec<&UsageEvent> = chunk
            .iter()
            .copied()
            .filter(|e| !known.contains(&e.id))
            .collect();
        if !new.is_empty() {
            // No OR IGNORE: a conflict here would mean the lock above did not hold, and then
            // failing the batch (the client retries) is right where skipping would miscount.
            insert_rows(&mut tx, "INSERT", &new, received).await?;
        }
        fresh.extend(new);
    }

    // Queue the new events for the rollups, in this same transaction: one row for them all.
    if !fresh.is_empty() {
        let samples: Vec<Sample> = fresh.iter().map(|e| Sample::of(e, rolled)).collect();
        sqlx::query("INSERT INTO rollup_batches (events, samples) VALUES ($1, $2)")
            .bind(samples.len() as i64)
            .bind(rollup::encode_samples(&samples)?)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    let mut inserted: HashSet<Uuid> = fresh.iter().map(|e| e.id).collect();
    // Each stored id once: for its first occurrence in `events`.
    Ok(events.iter().map(|e| inserted.remove(&e.id)).collect())
}

/// `select` (ending in `IN (`) followed by the ids of `chunk` and `)`.
fn ids_in<'a>(select: &'static str, chunk: &[&UsageEvent]) -> QueryBuilder<'a, Sqlite> {
    let mut qb: QueryBuilder<'a, Sqlite> = QueryBuilder::new(select);
    let mut ids = qb.separated(", ");
    for e in chunk {
        ids.push_bind(e.id.as_bytes().to_vec());
    }
    qb.push(")");
    qb
}

/// Inserts a chunk of distinct ids in one statement if none of them is stored yet, and says
/// whether it did; otherwise leaves the transaction as it was.
///
/// Fresh ids are the common case, and for them this saves looking every id up before
/// inserting: that lookup was about a seventh of the single writer's time in the ingest
/// bench's closed loop (~120k events/s, a trace of each statement). `INSERT OR IGNORE` inserts
/// them and its change count says whether all were new, under the write lock no other writer
/// can store an id meanwhile. A chunk with a row ignored (a stored id, or a row a plain insert
/// would refuse) is rolled back to its savepoint and goes the way that sorts ids first, where
/// a refused row fails the batch. A resent chunk (its first id stored) goes that way at once,
/// so all-duplicate resends are not looked up twice.
async fn insert_if_all_new(
    conn: &mut SqliteConnection,
    chunk: &[&UsageEvent],
    received: i64,
) -> Result<bool, DbError> {
    let Some(first) = chunk.first() else {
        return Ok(true);
    };
    let resent: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM events WHERE id = $1)")
        .bind(first.id.as_bytes().as_slice())
        .fetch_one(&mut *conn)
        .await?;
    if resent {
        return Ok(false);
    }
    sqlx::query("SAVEPOINT fresh_chunk")
        .execute(&mut *conn)
        .await?;
    let stored = insert_rows(conn, "INSERT OR IGNORE", chunk, received).await?;
    let all_new = stored == chunk.len() as u64;
    if !all_new {
        sqlx::query("ROLLBACK TO fresh_chunk")
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("RELEASE fresh_chunk")
        .execute(&mut *conn)
        .await?;
    Ok(all_new)
}

/// Inserts events (at most [`ROWS_PER_STATEMENT`]) in one statement that starts with `verb`;
/// returns how many rows it stored.
async fn insert_rows(
    conn: &mut SqliteConnection,
    verb: &str,
    events: &[&UsageEvent],
    received: i64,
) -> Result<u64, DbError> {
    let mut qb: QueryBuilder<'_, Sqlite> = QueryBuilder::new(verb);
    qb.push(COLUMNS);
    qb.push_values(events, |mut b, e| {
        b.push_bind(e.id.as_bytes().to_vec())
            .push_bind(e.timestamp.timestamp_micros())
            .push_bind(e.org.as_str())
            .push_bind(e.user.as_deref())
            .push_bind(e.plan.as_str())
            .push_bind(e.method.as_str())
            .push_bind(e.route.as_str())
            .push_bind(i64::from(e.status))
            .push_bind(e.latency_us as i64)
            .push_bind(e.request_bytes as i64)
            .push_bind(e.response_bytes as i64)
            .push_bind(e.cost as i64)
            .push_bind(rollup::decision_name(e.decision))
            .push_bind(e.rule.as_deref())
            .push_bind(edge_name(e.edge))
            .push_bind(e.node.as_str())
            .push_bind(json_or_null(&e.dimensions))
            .push_bind(json_or_null(&e.metrics))
            .push_bind(e.fingerprint.as_deref())
            .push_bind(received);
    });
    Ok(qb.build().execute(&mut *conn).await?.rows_affected())
}

/// A queued sample and its place in the queue.
#[derive(sqlx::FromRow)]
struct Queued {
    seq: i64,
    #[sqlx(flatten)]
    sample: Sample,
}

/// One folder at a time per process: the fold reads outside its write transaction (below), which
/// is only sound while nothing else changes the rollups or the queue's head meanwhile. A SQLite
/// file is served by one collector process (the CLI never folds), so a process-wide lock does.
static FOLD_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Rollup rows per statement of the fold: 20 columns × 1,000 rows stays under SQLite's 32,766
/// bound parameters (and 6 × 1,000 for the sketch reads).
const FOLD_ROWS_PER_STATEMENT: usize = 1_000;

/// Folds queued events into the rollups, up to `max` (or one batch, should it hold more);
/// returns how many.
///
/// Reading the queue and the stored sketches, aggregating and merging sketches all happen
/// before the write transaction, so the rollups' write lock is held only for the writes
/// themselves. Reads and writes go a thousand rows per statement: every statement is a round
/// trip to sqlx's SQLite worker thread, and one per row made that hand-off most of a fold's
/// time.
///
/// The rows and the progress marks commit together in the rollups' file; the folded batches are
/// deleted from the main file later (by the next ingest transaction, or by an idle fold). Until
/// then, and after a crash in between, every read skips what the marks cover.
pub(super) async fn fold(pool: &SqlitePool, max: usize) -> Result<usize, DbError> {
    let _guard = FOLD_LOCK.lock().await;
    let mut conn = pool.acquire().await?;
    let (queue_done, batches_done) = fold_progress(&mut conn).await?;
    // What an older collector queued one row per event goes first.
    let rows: Vec<Queued> = sqlx::query_as(
        "SELECT seq, ts, org, user_id, route, method, status, decision, rule, latency_us, \
         request_bytes, response_bytes, cost, dimensions FROM rollup_queue WHERE seq > $1 \
         ORDER BY seq LIMIT $2",
    )
    .bind(queue_done)
    .bind(max.min(i64::MAX as usize) as i64)
    .fetch_all(&mut *conn)
    .await?;
    let queue_last = rows.last().map(|r| r.seq);
    let mut samples: Vec<Sample> = rows.into_iter().map(|r| r.sample).collect();
    // Then whole batches, oldest first, while they fit in `max` (at least one).
    let mut batch_last = None;
    if samples.len() < max {
        let heads: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT seq, events FROM rollup_batches WHERE seq > $1 ORDER BY seq LIMIT 1024",
        )
        .bind(batches_done)
        .fetch_all(&mut *conn)
        .await?;
        let take = rollup::batches_that_fit(&heads, samples.len(), max);
        batch_last = take.checked_sub(1).map(|i| heads[i].0);
        if let Some(last) = batch_last {
            // Only this fold moves the marks (FOLD_LOCK), so the range is stable.
            let blobs: Vec<(Vec<u8>,)> = sqlx::query_as(
                "SELECT samples FROM rollup_batches WHERE seq > $1 AND seq <= $2 ORDER BY seq",
            )
            .bind(batches_done)
            .bind(last)
            .fetch_all(&mut *conn)
            .await?;
            for (blob,) in blobs {
                samples.extend(rollup::decode_samples(&blob)?);
            }
        }
    }
    if samples.is_empty() {
        delete_folded(&mut conn, queue_done, batches_done).await?;
        return Ok(0);
    }
    let deltas = rollup::aggregate(&samples);
    let file = database_file(pool);
    let mut cache =
        take_sketch_cache(&file, (queue_done, batches_done)).unwrap_or_else(|| SketchCache {
            file,
            marks: (queue_done, batches_done),
            rows: SketchRows::default(),
            whole: HashSet::new(),
        });
    let sketches = merged_sketches(&mut conn, &deltas, Some(&mut cache)).await?;

    // Deferred: the first write locks the rollups' file only.
    let mut tx = conn.begin().await?;
    write_deltas(&mut tx, &deltas, &sketches).await?;
    // Under that lock, the marks must still be the ones this fold started from. Only another
    // process folding the same file (which SQLite's one-collector rule forbids) moves them;
    // then nothing of this fold is written, and its events are folded once, by that process.
    if fold_progress(&mut tx).await? != (queue_done, batches_done) {
        tx.rollback().await?;
        tracing::error!("another process folded this SQLite database: one collector per file");
        return Err(DbError::ConcurrentFold);
    }
    for (name, last) in [("queue", queue_last), ("batches", batch_last)] {
        if let Some(last) = last {
            sqlx::query(
                "INSERT INTO rollupdb.fold_progress (name, seq) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET seq = excluded.seq",
            )
            .bind(name)
            .bind(last)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    cache.marks = (
        queue_last.unwrap_or(queue_done),
        batch_last.unwrap_or(batches_done),
    );
    cache.keep(&deltas, sketches);
    *SKETCH_CACHE.lock().unwrap_or_else(|e| e.into_inner()) = Some(cache);
    Ok(samples.len())
}

/// Deletes from the main file the queued events the rollups already hold (up to the marks),
/// when the folder finds nothing new. While events arrive, each ingest transaction deletes the
/// folded batches under the lock it holds anyway, so the folder never waits for that lock.
/// Looks before it writes: most calls find nothing.
async fn delete_folded(
    conn: &mut SqliteConnection,
    queue_done: i64,
    batches_done: i64,
) -> Result<(), DbError> {
    let (queue, batches): (i64, i64) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM rollup_queue WHERE seq <= $1), \
         EXISTS (SELECT 1 FROM rollup_batches WHERE seq <= $2)",
    )
    .bind(queue_done)
    .bind(batches_done)
    .fetch_one(&mut *conn)
    .await?;
    if queue != 0 {
        sqlx::query("DELETE FROM rollup_queue WHERE seq <= $1")
            .bind(queue_done)
            .execute(&mut *conn)
            .await?;
    }
    if batches != 0 {
        sqlx::query("DELETE FROM rollup_batches WHERE seq <= $1")
            .bind(batches_done)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Migration 0006's backfill (see `Storage::backfill_callers`), in one write transaction under
/// the fold lock.
pub(super) async fn backfill_callers(pool: &SqlitePool) -> Result<(), DbError> {
    // Checked before taking the write lock too: every start and CLI command gets here.
    let pending: i64 = sqlx::query_scalar(super::CALLERS_PENDING)
        .fetch_one(pool)
        .await?;
    if pending == 0 {
        return Ok(());
    }
    let _guard = outside_folds().await;
    // The rollups' file's write lock first (a write to it, not `BEGIN IMMEDIATE`, which would
    // lock the main file too), so the check below is not read from a stale snapshot.
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM rollupdb.rollup_backfills WHERE 0")
        .execute(&mut *tx)
        .await?;
    backfill_callers_in!(tx, deltas => {
        let sketches = merged_sketches(&mut tx, &deltas, None).await?;
        write_deltas(&mut tx, &deltas, &sketches).await?;
    });
    tx.commit().await?;
    Ok(())
}

/// A rollup row's primary key: org, cube, granularity, bucket, key hash.
type RowKey = (String, i16, i16, i64, i64);

/// A rollup row's bucket as the sketch cache names it: granularity code, bucket start.
type BucketKey = (i16, i64);

fn bucket_key(key: &RollupKey) -> BucketKey {
    (key.granularity.code(), key.bucket)
}

fn row_key(key: &RollupKey, hash: i64) -> RowKey {
    (
        key.org.clone(),
        key.cube.code(),
        key.granularity.code(),
        key.bucket,
        hash,
    )
}

/// The stored sketches of the buckets the last fold wrote into, for the next one. At 100k
/// events/s a fold merges into ~24k rows that keep sketches, nearly all of them in the buckets
/// the fold before wrote (this minute's, hour's, day's and week's), and reading their stored
/// sketches back took 0.24–0.36 s of a ~0.9 s fold. Sound only because this process is the
/// database's only writer of rollups (one collector process per SQLite file, one folder by
/// [`FOLD_LOCK`]): the cache is used only while the progress marks are those its fold
/// committed, and every other write of rollups (prune, backfill, the move) drops it.
struct SketchCache {
    /// The database (main file) it belongs to.
    file: String,
    /// The progress marks its fold committed.
    marks: (i64, i64),
    /// Rows of the cubes that keep sketches, as stored.
    rows: SketchRows,
    /// Buckets (granularity code, bucket) all of whose rows are in `rows`: they held none when
    /// a fold first wrote into them under this cache, and every fold since kept the rows it
    /// wrote. A row of theirs not in `rows` is new, with nothing to read back.
    ///
    /// Without it, each fold of the ingest bench read back ~2,000 rows that did not exist
    /// (keys the fold before had no event for): with it, a fold's sketch phase under load
    /// took 37–41 ms on average instead of 56–62 (`benches/README.md`, item 12).
    whole: HashSet<BucketKey>,
}

/// Most rows the cache holds (~100 MB with sketches of a kilobyte; the ingest bench's folds
/// keep ~15,000): past it, it is dropped, and the next fold reads back what it merges into, as
/// after a restart.
const SKETCH_CACHE_ROWS: usize = 100_000;

/// The cache's map. Every fold hashes each row's key into it: foldhash (randomly seeded, as
/// `rollup::aggregate`'s maps) rather than std's SipHash, which is slower on these keys.
type SketchRows = HashMap<RowKey, Sketches, foldhash::fast::RandomState>;

impl SketchCache {
    /// Keeps what a fold wrote (`sketches`, of `deltas`' rows) and, of what it held before,
    /// the rows of the buckets that fold wrote into: buckets time has moved past are let go
    /// (and are no longer whole).
    fn keep(&mut self, deltas: &[(RollupKey, i64, Delta)], sketches: Vec<Sketches>) {
        // A fold writes into a handful of buckets (this minute, hour, day and week, and
        // those of late events).
        let mut written: Vec<BucketKey> = Vec::new();
        for ((key, hash, _), sketches) in deltas.iter().zip(sketches) {
            if key.cube.keeps_any_sketch() {
                let bucket = bucket_key(key);
                if !written.contains(&bucket) {
                    written.push(bucket);
                }
                self.rows.insert(row_key(key, *hash), sketches);
            }
        }
        self.rows
            .retain(|(_, _, granularity, bucket, _), _| written.contains(&(*granularity, *bucket)));
        self.whole.retain(|bucket| written.contains(bucket));
        if self.rows.len() > SKETCH_CACHE_ROWS {
            self.rows = SketchRows::default();
            self.whole.clear();
        }
    }
}

static SKETCH_CACHE: std::sync::Mutex<Option<SketchCache>> = std::sync::Mutex::new(None);

fn database_file(pool: &SqlitePool) -> String {
    pool.connect_options()
        .get_filename()
        .to_string_lossy()
        .into_owned()
}

/// Takes the cached sketches of `file` if they are still what the rollups hold (`marks`).
fn take_sketch_cache(file: &str, marks: (i64, i64)) -> Option<SketchCache> {
    let mut cache = SKETCH_CACHE.lock().unwrap_or_else(|e| e.into_inner());
    match cache.take() {
        Some(c) if c.file == file && c.marks == marks => Some(c),
        _ => None,
    }
}

/// Drops the cached sketches: something other than a fold wrote rollups.
fn forget_cached_sketches() {
    *SKETCH_CACHE.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// For a write of rollups other than a fold's (prune, backfill, the move): keeps folds out
/// while the guard lives, and drops the folder's cached sketches, which that write may make
/// stale (no fold can cache again before the guard is dropped).
pub(super) async fn outside_folds() -> tokio::sync::MutexGuard<'static, ()> {
    let guard = FOLD_LOCK.lock().await;
    forget_cached_sketches();
    guard
}

/// The sketches of the deltas' rows after their deltas: the stored ones (a row not found is
/// new) with the deltas' latencies and users added. Rows in `cache` are not read back, nor are
/// rows of a bucket it holds whole (they are new); a bucket it has not seen is made whole if the
/// rollups have no row of it yet.
async fn merged_sketches(
    conn: &mut SqliteConnection,
    deltas: &[(RollupKey, i64, Delta)],
    cache: Option<&mut SketchCache>,
) -> Result<Vec<Sketches>, DbError> {
    // Split borrows: the cached rows are looked up once, here, and read while `whole` grows.
    let (rows, whole) = match cache {
        Some(c) => (Some(&c.rows), Some(&mut c.whole)),
        None => (None, None),
    };
    let mut cached: Vec<Option<&Sketches>> = vec![None; deltas.len()];
    let mut misses: Vec<usize> = Vec::new();
    for (i, (key, hash, _)) in deltas.iter().enumerate() {
        if !key.cube.keeps_any_sketch() {
            continue;
        }
        cached[i] = rows.and_then(|r| r.get(&row_key(key, *hash)));
        if cached[i].is_none() {
            misses.push(i);
        }
    }
    if let Some(whole) = whole {
        let mut unseen: Vec<BucketKey> = misses
            .iter()
            .map(|&i| bucket_key(&deltas[i].0))
            .filter(|bucket| !whole.contains(bucket))
            .collect();
        unseen.sort_unstable();
        unseen.dedup();
        for (granularity, bucket) in unseen {
            if !bucket_has_sketch_rows(conn, granularity, bucket).await? {
                whole.insert((granularity, bucket));
            }
        }
        misses.retain(|&i| !whole.contains(&bucket_key(&deltas[i].0)));
    }
    let mut stored: HashMap<usize, Sketches> = HashMap::new();
    for chunk in misses.chunks(FOLD_ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> =
            QueryBuilder::new("WITH t (i, cube, granularity, bucket, org, key_hash) AS (");
        q.push_values(chunk, |mut b, &i| {
            let (key, hash, _) = &deltas[i];
            b.push_bind(i as i64)
                .push_bind(key.cube.code())
                .push_bind(key.granularity.code())
                .push_bind(key.bucket)
                .push_bind(key.org.as_str())
                .push_bind(*hash);
        });
        q.push(
            ") SELECT t.i, r.latency_sketch, r.users_sketch FROM t JOIN rollupdb.rollups r \
             ON r.cube = t.cube AND r.granularity = t.granularity AND r.bucket = t.bucket \
             AND r.org = t.org AND r.key_hash = t.key_hash",
        );
        let found: Vec<(i64, Sketch, Sketch)> = q.build_query_as().fetch_all(&mut *conn).await?;
        stored.extend(
            found.into_iter().filter_map(|(i, latency, users)| {
                Some((usize::try_from(i).ok()?, (latency, users)))
            }),
        );
    }
    Ok(deltas
        .iter()
        .enumerate()
        .map(|(i, (key, _, delta))| {
            if !key.cube.keeps_any_sketch() {
                return (None, None);
            }
            let (latency, users) = stored
                .get(&i)
                .or(cached[i])
                .map_or((None, None), |(l, u)| (l.as_deref(), u.as_deref()));
            (
                key.cube.keeps_sketch().then(|| delta.sketch_onto(latency)),
                key.cube.keeps_users().then(|| delta.users_onto(users)),
            )
        })
        .collect())
}

/// Whether the rollups hold a row of a cube that keeps a sketch in this bucket.
async fn bucket_has_sketch_rows(
    conn: &mut SqliteConnection,
    granularity: i16,
    bucket: i64,
) -> Result<bool, DbError> {
    let mut q: QueryBuilder<Sqlite> =
        QueryBuilder::new("SELECT EXISTS (SELECT 1 FROM rollupdb.rollups WHERE cube IN (");
    let mut cubes = q.separated(", ");
    for cube in rollup::Cube::ALL
        .into_iter()
        .filter(|c| c.keeps_any_sketch())
    {
        cubes.push_bind(cube.code());
    }
    q.push(") AND granularity = ")
        .push_bind(granularity)
        .push(" AND bucket = ")
        .push_bind(bucket)
        .push(")");
    Ok(q.build_query_scalar().fetch_one(&mut *conn).await?)
}

/// Adds the deltas to their rows, creating the missing ones, with `sketches` (from
/// [`merged_sketches`]) as the rows' new sketches.
async fn write_deltas(
    conn: &mut SqliteConnection,
    deltas: &[(RollupKey, i64, Delta)],
    sketches: &[Sketches],
) -> Result<(), DbError> {
    let rows: Vec<_> = deltas.iter().zip(sketches).collect();
    for chunk in rows.chunks(FOLD_ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO rollupdb.rollups (cube, granularity, bucket, org, key_hash, user_id, route, \
             method, status_class, decision, rule, dimension, dimension_value, calls, errors, \
             cost, request_bytes, response_bytes, latency_sketch, users_sketch) ",
        );
        q.push_values(chunk, |mut b, &((key, hash, delta), (sketch, users))| {
            b.push_bind(key.cube.code())
                .push_bind(key.granularity.code())
                .push_bind(key.bucket)
                .push_bind(key.org.as_str())
                .push_bind(*hash)
                .push_bind(key.user.as_str())
                .push_bind(key.route.as_str())
                .push_bind(key.method.as_str())
                .push_bind(key.status_class)
                .push_bind(key.decision.as_str())
                .push_bind(key.rule.as_str())
                .push_bind(key.dimension.as_str())
                .push_bind(key.dimension_value.as_str())
                .push_bind(delta.calls)
                .push_bind(delta.errors)
                .push_bind(delta.cost)
                .push_bind(delta.request_bytes)
                .push_bind(delta.response_bytes)
                .push_bind(sketch.as_deref())
                .push_bind(users.as_deref());
        });
        q.push(
            " ON CONFLICT (org, cube, granularity, bucket, key_hash) DO UPDATE SET \
             calls = calls + excluded.calls, errors = errors + excluded.errors, \
             cost = cost + excluded.cost, request_bytes = request_bytes + excluded.request_bytes, \
             response_bytes = response_bytes + excluded.response_bytes, \
             latency_sketch = COALESCE(excluded.latency_sketch, latency_sketch), \
             users_sketch = COALESCE(excluded.users_sketch, users_sketch)",
        );
        q.build().execute(&mut *conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn this_build_of_sqlite_keeps_no_memory_statistics() {
        let mut conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        assert!(
            keeps_no_memory_statistics(&mut conn).await.unwrap(),
            "SQLite was built without SQLITE_DEFAULT_MEMSTATUS=0: is LIBSQLITE3_FLAGS still set \
             in .cargo/config.toml?"
        );
    }
}
