//! Storage over SQLite (embedded default) and PostgreSQL (production). One enum rather than a
//! trait object: the two engines share most SQL (`$N` parameters work on both), and where they
//! differ — the ingest write path above all — each has its own module.

/// Whether migration 0006's backfill is owed (non-zero): the migration left its marker, or a
/// collector from before it has folded route-and-user rows (6) since — it folds into the user
/// cube but not the caller cube, so both are rebuilt again.
const CALLERS_PENDING: &str =
    "SELECT (SELECT COUNT(*) FROM rollup_backfills WHERE name = 'callers') \
    + (SELECT COUNT(*) FROM (SELECT 1 FROM rollups WHERE cube = 6 LIMIT 1) AS older)";
/// The caller cube's rows, summed from the user cube's (every granularity the caller cube has).
const CALLER_TOTALS: &str = "SELECT org, CAST(granularity AS BIGINT) AS granularity, \
    CAST(bucket AS BIGINT) AS bucket, user_id, CAST(SUM(calls) AS BIGINT) AS calls, \
    CAST(SUM(errors) AS BIGINT) AS errors, CAST(SUM(cost) AS BIGINT) AS cost, \
    CAST(SUM(request_bytes) AS BIGINT) AS request_bytes, \
    CAST(SUM(response_bytes) AS BIGINT) AS response_bytes \
    FROM rollups WHERE cube = 2 AND granularity > 0 GROUP BY org, granularity, bucket, user_id";
/// The former route-and-user cube's rows.
const ROUTE_USERS: &str = "SELECT org, CAST(granularity AS BIGINT) AS granularity, \
    CAST(bucket AS BIGINT) AS bucket, route, method, user_id FROM rollups WHERE cube = 6";
/// Before the backfill writes: caller rows a newer collector folded meanwhile are replaced by
/// the sums of the user cube, which holds their events too.
const CALLERS_CLEARED: &str = "DELETE FROM rollups WHERE cube = 7";
/// After it: the route-and-user cube is no longer read, and the backfill is done.
const CALLERS_FILLED: [&str; 2] = [
    "DELETE FROM rollups WHERE cube = 6",
    "DELETE FROM rollup_backfills WHERE name = 'callers'",
];

/// Migration 0006's backfill (see `Storage::backfill_callers`) inside the caller's write
/// transaction `$tx`, on either engine; `$write` writes `$deltas` (with the engine's fold
/// write). Returns from the enclosing function when nothing is owed; the caller commits.
macro_rules! backfill_callers_in {
    ($tx:ident, $deltas:ident => $write:block) => {{
        let pending: i64 = sqlx::query_scalar(super::CALLERS_PENDING)
            .fetch_one(&mut *$tx)
            .await?;
        if pending == 0 {
            return Ok(());
        }
        sqlx::query(super::CALLERS_CLEARED)
            .execute(&mut *$tx)
            .await?;
        let callers: Vec<crate::rollup::CallerTotals> = sqlx::query_as(super::CALLER_TOTALS)
            .fetch_all(&mut *$tx)
            .await?;
        let route_users: Vec<crate::rollup::RouteUser> = sqlx::query_as(super::ROUTE_USERS)
            .fetch_all(&mut *$tx)
            .await?;
        let $deltas = crate::rollup::backfill_deltas(&callers, &route_users);
        $write
        for sql in super::CALLERS_FILLED {
            sqlx::query(sql).execute(&mut *$tx).await?;
        }
    }};
}

mod postgres;
pub mod reports;
mod sqlite;

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::SqlitePoolOptions;
use sqlx::SqlitePool;
use tollgate_core::event::{EdgeKind, UsageEvent};
use uuid::Uuid;

use crate::auth::KeyRecord;
use crate::rollup::{Cube, Granularity};

pub use postgres::{copy_binary, PgStore, EVENT_COLUMNS};

/// What storage can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database said no, or could not be reached.
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    /// A migration failed.
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database URL is not one we can use.
    #[error("database URL: {0}")]
    Url(String),
    /// Rollup samples that cannot be encoded or read back (`rollup_batches`); the batch stays
    /// queued, so a fixed collector folds it later.
    #[error("rollup samples: {0}")]
    Samples(#[from] postcard::Error),
    /// An event that does not fit the schema's column types (PostgreSQL's binary COPY);
    /// ingest's bounds keep every accepted event within them.
    #[error("event encoding: {0}")]
    Encode(String),
    /// Another process folded the same SQLite database meanwhile; this fold wrote nothing.
    #[error(
        "another process folds this SQLite database: serve each SQLite file from one collector"
    )]
    ConcurrentFold,
}

