//! PostgreSQL's write path: ids looked up when a sample of them is stored, the rest COPYed
//! (binary) straight into the day-partitioned events table and queued for the rollups in the
//! same transaction; a group holding an id stored meanwhile goes again through a staging table
//! and `INSERT … ON CONFLICT DO NOTHING`. So a retried event is never counted twice nor zero
//! times. The fold claims queued events, locks their rollup rows in one global order, merges
//! and writes them, and deletes the claimed events, again in one transaction; several
//! collector replicas can do all of this against one server.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::encode::IsNull;
use sqlx::postgres::{PgArgumentBuffer, PgPoolOptions};
use sqlx::types::Json;
use sqlx::PgPool;
use tollgate_core::event::UsageEvent;
use uuid::Uuid;

use super::{edge_name, DbError};
use crate::rollup::{self, Sample};

/// The columns of `events` the write path fills, in COPY order (`copy_rows` writes them).
pub const EVENT_COLUMNS: &str = "id, ts, org, user_id, plan, method, route, status, latency_us, \
    request_bytes, response_bytes, cost, decision, rule, edge, node, dimensions, metrics, \
    fingerprint, received_at";

/// A PostgreSQL pool and the day partitions this process knows exist.
#[derive(Clone, Debug)]
pub struct PgStore {
    /// The pool.
    pub pool: PgPool,
    /// Days (since the epoch) whose partition exists. Only a cache: creation is idempotent, so
    /// replicas that each keep one never disagree.
    partitions: Arc<Mutex<HashSet<i64>>>,
}

fn day_of(ts: DateTime<Utc>) -> i64 {
    ts.timestamp().div_euclid(86_400)
}

fn date_of_day(day: i64) -> NaiveDate {
    DateTime::from_timestamp(day * 86_400, 0)
        .unwrap_or_default()
        .date_naive()
}

/// Events per id looked up when deciding whether a group is resent
/// ([`PgStore::write_events`]).
const PROBE_STRIDE: usize = 500;

/// The name of the `events` partition of `day` (days since the epoch).
fn partition_name(day: i64) -> String {
    format!("events_p{}", date_of_day(day).format("%Y%m%d"))
}

/// The ids of `events` already stored. One primary-key probe per id, whatever the planner
/// thinks of the array: the LIMIT keeps the lateral subquery from being flattened into a join,
/// which with a bound array of thousands of ids chose a sequential scan (or a sort) of the
/// whole day's partition. The probes go to each day's partition by name (the write made sure
/// it exists), not through the partitioned table, which prunes its partitions again for every
/// probe: 1,000 probes took 2.1–2.8 ms so against 3.5–3.7 ms through the parent (`pgbench`, a
/// million-row partition), and resent batches are checked this way id by id.
async fn stored_ids<'a>(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    events: impl Iterator<Item = &'a UsageEvent>,
) -> Result<HashSet<Uuid>, DbError> {
    let mut known = HashSet::new();
    for (day, (ts, ids)) in by_day(events) {
        let stored: Vec<(Uuid,)> = sqlx::query_as(&probe("t.id", day))
            .bind(ts)
            .bind(ids)
            .fetch_all(&mut **tx)
            .await?;
        known.extend(stored.into_iter().map(|(id,)| id));
    }
    Ok(known)
}

/// How many of `events` are stored, by the same probes as [`stored_ids`] but answered by one
/// row a day: a resent group (every id stored) needs nothing more.
async fn stored_count<'a>(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    events: impl Iterator<Item = &'a UsageEvent>,
) -> Result<usize, DbError> {
    let mut count = 0;
    for (day, (ts, ids)) in by_day(events) {
        let stored: i64 = sqlx::query_scalar(&probe("COUNT(*)", day))
            .bind(ts)
            .bind(ids)
            .fetch_one(&mut **tx)
            .await?;
        count += usize::try_from(stored).unwrap_or(0);
    }
    Ok(count)
}

/// The timestamps and ids of `events`, by day.
fn by_day<'a>(
    events: impl Iterator<Item = &'a UsageEvent>,
) -> BTreeMap<i64, (Vec<DateTime<Utc>>, Vec<Uuid>)> {
    let mut days: BTreeMap<i64, (Vec<DateTime<Utc>>, Vec<Uuid>)> = BTreeMap::new();
    for e in events {
        let (ts, ids) = days.entry(day_of(e.timestamp)).or_default();
        ts.push(e.timestamp);
        ids.push(e.id);
    }
    days
}

