//! Collector reports at production size, SQLite and PostgreSQL side by side.
//!
//! 1. **Workload**: 10,000,000 usage events over the 30 days ending when the data set was built,
//!    from a seeded generator (same events on both engines, same events every run): 500 orgs
//!    (the heaviest carries 25% of the traffic, the top five 60%, a Zipf tail the rest), 5,000
//!    users spread over the orgs by size and Zipf-skewed within each, 300 route templates
//!    (Zipf-skewed; each user calls its own handful of them, as an integration does), five
//!    methods by route shape, status mostly 2xx with some 4xx and 5xx, 2% limited (429) and 1.5%
//!    shadow-limited with the rule that decided, log-normal latencies per route, cost 1 except on
//!    weighted routes, and a daily and weekly cycle in the rate.
//! 2. **Load**: through the collector's own storage code — `Storage::write_events` in 50,000-event
//!    transactions, `Storage::fold` of `MAX_FOLD` (the collector folder's batch) every 100,000
//!    events until the rollup queue is empty, then the pruning `serve` does every hour (minute rollups kept 14 days) — not through HTTP. The
//!    load takes far longer than a benchmark run should, so the loaded database is kept under
//!    `target/bench-data/` (an SQLite file; a PostgreSQL data directory) and reused by later runs
//!    with the same generator version and event count, for up to `MAX_CACHE_AGE`; the load time
//!    and rate are printed when it loads, and remembered beside the cache.
//! 3. **Reports**: the collector's HTTP app in this process on 127.0.0.1 over each database, an
//!    admin key, and one client timing each report request (5 warm-ups, then up to 100 requests
//!    or `LINE_BUDGET`, whichever ends first), every answer checked to be 200 with a JSON body.
//!
//! Run: `cargo bench -p tollgate-benches --bench collector_reports` (needs PostgreSQL's server
//! binaries under /usr/lib/postgresql/*/bin; as root they run as the `postgres` user).
//! `TOLLGATE_BENCH_REPORTS_EVENTS=N` loads N events instead (a separate cache);
//! `TOLLGATE_BENCH_REPORTS_REBUILD=1` reloads even when a cache is usable;
//! `TOLLGATE_BENCH_REPORTS_STAND_IN=1` times the `/v1/usage` stand-in line even when every report
//! route answers.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, Timelike, Utc};
use tollgate_benches::Rng;
use tollgate_benches::{cluster, pg};
use tollgate_collector::auth::Role;
use tollgate_collector::cli::build_state;
use tollgate_collector::db::reports::Segment;
use tollgate_collector::db::OrgRecord;
use tollgate_collector::rollup::Granularity;
use tollgate_collector::{app, Limits, Storage};
use tollgate_core::event::{EdgeKind, EventIdGenerator, UsageEvent};
use tollgate_core::{Timestamp, Verdict};

/// Bump whenever the generated events change: a cache of another version is rebuilt.
const GENERATOR_VERSION: u32 = 1;
const DEFAULT_EVENTS: u64 = 10_000_000;
const DAYS: i64 = 30;
const ORGS: usize = 500;
const USERS: usize = 5_000;
const ROUTES: usize = 300;
const SEED: u64 = 0x7011_6a7e_5eed;
/// Events per `write_events` transaction.
const WRITE_BATCH: usize = 50_000;
/// Events written between two rounds of folding.
const FOLD_EVERY: u64 = 100_000;
/// Events per `Storage::fold`: the collector's own folder's batch (`rollup_worker::MAX_FOLD`),
/// which also bounds the fold's memory (a latency sketch per distinct rollup key).
const FOLD_BATCH: usize = tollgate_collector::rollup_worker::MAX_FOLD;
/// A load that has not finished by then is abandoned (the cache is then rebuilt next time).
const LOAD_LIMIT: Duration = Duration::from_secs(8 * 3_600);
/// A cache older than this is rebuilt: its 30 days drift out of the reports' window.
const MAX_CACHE_AGE: Duration = Duration::from_secs(3 * 86_400);
/// `serve`'s defaults, applied once after the load as its hourly pruner would have.
const RETENTION_DAYS: i64 = 30;
const MINUTE_ROLLUP_DAYS: i64 = 14;

const WARMUPS: usize = 5;
const REPEATS: usize = 100;
/// How long one line (warm-ups included) runs on one engine, `MIN_SAMPLES` permitting.
const LINE_BUDGET: Duration = Duration::from_secs(90);
/// Measured requests per line even when the budget runs out first.
const MIN_SAMPLES: usize = 3;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const TARGET_P99: Duration = Duration::from_millis(50);
/// The process is stopped (PostgreSQL first) if its resident memory passes this: a report that
/// materialises every row it reads could otherwise take the machine down.
const RSS_LIMIT_MIB: u64 = 14 * 1024;
/// The stand-in line (`/v1/usage`, which decodes every row's sketch at once) is not run when
/// that would take more than this.
const STAND_IN_MAX_GIB: f64 = 6.0;

// ---------------------------------------------------------------------------------------------
// The generator.

fn cumulative(weights: impl IntoIterator<Item = f64>) -> Vec<f64> {
    let mut sum = 0.0;
    weights
        .into_iter()
        .map(|w| {
            sum += w;
            sum
        })
        .collect()
}

#[derive(Clone, Copy)]
enum Shape {
    Collection,
    Item,
    ReadOnly,
    Action,
}

struct Route {
    template: String,
    shape: Shape,
    median_latency_us: f64,
    median_response_bytes: f64,
    cost: u64,
}

struct User {
    id: String,
    routes: Vec<usize>,
    route_cum: Vec<f64>,
}

struct Org {
    id: String,
    plan: &'static str,
    share: f64,
    users: Vec<User>,
    user_cum: Vec<f64>,
}

struct Workload {
    routes: Vec<Route>,
    route_cum: Vec<f64>,
    orgs: Vec<Org>,
    org_cum: Vec<f64>,
}

const RESOURCES: [&str; 30] = [
    "items",
    "orders",
    "customers",
    "invoices",
    "payments",
    "products",
    "carts",
    "shipments",
    "accounts",
    "projects",
    "tasks",
    "comments",
    "files",
    "images",
    "reports",
    "webhooks",
    "events",
    "sessions",
    "teams",
    "members",
    "subscriptions",
    "plans",
    "coupons",
    "refunds",
    "disputes",
    "balances",
    "transfers",
    "payouts",
    "messages",
    "notifications",
];