impl DbError {
    /// Whether this is a unique-key violation (a duplicate org id, say).
    pub fn is_unique_violation(&self) -> bool {
        matches!(self, DbError::Sqlx(sqlx::Error::Database(e)) if e.is_unique_violation())
    }
}

/// An org (tenant).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct OrgRecord {
    /// Id, as events name it.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Plan it pays for (prices come from the policy file's `pricing`).
    pub plan: Option<String>,
    /// Creation time, seconds since the epoch.
    #[serde(default)]
    pub created_at: i64,
}

/// One stored rollup row of one org.
#[derive(Clone, Debug)]
pub struct StoredRollup {
    /// Bucket start, seconds since the epoch.
    pub bucket: i64,
    /// User ('' when none).
    pub user: String,
    /// Route template.
    pub route: String,
    /// Method.
    pub method: String,
    /// 1..5.
    pub status_class: i64,
    /// Decision.
    pub decision: String,
    /// The rule that decided the events ('' when none).
    pub rule: String,
    /// Counters and sketch.
    pub values: crate::rollup::RollupValues,
}

/// The database.
#[derive(Clone, Debug)]
pub enum Storage {
    /// An embedded SQLite file (WAL, synchronous=FULL: an acknowledged commit is on disk).
    Sqlite(SqlitePool),
    /// A PostgreSQL server.
    Postgres(PgStore),
}

macro_rules! both {
    ($self:expr, $pool:ident => $body:expr) => {
        match $self {
            Storage::Sqlite($pool) => $body,
            Storage::Postgres(PgStore { pool: $pool, .. }) => $body,
        }
    };
}

type KeyRow = (String, String, String, Option<String>, i64, Option<i64>);
type RollupRow = (
    i64,
    String,
    String,
    String,
    i64,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<Vec<u8>>,
);

fn key_from_row(r: KeyRow) -> KeyRecord {
    KeyRecord {
        id: r.0,
        org: r.1,
        role: r.2,
        name: r.3,
        created_at: r.4,
        revoked_at: r.5,
    }
}