/// The probes of the (timestamp, id) pairs bound as `$1` and `$2` in `day`'s partition,
/// selecting `what` of the stored ones.
fn probe(what: &str, day: i64) -> String {
    format!(
        "SELECT {what} FROM UNNEST($1::timestamptz[], $2::uuid[]) AS t(ts, id) \
         CROSS JOIN LATERAL (SELECT 1 FROM {} e WHERE e.ts = t.ts AND e.id = t.id \
         LIMIT 1) AS stored",
        partition_name(day)
    )
}

/// COPYs `rows` (COPY binary format, [`copy_rows`]) into `table (columns)`.
async fn copy_in(
    conn: &mut sqlx::PgConnection,
    table: &str,
    columns: &str,
    rows: &[u8],
) -> Result<(), DbError> {
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY {table} ({columns}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    for chunk in rows.chunks(1 << 20) {
        copy.send(chunk).await?;
    }
    copy.finish().await?;
    Ok(())
}

/// The fast path's writes: `fresh` into `events`, and into the rollup queue.
async fn copy_fresh(
    conn: &mut sqlx::PgConnection,
    fresh: &[&UsageEvent],
    received_at: DateTime<Utc>,
    rolled: &[String],
) -> Result<(), DbError> {
    copy_in(
        conn,
        "events",
        EVENT_COLUMNS,
        &copy_rows(fresh, received_at)?,
    )
    .await?;
    queue_batch(conn, fresh, rolled).await
}

/// Queues `new` events for the rollups: one `rollup_batches` row for them all.
async fn queue_batch(
    conn: &mut sqlx::PgConnection,
    new: &[&UsageEvent],
    rolled: &[String],
) -> Result<(), DbError> {
    if new.is_empty() {
        return Ok(());
    }
    let samples: Vec<Sample> = new.iter().map(|e| Sample::of(e, rolled)).collect();
    sqlx::query("INSERT INTO rollup_batches (events, samples) VALUES ($1, $2)")
        .bind(i32::try_from(samples.len()).unwrap_or(i32::MAX))
        .bind(rollup::encode_samples(&samples)?)
        .execute(conn)
        .await?;
    Ok(())
}

/// COPY's binary format: a signature, flags and header extension, then per row its field
/// count and each field as a length (−1 for NULL) and the value's binary form, then a
/// trailer. Each value is encoded by sqlx's own `Encode`, exactly as a bound parameter of that
/// type is sent, so the known-ids lookup (whose timestamps are bound) finds what COPY stored:
/// both cut timestamps to the microsecond.
///
/// Why binary: with COPY's text format, PostgreSQL parsing the text (timestamps, UUIDs,
/// integers) was 42 % of COPY's server CPU in the ingest bench at 100k events/s (`perf`), on
/// the path every acknowledgement waits for; the binary forms are read nearly as they are.
struct CopyRows {
    buf: PgArgumentBuffer,
}

/// The format's signature, flags (no OIDs) and header extension length.
const COPY_BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

impl CopyRows {
    fn new(rows: usize) -> Self {
        let mut buf = PgArgumentBuffer::default();
        buf.reserve(COPY_BINARY_HEADER.len() + rows * 360 + 2);
        buf.extend_from_slice(COPY_BINARY_HEADER);
        Self { buf }
    }

    fn row(&mut self, fields: i16) {
        self.buf.extend_from_slice(&fields.to_be_bytes());
    }

    fn field<'q, T: sqlx::Encode<'q, sqlx::Postgres>>(&mut self, value: &T) -> Result<(), DbError> {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        let null = value
            .encode_by_ref(&mut self.buf)
            .map_err(|e| DbError::Encode(e.to_string()))?;
        let len = match null {
            IsNull::Yes => {
                self.buf.truncate(at + 4);
                -1
            }
            IsNull::No => i32::try_from(self.buf.len() - at - 4)
                .map_err(|_| DbError::Encode("a COPY value over 2 GiB".into()))?,
        };
        self.buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }

    fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        std::mem::take(&mut *self.buf)
    }
}

/// A counter the schema stores as BIGINT; ingest bounds every one far below `i64::MAX`.
fn bigint(name: &str, v: u64) -> Result<i64, DbError> {
    i64::try_from(v).map_err(|_| DbError::Encode(format!("`{name}` {v} is over BIGINT")))
}

