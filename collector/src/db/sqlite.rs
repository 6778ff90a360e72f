//! SQLite's write path: prepared multi-row `INSERT … ON CONFLICT DO NOTHING RETURNING id` in
//! one transaction, the new events queued for the rollups in the same transaction; and the fold
//! that moves queued events into the rollup rows (read, merge, write) and deletes them from the
//! queue, again in one transaction.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};
use tollgate_core::event::UsageEvent;
use uuid::Uuid;

use super::{edge_name, json_or_null, DbError};
use crate::rollup::{self, decode_sketch, encode_sketch, merge_sketch, Sample};

const COLUMNS: &str = "INSERT INTO events (id, ts, org, user_id, plan, method, route, status, \
    latency_us, request_bytes, response_bytes, cost, decision, rule, edge, node, dimensions, \
    metrics, fingerprint, received_at) ";
const QUEUE_COLUMNS: &str = "INSERT INTO rollup_queue (ts, org, user_id, route, method, \
    status, decision, rule, latency_us, request_bytes, response_bytes, cost) ";
/// 12 columns × 2,000 rows stays under SQLite's 32,766 bound parameters.
const QUEUE_ROWS_PER_STATEMENT: usize = 2_000;

/// Rows per statement: 20 columns × 1,000 rows stays under SQLite's 32,766 bound parameters,
/// and every full chunk reuses one prepared statement.
const ROWS_PER_STATEMENT: usize = 1_000;

pub(super) async fn write_events(
    pool: &SqlitePool,
    events: &[UsageEvent],
    received_at: DateTime<Utc>,
) -> Result<Vec<bool>, DbError> {
    let received = received_at.timestamp();
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let mut inserted: HashSet<Uuid> = HashSet::with_capacity(events.len());
    // Known ids first, by the primary key alone: a resent batch then costs one index probe per
    // event instead of a 20-column insert attempt. The insert below keeps ON CONFLICT, so this
    // is only a shortcut, never what decides.
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
    let fresh: Vec<&UsageEvent> = events.iter().filter(|e| !known.contains(&e.id)).collect();
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
        qb.push(" ON CONFLICT DO NOTHING RETURNING id");
        let ids: Vec<(Vec<u8>,)> = qb.build_query_as().fetch_all(&mut *tx).await?;
        inserted.extend(ids.iter().filter_map(|(b,)| Uuid::from_slice(b).ok()));
    }

    // Queue the new events for the rollups, in this same transaction.
    let new: Vec<&UsageEvent> = events.iter().filter(|e| inserted.contains(&e.id)).collect();
    for chunk in new.chunks(QUEUE_ROWS_PER_STATEMENT) {
        let mut qb: QueryBuilder<'_, Sqlite> = QueryBuilder::new(QUEUE_COLUMNS);
        qb.push_values(chunk, |mut b, e| {
            b.push_bind(e.timestamp.timestamp())
                .push_bind(e.org.as_str())
                .push_bind(e.user.as_deref().unwrap_or(""))
                .push_bind(e.route.as_str())
                .push_bind(e.method.as_str())
                .push_bind(i64::from(e.status))
                .push_bind(rollup::decision_name(e.decision))
                .push_bind(e.rule.as_deref().unwrap_or(""))
                .push_bind(e.latency_us as i64)
                .push_bind(e.request_bytes as i64)
                .push_bind(e.response_bytes as i64)
                .push_bind(e.cost as i64);
        });
        qb.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(events.iter().map(|e| inserted.contains(&e.id)).collect())
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

/// Folds up to `max` queued events into the rollups; returns how many.
///
/// Reading the queue and the rollup rows, aggregating and merging sketches all happen before
/// the write transaction, so SQLite's single write lock — which the ingest commits wait for — is
/// held only for the writes themselves.
pub(super) async fn fold(pool: &SqlitePool, max: usize) -> Result<usize, DbError> {
    let _guard = FOLD_LOCK.lock().await;
    let mut conn = pool.acquire().await?;
    let rows: Vec<Queued> = sqlx::query_as(
        "SELECT seq, ts, org, user_id, route, method, status, decision, rule, latency_us, \
         request_bytes, response_bytes, cost FROM rollup_queue ORDER BY seq LIMIT $1",
    )
    .bind(max.min(i64::MAX as usize) as i64)
    .fetch_all(&mut *conn)
    .await?;
    let Some(last) = rows.last().map(|r| r.seq) else {
        return Ok(0);
    };
    let samples: Vec<Sample> = rows.into_iter().map(|r| r.sample).collect();
    let mut writes = Vec::new();
    for (key, hash, delta) in rollup::aggregate(&samples) {
        if !key.cube.keeps_sketch() {
            // Counters only: an upsert below, nothing to read first.
            writes.push((key, hash, delta, None, None));
            continue;
        }
        let existing: Option<(Option<Vec<u8>>,)> =
            sqlx::query_as("SELECT latency_sketch FROM rollups WHERE org = $1 AND key_hash = $2")
                .bind(&key.org)
                .bind(hash)
                .fetch_optional(&mut *conn)
                .await?;
        let sketch = match &existing {
            Some((stored,)) => {
                let mut sketch = decode_sketch(stored.as_deref());
                merge_sketch(&mut sketch, &delta.sketch);
                Some(encode_sketch(&sketch))
            }
            None => Some(encode_sketch(&delta.sketch)),
        };
        writes.push((key, hash, delta, sketch, Some(existing.is_some())));
    }
    drop(conn);

    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    for (key, hash, delta, sketch, exists) in &writes {
        if *exists == Some(true) {
            sqlx::query(
                "UPDATE rollups SET calls = calls + $1, errors = errors + $2, \
                 cost = cost + $3, request_bytes = request_bytes + $4, \
                 response_bytes = response_bytes + $5, latency_sketch = $6 \
                 WHERE org = $7 AND key_hash = $8",
            )
            .bind(delta.calls)
            .bind(delta.errors)
            .bind(delta.cost)
            .bind(delta.request_bytes)
            .bind(delta.response_bytes)
            .bind(sketch.as_deref())
            .bind(&key.org)
            .bind(hash)
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query(
                "INSERT INTO rollups (org, key_hash, granularity, bucket, user_id, route, \
                 method, status_class, decision, rule, calls, errors, cost, request_bytes, \
                 response_bytes, latency_sketch, cube) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
                 $16, $17) \
                 ON CONFLICT (org, key_hash) DO UPDATE SET calls = calls + excluded.calls, \
                 errors = errors + excluded.errors, cost = cost + excluded.cost, \
                 request_bytes = request_bytes + excluded.request_bytes, \
                 response_bytes = response_bytes + excluded.response_bytes",
            )
            .bind(&key.org)
            .bind(hash)
            .bind(key.granularity.code())
            .bind(key.bucket)
            .bind(&key.user)
            .bind(&key.route)
            .bind(&key.method)
            .bind(key.status_class)
            .bind(&key.decision)
            .bind(&key.rule)
            .bind(delta.calls)
            .bind(delta.errors)
            .bind(delta.cost)
            .bind(delta.request_bytes)
            .bind(delta.response_bytes)
            .bind(sketch.as_deref())
            .bind(key.cube.code())
            .execute(&mut *tx)
            .await?;
        }
    }
    sqlx::query("DELETE FROM rollup_queue WHERE seq <= $1")
        .bind(last)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(samples.len())
}
