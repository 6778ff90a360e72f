//! SQLite's write path: the known ids looked up, then prepared multi-row `INSERT`s of the rest
//! in one transaction under the write lock, the new events queued for the rollups in the same
//! transaction; and the fold that moves queued events into the rollup rows (read, merge, write)
//! and deletes them from the queue, again in one transaction.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::{QueryBuilder, Sqlite, SqliteConnection, SqlitePool};
use tollgate_core::event::UsageEvent;
use uuid::Uuid;

use super::{edge_name, json_or_null, DbError};
use crate::rollup::{self, Delta, RollupKey, Sample, Sketches};

/// A stored sketch.
type Sketch = Option<Vec<u8>>;

const COLUMNS: &str = "INSERT INTO events (id, ts, org, user_id, plan, method, route, status, \
    latency_us, request_bytes, response_bytes, cost, decision, rule, edge, node, dimensions, \
    metrics, fingerprint, received_at) ";

/// Rows per statement: 20 columns × 1,000 rows stays under SQLite's 32,766 bound parameters,
/// and every full chunk reuses one prepared statement.
const ROWS_PER_STATEMENT: usize = 1_000;

pub(super) async fn write_events(
    pool: &SqlitePool,
    events: &[UsageEvent],
    received_at: DateTime<Utc>,
    rolled: &[String],
) -> Result<Vec<bool>, DbError> {
    let received = received_at.timestamp();
    // `BEGIN IMMEDIATE` takes the database's write lock before the first read, so no other
    // writer can store an id between the known-ids check below and the insert: the check
    // decides alone, and the insert needs neither `ON CONFLICT` nor `RETURNING` (which sent
    // every inserted id back through sqlx's worker channel).
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let mut known: HashSet<Uuid> = HashSet::new();
    for chunk in events.chunks(ROWS_PER_STATEMENT) {
        let mut qb: QueryBuilder<'_, Sqlite> =
            QueryBuilder::new("SELECT id FROM events WHERE id IN (");
        let mut ids = qb.separated(", ");
        for e in chunk {
            ids.push_bind(e.id.as_bytes().to_vec());
        }
        qb.push(")");
        let rows: Vec<(Vec<u8>,)> = qb.build_query_as().fetch_all(&mut *tx).await?;
        known.extend(rows.iter().filter_map(|(b,)| Uuid::from_slice(b).ok()));
    }
    // The first occurrence of an id is the one stored; a repeat in the same batch is a duplicate.
    let mut inserted: HashSet<Uuid> = HashSet::with_capacity(events.len());
    let fresh: Vec<&UsageEvent> = events
        .iter()
        .filter(|e| !known.contains(&e.id) && inserted.insert(e.id))
        .collect();
    for chunk in fresh.chunks(ROWS_PER_STATEMENT) {
        let mut qb: QueryBuilder<'_, Sqlite> = QueryBuilder::new(COLUMNS);
        qb.push_values(chunk, |mut b, e| {
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
        // No ON CONFLICT: a conflict here would mean the lock above did not hold, and then
        // failing the batch (the client retries) is right where skipping would miscount.
        qb.build().execute(&mut *tx).await?;
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
    // Each stored id once: for its first occurrence in `events`.
    Ok(events.iter().map(|e| inserted.remove(&e.id)).collect())
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
/// before the write transaction, so SQLite's single write lock — which the ingest commits wait
/// for — is held only for the writes themselves. Reads and writes go a thousand rows per
/// statement: every statement is a round trip to sqlx's SQLite worker thread, and one per row
/// made that hand-off most of a fold's time.
pub(super) async fn fold(pool: &SqlitePool, max: usize) -> Result<usize, DbError> {
    let _guard = FOLD_LOCK.lock().await;
    let mut conn = pool.acquire().await?;
    // What an older collector queued one row per event goes first.
    let rows: Vec<Queued> = sqlx::query_as(
        "SELECT seq, ts, org, user_id, route, method, status, decision, rule, latency_us, \
         request_bytes, response_bytes, cost, dimensions FROM rollup_queue ORDER BY seq \
         LIMIT $1",
    )
    .bind(max.min(i64::MAX as usize) as i64)
    .fetch_all(&mut *conn)
    .await?;
    let queue_last = rows.last().map(|r| r.seq);
    let mut samples: Vec<Sample> = rows.into_iter().map(|r| r.sample).collect();
    // Then whole batches, oldest first, while they fit in `max` (at least one).
    let mut batch_last = None;
    if samples.len() < max {
        let heads: Vec<(i64, i64)> =
            sqlx::query_as("SELECT seq, events FROM rollup_batches ORDER BY seq LIMIT 1024")
                .fetch_all(&mut *conn)
                .await?;
        let take = rollup::batches_that_fit(&heads, samples.len(), max);
        batch_last = take.checked_sub(1).map(|i| heads[i].0);
        if let Some(last) = batch_last {
            // Only this fold deletes from the queue's head (FOLD_LOCK), so the range is stable.
            let blobs: Vec<(Vec<u8>,)> =
                sqlx::query_as("SELECT samples FROM rollup_batches WHERE seq <= $1 ORDER BY seq")
                    .bind(last)
                    .fetch_all(&mut *conn)
                    .await?;
            for (blob,) in blobs {
                samples.extend(rollup::decode_samples(&blob)?);
            }
        }
    }
    if samples.is_empty() {
        return Ok(0);
    }
    let deltas = rollup::aggregate(&samples);
    let sketches = merged_sketches(&mut conn, &deltas).await?;
    drop(conn);

    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    write_deltas(&mut tx, &deltas, &sketches).await?;
    if let Some(last) = queue_last {
        sqlx::query("DELETE FROM rollup_queue WHERE seq <= $1")
            .bind(last)
            .execute(&mut *tx)
            .await?;
    }
    if let Some(last) = batch_last {
        sqlx::query("DELETE FROM rollup_batches WHERE seq <= $1")
            .bind(last)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(samples.len())
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
    let _guard = FOLD_LOCK.lock().await;
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    backfill_callers_in!(tx, deltas => {
        let sketches = merged_sketches(&mut tx, &deltas).await?;
        write_deltas(&mut tx, &deltas, &sketches).await?;
    });
    tx.commit().await?;
    Ok(())
}

/// The sketches of the deltas' rows after their deltas: the stored ones (a row not found is
/// new) with the deltas' latencies and users added.
async fn merged_sketches(
    conn: &mut SqliteConnection,
    deltas: &[(RollupKey, i64, Delta)],
) -> Result<Vec<Sketches>, DbError> {
    let keeping: Vec<usize> = (0..deltas.len())
        .filter(|&i| deltas[i].0.cube.keeps_sketch())
        .collect();
    let mut stored: HashMap<usize, Sketches> = HashMap::new();
    for chunk in keeping.chunks(FOLD_ROWS_PER_STATEMENT) {
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
            ") SELECT t.i, r.latency_sketch, r.users_sketch FROM t JOIN rollups r \
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
            let (latency, users) = stored
                .get(&i)
                .map_or((None, None), |(l, u)| (l.as_deref(), u.as_deref()));
            (
                key.cube.keeps_sketch().then(|| delta.sketch_onto(latency)),
                key.cube.keeps_users().then(|| delta.users_onto(users)),
            )
        })
        .collect())
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
            "INSERT INTO rollups (cube, granularity, bucket, org, key_hash, user_id, route, \
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