/// `events` as COPY binary rows, in [`EVENT_COLUMNS`] order.
fn copy_rows(events: &[&UsageEvent], received_at: DateTime<Utc>) -> Result<Vec<u8>, DbError> {
    let mut rows = CopyRows::new(events.len());
    for e in events {
        rows.row(20);
        rows.field(&e.id)?;
        rows.field(&e.timestamp)?;
        rows.field(&e.org.as_str())?;
        rows.field(&e.user.as_deref())?;
        rows.field(&e.plan.as_str())?;
        rows.field(&e.method.as_str())?;
        rows.field(&e.route.as_str())?;
        rows.field(
            &i16::try_from(e.status)
                .map_err(|_| DbError::Encode(format!("`status` {} is over SMALLINT", e.status)))?,
        )?;
        rows.field(&bigint("latency_us", e.latency_us)?)?;
        rows.field(&bigint("request_bytes", e.request_bytes)?)?;
        rows.field(&bigint("response_bytes", e.response_bytes)?)?;
        rows.field(&bigint("cost", e.cost)?)?;
        rows.field(&rollup::decision_name(e.decision))?;
        rows.field(&e.rule.as_deref())?;
        rows.field(&edge_name(e.edge))?;
        rows.field(&e.node.as_str())?;
        // JSONB; an empty map is stored as NULL, as on SQLite.
        rows.field(&(!e.dimensions.is_empty()).then_some(Json(&e.dimensions)))?;
        rows.field(&(!e.metrics.is_empty()).then_some(Json(&e.metrics)))?;
        rows.field(&e.fingerprint.as_deref())?;
        rows.field(&received_at)?;
    }
    Ok(rows.finish())
}

impl PgStore {
    pub(super) fn new(pool: PgPool) -> Self {
        Self {
            pool,
            partitions: Arc::default(),
        }
    }

    /// A store with this one's connection options over a pool of its own, of at most `max`
    /// connections opened on first use (so on the runtime that first uses them).
    pub(super) fn with_own_pool(&self, max: u32) -> Self {
        let options = (*self.pool.connect_options()).clone();
        Self::new(
            PgPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy_with(options),
        )
    }

    /// Creates the partitions of yesterday, today and tomorrow (at start, so the first batch
    /// does not pay for it).
    pub(super) async fn ensure_partitions_around(&self, now: DateTime<Utc>) -> Result<(), DbError> {
        let today = day_of(now);
        self.ensure_partitions([today - 1, today, today + 1]).await
    }

    async fn ensure_partitions(&self, days: impl IntoIterator<Item = i64>) -> Result<(), DbError> {
        let missing: Vec<i64> = {
            let known = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
            let mut v: Vec<i64> = days.into_iter().filter(|d| !known.contains(d)).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        for day in missing {
            let from = date_of_day(day);
            let to = date_of_day(day + 1);
            let name = partition_name(day);
            let ddl = format!(
                "CREATE TABLE IF NOT EXISTS {name} PARTITION OF events \
                 FOR VALUES FROM ('{from} 00:00:00+00') TO ('{to} 00:00:00+00')"
            );
            if let Err(e) = sqlx::query(&ddl).execute(&self.pool).await {
                // Another replica may have created it between our IF NOT EXISTS and ours.
                let exists: (Option<String>,) = sqlx::query_as("SELECT to_regclass($1)::text")
                    .bind(&name)
                    .fetch_one(&self.pool)
                    .await?;
                if exists.0.is_none() {
                    return Err(e.into());
                }
            }
            self.partitions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(day);
        }
        Ok(())
    }

    /// Drops whole day partitions that end before `cutoff`.
    pub(super) async fn drop_partitions_before(
        &self,
        cutoff: DateTime<Utc>,
    ) -> Result<(), DbError> {
        let names: Vec<(String,)> = sqlx::query_as(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'events'",
        )
        .fetch_all(&self.pool)
        .await?;
        let cutoff_day = day_of(cutoff);
        for (name,) in names {
            let Some(date) = name
                .strip_prefix("events_p")
                .and_then(|d| NaiveDate::parse_from_str(d, "%Y%m%d").ok())
            else {
                continue;
            };
            let day = day_of(date.and_time(chrono::NaiveTime::MIN).and_utc());
            // The partition ends before the day holding the cutoff starts.
            if day < cutoff_day {
                sqlx::query(&format!("DROP TABLE IF EXISTS {name}"))
                    .execute(&self.pool)
                    .await?;
                self.partitions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&day);
            }
        }
        Ok(())
    }