impl Workload {
    fn new() -> Self {
        let mut rng = Rng(SEED ^ 0x9e37_79b9_7f4a_7c15);
        // Routes: 30 resources × 10 shapes, then ranked by popularity at random, Zipf s = 1.
        let shapes: [(&str, Shape); 10] = [
            ("/v1/{r}", Shape::Collection),
            ("/v1/{r}/{id}", Shape::Item),
            ("/v1/{r}/{id}/events", Shape::ReadOnly),
            ("/v1/{r}/{id}/members", Shape::Collection),
            ("/v1/{r}/{id}/members/{member_id}", Shape::Item),
            ("/v1/{r}/search", Shape::ReadOnly),
            ("/v1/{r}/{id}/archive", Shape::Action),
            ("/v1/{r}/batch", Shape::Action),
            ("/v2/{r}", Shape::Collection),
            ("/v2/{r}/{id}", Shape::Item),
        ];
        let mut routes: Vec<Route> = RESOURCES
            .iter()
            .flat_map(|r| shapes.iter().map(move |(t, s)| (t.replace("{r}", r), *s)))
            .map(|(template, shape)| {
                let heavy = template.ends_with("/search") || template.ends_with("/batch");
                let cost = if template.ends_with("/batch") {
                    10
                } else if template.ends_with("/search") {
                    2
                } else if rng.below(10) == 0 {
                    5
                } else {
                    1
                };
                Route {
                    template,
                    shape,
                    // 3 ms to 150 ms, log-uniform; search and batch 3× slower.
                    median_latency_us: (3_000f64.ln() + rng.unit() * 50f64.ln()).exp()
                        * if heavy { 3.0 } else { 1.0 },
                    median_response_bytes: (200f64.ln() + rng.unit() * 100f64.ln()).exp(),
                    cost,
                }
            })
            .collect();
        assert_eq!(routes.len(), ROUTES);
        for i in (1..routes.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            routes.swap(i, j);
        }
        let route_cum = cumulative((1..=ROUTES).map(|r| 1.0 / r as f64));

        // Orgs: the top five carry 25/15/9/6/5%, the other 495 share 40% as 1/rank.
        let head = [0.25, 0.15, 0.09, 0.06, 0.05];
        let tail: f64 = (head.len() + 1..=ORGS).map(|r| 1.0 / r as f64).sum();
        let shares: Vec<f64> = (1..=ORGS)
            .map(|r| match head.get(r - 1) {
                Some(&s) => s,
                None => 0.40 * (1.0 / r as f64) / tail,
            })
            .collect();
        // Users: one each, the rest by share^0.8 (largest remainder), so 5,000 in all.
        let spread: Vec<f64> = shares.iter().map(|s| s.powf(0.8)).collect();
        let spread_sum: f64 = spread.iter().sum();
        let extra = (USERS - ORGS) as f64;
        let mut counts: Vec<usize> = spread
            .iter()
            .map(|w| 1 + (extra * w / spread_sum) as usize)
            .collect();
        let mut by_remainder: Vec<usize> = (0..ORGS).collect();
        by_remainder.sort_by(|&a, &b| {
            let frac = |i: usize| (extra * spread[i] / spread_sum).fract();
            frac(b).total_cmp(&frac(a))
        });
        let missing = USERS - counts.iter().sum::<usize>();
        for &i in by_remainder.iter().take(missing) {
            counts[i] += 1;
        }
        let orgs: Vec<Org> = shares
            .iter()
            .zip(&counts)
            .enumerate()
            .map(|(i, (&share, &n))| {
                let id = format!("org-{:03}", i + 1);
                let users: Vec<User> = (0..n)
                    .map(|u| {
                        // Each user (an integration) calls 2–40 routes, mostly few, drawn from
                        // the global popularity and used with a Zipf skew of their own.
                        let k = 2 + (rng.unit().powi(3) * 38.0) as usize;
                        let mut mine: Vec<usize> = Vec::with_capacity(k);
                        for _ in 0..k * 8 {
                            if mine.len() == k {
                                break;
                            }
                            let r = rng.pick(&route_cum);
                            if !mine.contains(&r) {
                                mine.push(r);
                            }
                        }
                        User {
                            id: format!("key-{}-{u:04}", i + 1),
                            route_cum: cumulative((1..=mine.len()).map(|r| 1.0 / r as f64)),
                            routes: mine,
                        }
                    })
                    .collect();
                Org {
                    plan: match i {
                        0..=4 => "enterprise",
                        5..=49 => "pro",
                        _ => "free",
                    },
                    share,
                    user_cum: cumulative((1..=users.len()).map(|r| 1.0 / (r as f64).powf(1.1))),
                    users,
                    id,
                }
            })
            .collect();
        let org_cum = cumulative(shares.iter().copied());
        Self {
            routes,
            route_cum,
            orgs,
            org_cum,
        }
    }

    fn event(&self, rng: &mut Rng, ids: &mut EventIdGenerator, at: DateTime<Utc>) -> UsageEvent {
        let org = &self.orgs[rng.pick(&self.org_cum)];
        let user = &org.users[rng.pick(&org.user_cum)];
        let route_index = if rng.below(100) < 3 {
            rng.pick(&self.route_cum)
        } else {
            user.routes[rng.pick(&user.route_cum)]
        };
        let route = &self.routes[route_index];
        let roll = rng.below(100);
        let method = match route.shape {
            Shape::Collection if roll < 80 => "GET",
            Shape::Collection => "POST",
            Shape::Item if roll < 82 => "GET",
            Shape::Item if roll < 89 => "PUT",
            Shape::Item if roll < 95 => "PATCH",
            Shape::Item => "DELETE",
            Shape::ReadOnly => "GET",
            Shape::Action => "POST",
        };
        let write = method != "GET";
        let decision = match rng.below(1_000) {
            0..=19 => Verdict::Limited,
            20..=34 => Verdict::ShadowLimited,
            _ => Verdict::Allowed,
        };
        let rule = (decision != Verdict::Allowed).then(|| {
            match rng.below(4) {
                0 => "org-per-minute",
                1 => "user-burst",
                2 if write => "endpoint-writes",
                2 => "endpoint-reads",
                _ => "plan-monthly",
            }
            .to_owned()
        });
        let status = if decision == Verdict::Limited {
            429
        } else {
            match rng.below(1_000) {
                0..=9 => 400,
                10..=14 => 401,
                15..=19 => 403,
                20..=44 => 404,
                45..=50 => 500,
                51..=52 => 502,
                53..=54 => 503,
                _ => match method {
                    "POST" if matches!(route.shape, Shape::Collection) => 201,
                    "DELETE" => 204,
                    _ => 200,
                },
            }
        };
        let mut latency = if status == 429 {
            rng.log_normal(400.0, 0.3)
        } else {
            rng.log_normal(route.median_latency_us, 0.55)
        };
        if rng.below(200) == 0 {
            latency *= 10.0; // a slow tail
        }
        let response_bytes = match status {
            429 => 180,
            204 => 0,
            s if s >= 400 => 120 + rng.below(200),
            _ => rng.log_normal(route.median_response_bytes, 0.8) as u64,
        };
        let cloudflare = org.share < 0.01 && rng.below(3) == 0;
        UsageEvent {
            id: ids.next_id(Timestamp::from_millis(at.timestamp_millis() as u64)),
            timestamp: at,
            org: org.id.clone(),
            user: Some(user.id.clone()),
            plan: org.plan.into(),
            method: method.into(),
            route: route.template.clone(),
            status,
            latency_us: (latency as u64).clamp(50, 60_000_000),
            request_bytes: if write {
                rng.log_normal(900.0, 1.0) as u64
            } else {
                0
            },
            response_bytes,
            cost: route.cost,
            decision,
            rule,
            edge: if cloudflare {
                EdgeKind::Cloudflare
            } else {
                EdgeKind::Envoy
            },
            node: if cloudflare {
                "cf-fra".into()
            } else {
                format!("envoy-{}", rng.below(8))
            },
            dimensions: BTreeMap::new(),
            metrics: BTreeMap::new(),
            fingerprint: None,
        }
    }

    /// The org ranked `rank` (1 = heaviest).
    fn org(&self, rank: usize) -> &Org {
        &self.orgs[rank - 1]
    }
}

/// Relative traffic at a time: a daily cycle (trough 04:00 UTC, peak 16:00) and quieter
/// weekends.
fn rate(t: DateTime<Utc>) -> f64 {
    let hour = f64::from(t.hour()) + f64::from(t.minute()) / 60.0;
    let daily = 0.3 + 0.7 * (0.5 - 0.5 * ((hour - 4.0) / 24.0 * std::f64::consts::TAU).cos());
    let weekly = if t.weekday().number_from_monday() >= 6 {
        0.55
    } else {
        1.0
    };
    daily * weekly
}