impl Storage {
    /// Connects: `postgres://…` or `postgresql://…` is PostgreSQL; `sqlite:PATH`,
    /// `sqlite://PATH` or a bare path is an SQLite file, created on first use.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, DbError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url)
                .map_err(|e| DbError::Url(e.to_string()))?
                .options([("client_min_messages", "warning")]);
            // The pool pings a connection before each use (sqlx's default): a round trip per
            // transaction, 2.7 % of the collector's CPU under ingest (`perf`), kept so that a
            // connection the server dropped (restart, failover) is replaced unseen rather than
            // failing a request.
            let pool = PgPoolOptions::new()
                .max_connections(max_connections.max(2))
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options)
                .await?;
            Ok(Storage::Postgres(PgStore::new(pool)))
        } else {
            let path = url
                .strip_prefix("sqlite://")
                .or_else(|| url.strip_prefix("sqlite:"))
                .unwrap_or(url);
            if path.is_empty() {
                return Err(DbError::Url("empty SQLite path".into()));
            }
            let rollups: std::sync::Arc<str> = sqlite::rollups_path(path).into();
            // The rollups' file: its own schema first, then attached to every connection.
            sqlite::migrate_rollups_file(&rollups).await?;
            // An in-process file has no connection to lose: no ping (a round trip to sqlx's
            // worker thread) before each transaction.
            let pool = SqlitePoolOptions::new()
                .max_connections(max_connections.max(2))
                .test_before_acquire(false)
                .after_connect(move |conn, _| {
                    let rollups = rollups.clone();
                    Box::pin(async move { sqlite::attach_rollups(conn, &rollups).await })
                })
                .connect_with(sqlite::connect_options(path))
                .await?;
            if !sqlite::keeps_no_memory_statistics(&mut *pool.acquire().await?).await? {
                tracing::warn!(
                    "this build's SQLite keeps memory statistics (a process-wide lock per \
                     allocation; ingest is slower): build it with \
                     LIBSQLITE3_FLAGS=-DSQLITE_DEFAULT_MEMSTATUS=0, as the workspace does"
                );
            }
            Ok(Storage::Sqlite(pool))
        }
    }

    /// The storage the rollup folder uses on its own thread ([`crate::rollup_worker::spawn`]).
    /// On PostgreSQL a pool of its own with the same connection options (two connections,
    /// opened on first use), so that no connection is driven by two runtimes; SQLite's
    /// connections each run on a thread of their own, so its pool is shared. Call it on the
    /// runtime that will use it.
    pub fn for_folder(&self) -> Storage {
        match self {
            Storage::Sqlite(pool) => Storage::Sqlite(pool.clone()),
            Storage::Postgres(pg) => Storage::Postgres(pg.with_own_pool(2)),
        }
    }

    /// How many committer tasks `serve` starts unless told otherwise.
    ///
    /// SQLite: one, its writes serialise anyway. PostgreSQL: four, so some groups' COPYs run
    /// while others wait for their round trips and commits. In the ingest bench (PostgreSQL
    /// only, four alternating rounds, 2026-11-25) four against two sustained 119–131k fresh
    /// events/s against 77–117k, more in every round, and acknowledged at 100k/s offered with
    /// a p99 of 110–525 ms against 104–736 ms; six was not better than four.
    pub fn default_committers(&self) -> usize {
        match self {
            Storage::Sqlite(_) => 1,
            Storage::Postgres(_) => 4,
        }
    }

    /// `sqlite` or `postgres`.
    pub fn engine(&self) -> &'static str {
        match self {
            Storage::Sqlite(_) => "sqlite",
            Storage::Postgres(_) => "postgres",
        }
    }

    /// Applies the engine's migrations (idempotent).
    pub async fn migrate(&self) -> Result<(), DbError> {
        match self {
            Storage::Sqlite(pool) => {
                sqlx::migrate!("./migrations/sqlite").run(pool).await?;
                sqlite::move_rollups(pool).await?;
                sqlite::seqs_past_the_mark(pool).await?;
            }
            Storage::Postgres(pg) => {
                sqlx::migrate!("./migrations/postgres")
                    .run(&pg.pool)
                    .await?;
                pg.ensure_partitions_around(Utc::now()).await?;
            }
        }
        self.backfill_callers().await
    }

    /// Fills what rows folded before migration 0006 lack: the caller cube (summed from the
    /// user cube) and the route rows' users sketches (from the route-and-user cube, which it
    /// then deletes). Once, in one transaction that keeps folds out, whatever the replicas.
    async fn backfill_callers(&self) -> Result<(), DbError> {
        match self {
            Storage::Sqlite(pool) => sqlite::backfill_callers(pool).await,
            Storage::Postgres(pg) => pg.backfill_callers().await,
        }
    }

    /// A round trip to the database.
    pub async fn ping(&self) -> Result<(), DbError> {
        both!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        both!(self, pool => pool.close().await)
    }

    /// Creates an org; a duplicate id is a unique violation.
    pub async fn create_org(&self, org: &OrgRecord) -> Result<(), DbError> {
        both!(self, pool => sqlx::query(
            "INSERT INTO orgs (id, name, plan, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&org.id)
        .bind(&org.name)
        .bind(&org.plan)
        .bind(org.created_at)
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// Every org, by id.
    pub async fn list_orgs(&self) -> Result<Vec<OrgRecord>, DbError> {
        let rows: Vec<(String, String, Option<String>, i64)> = both!(self, pool =>
            sqlx::query_as("SELECT id, name, plan, created_at FROM orgs ORDER BY id")
                .fetch_all(pool)
                .await)?;
        Ok(rows
            .into_iter()
            .map(|(id, name, plan, created_at)| OrgRecord {
                id,
                name,
                plan,
                created_at,
            })
            .collect())
    }

    /// One org.
    pub async fn get_org(&self, id: &str) -> Result<Option<OrgRecord>, DbError> {
        Ok(self.list_orgs().await?.into_iter().find(|o| o.id == id))
    }

    /// Stores a key by its hash.
    pub async fn insert_key(&self, key: &KeyRecord, hash: &str) -> Result<(), DbError> {
        both!(self, pool => sqlx::query(
            "INSERT INTO api_keys (id, hash, org, role, name, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&key.id)
        .bind(hash)
        .bind(&key.org)
        .bind(&key.role)
        .bind(&key.name)
        .bind(key.created_at)
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// Keys (never their secrets), of one org or all.
    pub async fn list_keys(&self, org: Option<&str>) -> Result<Vec<KeyRecord>, DbError> {
        let rows: Vec<KeyRow> = both!(self, pool => sqlx::query_as(
            "SELECT id, org, role, name, created_at, revoked_at FROM api_keys \
             WHERE ($1 IS NULL OR org = $1) ORDER BY created_at, id",
        )
        .bind(org)
        .fetch_all(pool)
        .await)?;
        Ok(rows.into_iter().map(key_from_row).collect())
    }

    /// Revokes a key; false when there is no such unrevoked key.
    pub async fn revoke_key(&self, id: &str, now: i64) -> Result<bool, DbError> {
        let done = both!(self, pool => sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// The key with this secret hash, revoked or not.
    pub async fn find_key_by_hash(&self, hash: &str) -> Result<Option<KeyRecord>, DbError> {
        let row: Option<KeyRow> = both!(self, pool => sqlx::query_as(
            "SELECT id, org, role, name, created_at, revoked_at FROM api_keys WHERE hash = $1",
        )
        .bind(hash)
        .fetch_optional(pool)
        .await)?;
        Ok(row.map(key_from_row))
    }

    /// Writes events (distinct ids) in one transaction, queueing the new ones for the rollups in
    /// the same transaction. Returns, per event, whether it was new (true) or already stored
    /// (false).
    ///
    /// `rolled` names the custom dimensions the rollups keep (the policy's `dimensions`); the
    /// queue carries those an event has.
    pub async fn write_events(
        &self,
        events: &[UsageEvent],
        received_at: DateTime<Utc>,
        rolled: &[String],
    ) -> Result<Vec<bool>, DbError> {
        match self {
            Storage::Sqlite(pool) => sqlite::write_events(pool, events, received_at, rolled).await,
            Storage::Postgres(pg) => pg.write_events(events, received_at, rolled).await,
        }
    }

    /// Folds up to `max` queued events into the rollups (one transaction); returns how many.
    pub async fn fold(&self, max: usize) -> Result<usize, DbError> {
        match self {
            Storage::Sqlite(pool) => sqlite::fold(pool, max).await,
            Storage::Postgres(pg) => pg.fold(max).await,
        }
    }

    /// The first bucket start from which `granularity`'s rollup rows hold every event
    /// (granularities added after data was stored start later; the others always).
    pub async fn complete_since(&self, granularity: Granularity) -> Result<i64, DbError> {
        let since: Option<(i64,)> = both!(self, pool => sqlx::query_as(
            "SELECT CAST(since AS BIGINT) FROM rollup_epochs WHERE granularity = $1",
        )
        .bind(granularity.code())
        .fetch_optional(pool)
        .await)?;
        Ok(since.map_or(i64::MIN / 4, |s| s.0))
    }

    /// Events stored but not yet folded into the rollups (committed state).
    pub async fn queued_for_rollup(&self) -> Result<i64, DbError> {
        match self {
            Storage::Sqlite(pool) => sqlite::queued_for_rollup(pool).await,
            Storage::Postgres(pg) => {
                let n: (i64,) = sqlx::query_as(
                    "SELECT (SELECT COUNT(*) FROM rollup_queue) \
                     + (SELECT CAST(COALESCE(SUM(events), 0) AS BIGINT) FROM rollup_batches)",
                )
                .fetch_one(&pg.pool)
                .await?;
                Ok(n.0)
            }
        }
    }

    /// Folds until the queue is empty (tests and benchmarks; at shutdown the folder drains it).
    pub async fn fold_all(&self) -> Result<(), DbError> {
        for _ in 0..10_000 {
            while self.fold(100_000).await? > 0 {}
            if self.queued_for_rollup().await? == 0 {
                return Ok(());
            }
            // Another folder holds some rows: wait for its commit.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// An org's full-cube rollup rows of one granularity with `from <= bucket < to` (whole
    /// buckets of it). Days and weeks, which the full cube does not store, are its hours
    /// merged per key and bucket ([`Cube::stored_for`]).
    pub async fn rollup_rows(
        &self,
        org: &str,
        granularity: Granularity,
        from: i64,
        to: i64,
    ) -> Result<Vec<StoredRollup>, DbError> {
        let stored = Cube::Full.stored_for(granularity).unwrap_or(granularity);
        let rows: Vec<RollupRow> = both!(self, pool => sqlx::query_as(
            "SELECT bucket, user_id, route, method, CAST(status_class AS BIGINT), decision, \
             rule, calls, errors, cost, request_bytes, response_bytes, latency_sketch \
             FROM rollups \
             WHERE org = $1 AND cube = $2 AND granularity = $3 AND bucket >= $4 AND bucket < $5",
        )
        .bind(org)
        .bind(Cube::Full.code())
        .bind(stored.code())
        .bind(from)
        .bind(to)
        .fetch_all(pool)
        .await)?;
        let rows = rows.into_iter().map(|r| StoredRollup {
            bucket: granularity.bucket_of(r.0),
            user: r.1,
            route: r.2,
            method: r.3,
            status_class: r.4,
            decision: r.5,
            rule: r.6,
            values: crate::rollup::RollupValues {
                calls: r.7,
                errors: r.8,
                cost: r.9,
                request_bytes: r.10,
                response_bytes: r.11,
                sketch: crate::rollup::decode_sketch(r.12.as_deref()),
            },
        });
        if stored == granularity {
            return Ok(rows.collect());
        }
        type RowKey = (i64, String, String, String, i64, String, String);
        let mut merged: std::collections::BTreeMap<RowKey, StoredRollup> =
            std::collections::BTreeMap::new();
        for row in rows {
            let key = (
                row.bucket,
                row.user.clone(),
                row.route.clone(),
                row.method.clone(),
                row.status_class,
                row.decision.clone(),
                row.rule.clone(),
            );
            match merged.entry(key) {
                std::collections::btree_map::Entry::Occupied(mut e) => {
                    e.get_mut().values.merge(&row.values)
                }
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(row);
                }
            }
        }
        Ok(merged.into_values().collect())
    }

    /// How many raw events of `org` are stored, and how many distinct ids (tests and audits).
    pub async fn count_events(&self, org: &str) -> Result<(i64, i64), DbError> {
        let row: (i64, i64) = both!(self, pool => sqlx::query_as(
            "SELECT COUNT(*), COUNT(DISTINCT id) FROM events WHERE org = $1",
        )
        .bind(org)
        .fetch_one(pool)
        .await)?;
        Ok(row)
    }

    /// Whether an event with this id is stored.
    pub async fn has_event(&self, id: Uuid) -> Result<bool, DbError> {
        let n: (i64,) = match self {
            Storage::Sqlite(pool) => {
                sqlx::query_as("SELECT COUNT(*) FROM events WHERE id = $1")
                    .bind(id.as_bytes().as_slice())
                    .fetch_one(pool)
                    .await?
            }
            Storage::Postgres(pg) => {
                sqlx::query_as("SELECT COUNT(*) FROM events WHERE id = $1")
                    .bind(id)
                    .fetch_one(&pg.pool)
                    .await?
            }
        };
        Ok(n.0 > 0)
    }

    /// Deletes raw events older than `cutoff` (whole partitions on PostgreSQL) and minute
    /// rollups older than `minute_cutoff`.
    pub async fn prune(
        &self,
        cutoff: DateTime<Utc>,
        minute_cutoff: DateTime<Utc>,
    ) -> Result<(), DbError> {
        match self {
            Storage::Sqlite(pool) => {
                sqlx::query("DELETE FROM events WHERE ts < $1")
                    .bind(cutoff.timestamp_micros())
                    .execute(pool)
                    .await?;
            }
            Storage::Postgres(pg) => pg.drop_partitions_before(cutoff).await?,
        }
        // Every cube named, so each cube's old minutes are one range of `rollups_time`.
        const OLD_MINUTES: &str = "DELETE FROM rollups WHERE cube IN (0, 1, 2, 3, 4) \
            AND granularity = $1 AND bucket < $2";
        let minute = Granularity::Minute.code();
        let before = minute_cutoff.timestamp();
        match self {
            // Between folds: the folder keeps the sketches it wrote (`sqlite::fold`).
            Storage::Sqlite(pool) => {
                let _guard = sqlite::outside_folds().await;
                sqlx::query(OLD_MINUTES)
                    .bind(minute)
                    .bind(before)
                    .execute(pool)
                    .await?;
            }
            Storage::Postgres(pg) => {
                sqlx::query(OLD_MINUTES)
                    .bind(minute)
                    .bind(before)
                    .execute(&pg.pool)
                    .await?;
            }
        }
        Ok(())
    }
}

/// The stored name of an edge.
pub(crate) fn edge_name(e: EdgeKind) -> &'static str {
    match e {
        EdgeKind::Envoy => "envoy",
        EdgeKind::Cloudflare => "cloudflare",
        EdgeKind::External => "external",
    }
}

/// Custom dimensions or metrics as stored: JSON, or NULL when there are none.
pub(crate) fn json_or_null<T: serde::Serialize>(
    map: &std::collections::BTreeMap<String, T>,
) -> Option<String> {
    if map.is_empty() {
        None
    } else {
        serde_json::to_string(map).ok()
    }
}