    pub(super) async fn write_events(
        &self,
        events: &[UsageEvent],
        received_at: DateTime<Utc>,
        rolled: &[String],
    ) -> Result<Vec<bool>, DbError> {
        self.ensure_partitions(events.iter().map(|e| day_of(e.timestamp)))
            .await?;
        let mut tx = self.pool.begin().await?;
        // Known ids first, but only for a group that looks resent: one in every
        // `PROBE_STRIDE` events is looked up (so a resent client batch of that size or more is
        // seen wherever it sits in the group), and only when one of those is stored are all
        // of them. A fresh group (the common case) goes straight to COPY; should it hold a
        // stored id after all, COPY fails on the unique index and the group takes the staging
        // path below, which is right, only slower. A resent one skips COPY and the insert
        // entirely. Looking every id up first cost the ingest bench ~15 % of its fresh rate.
        let mut known = stored_ids(&mut tx, events.iter().step_by(PROBE_STRIDE)).await?;
        if !known.is_empty() {
            // Counted first: a resent group is answered without a row per id.
            if stored_count(&mut tx, events.iter()).await? == events.len() {
                tx.commit().await?;
                return Ok(vec![false; events.len()]);
            }
            known = stored_ids(&mut tx, events.iter()).await?;
        }
        let fresh: Vec<&UsageEvent> = events.iter().filter(|e| !known.contains(&e.id)).collect();
        if fresh.is_empty() {
            tx.commit().await?;
            return Ok(vec![false; events.len()]);
        }
        // Fast path: the events not stored a moment ago are COPYed straight into `events` and
        // the rollup queue. COPY has no ON CONFLICT, so an id stored in between (the same event
        // in another replica's or committer's transaction) aborts it with a unique violation:
        // then the whole group goes again through the staging table, whose insert skips what is
        // already there. Either way the dedup check and the write share one transaction.
        match copy_fresh(&mut tx, &fresh, received_at, rolled).await {
            Ok(()) => {
                tx.commit().await?;
                let inserted: HashSet<Uuid> = fresh.iter().map(|e| e.id).collect();
                Ok(events.iter().map(|e| inserted.contains(&e.id)).collect())
            }
            Err(e) if e.is_unique_violation() => {
                tx.rollback().await?;
                self.write_via_staging(events, received_at, rolled).await
            }
            Err(e) => Err(e),
        }
    }