/// The events in time order, in batches of `WRITE_BATCH`: minute by minute over the `DAYS` days
/// ending at `end`, each minute's count following `rate` (exact total `n`).
struct Stream<'a> {
    workload: &'a Workload,
    rng: Rng,
    ids: EventIdGenerator,
    start: i64,
    minutes: i64,
    minute: i64,
    weights_total: f64,
    carry: f64,
    n: u64,
    emitted: u64,
    pending: Vec<UsageEvent>,
}

impl<'a> Stream<'a> {
    fn new(workload: &'a Workload, end: DateTime<Utc>, n: u64) -> Self {
        let end_minute = end.timestamp().div_euclid(60) * 60;
        let minutes = DAYS * 1_440;
        let start = end_minute - minutes * 60;
        let weights_total = (0..minutes)
            .map(|m| rate(DateTime::from_timestamp(start + m * 60, 0).unwrap_or_default()))
            .sum();
        Self {
            workload,
            rng: Rng(SEED),
            ids: EventIdGenerator::new(SEED),
            start,
            minutes,
            minute: 0,
            weights_total,
            carry: 0.0,
            n,
            emitted: 0,
            pending: Vec::new(),
        }
    }

    fn next_batch(&mut self) -> Option<Vec<UsageEvent>> {
        while self.pending.len() < WRITE_BATCH && self.minute < self.minutes {
            let at = self.start + self.minute * 60;
            let t = DateTime::from_timestamp(at, 0).unwrap_or_default();
            self.carry += self.n as f64 * rate(t) / self.weights_total;
            let mut count = self.carry.floor() as u64;
            self.carry -= count as f64;
            self.minute += 1;
            if self.minute == self.minutes {
                count = self.n - self.emitted; // rounding: the last minute takes the rest
            }
            count = count.min(self.n - self.emitted);
            let mut offsets: Vec<u64> = (0..count).map(|_| self.rng.below(60_000)).collect();
            offsets.sort_unstable();
            for ms in offsets {
                let ts =
                    DateTime::from_timestamp_millis(at * 1_000 + ms as i64).unwrap_or_default();
                let e = self.workload.event(&mut self.rng, &mut self.ids, ts);
                self.pending.push(e);
            }
            self.emitted += count;
        }
        if self.pending.is_empty() {
            return None;
        }
        let rest = self.pending.split_off(self.pending.len().min(WRITE_BATCH));
        Some(std::mem::replace(&mut self.pending, rest))
    }
}

// ---------------------------------------------------------------------------------------------
// Cache bookkeeping.

fn bench_data_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("bench-data");
    std::fs::create_dir_all(&dir).expect("target/bench-data");
    dir
}

/// What is remembered beside a loaded database.
#[derive(Clone, Debug, PartialEq)]
struct Meta {
    version: u32,
    events: u64,
    /// Fingerprint of the collector's migrations for the engine when the data was loaded.
    schema: String,
    /// End of the data's 30 days, seconds since the epoch.
    end: i64,
    load_secs: f64,
    write_secs: f64,
    fold_secs: f64,
    finish_secs: f64,
    /// Runs the load took: more than one when a stopped load was resumed (the times are sums).
    sessions: u32,
}

impl Meta {
    fn read(path: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        let fields: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let get = |k: &str| fields.get(k).copied();
        Some(Self {
            version: get("version")?.parse().ok()?,
            events: get("events")?.parse().ok()?,
            schema: get("schema")?.to_owned(),
            end: get("end")?.parse().ok()?,
            load_secs: get("load_secs")?.parse().ok()?,
            write_secs: get("write_secs")?.parse().ok()?,
            fold_secs: get("fold_secs")?.parse().ok()?,
            finish_secs: get("finish_secs")?.parse().ok()?,
            sessions: get("sessions").and_then(|v| v.parse().ok()).unwrap_or(1),
        })
    }

    fn write(&self, path: &Path) {
        let text = format!(
            "version={}\nevents={}\nschema={}\nend={}\nload_secs={:.1}\nwrite_secs={:.1}\n\
             fold_secs={:.1}\nfinish_secs={:.1}\nsessions={}\n",
            self.version,
            self.events,
            self.schema,
            self.end,
            self.load_secs,
            self.write_secs,
            self.fold_secs,
            self.finish_secs,
            self.sessions
        );
        std::fs::write(path, text).expect("write the cache's meta file");
    }

    /// Whether a cache with this meta can serve this run.
    fn usable(meta: Option<&Meta>, events: u64, schema: &str) -> Result<Meta, String> {
        let Some(m) = meta else {
            return Err("no complete load cached".into());
        };
        if m.version != GENERATOR_VERSION || m.events != events {
            return Err(format!(
                "cached generator v{} with {} events, want v{GENERATOR_VERSION} with {events}",
                m.version, m.events
            ));
        }
        if m.schema != schema {
            return Err("the collector's migrations changed since it was loaded".into());
        }
        let age = Utc::now().timestamp() - m.end;
        if age < 0 || age as u64 > MAX_CACHE_AGE.as_secs() {
            return Err(format!(
                "cached data ends {:.1} days ago",
                age as f64 / 86_400.0
            ));
        }
        if std::env::var_os("TOLLGATE_BENCH_REPORTS_REBUILD").is_some() {
            return Err("TOLLGATE_BENCH_REPORTS_REBUILD is set".into());
        }
        Ok(m.clone())
    }

    /// A stopped load of the same data that can be resumed: same generator, events and
    /// migrations (its age does not matter: it keeps its own end time).
    fn resumable(meta: Option<&Meta>, events: u64, schema: &str) -> Option<Meta> {
        let m = meta?;
        (m.version == GENERATOR_VERSION
            && m.events == events
            && m.schema == schema
            && std::env::var_os("TOLLGATE_BENCH_REPORTS_REBUILD").is_none())
        .then(|| m.clone())
    }
}