    /// The path that tolerates ids stored concurrently: COPY into a per-connection staging
    /// table, then one statement inserting into `events` with `ON CONFLICT DO NOTHING` and
    /// queueing exactly the rows it inserted.
    async fn write_via_staging(
        &self,
        events: &[UsageEvent],
        received_at: DateTime<Utc>,
        rolled: &[String],
    ) -> Result<Vec<bool>, DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "CREATE TEMP TABLE IF NOT EXISTS staging_events AS \
             SELECT {EVENT_COLUMNS} FROM events WITH NO DATA"
        ))
        .execute(&mut *tx)
        .await?;
        // Rows left by a transaction that failed after COPY would otherwise be inserted later.
        sqlx::query("TRUNCATE staging_events")
            .execute(&mut *tx)
            .await?;
        let all: Vec<&UsageEvent> = events.iter().collect();
        copy_in(
            &mut tx,
            "staging_events",
            EVENT_COLUMNS,
            &copy_rows(&all, received_at)?,
        )
        .await?;
        let ids: Vec<(Uuid,)> = sqlx::query_as(&format!(
            "INSERT INTO events ({EVENT_COLUMNS}) SELECT {EVENT_COLUMNS} FROM staging_events \
             ON CONFLICT DO NOTHING RETURNING id"
        ))
        .fetch_all(&mut *tx)
        .await?;
        let inserted: HashSet<Uuid> = ids.into_iter().map(|(id,)| id).collect();
        // The inserted events, each once, in batch order, go to the rollup queue.
        let mut unqueued = inserted.clone();
        let new: Vec<&UsageEvent> = events.iter().filter(|e| unqueued.remove(&e.id)).collect();
        queue_batch(&mut tx, &new, rolled).await?;
        tx.commit().await?;
        Ok(events.iter().map(|e| inserted.contains(&e.id)).collect())
    }

    /// Migration 0006's backfill (see `Storage::backfill_callers`). The table lock keeps folds
    /// (which take ROW EXCLUSIVE) and other replicas' backfills out until it commits.
    pub(super) async fn backfill_callers(&self) -> Result<(), DbError> {
        // Checked before locking too: every start and CLI command gets here, and the lock
        // would wait behind autovacuum and block folds for nothing.
        let pending: i64 = sqlx::query_scalar(super::CALLERS_PENDING)
            .fetch_one(&self.pool)
            .await?;
        if pending == 0 {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("LOCK TABLE rollups IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        backfill_callers_in!(tx, deltas => {
            // In chunks: one UNNEST statement per 10,000 rows keeps each message small.
            for chunk in deltas.chunks(10_000) {
                upsert_deltas(&mut tx, chunk).await?;
            }
        });
        tx.commit().await?;
        Ok(())
    }

    /// Folds up to `max` queued events into the rollups; returns how many. Rows are claimed
    /// with `FOR UPDATE SKIP LOCKED`, so folders on several replicas never take the same ones.
    pub(super) async fn fold(&self, max: usize) -> Result<usize, DbError> {
        let mut tx = self.pool.begin().await?;
        // What an older collector queued one row per event goes first.
        let mut samples: Vec<Sample> = sqlx::query_as(
            "DELETE FROM rollup_queue WHERE seq IN (SELECT seq FROM rollup_queue ORDER BY seq \
             LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING ts, org, user_id, route, method, \
             CAST(status AS BIGINT) AS status, decision, rule, latency_us, request_bytes, \
             response_bytes, cost, dimensions",
        )
        .bind(max.min(i64::MAX as usize) as i64)
        .fetch_all(&mut *tx)
        .await?;
        // Then whole batches, oldest first, while they fit in `max` (at least one). Rows locked
        // here and not taken stay locked until COMMIT: other replicas skip them meanwhile.
        if samples.len() < max {
            let heads: Vec<(i64, i64)> = sqlx::query_as(
                "SELECT seq, CAST(events AS BIGINT) FROM rollup_batches ORDER BY seq \
                 LIMIT 1024 FOR UPDATE SKIP LOCKED",
            )
            .fetch_all(&mut *tx)
            .await?;
            let take = rollup::batches_that_fit(&heads, samples.len(), max);
            let claimed: Vec<i64> = heads[..take].iter().map(|(seq, _)| *seq).collect();
            if !claimed.is_empty() {
                let blobs: Vec<(Vec<u8>,)> = sqlx::query_as(
                    "DELETE FROM rollup_batches WHERE seq = ANY($1) RETURNING samples",
                )
                .bind(&claimed)
                .fetch_all(&mut *tx)
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
        if !deltas.is_empty() {
            upsert_deltas(&mut tx, &deltas).await?;
        }
        tx.commit().await?;
        // After a fold that wrote rows, for the next one (an idle folder asks nothing).
        if let Err(e) = self.analyze_outgrown_rollups().await {
            tracing::warn!(error = %e, "could not analyze the rollups; folding without");
        }
        Ok(samples.len())
    }

    /// Analyzes each rollup partition that has more than doubled on disk since its statistics
    /// were taken, so the next fold's probes by key use the primary key.
    ///
    /// Without statistics (a new table: autovacuum first analyzes it a minute or more after it
    /// fills) the planner assumes 200 distinct orgs, and for a young table it then finds the
    /// `(org, cube, …)` report index as cheap as the primary key: probing by it reads an org's
    /// whole cube for each key. In the ingest bench's first minute that made single folds of a
    /// fresh database take up to 12–14 s. The sizes are read live, not from the statistics
    /// collector (which lags by a second or more); doubling keeps the number of ANALYZEs
    /// logarithmic in the table's size, and autovacuum's own 10 % rule takes over from there.
    async fn analyze_outgrown_rollups(&self) -> Result<(), DbError> {
        let outgrown: Vec<(String,)> = sqlx::query_as(
            "SELECT c.relname::text FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid \
             WHERE i.inhparent = 'rollups'::regclass \
             AND pg_relation_size(c.oid) / current_setting('block_size')::int \
                 > 2 * c.relpages + 8",
        )
        .fetch_all(&self.pool)
        .await?;
        for (partition,) in outgrown {
            // The name comes from the catalog; quoted all the same. SKIP_LOCKED: a partition
            // that autovacuum (or another replica's fold) is vacuuming or analyzing is left to
            // it, rather than holding this fold until it finishes.
            let quoted = format!("\"{}\"", partition.replace('"', "\"\""));
            sqlx::query(&format!("ANALYZE (SKIP_LOCKED) {quoted}"))
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }
}

/// A stored sketch.
type Sketch = Option<Vec<u8>>;

/// The fold's statements join a list of keys (thousands to tens of thousands) to `rollups`;
/// the only good plan probes the primary key once per key, and this transaction-local setting
/// leaves the planner no other join. Its costing prices each probe as an uncached random read,
/// and past a few tens of thousands of keys it hashes the whole table instead: 3.5 s for
/// 40,000 keys over 5.7M rows (where the probes took 1.2 s, cold and random, and take far less
/// for the hot, newest buckets a fold touches). JIT is off too: at those estimated costs it
/// compiled each statement for a further ~0.23 s. Which index the probes use is left to
/// statistics ([`PgStore::analyze_outgrown_rollups`]).
///
/// `work_mem` is raised for the same transaction: the statements' unnested key lists (the
/// sketches among them) and the lock order's sort are a few MB per fold, over the server's
/// default 4 MB, and were written to temporary files and read back (`BufFileWrite` and
/// `BufFileRead` waits in `pg_stat_activity` at 100k events/s). 64 MB is some twenty times
/// what the lock order's sort of a ~13,000-row fold used (2–3 MB, `EXPLAIN ANALYZE`); it is
/// a limit per sort or list, taken only while a fold runs.
const FOLD_PLANNER_SETTINGS: &str = "SELECT set_config('enable_hashjoin', 'off', true), \
     set_config('enable_mergejoin', 'off', true), set_config('jit', 'off', true), \
     set_config('work_mem', '64MB', true)";

/// Adds fold deltas to their rollup rows, creating the missing ones; `deltas` are in (org,
/// hash) order, so concurrent folders lock and insert rows in the same order.
///
/// The rows that exist are locked and read for their sketches first; then only the missing
/// rows are inserted, whole (their sketch is the delta's own), and the existing ones merged and
/// updated. Nearly every row a fold touches exists already: folds come every second or so and
/// revisit this minute's, hour's, day's and week's rows. Inserting every row first (the order
/// until 2026-11-24) paid a conflict check, a shipped copy of the row and an encoded sketch for
/// each of them, to learn what one read tells. A row another replica inserts between the read
/// and the insert is skipped by the insert (`ON CONFLICT DO NOTHING`), then read, locked and
/// updated like the others.
async fn upsert_deltas(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    deltas: &[(rollup::RollupKey, i64, rollup::Delta)],
) -> Result<(), DbError> {
    sqlx::query(FOLD_PLANNER_SETTINGS)
        .execute(&mut **tx)
        .await?;
    let index: HashMap<(&str, i64), usize> = deltas
        .iter()
        .enumerate()
        .map(|(i, (k, h, _))| ((k.org.as_str(), *h), i))
        .collect();
    let all: Vec<usize> = (0..deltas.len()).collect();
    let mut stored = lock_stored(tx, deltas, &index, &all).await?;
    let missing: Vec<usize> = all
        .iter()
        .copied()
        .filter(|i| !stored.contains_key(i))
        .collect();
    if !missing.is_empty() {
        let inserted = insert_new_rows(tx, deltas, &index, &missing).await?;
        let raced: Vec<usize> = missing
            .into_iter()
            .filter(|i| !inserted.contains(i))
            .collect();
        if !raced.is_empty() {
            stored.extend(lock_stored(tx, deltas, &index, &raced).await?);
        }
    }
    let mut existing: Vec<usize> = stored.keys().copied().collect();
    existing.sort_unstable();
    update_rows(tx, deltas, &existing, &stored).await
}

/// Locks the stored rows of `deltas[which]`, in (org, key_hash) order, and reads their
/// sketches, by delta index; rows not stored yet are absent.
async fn lock_stored(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    deltas: &[(rollup::RollupKey, i64, rollup::Delta)],
    index: &HashMap<(&str, i64), usize>,
    which: &[usize],
) -> Result<HashMap<usize, rollup::Sketches>, DbError> {
    let orgs: Vec<&str> = which.iter().map(|&i| deltas[i].0.org.as_str()).collect();
    let cubes: Vec<i16> = which.iter().map(|&i| deltas[i].0.cube.code()).collect();
    let hashes: Vec<i64> = which.iter().map(|&i| deltas[i].1).collect();
    let rows: Vec<(String, i64, Sketch, Sketch)> = sqlx::query_as(
        "SELECT r.org, r.key_hash, r.latency_sketch, r.users_sketch FROM rollups r \
         JOIN UNNEST($1::text[], $2::int2[], $3::int8[]) AS t(org, cube, h) \
         ON r.org = t.org AND r.cube = t.cube AND r.key_hash = t.h \
         ORDER BY r.org, r.key_hash FOR UPDATE OF r",
    )
    .bind(&orgs)
    .bind(&cubes)
    .bind(&hashes)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(org, hash, latency, users)| {
            Some((*index.get(&(org.as_str(), hash))?, (latency, users)))
        })
        .collect())
}