/// Where a load in progress keeps its progress (the meta file's name plus `.partial`).
fn partial_path(meta_path: &Path) -> PathBuf {
    let mut p = meta_path.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// Migrations that change neither the stored events nor the rollups, so a cache loaded before
/// them stays valid (the bench's `migrate` adds them to it): `0007` only adds the new queue
/// table, which a loaded cache holds empty anyway.
const CACHE_NEUTRAL_MIGRATIONS: &[&str] = &[
    "0007_rollup_batches.sql",
    // The rollups' own file (SQLite): the collector's `migrate` moves the cached rollups into
    // it unchanged. Later migrations of that file count.
    "0001_rollups.sql",
    // Rebuilds the (empty) queue table; the collector's `migrate` then moves the cached rollups
    // into their own file, rows unchanged.
    "0008_rollup_batches_autoincrement.sql",
    // Delete the full cube's day and week rows (PostgreSQL `0008`, the rollups file's `0002`):
    // applied to a cache, they leave what a load under them folds.
    "0008_full_cube_hours_only.sql",
    "0002_full_cube_hours_only.sql",
    // Partitions PostgreSQL's rollups by cube: the same rows, moved.
    "0009_rollups_by_cube.sql",
    "0010_rollups_vacuumed.sql",
];

/// A fingerprint (FNV-1a) of the collector's migrations for one engine: names and contents. A
/// cache loaded under other migrations is rebuilt, since new rollup columns would hold defaults
/// rather than folded values.
fn schema_fingerprint(engine: &str) -> String {
    let migrations = Path::new(env!("CARGO_MANIFEST_DIR")).join("../collector/migrations");
    // SQLite's rollups file has migrations of its own.
    let dirs = match engine {
        "sqlite" => vec![migrations.join("sqlite"), migrations.join("sqlite-rollups")],
        _ => vec![migrations.join(engine)],
    };
    let mut files: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|dir| {
            std::fs::read_dir(dir)
                .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
                .unwrap_or_else(|_| Vec::new())
        })
        .collect();
    files.retain(|f| {
        f.file_name()
            .is_none_or(|n| !CACHE_NEUTRAL_MIGRATIONS.iter().any(|m| n == *m))
    });
    files.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for f in files {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
        let bytes = std::fs::read(&f).unwrap_or_default();
        for b in name.unwrap_or_default().bytes().chain(bytes) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// An SQLite database's files: the main one and the rollups' (`<db>.rollups`), with their WALs.
fn remove_sqlite_files(db: &Path) {
    for suffix in [
        "",
        "-wal",
        "-shm",
        ".rollups",
        ".rollups-wal",
        ".rollups-shm",
    ] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

// ---------------------------------------------------------------------------------------------
// The load.

fn rate_text(n: u64, secs: f64) -> String {
    format!("{:.0} events/s", n as f64 / secs.max(1e-9))
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Writes and folds every event; returns the timings.
///
/// `resumed` is the progress of an earlier run of the same load that was stopped: its events are
/// written again (those already stored come back as duplicates and are not queued twice) and
/// what they queued and did not fold is folded, so the load picks up where it stopped; the
/// times are added to that run's.
#[allow(clippy::too_many_arguments)]
async fn load(
    name: &str,
    storage: &Storage,
    workload: &Workload,
    events: u64,
    end: DateTime<Utc>,
    schema: &str,
    resumed: Option<Meta>,
    partial: &Path,
) -> Meta {
    let started = Instant::now();
    let before = resumed.clone().unwrap_or(Meta {
        version: GENERATOR_VERSION,
        events,
        schema: schema.to_owned(),
        end: end.timestamp(),
        load_secs: 0.0,
        write_secs: 0.0,
        fold_secs: 0.0,
        finish_secs: 0.0,
        sessions: 0,
    });
    let progress = |write: Duration, fold: Duration, finish: Duration| Meta {
        load_secs: before.load_secs + started.elapsed().as_secs_f64(),
        write_secs: before.write_secs + write.as_secs_f64(),
        fold_secs: before.fold_secs + fold.as_secs_f64(),
        finish_secs: before.finish_secs + finish.as_secs_f64(),
        sessions: before.sessions + 1,
        ..before.clone()
    };
    progress(Duration::ZERO, Duration::ZERO, Duration::ZERO).write(partial);
    if resumed.is_some() {
        eprintln!(
            "[{name}] resuming a stopped load ({:.0} s over {} earlier run(s)): events already \
             stored come back as duplicates",
            before.load_secs, before.sessions
        );
    }
    // Whatever a stopped run queued and did not fold.
    let t = Instant::now();
    storage.fold_all().await.expect("fold_all");
    let resume_fold = t.elapsed();
    for org in &workload.orgs {
        let created = storage
            .create_org(&OrgRecord {
                id: org.id.clone(),
                name: org.id.clone(),
                plan: Some(org.plan.into()),
                created_at: end.timestamp() - DAYS * 86_400,
            })
            .await;
        match created {
            Err(e) if resumed.is_some() && e.is_unique_violation() => {}
            other => other.expect("create org"),
        }
    }
    let mut stream = Stream::new(workload, end, events);
    let (mut write, mut fold, mut generate) = (Duration::ZERO, resume_fold, Duration::ZERO);
    let report_every = (events / 10).max(100_000);
    let (mut written, mut since_fold, mut next_report) = (0u64, 0u64, report_every);
    let mut duplicates = 0u64;
    loop {
        assert!(
            started.elapsed() < LOAD_LIMIT,
            "[{name}] load not done after {LOAD_LIMIT:?}: abandoned"
        );
        let t = Instant::now();
        let Some(batch) = stream.next_batch() else {
            break;
        };
        generate += t.elapsed();
        let t = Instant::now();
        let new = storage
            .write_events(&batch, Utc::now(), &[])
            .await
            .expect("write_events");
        write += t.elapsed();
        let dups = new.iter().filter(|&&n| !n).count() as u64;
        assert!(
            dups == 0 || resumed.is_some(),
            "[{name}] a generated event was a duplicate"
        );
        duplicates += dups;
        written += batch.len() as u64;
        since_fold += batch.len() as u64;
        drop(batch);
        if since_fold >= FOLD_EVERY || written == events {
            let t = Instant::now();
            // As the collector's folder does: `MAX_FOLD` events a fold until the queue is empty.
            for _ in 0..FOLD_EVERY as usize / FOLD_BATCH.max(1) + 10 {
                if storage.fold(FOLD_BATCH).await.expect("fold") == 0 {
                    break;
                }
            }
            fold += t.elapsed();
            since_fold = 0;
            progress(write, fold, Duration::ZERO).write(partial);
        }
        if written >= next_report || written == events {
            next_report += report_every;
            eprintln!(
                "[{name}] {} / {} events ({} already stored): write {:.0} s ({}), fold {:.0} s \
                 ({}), generate {:.0} s, elapsed {:.0} s",
                thousands(written),
                thousands(events),
                thousands(duplicates),
                write.as_secs_f64(),
                rate_text(written, write.as_secs_f64()),
                fold.as_secs_f64(),
                rate_text(written, fold.as_secs_f64()),
                generate.as_secs_f64(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    assert_eq!(written, events, "[{name}] the stream ended early");
    storage.fold_all().await.expect("fold_all");
    let queued = storage.queued_for_rollup().await.expect("queued");
    assert_eq!(queued, 0, "[{name}] rollup queue not empty after folding");

    // What `serve`'s hourly pruner would have done by now, then housekeeping the engine's own
    // background work would have done in steady state.
    let t = Instant::now();
    let now = Utc::now();
    storage
        .prune(
            now - chrono::Duration::days(RETENTION_DAYS),
            now - chrono::Duration::days(MINUTE_ROLLUP_DAYS),
        )
        .await
        .expect("prune");
    match storage {
        Storage::Sqlite(pool) => {
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(pool)
                .await
                .expect("checkpoint");
        }
        Storage::Postgres(pg) => {
            // Autovacuum's job in steady state: dead rollup versions from the folds' updates,
            // and planner statistics.
            sqlx::query("VACUUM (ANALYZE) rollups")
                .execute(&pg.pool)
                .await
                .expect("vacuum");
            sqlx::query("ANALYZE")
                .execute(&pg.pool)
                .await
                .expect("analyze");
        }
    }
    let finish = t.elapsed();
    let meta = progress(write, fold, finish);
    eprintln!(
        "[{name}] loaded {} events in {:.0} s ({}){}: write_events {:.0} s, fold {:.0} s, \
         generate {:.0} s, prune + {} {:.0} s",
        thousands(events),
        meta.load_secs,
        rate_text(events, meta.load_secs),
        if meta.sessions > 1 {
            format!(" over {} runs", meta.sessions)
        } else {
            String::new()
        },
        meta.write_secs,
        meta.fold_secs,
        generate.as_secs_f64(),
        if matches!(storage, Storage::Sqlite(_)) {
            "checkpoint"
        } else {
            "vacuum/analyze"
        },
        meta.finish_secs
    );
    meta
}

// ---------------------------------------------------------------------------------------------
// Direct reads for the printout (row counts, sketch sizes).

macro_rules! on_pool {
    ($storage:expr, $pool:ident => $body:expr) => {
        match $storage {
            Storage::Sqlite($pool) => $body,
            Storage::Postgres(pg) => {
                let $pool = &pg.pool;
                $body
            }
        }
    };
}

async fn rows_per_granularity(storage: &Storage) -> [i64; 4] {
    let rows: Vec<(i64, i64)> = on_pool!(storage, pool => sqlx::query_as(
        "SELECT CAST(granularity AS BIGINT), COUNT(*) FROM rollups GROUP BY granularity",
    )
    .fetch_all(pool)
    .await
    .expect("count rollups"));
    let mut out = [0; 4];
    for (g, n) in rows {
        if let Some(slot) = out.get_mut(g as usize) {
            *slot = n;
        }
    }
    out
}

/// Rollup rows in `segments` (granularity code, from, to), of one org or of all, per cube (the
/// collector's narrower projections of the rollup key; all rows count as cube 0 on a schema
/// without them).
async fn rows_by_cube(
    storage: &Storage,
    org: Option<&str>,
    segments: &[(i16, i64, i64)],
) -> Vec<(i64, i64)> {
    let ranges: Vec<String> = segments
        .iter()
        .map(|(g, from, to)| format!("(granularity = {g} AND bucket >= {from} AND bucket < {to})"))
        .collect();
    let filter = format!(
        "{}({})",
        if org.is_some() { "org = $1 AND " } else { "" },
        ranges.join(" OR ")
    );
    let mut out = Vec::new();
    for cube in ["CAST(cube AS BIGINT)", "CAST(0 AS BIGINT)"] {
        let sql =
            format!("SELECT {cube}, COUNT(*) FROM rollups WHERE {filter} GROUP BY 1 ORDER BY 1");
        let rows: Result<Vec<(i64, i64)>, sqlx::Error> = on_pool!(storage, pool => {
            let mut q = sqlx::query_as(&sql);
            if let Some(org) = org {
                q = q.bind(org);
            }
            q.fetch_all(pool).await
        });
        if let Ok(rows) = rows {
            out = rows;
            break;
        }
    }
    out
}

/// A `days=N` report's range tiled by the collector's own code: whole UTC days up to the end of
/// today, weeks between the first and last Monday.
async fn tiled(storage: &Storage, days: i64) -> Vec<(i16, i64, i64)> {
    const D: i64 = 86_400;
    let to = (Utc::now().timestamp() + D - 1).div_euclid(D) * D;
    let weeks_since = storage
        .complete_since(Granularity::Week)
        .await
        .expect("rollup_epochs");
    Segment::tile(to - days * D, to, weeks_since)
        .into_iter()
        .map(|s| (s.granularity.code(), s.from, s.to))
        .collect()
}

/// A row count as printed; negative: not counted (`TOLLGATE_BENCH_REPORTS_SKIP_COUNTS`).
fn counted(n: i64) -> String {
    if n < 0 {
        "not counted".into()
    } else {
        thousands(n as u64)
    }
}

fn cube_name(code: i64) -> String {
    match code {
        0 => "full key".into(),
        1 => "endpoint".into(),
        2 => "user".into(),
        3 => "org".into(),
        4 => "route".into(),
        5 => "custom dimension".into(),
        6 => "route and user (before migration 0006)".into(),
        7 => "caller".into(),
        n => format!("cube {n}"),
    }
}

/// Of up to 2,000 of an org's rows of one granularity: mean stored sketch bytes, and mean bytes
/// of the decoded HdrHistogram (its counts array), which is what a report holds per row.
async fn sketch_sizes(storage: &Storage, org: &str, g: i16) -> (f64, f64) {
    let rows: Vec<(Option<Vec<u8>>,)> = on_pool!(storage, pool => sqlx::query_as(
        "SELECT latency_sketch FROM rollups WHERE org = $1 AND granularity = $2 \
         AND latency_sketch IS NOT NULL LIMIT 2000",
    )
    .bind(org)
    .bind(g)
    .fetch_all(pool)
    .await
    .expect("sample sketches"));
    if rows.is_empty() {
        return (0.0, 0.0);
    }
    let stored: usize = rows.iter().map(|(s,)| s.as_ref().map_or(0, Vec::len)).sum();
    let decoded: usize = rows
        .iter()
        .map(|(s,)| tollgate_collector::rollup::decode_sketch(s.as_deref()).distinct_values() * 8)
        .sum();
    (
        stored as f64 / rows.len() as f64,
        decoded as f64 / rows.len() as f64,
    )
}

// ---------------------------------------------------------------------------------------------
// Memory: peak RSS per line, and a hard stop.

fn rss_mib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Resets the peak-RSS mark (`VmHWM`); false when the kernel does not allow it.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The PostgreSQL cluster the watchdog must stop before it exits the process, if one runs:
/// binaries, data directory, whether as the `postgres` user.
static PG_TO_STOP: std::sync::Mutex<Option<(PathBuf, PathBuf, bool)>> = std::sync::Mutex::new(None);
static WATCHDOG_STARTED: AtomicBool = AtomicBool::new(false);

/// Stops the PostgreSQL cluster this run started, if one runs (for exits that skip `Drop`).
fn stop_pg_now() {
    let pg = PG_TO_STOP.lock().ok().and_then(|mut g| g.take());
    if let Some((bin, data, as_postgres)) = pg {
        let _ = pg::command(&bin, &data, as_postgres, "pg_ctl")
            .args(["-D".as_ref(), data.as_os_str()])
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// On SIGTERM or SIGINT: stop PostgreSQL, then exit (a cache left half-loaded has no meta file,
/// so the next run rebuilds it).
async fn stop_on_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    eprintln!("collector_reports: {which}: stopping PostgreSQL and exiting");
    stop_pg_now();
    std::process::exit(130);
}

/// Samples RSS every 50 ms; past `RSS_LIMIT_MIB` it stops PostgreSQL and exits.
fn start_watchdog() {
    if WATCHDOG_STARTED.swap(true, Ordering::SeqCst) {
        return;
    }
    std::thread::spawn(|| loop {
        let rss = rss_mib("VmRSS:").unwrap_or(0);
        if rss > RSS_LIMIT_MIB {
            eprintln!(
                "collector_reports: resident memory {rss} MiB passed {RSS_LIMIT_MIB} MiB: \
                 stopping PostgreSQL and exiting"
            );
            stop_pg_now();
            std::process::exit(3);
        }
        std::thread::sleep(Duration::from_millis(50));
    });
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL, in a data directory kept between runs.

/// A PostgreSQL server over `dir/data`, with production durability, stopped on drop (the data
/// directory stays: it is the cache).
struct Pg {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Pg {
    /// The server's major version, as `PG_VERSION` in a data directory holds it.
    fn major(bin: &Path) -> String {
        bin.parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Starts over `dir/data`: the existing cluster when `reuse`, else a fresh one.
    fn start(dir: &Path, reuse: bool) -> Self {
        let bin = pg::bin_dir();
        let as_postgres = pg::as_postgres();
        let data = dir.join("data");
        if !reuse {
            let _ = std::fs::remove_dir_all(dir);
        }
        std::fs::create_dir_all(dir).expect("PostgreSQL dir");
        pg::own(dir, as_postgres);
        let port = pg::free_port();
        let pg = Self {
            dir: dir.to_owned(),
            bin,
            port,
            as_postgres,
        };
        if !reuse {
            cluster::initdb(&pg.bin, &pg.dir, as_postgres);
        }
        *PG_TO_STOP.lock().expect("lock") = Some((pg.bin.clone(), data.clone(), as_postgres));
        cluster::start(
            &pg.bin,
            &pg.dir,
            as_postgres,
            port,
            "-c shared_buffers=1GB -c max_wal_size=2GB",
        );
        pg
    }

    fn url(&self) -> String {
        pg::url(self.port)
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        cluster::stop(&self.bin, &self.dir, self.as_postgres);
        if let Ok(mut g) = PG_TO_STOP.lock() {
            *g = None;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The report requests.

struct Line {
    label: &'static str,
    path: String,
    query: Vec<(&'static str, String)>,
    /// A route being written: a 404 (no such route) or 501 (not built yet) means it is not
    /// there yet, and the stand-in line runs.
    report_route: bool,
}

enum Outcome {
    Measured {
        samples: Vec<Duration>,
        /// Resident memory before the line and its peak during the line.
        rss_mib: Option<(u64, u64)>,
        body_bytes: usize,
    },
    Failed(String),
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// One request: status, body, time to the last body byte.
async fn request(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    line: &Line,
) -> Result<(u16, Vec<u8>, Duration), String> {
    let started = Instant::now();
    let response = client
        .get(format!("{base}{}", line.path))
        .query(&line.query)
        .bearer_auth(key)
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status().as_u16();
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("reading the body failed: {e}"))?;
    Ok((status, body.to_vec(), started.elapsed()))
}

async fn measure(client: &reqwest::Client, base: &str, key: &str, line: &Line) -> Outcome {
    let started = Instant::now();
    let tracked = reset_peak_rss();
    let rss_before = rss_mib("VmRSS:");
    let mut samples = Vec::with_capacity(REPEATS);
    let mut body_bytes = 0;
    // Warm-ups take at most a third of the budget; at least `MIN_SAMPLES` are measured even
    // past the budget (each bounded by `REQUEST_TIMEOUT`).
    for i in 0..WARMUPS + REPEATS {
        let warm_up = i < WARMUPS;
        let over = if warm_up {
            started.elapsed() >= LINE_BUDGET / 3
        } else {
            samples.len() >= MIN_SAMPLES && started.elapsed() >= LINE_BUDGET
        };
        if over {
            if warm_up {
                continue;
            }
            break;
        }
        let (status, body, took) = match request(client, base, key, line).await {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(e),
        };
        if status != 200 {
            let text = String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned();
            println!("  {}: HTTP {status}, body: {text}", line.label);
            return Outcome::Failed(format!("HTTP {status}"));
        }
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&body) {
            println!("  {}: HTTP 200 but not JSON ({e})", line.label);
            return Outcome::Failed("not JSON".into());
        }
        body_bytes = body.len();
        if !warm_up {
            samples.push(took);
        }
    }
    samples.sort();
    Outcome::Measured {
        samples,
        rss_mib: tracked.then(|| rss_before.zip(rss_mib("VmHWM:"))).flatten(),
        body_bytes,
    }
}

struct Picks {
    heaviest: String,
    mid: String,
    mid_rank: usize,
    mid_share: f64,
}

fn lines(picks: &Picks) -> Vec<Line> {
    let days = ("days", "30".to_owned());
    vec![
        Line {
            label: "overview: heaviest org, 30 days",
            path: "/v1/reports/overview".into(),
            query: vec![("org", picks.heaviest.clone()), days.clone()],
            report_route: true,
        },
        Line {
            label: "top 100 users by calls, all orgs, 30 d",
            path: "/v1/reports/top".into(),
            query: vec![
                ("dimension", "users".into()),
                ("by", "calls".into()),
                ("limit", "100".into()),
                days.clone(),
            ],
            report_route: true,
        },
        Line {
            label: "timeseries: mid org, hourly, 30 d",
            path: "/v1/reports/timeseries".into(),
            query: vec![
                ("org", picks.mid.clone()),
                ("interval", "hour".into()),
                days.clone(),
            ],
            report_route: true,
        },
        Line {
            label: "endpoints: heaviest org, 30 d",
            path: "/v1/reports/endpoints".into(),
            query: vec![("org", picks.heaviest.clone()), days],
            report_route: true,
        },
    ]
}

fn stand_in(picks: &Picks) -> Line {
    let now = Utc::now();
    Line {
        label: "stand-in: /v1/usage heaviest, day, by route",
        path: "/v1/usage".into(),
        query: vec![
            ("org", picks.heaviest.clone()),
            ("granularity", "day".into()),
            ("from", (now - chrono::Duration::days(30)).to_rfc3339()),
            ("to", now.to_rfc3339()),
            ("group_by", "route".into()),
        ],
        report_route: false,
    }
}

struct EngineReport {
    meta: Meta,
    loaded_now: bool,
    rows: [i64; 4],
    /// Rows a report's range covers, by scope and cube.
    scope: Vec<(String, i64)>,
    sketch: Vec<(&'static str, f64, f64)>,
    outcomes: Vec<(String, Outcome)>,
}

impl EngineReport {
    fn outcome(&self, label: &str) -> Option<&Outcome> {
        self.outcomes
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, o)| o)
    }
}

/// One engine's database and its cache: where to connect, what of the cache is usable.
struct Engine<'a> {
    name: &'static str,
    url: String,
    /// A complete cache, and a stopped load to resume (see `check_cache`).
    cached: (Option<Meta>, Option<Meta>),
    meta_path: &'a Path,
    schema: &'a str,
}

/// What every engine loads: the same events.
struct Load<'a> {
    workload: &'a Workload,
    events: u64,
    end: DateTime<Utc>,
}

/// Forgets a cache that cannot be used: its meta files, and whatever `remove_data` removes.
fn clear_unusable(
    cached: &(Option<Meta>, Option<Meta>),
    meta_path: &Path,
    remove_data: impl FnOnce(),
) {
    if *cached == (None, None) {
        let _ = std::fs::remove_file(meta_path);
        let _ = std::fs::remove_file(partial_path(meta_path));
        remove_data();
    }
}

/// Connects, migrates and loads the engine's database (or reuses its cache); writes the
/// cache's meta file when it loaded.
async fn load_engine(engine: &Engine<'_>, load: &Load<'_>) -> (Storage, Meta) {
    let Engine {
        name,
        ref url,
        ref cached,
        meta_path,
        schema,
    } = *engine;
    let (cached, resumed) = cached.clone();
    let storage = Storage::connect(url, 16).await.expect("connect");
    storage.migrate().await.expect("migrate");
    let meta = match cached {
        Some(m) => {
            eprintln!(
                "[{name}] reusing the loaded database ({} events, data ending {}; loaded in {:.0} s \
                 when built)",
                thousands(m.events),
                DateTime::from_timestamp(m.end, 0)
                    .unwrap_or_default()
                    .to_rfc3339(),
                m.load_secs
            );
            m
        }
        None => {
            let end = resumed
                .as_ref()
                .and_then(|m| DateTime::from_timestamp(m.end, 0))
                .unwrap_or(load.end);
            let partial = partial_path(meta_path);
            let m = crate::load(
                name,
                &storage,
                load.workload,
                load.events,
                end,
                schema,
                resumed,
                &partial,
            )
            .await;
            m.write(meta_path);
            let _ = std::fs::remove_file(&partial);
            m
        }
    };
    (storage, meta)
}

/// Loads (or reuses) the engine's database, then times every line over HTTP.
async fn run_engine(engine: &Engine<'_>, load: &Load<'_>, picks: &Picks) -> EngineReport {
    let name = engine.name;
    let loaded_now = engine.cached.0.is_none();
    let (storage, meta) = load_engine(engine, load).await;
    // Counting rows scans most of a 10M-event database (minutes); it can be skipped.
    let count = std::env::var_os("TOLLGATE_BENCH_REPORTS_SKIP_COUNTS").is_none();
    let rows = if count {
        rows_per_granularity(&storage).await
    } else {
        [-1; 4]
    };
    let now = Utc::now().timestamp();
    let hour_to = (now + 3_599).div_euclid(3_600) * 3_600;
    let mut scope = Vec::new();
    for (label, org, segments) in [
        (
            "heaviest org, 30 d",
            Some(&picks.heaviest),
            tiled(&storage, 30).await,
        ),
        (
            "mid org, hour rows, 30 d",
            Some(&picks.mid),
            vec![(1, hour_to - 30 * 86_400, hour_to)],
        ),
        ("all orgs, 30 d", None, tiled(&storage, 30).await),
    ] {
        if !count {
            break;
        }
        for (cube, n) in rows_by_cube(&storage, org.map(String::as_str), &segments).await {
            scope.push((format!("{label}, {}", cube_name(cube)), n));
        }
    }
    let mut sketch = Vec::new();
    for (label, g) in [
        ("heaviest org day rows", 2i16),
        ("heaviest org hour rows", 1),
    ] {
        let (stored, decoded) = sketch_sizes(&storage, &picks.heaviest, g).await;
        sketch.push((label, stored, decoded));
    }

    let (state, _writer) = build_state(
        storage.clone(),
        Limits::default(),
        None,
        if matches!(storage, Storage::Sqlite(_)) {
            1
        } else {
            2
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app(state)).await;
    });
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("client");

    let mut outcomes = Vec::new();
    let mut missing_route = false;
    for line in lines(picks) {
        eprintln!("[{name}] timing {}", line.label);
        // A key per line: the report API limits each key (burst, then per minute), and every
        // line should start with a full bucket.
        let key = admin_key(&storage).await;
        let outcome = measure(&client, &base, &key, &line).await;
        if line.report_route
            && matches!(&outcome, Outcome::Failed(s) if s == "HTTP 404" || s == "HTTP 501")
        {
            missing_route = true;
        }
        report_line(name, line.label, &outcome);
        outcomes.push((line.label.to_owned(), outcome));
    }
    if missing_route || std::env::var_os("TOLLGATE_BENCH_REPORTS_STAND_IN").is_some() {
        let line = stand_in(picks);
        // The stand-in reads through `Storage::rollup_rows`, which decodes every row's sketch
        // before merging: refuse when that would not fit.
        let day = |t: i64| t.div_euclid(86_400) * 86_400;
        let rows = rows_by_cube(
            &storage,
            Some(&picks.heaviest),
            &[(2, day(now - 30 * 86_400), day(now + 86_399))],
        )
        .await
        .first()
        .map_or(0, |c| c.1);
        let per_row = sketch.first().map_or(0.0, |s| s.2) + 200.0;
        let gib = rows as f64 * per_row / f64::from(1u32 << 30);
        let outcome = if gib > STAND_IN_MAX_GIB {
            Outcome::Failed(format!(
                "skipped: would decode {} sketches (~{gib:.1} GiB) at once",
                thousands(rows.max(0) as u64)
            ))
        } else {
            eprintln!("[{name}] timing {}", line.label);
            let key = admin_key(&storage).await;
            measure(&client, &base, &key, &line).await
        };
        report_line(name, line.label, &outcome);
        outcomes.push((line.label.to_owned(), outcome));
    }
    server.abort();
    let _ = server.await;
    storage.close().await;
    EngineReport {
        meta,
        loaded_now,
        rows,
        scope,
        sketch,
        outcomes,
    }
}

async fn admin_key(storage: &Storage) -> String {
    tollgate_collector::api::create_key_record(storage, "*", Role::Admin, None)
        .await
        .expect("admin key")
        .1
        .reveal()
        .to_owned()
}

/// A line's figures as soon as it is measured (stderr), so a run stopped part-way still tells.
fn report_line(engine: &str, label: &str, outcome: &Outcome) {
    let (p50, p99, n, _) = cell(Some(outcome));
    eprintln!("[{engine}] {label}: p50 {p50}, p99 {p99}, n {n}");
}

fn cell(outcome: Option<&Outcome>) -> (String, String, String, Option<bool>) {
    match outcome {
        Some(Outcome::Measured { samples, .. }) if !samples.is_empty() => {
            let p99 = percentile(samples, 0.99);
            (
                ms(percentile(samples, 0.50)),
                ms(p99),
                samples.len().to_string(),
                Some(p99 < TARGET_P99),
            )
        }
        Some(Outcome::Measured { .. }) => ("no sample".into(), "-".into(), "0".into(), None),
        Some(Outcome::Failed(why)) => (format!("FAILED {why}"), "-".into(), "-".into(), None),
        None => ("-".into(), "-".into(), "-".into(), None),
    }
}

/// Whether a cache can be reused, saying why not.
/// (a complete load to reuse, a stopped load to resume): at most one is `Some`.
fn check_cache(
    name: &str,
    meta_path: &Path,
    events: u64,
    schema: &str,
    present: bool,
) -> (Option<Meta>, Option<Meta>) {
    let why = match Meta::usable(Meta::read(meta_path).as_ref(), events, schema) {
        Ok(m) if present => return (Some(m), None),
        Ok(_) => "the cached database is missing or unusable".to_owned(),
        Err(why) => why,
    };
    let partial = Meta::resumable(
        Meta::read(&partial_path(meta_path)).as_ref(),
        events,
        schema,
    );
    match partial {
        Some(p) if present => {
            eprintln!("[{name}] will resume the load a stopped run began");
            (None, Some(p))
        }
        _ => {
            eprintln!("[{name}] will load: {why}");
            (None, None)
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; this harness takes no arguments.
    let events: u64 = std::env::var("TOLLGATE_BENCH_REPORTS_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_EVENTS);
    start_watchdog();
    let data = bench_data_dir();
    let stem = if events == DEFAULT_EVENTS {
        format!("reports-v{GENERATOR_VERSION}")
    } else {
        format!("reports-v{GENERATOR_VERSION}-{events}")
    };
    let workload = Workload::new();
    let mid_rank = 20;
    let picks = Picks {
        heaviest: workload.org(1).id.clone(),
        mid: workload.org(mid_rank).id.clone(),
        mid_rank,
        mid_share: workload.org(mid_rank).share,
    };
    eprintln!(
        "collector_reports: {} events; heaviest org {} ({:.0}% of traffic, {} users), mid org {} \
         (rank {}, {:.2}%, {} users); cache in {}",
        thousands(events),
        picks.heaviest,
        workload.org(1).share * 100.0,
        workload.org(1).users.len(),
        picks.mid,
        picks.mid_rank,
        picks.mid_share * 100.0,
        workload.org(mid_rank).users.len(),
        data.display()
    );

    // What can be reused. Both engines get the very same events: a load uses the end time of
    // a reusable cache of the other engine if there is one, else now.
    let sqlite_db = data.join(format!("{stem}.db"));
    let sqlite_meta = data.join(format!("{stem}.db.meta"));
    let sqlite_schema = schema_fingerprint("sqlite");
    let sqlite_cached = check_cache(
        "sqlite",
        &sqlite_meta,
        events,
        &sqlite_schema,
        sqlite_db.exists(),
    );
    let pg_dir = data.join(format!("{stem}-pg"));
    let pg_meta = data.join(format!("{stem}-pg.meta"));
    let pg_schema = schema_fingerprint("postgres");
    let pg_version_ok = std::fs::read_to_string(pg_dir.join("data/PG_VERSION"))
        .map(|v| v.trim() == Pg::major(&pg::bin_dir()))
        .unwrap_or(false);
    let pg_cached = check_cache("postgres", &pg_meta, events, &pg_schema, pg_version_ok);
    let now = Utc::now();
    let end = [
        &sqlite_cached.0,
        &pg_cached.0,
        &sqlite_cached.1,
        &pg_cached.1,
    ]
    .into_iter()
    .find_map(|m| m.as_ref())
    .and_then(|m| DateTime::from_timestamp(m.end, 0))
    .unwrap_or_else(|| DateTime::from_timestamp(now.timestamp() / 60 * 60, 0).unwrap_or(now));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.spawn(stop_on_signal());
    let load = Load {
        workload: &workload,
        events,
        end,
    };
    let sqlite = Engine {
        name: "sqlite",
        url: format!("sqlite://{}", sqlite_db.display()),
        cached: sqlite_cached,
        meta_path: &sqlite_meta,
        schema: &sqlite_schema,
    };
    let clear_sqlite = || {
        clear_unusable(&sqlite.cached, &sqlite_meta, || {
            remove_sqlite_files(&sqlite_db)
        })
    };
    // PostgreSQL's data directory is reused or re-initialised by `Pg::start`.
    let pg_reuse = pg_cached != (None, None);
    let start_pg = || {
        clear_unusable(&pg_cached, &pg_meta, || {});
        Pg::start(&pg_dir, pg_reuse)
    };
    let postgres = |pg: &Pg| Engine {
        name: "postgres",
        url: pg.url(),
        cached: pg_cached.clone(),
        meta_path: &pg_meta,
        schema: &pg_schema,
    };
    // Load one engine's cache and stop: the two loads can then run side by side (in two
    // processes, the second started once the first has written its partial meta, so both use
    // the same end time), and a later run measures both from the caches.
    if let Ok(only) = std::env::var("TOLLGATE_BENCH_REPORTS_LOAD_ONLY") {
        runtime.block_on(async {
            match only.as_str() {
                "sqlite" => {
                    clear_sqlite();
                    load_engine(&sqlite, &load).await;
                }
                "postgres" => {
                    let pg = start_pg();
                    load_engine(&postgres(&pg), &load).await;
                    drop(pg);
                }
                other => panic!("TOLLGATE_BENCH_REPORTS_LOAD_ONLY={other}: sqlite or postgres"),
            }
        });
        return;
    }
    let (sqlite, postgres) = runtime.block_on(async {
        clear_sqlite();
        let sqlite = run_engine(&sqlite, &load, &picks).await;
        let pg = start_pg();
        let postgres = run_engine(&postgres(&pg), &load, &picks).await;
        drop(pg);
        (sqlite, postgres)
    });
    drop(runtime);
    print_report(events, &picks, &sqlite, &postgres);
}

fn print_report(events: u64, picks: &Picks, sqlite: &EngineReport, postgres: &EngineReport) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "collector reports: {} events over {DAYS} days, {ORGS} orgs, {} users, {ROUTES} routes \
         (generator v{GENERATOR_VERSION}); heaviest org {}, mid org {} (rank {}, {:.2}% of \
         traffic)",
        thousands(events),
        thousands(USERS as u64),
        picks.heaviest,
        picks.mid,
        picks.mid_rank,
        picks.mid_share * 100.0
    );
    for (name, r) in [("SQLite", sqlite), ("PostgreSQL", postgres)] {
        let m = &r.meta;
        let _ = writeln!(
            out,
            "{name:<11} load ({}): {:.0} s, {} (write_events {:.0} s = {}; folds {:.0} s = \
             {}; prune and housekeeping {:.0} s)",
            if r.loaded_now && m.sessions > 1 {
                format!("this run, resuming {} stopped one(s)", m.sessions - 1)
            } else if r.loaded_now {
                "this run".to_owned()
            } else {
                "cached, built earlier".to_owned()
            },
            m.load_secs,
            rate_text(m.events, m.load_secs),
            m.write_secs,
            rate_text(m.events, m.write_secs),
            m.fold_secs,
            rate_text(m.events, m.fold_secs),
            m.finish_secs
        );
    }
    let _ = writeln!(out);
    let row = |out: &mut std::io::StdoutLock, label: &str, a: String, b: String| {
        let _ = writeln!(out, "{label:<44} {a:>14} {b:>14}");
    };
    row(
        &mut out,
        "rollup rows",
        "SQLite".into(),
        "PostgreSQL".into(),
    );
    for (i, g) in ["  minute (14 days kept)", "  hour", "  day", "  week"]
        .iter()
        .enumerate()
    {
        row(
            &mut out,
            g,
            counted(sqlite.rows[i]),
            counted(postgres.rows[i]),
        );
    }
    row(
        &mut out,
        "rows in a report's range (30 d: weeks, days around them), by cube",
        String::new(),
        String::new(),
    );
    let mut scope_labels: Vec<&String> = sqlite.scope.iter().map(|s| &s.0).collect();
    for (l, _) in &postgres.scope {
        if !scope_labels.contains(&l) {
            scope_labels.push(l);
        }
    }
    for label in scope_labels {
        let find = |r: &EngineReport| {
            r.scope
                .iter()
                .find(|s| &s.0 == label)
                .map_or("-".to_owned(), |s| thousands(s.1.max(0) as u64))
        };
        row(
            &mut out,
            &format!("  {label}"),
            find(sqlite),
            find(postgres),
        );
    }
    for (i, (label, stored, decoded)) in sqlite.sketch.iter().enumerate() {
        let pg = postgres.sketch.get(i).map_or((0.0, 0.0), |s| (s.1, s.2));
        row(
            &mut out,
            &format!("  sketch bytes stored/decoded, {label}"),
            format!("{stored:.0}/{decoded:.0}"),
            format!("{:.0}/{:.0}", pg.0, pg.1),
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "one client on 127.0.0.1, {WARMUPS} warm-ups then up to {REPEATS} requests or {} s per \
         line; target p99 < {} ms",
        LINE_BUDGET.as_secs(),
        TARGET_P99.as_millis()
    );
    let _ = writeln!(
        out,
        "{:<44} {:>12} {:>10} {:>4} {:>12} {:>10} {:>4}  {:<7} {:<10}",
        "query", "SQLite p50", "p99", "n", "PG p50", "p99", "n", "SQLite", "PostgreSQL"
    );
    let mut labels: Vec<&String> = sqlite.outcomes.iter().map(|(l, _)| l).collect();
    for (l, _) in &postgres.outcomes {
        if !labels.contains(&l) {
            labels.push(l);
        }
    }
    let verdict = |v: Option<bool>| match v {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "-",
    };
    for label in &labels {
        let (s50, s99, sn, sv) = cell(sqlite.outcome(label));
        let (p50, p99, pn, pv) = cell(postgres.outcome(label));
        let _ = writeln!(
            out,
            "{label:<44} {s50:>12} {s99:>10} {sn:>4} {p50:>12} {p99:>10} {pn:>4}  {:<7} {:<10}",
            verdict(sv),
            verdict(pv)
        );
    }
    let _ = writeln!(out);
    let show = |o: Option<&Outcome>| match o {
        Some(Outcome::Measured {
            rss_mib,
            body_bytes,
            ..
        }) => format!(
            "{} MiB / {} B",
            rss_mib.map_or("-".into(), |(a, b)| format!("{a}→{b}")),
            thousands(*body_bytes as u64)
        ),
        _ => "-".into(),
    };
    let _ = writeln!(
        out,
        "{:<44} {:>28} {:>28}",
        "RSS before→peak / response size", "SQLite", "PostgreSQL"
    );
    for label in &labels {
        let _ = writeln!(
            out,
            "{label:<44} {:>28} {:>28}",
            show(sqlite.outcome(label)),
            show(postgres.outcome(label))
        );
    }
}