/// Inserts the rows of `deltas[which]` whole, leaving alone any a racing replica inserted
/// meanwhile; returns the indices of the rows this call inserted.
async fn insert_new_rows(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    deltas: &[(rollup::RollupKey, i64, rollup::Delta)],
    index: &HashMap<(&str, i64), usize>,
    which: &[usize],
) -> Result<HashSet<usize>, DbError> {
    let rows: Vec<&(rollup::RollupKey, i64, rollup::Delta)> =
        which.iter().map(|&i| &deltas[i]).collect();
    let int = |f: &dyn Fn(&(rollup::RollupKey, i64, rollup::Delta)) -> i64| -> Vec<i64> {
        rows.iter().map(|d| f(d)).collect()
    };
    let small = |f: &dyn Fn(&rollup::RollupKey) -> i16| -> Vec<i16> {
        rows.iter().map(|d| f(&d.0)).collect()
    };
    let text = |f: &dyn Fn(&rollup::RollupKey) -> &str| -> Vec<String> {
        rows.iter().map(|d| f(&d.0).to_owned()).collect()
    };
    let inserted: Vec<(String, i64)> = sqlx::query_as(
        "INSERT INTO rollups (org, key_hash, granularity, bucket, user_id, route, method, \
         status_class, decision, rule, calls, errors, cost, request_bytes, response_bytes, \
         latency_sketch, cube, dimension, dimension_value, users_sketch) \
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int2[], $4::int8[], $5::text[], \
         $6::text[], $7::text[], $8::int2[], $9::text[], $10::text[], $11::int8[], $12::int8[], \
         $13::int8[], $14::int8[], $15::int8[], $16::bytea[], $17::int2[], $18::text[], \
         $19::text[], $20::bytea[]) \
         ON CONFLICT (org, cube, key_hash) DO NOTHING RETURNING org, key_hash",
    )
    .bind(text(&|k| &k.org))
    .bind(int(&|d| d.1))
    .bind(small(&|k| k.granularity.code()))
    .bind(int(&|d| d.0.bucket))
    .bind(text(&|k| &k.user))
    .bind(text(&|k| &k.route))
    .bind(text(&|k| &k.method))
    .bind(small(&|k| k.status_class))
    .bind(text(&|k| &k.decision))
    .bind(text(&|k| &k.rule))
    .bind(int(&|d| d.2.calls))
    .bind(int(&|d| d.2.errors))
    .bind(int(&|d| d.2.cost))
    .bind(int(&|d| d.2.request_bytes))
    .bind(int(&|d| d.2.response_bytes))
    .bind(
        rows.iter()
            .map(|(k, _, v)| k.cube.keeps_sketch().then(|| v.sketch_onto(None)))
            .collect::<Vec<_>>(),
    )
    .bind(small(&|k| k.cube.code()))
    .bind(text(&|k| &k.dimension))
    .bind(text(&|k| &k.dimension_value))
    .bind(
        rows.iter()
            .map(|(k, _, v)| k.cube.keeps_users().then(|| v.users_onto(None)))
            .collect::<Vec<_>>(),
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(inserted
        .iter()
        .filter_map(|(org, hash)| index.get(&(org.as_str(), *hash)).copied())
        .collect())
}

/// Adds the deltas of the locked rows `which` to them, with their sketches merged into
/// `stored`'s.
async fn update_rows(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    deltas: &[(rollup::RollupKey, i64, rollup::Delta)],
    which: &[usize],
    stored: &HashMap<usize, rollup::Sketches>,
) -> Result<(), DbError> {
    if which.is_empty() {
        return Ok(());
    }
    let int = |f: &dyn Fn(&rollup::Delta) -> i64| -> Vec<i64> {
        which.iter().map(|&i| f(&deltas[i].2)).collect()
    };
    let (sketches, users): (Vec<Sketch>, Vec<Sketch>) = which
        .iter()
        .map(|&i| {
            let (k, _, v) = &deltas[i];
            let (latency, users) = stored
                .get(&i)
                .map_or((None, None), |(l, u)| (l.as_deref(), u.as_deref()));
            (
                k.cube.keeps_sketch().then(|| v.sketch_onto(latency)),
                k.cube.keeps_users().then(|| v.users_onto(users)),
            )
        })
        .unzip();
    sqlx::query(
        "UPDATE rollups r SET calls = r.calls + t.calls, errors = r.errors + t.errors, \
         cost = r.cost + t.cost, request_bytes = r.request_bytes + t.rq, \
         response_bytes = r.response_bytes + t.rs, \
         latency_sketch = COALESCE(t.sk, r.latency_sketch), \
         users_sketch = COALESCE(t.us, r.users_sketch) \
         FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], \
         $6::int8[], $7::int8[], $8::bytea[], $9::bytea[], $10::int2[]) \
         AS t(org, h, calls, errors, cost, rq, rs, sk, us, cube) \
         WHERE r.org = t.org AND r.cube = t.cube AND r.key_hash = t.h",
    )
    .bind(
        which
            .iter()
            .map(|&i| deltas[i].0.org.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(which.iter().map(|&i| deltas[i].1).collect::<Vec<_>>())
    .bind(int(&|d| d.calls))
    .bind(int(&|d| d.errors))
    .bind(int(&|d| d.cost))
    .bind(int(&|d| d.request_bytes))
    .bind(int(&|d| d.response_bytes))
    .bind(&sketches)
    .bind(&users)
    .bind(
        which
            .iter()
            .map(|&i| deltas[i].0.cube.code())
            .collect::<Vec<_>>(),
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// For the bench's raw COPY rate: `events` as COPY binary rows (`COPY … FROM STDIN (FORMAT
/// binary)` into [`EVENT_COLUMNS`]).
#[doc(hidden)]
pub fn copy_binary(events: &[UsageEvent]) -> Result<Vec<u8>, DbError> {
    copy_rows(&events.iter().collect::<Vec<_>>(), Utc::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads one field of a COPY binary row: `None` for NULL.
    fn next_field<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
        let (len, tail) = rest.split_at(4);
        let len = i32::from_be_bytes(len.try_into().unwrap());
        if len < 0 {
            *rest = tail;
            return None;
        }
        let (value, tail) = tail.split_at(len as usize);
        *rest = tail;
        Some(value)
    }

    #[test]
    fn copied_rows_are_postgres_binary_copy_with_timestamps_cut_to_the_microsecond() {
        let event: UsageEvent = serde_json::from_value(serde_json::json!({
            "id": "0190f6f0-0000-7000-8000-000000000001",
            "timestamp": "2026-11-24T06:00:00.123456789Z",
            "org": "acme", "plan": "pro", "method": "GET", "route": "/a\tb\\c\nd",
            "status": 200, "latency_us": 1, "request_bytes": 0, "response_bytes": 0,
            "cost": 7, "decision": "allowed", "edge": "envoy", "node": "n",
            "dimensions": {"model": "m1"}
        }))
        .unwrap();
        let bytes = copy_rows(&[&event], Utc::now()).unwrap();
        assert_eq!(&bytes[..19], COPY_BINARY_HEADER);
        assert_eq!(&bytes[bytes.len() - 2..], &(-1i16).to_be_bytes(), "trailer");
        let mut rest = &bytes[19..bytes.len() - 2];
        assert_eq!(
            i16::from_be_bytes([rest[0], rest[1]]),
            20,
            "one field per column"
        );
        rest = &rest[2..];
        let fields: Vec<Option<&[u8]>> = (0..20).map(|_| next_field(&mut rest)).collect();
        assert!(rest.is_empty(), "one row, nothing after it");
        assert_eq!(fields[0], Some(event.id.as_bytes().as_slice()));
        // Microseconds since 2000-01-01, cut as sqlx cuts a bound timestamp, not rounded.
        let since_2000 = DateTime::parse_from_rfc3339("2000-01-01T00:00:00Z").unwrap();
        let micros = (DateTime::parse_from_rfc3339("2026-11-24T06:00:00.123456Z").unwrap()
            - since_2000)
            .num_microseconds()
            .unwrap();
        assert_eq!(fields[1], Some(micros.to_be_bytes().as_slice()));
        assert_eq!(fields[2], Some(b"acme".as_slice()));
        assert_eq!(fields[3], None, "no user");
        // Text goes as it is: nothing in it is structure.
        assert_eq!(fields[6], Some(b"/a\tb\\c\nd".as_slice()));
        assert_eq!(fields[7], Some(200i16.to_be_bytes().as_slice()));
        assert_eq!(fields[11], Some(7i64.to_be_bytes().as_slice()));
        assert_eq!(fields[12], Some(b"allowed".as_slice()));
        // JSONB's binary form: version 1, then the JSON text.
        assert_eq!(fields[16], Some(b"\x01{\"model\":\"m1\"}".as_slice()));
        assert_eq!(fields[17], None, "no metrics");
        assert_eq!(fields[18], None, "no fingerprint");
    }

    #[test]
    fn a_counter_over_bigint_is_an_error_not_a_wrapped_value() {
        assert!(bigint("cost", i64::MAX as u64).is_ok());
        assert!(matches!(bigint("cost", u64::MAX), Err(DbError::Encode(m)) if m.contains("cost")));
    }
}
