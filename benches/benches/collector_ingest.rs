//! Collector ingest, SQLite and PostgreSQL side by side, through a bounded loopback load
//! generator against the real HTTP service (in this process, on 127.0.0.1):
//!
//! 1. **fresh**: closed loop, `CLIENTS` connections each posting pre-serialised 1,000-event
//!    batches as fast as acknowledgements come back — sustained events/s.
//! 2. **duplicates**: the same batches again (every event already stored), once the folder has
//!    folded what the fresh loop queued — events/s.
//! 3. **offered 100k/s**: open loop, one 1,000-event batch every 10 ms whatever the server does
//!    (in flight bounded at `MAX_IN_FLIGHT`; a batch that would exceed it counts as shed), ack
//!    latency measured from the batch's scheduled send time, so a slow server cannot hide its
//!    queueing (no coordinated omission). A probe posts one event of its own org every 100 ms and
//!    polls `/v1/usage` until the rollups show it: visibility latency.
//! 4. **fold alone**: with the service stopped, `FOLD_ROUNDS` times: `FOLD_EVENTS` events
//!    written straight through the storage (no folder running; the writes' CPU is printed per
//!    1,000 events), then one timed fold of them all into the rollups — the fold's own cost,
//!    which under load sets how soon an event shows in the rollups, without the load's noise.
//!    `TOLLGATE_BENCH_FOLD_ONLY=1` runs this phase alone (and the raw COPY), for comparing two
//!    builds' folds quickly.
//! 5. **raw COPY** (PostgreSQL): the same kind of rows COPYed (binary, as ingest sends them)
//!    straight into the same `events` table (its unique index and partitions), 10,000 rows per
//!    transaction — the ceiling the ingest path is measured against.
//!
//! Both engines run with full durability: SQLite in WAL with `synchronous=FULL`, PostgreSQL with
//! `fsync=on` and `synchronous_commit=on`, its WAL segments written and recycled ahead as on a
//! server that has been running (`cluster::recycle_wal`). Load generator and server share the
//! machine's cores.
//!
//! Run: `cargo bench -p tollgate-benches --bench collector_ingest` (needs PostgreSQL's server
//! binaries under /usr/lib/postgresql/*/bin; as root they run as the `postgres` user).
//! `TOLLGATE_BENCH_ENGINES=sqlite` or `=postgres` runs one engine only (the other's column
//! then prints NaN and zeros).

/// The collector binary's allocator (`collector/src/main.rs`), so the bench measures what
/// ships.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tollgate_benches::Rng;
use tollgate_benches::{cluster, pg};
use tollgate_collector::auth::Role;
use tollgate_collector::cli::build_state;
use tollgate_collector::{app, Limits, Storage};
use tollgate_core::event::{EdgeKind, EventBatch, EventIdGenerator, UsageEvent};
use tollgate_core::{Timestamp, Verdict};

const BATCH: usize = 1_000;
const CLIENTS: usize = 16;
const CLOSED_BATCHES: usize = 1_200;
const CLOSED_SECS: u64 = 8;
const OFFERED_EPS: u64 = 100_000;
const OPEN_SECS: u64 = 8;
const MAX_IN_FLIGHT: usize = 256;
const COPY_ROWS: usize = 400_000;
const FOLD_EVENTS: usize = 50_000;
const FOLD_ROUNDS: usize = 5;

/// Events shaped like edge traffic: 8 orgs × 16 users, 8 routes, mostly GET, 200 and allowed.
fn events(ids: &mut EventIdGenerator, rng: &mut Rng, n: usize) -> Vec<UsageEvent> {
    let now = Utc::now();
    let ts = Timestamp::from_millis(now.timestamp_millis() as u64);
    (0..n)
        .map(|_| {
            let org = rng.below(8);
            let status = match rng.below(100) {
                0..=89 => 200,
                90..=94 => 404,
                95..=97 => 429,
                _ => 500,
            };
            UsageEvent {
                id: ids.next_id(ts),
                timestamp: now,
                org: format!("org-{org}"),
                user: Some(format!("key-{org}-{}", rng.below(16))),
                plan: "pro".into(),
                method: if rng.below(5) == 0 { "POST" } else { "GET" }.into(),
                route: format!("/v1/resource{}/{{id}}", rng.below(8)),
                status,
                latency_us: 200 + rng.below(50_000),
                request_bytes: rng.below(2_000),
                response_bytes: rng.below(20_000),
                cost: 1,
                decision: if status == 429 {
                    Verdict::Limited
                } else {
                    Verdict::Allowed
                },
                rule: None,
                edge: EdgeKind::Envoy,
                node: "envoy-1".into(),
                dimensions: BTreeMap::new(),
                metrics: BTreeMap::new(),
                fingerprint: None,
            }
        })
        .collect()
}

fn bodies(seed: u64, batches: usize) -> Vec<Arc<String>> {
    let mut ids = EventIdGenerator::new(seed);
    let mut rng = Rng(seed | 1);
    (0..batches)
        .map(|_| Arc::new(EventBatch::new(events(&mut ids, &mut rng, BATCH)).to_json()))
        .collect()
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Percentile `q` of the probes' visibility: "n/a" when no probe was acknowledged, "> 5 s" when
/// it falls on a probe that never showed.
fn visible(sorted: &[Option<Duration>], q: f64) -> String {
    if sorted.is_empty() {
        return "n/a (no probe acked)".into();
    }
    match sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1] {
        Some(d) => ms(d),
        None => "> 5 s".into(),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

struct Server {
    url: String,
    ingest_key: String,
    admin_key: String,
    task: tokio::task::JoinHandle<()>,
    /// The server's storage, to watch the rollup queue.
    storage: Storage,
}

/// Longest wait for the folder to empty the rollup queue between phases.
const DRAIN_LIMIT: Duration = Duration::from_secs(240);

/// Waits (bounded) until every queued event is folded into the rollups; returns how many were
/// queued at the start and how long folding them took. Between phases, so a phase never runs
/// beside the folder still working through an earlier phase's backlog — and so the next engine
/// never runs beside this one's.
async fn drain_rollups(server: &Server) -> (i64, Duration) {
    let started = Instant::now();
    let queued = server.storage.queued_for_rollup().await.unwrap_or(0);
    while started.elapsed() < DRAIN_LIMIT {
        match server.storage.queued_for_rollup().await {
            Ok(0) => break,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    (queued, started.elapsed())
}

async fn start_server(url: &str) -> Server {
    let storage = Storage::connect(url, 16).await.expect("connect");
    storage.migrate().await.expect("migrate");
    let committers = storage.default_committers();
    let (state, _writer) = build_state(storage.clone(), Limits::default(), None, committers);
    let ingest_key = tollgate_collector::api::create_key_record(&storage, "*", Role::Ingest, None)
        .await
        .expect("key")
        .1
        .reveal()
        .to_owned();
    let admin_key = tollgate_collector::api::create_key_record(&storage, "*", Role::Admin, None)
        .await
        .expect("key")
        .1
        .reveal()
        .to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app(state)).await;
    });
    Server {
        url: format!("http://{addr}"),
        ingest_key,
        admin_key,
        task,
        storage,
    }
}

async fn post(client: &reqwest::Client, url: &str, key: &str, body: &str) -> Option<u16> {
    let r = client
        .post(format!("{url}/v1/events"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.as_bytes().to_vec())
        .send()
        .await
        .ok()?;
    let status = r.status().as_u16();
    let _ = r.bytes().await;
    Some(status)
}

/// Closed loop over `bodies` for at most `secs`; events/s acknowledged.
async fn closed_loop(server: &Server, bodies: &[Arc<String>], secs: u64) -> (f64, usize) {
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let bodies = Arc::new(bodies.to_vec());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (client, next, acked, bodies) =
            (client.clone(), next.clone(), acked.clone(), bodies.clone());
        let (url, key) = (server.url.clone(), server.ingest_key.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                if post(&client, &url, &key, body).await == Some(200) {
                    acked.fetch_add(BATCH as u64, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let n = acked.load(Ordering::Relaxed);
    (
        n as f64 / started.elapsed().as_secs_f64(),
        (n as usize) / BATCH,
    )
}

#[derive(Default)]
struct OpenLoop {
    sustained: f64,
    p50: Duration,
    p99: Duration,
    shed: usize,
    unavailable: usize,
    /// Probes acknowledged, and how long each took to show in the rollups (`None`: not within
    /// the probe's 5 s), sorted with the `None`s last.
    visible: Vec<Option<Duration>>,
}

async fn open_loop(server: &Server, bodies: Vec<Arc<String>>) -> OpenLoop {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .build()
        .expect("client");
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let unavailable = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let interval = Duration::from_nanos(1_000_000_000 * BATCH as u64 / OFFERED_EPS);
    let started = Instant::now();
    let mut shed = 0;
    let mut tasks = Vec::new();

    // The visibility probe.
    let probe = {
        let (client, url, key) = (client.clone(), server.url.clone(), server.admin_key.clone());
        let ingest_key = server.ingest_key.clone();
        tokio::spawn(async move {
            let mut ids = EventIdGenerator::new(99);
            let mut rng = Rng(99);
            let mut seen = Vec::new();
            let end = Instant::now() + Duration::from_secs(OPEN_SECS);
            let mut n = 0u64;
            while Instant::now() < end {
                let mut e = events(&mut ids, &mut rng, 1).remove(0);
                e.org = "probe".into();
                e.user = Some(format!("probe-{n}"));
                n += 1;
                let sent = Instant::now();
                let ok = client
                    .post(format!("{url}/v1/events"))
                    .bearer_auth(&ingest_key)
                    .body(EventBatch::new(vec![e.clone()]).to_json())
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false);
                if ok {
                    let mut shown = None;
                    loop {
                        let report: serde_json::Value = match client
                            .get(format!("{url}/v1/usage"))
                            .query(&[
                                ("org", "probe"),
                                ("granularity", "minute"),
                                ("group_by", "user"),
                                (
                                    "from",
                                    &(Utc::now() - chrono::Duration::minutes(10)).to_rfc3339(),
                                ),
                            ])
                            .bearer_auth(&key)
                            .send()
                            .await
                        {
                            Ok(r) => r.json().await.unwrap_or_default(),
                            Err(_) => break,
                        };
                        let user = e.user.as_deref().unwrap_or_default();
                        let found = report["rows"]
                            .as_array()
                            .is_some_and(|rows| rows.iter().any(|r| r["user"] == user));
                        if found {
                            shown = Some(sent.elapsed());
                            break;
                        }
                        if sent.elapsed() > Duration::from_secs(5) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    // An acknowledged probe that never showed counts too: dropping it would
                    // report only the fast ones.
                    seen.push(shown);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen
        })
    };

    for (i, body) in bodies.into_iter().enumerate() {
        let scheduled = started + interval * i as u32;
        tokio::time::sleep_until(scheduled.into()).await;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            shed += 1;
            continue;
        };
        let (client, latencies, unavailable, acked) = (
            client.clone(),
            latencies.clone(),
            unavailable.clone(),
            acked.clone(),
        );
        let (url, key) = (server.url.clone(), server.ingest_key.clone());
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(format!("{url}/v1/events"))
                .bearer_auth(&key)
                .header("content-type", "application/json")
                .body(body.as_bytes().to_vec())
                .send()
                .await;
            match r {
                Ok(r) if r.status().is_success() => {
                    let _ = r.bytes().await;
                    latencies.lock().expect("lock").push(scheduled.elapsed());
                    acked.fetch_add(BATCH as u64, Ordering::Relaxed);
                }
                _ => {
                    unavailable.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed();
    let mut lat = latencies.lock().expect("lock").clone();
    lat.sort();
    let mut vis = probe.await.unwrap_or_default();
    vis.sort_by_key(|v| v.unwrap_or(Duration::MAX));
    OpenLoop {
        sustained: acked.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        shed,
        unavailable: unavailable.load(Ordering::Relaxed),
        visible: vis,
    }
}

struct EngineResult {
    fresh: f64,
    /// This process's CPU per 1,000 events of the fresh phase: the collector's (SQLite's
    /// included, PostgreSQL's server not) and the load generator's. Steadier than the rate on
    /// a shared machine, for comparing builds.
    fresh_cpu: Duration,
    duplicate: f64,
    open: OpenLoop,
    /// Each round's fold of `FOLD_EVENTS` queued events.
    folds: Vec<Fold>,
}

/// The "fold alone" phase: each round queues `FOLD_EVENTS` events (the storage's own write, no
/// folder running) and times one fold of them. The rounds' events share this minute's rows, as
/// folds under steady load do.
async fn fold_alone(name: &str, url: &str) -> Vec<Fold> {
    let storage = Storage::connect(url, 4).await.expect("connect");
    // A no-op after the service ran; needed when this phase runs alone.
    storage.migrate().await.expect("migrate");
    let mut ids = EventIdGenerator::new(3);
    let mut rng = Rng(3);
    let mut folds = Vec::with_capacity(FOLD_ROUNDS);
    for _ in 0..FOLD_ROUNDS {
        let mut write_cpu = Duration::ZERO;
        for _ in 0..FOLD_EVENTS / BATCH {
            let batch = events(&mut ids, &mut rng, BATCH);
            let cpu_before = process_cpu();
            storage
                .write_events(&batch, Utc::now(), &[])
                .await
                .expect("write");
            write_cpu += process_cpu().saturating_sub(cpu_before);
        }
        let (started, cpu_before) = (Instant::now(), process_cpu());
        let folded = storage
            .fold(tollgate_collector::rollup_worker::MAX_FOLD)
            .await
            .expect("fold");
        folds.push(Fold {
            wall: started.elapsed(),
            cpu: process_cpu().saturating_sub(cpu_before),
            write_cpu,
        });
        assert_eq!(folded, FOLD_EVENTS, "one fold takes the whole backlog");
    }
    eprintln!(
        "[{name}] fold alone, {FOLD_EVENTS} events per fold, wall (this process's CPU): {}",
        folds
            .iter()
            .map(|f| format!("{} ({})", ms(f.wall), ms(f.cpu)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    folds
}

/// One timed fold of the "fold alone" phase.
#[derive(Clone, Copy)]
struct Fold {
    wall: Duration,
    /// CPU time of this process's threads meanwhile: all of a SQLite fold's, the collector's
    /// side of a PostgreSQL one. Less moved by other load on a shared machine than `wall`.
    cpu: Duration,
    /// The same for writing the fold's events beforehand, one 1,000-event batch per
    /// transaction through the storage (no HTTP), generating them left out: the write path's
    /// own cost.
    write_cpu: Duration,
}

/// CPU time of this process's threads so far (their `schedstat`s, nanoseconds).
fn process_cpu() -> Duration {
    let tasks = std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten();
    let ns: u64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

impl EngineResult {
    /// An engine this run leaves out (`TOLLGATE_BENCH_ENGINES`): every figure NaN or empty.
    fn skipped() -> Self {
        Self {
            fresh: f64::NAN,
            fresh_cpu: Duration::ZERO,
            duplicate: f64::NAN,
            open: OpenLoop::default(),
            folds: Vec::new(),
        }
    }
}

async fn run_engine(name: &str, url: &str) -> EngineResult {
    if std::env::var_os("TOLLGATE_BENCH_FOLD_ONLY").is_some() {
        return EngineResult {
            folds: fold_alone(name, url).await,
            ..EngineResult::skipped()
        };
    }
    let server = start_server(url).await;
    eprintln!("[{name}] generating {CLOSED_BATCHES} batches of {BATCH}");
    let fresh_bodies = bodies(1, CLOSED_BATCHES);
    let cpu_before = process_cpu();
    let (fresh, batches) = closed_loop(&server, &fresh_bodies, CLOSED_SECS).await;
    let fresh_cpu = (process_cpu().saturating_sub(cpu_before) * 1_000)
        .checked_div((batches * BATCH).max(1) as u32)
        .unwrap_or_default();
    eprintln!(
        "[{name}] fresh: {fresh:.0} events/s ({batches} batches), this process's CPU per 1,000 \
         events {}",
        ms(fresh_cpu)
    );
    // Resends queue nothing to fold: they are measured once the folder has folded what the
    // fresh loop queued, not while it still works through that (it did until 2026-11-25, and
    // a resend's rate then paid for the fresh loop's folds).
    let (queued, took) = drain_rollups(&server).await;
    eprintln!(
        "[{name}] folds caught up: {queued} events queued after the fresh loop, folded in {}",
        ms(took)
    );
    let (duplicate, _) = closed_loop(&server, &fresh_bodies[..batches], CLOSED_SECS).await;
    eprintln!("[{name}] all-duplicate: {duplicate:.0} events/s");
    drop(fresh_bodies);
    let (queued, took) = drain_rollups(&server).await;
    eprintln!(
        "[{name}] folds caught up: {queued} events queued after the closed loops, folded in {} \
         ({:.0} events/s)",
        ms(took),
        queued as f64 / took.as_secs_f64()
    );
    let open_bodies = bodies(2, (OFFERED_EPS * OPEN_SECS) as usize / BATCH);
    let open = open_loop(&server, open_bodies).await;
    eprintln!(
        "[{name}] offered {OFFERED_EPS}/s: sustained {:.0}/s, ack p50 {} p99 {}, shed {}, 5xx {}",
        open.sustained,
        ms(open.p50),
        ms(open.p99),
        open.shed,
        open.unavailable
    );
    let (queued, took) = drain_rollups(&server).await;
    eprintln!(
        "[{name}] folds caught up: {queued} events queued after the open loop, folded in {}",
        ms(took)
    );
    server.task.abort();
    // The service's folder stops once its last committer has; nothing is queued by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let folds = fold_alone(name, url).await;
    EngineResult {
        fresh,
        fresh_cpu,
        duplicate,
        open,
        folds,
    }
}

/// A PostgreSQL server for the run, with production durability, stopped on drop.
struct Pg {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Pg {
    fn start() -> Self {
        let bin = pg::bin_dir();
        let dir = std::env::temp_dir().join(format!("tollgate-bench-pg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let as_postgres = pg::as_postgres();
        pg::own(&dir, as_postgres);
        let port = pg::free_port();
        let pg = Self {
            dir: dir.clone(),
            bin,
            port,
            as_postgres,
        };
        cluster::initdb(&pg.bin, &pg.dir, as_postgres);
        cluster::start(
            &pg.bin,
            &pg.dir,
            as_postgres,
            port,
            "-c shared_buffers=512MB -c max_wal_size=8GB -c min_wal_size=2GB",
        );
        cluster::recycle_wal(&pg.bin, &pg.dir, as_postgres, port, 128);
        pg
    }

    fn url(&self) -> String {
        pg::url(self.port)
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        cluster::stop(&self.bin, &self.dir, self.as_postgres);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// COPY of fresh rows straight into `events`, 10,000 per transaction: rows/s.
async fn raw_copy_rate(url: &str) -> f64 {
    let storage = Storage::connect(url, 2).await.expect("connect");
    let Storage::Postgres(pg) = &storage else {
        unreachable!()
    };
    let mut ids = EventIdGenerator::new(7);
    let mut rng = Rng(7);
    // The encoding the ingest path sends (COPY's binary format).
    let chunks: Vec<Vec<u8>> = (0..COPY_ROWS / 10_000)
        .map(|_| {
            tollgate_collector::db::copy_binary(&events(&mut ids, &mut rng, 10_000))
                .expect("bench events fit the schema")
        })
        .collect();
    let columns = tollgate_collector::db::EVENT_COLUMNS;
    let started = Instant::now();
    for chunk in &chunks {
        let mut tx = pg.pool.begin().await.expect("begin");
        let mut copy = tx
            .copy_in_raw(&format!(
                "COPY events ({columns}) FROM STDIN (FORMAT binary)"
            ))
            .await
            .expect("copy");
        copy.send(chunk.as_slice()).await.expect("send");
        copy.finish().await.expect("finish");
        tx.commit().await.expect("commit");
    }
    COPY_ROWS as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    // As the collector binary does.
    tollgate_collector::allocator::keep_freed_memory_longer();
    // `cargo bench` passes `--bench`; this harness takes no arguments.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let engines = std::env::var("TOLLGATE_BENCH_ENGINES").unwrap_or_default();
        let wanted = |name: &str| engines.is_empty() || engines.split(',').any(|e| e.trim() == name);
        let sqlite = if wanted("sqlite") {
            let dir = std::env::temp_dir().join(format!("tollgate-bench-sqlite-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            let sqlite = run_engine("sqlite", &format!("sqlite://{}", dir.join("bench.db").display())).await;
            let _ = std::fs::remove_dir_all(&dir);
            sqlite
        } else {
            EngineResult::skipped()
        };

        let (postgres, copy) = if wanted("postgres") {
            let pg = Pg::start();
            let postgres = run_engine("postgres", &pg.url()).await;
            (postgres, raw_copy_rate(&pg.url()).await)
        } else {
            (EngineResult::skipped(), f64::NAN)
        };

        println!();
        println!("collector ingest ({BATCH}-event batches, {CLIENTS} closed-loop clients, the collector's default committers)");
        println!("{:<44} {:>16} {:>16}", "", "SQLite", "PostgreSQL");
        let row = |label: &str, a: String, b: String| println!("{label:<44} {a:>16} {b:>16}");
        row("fresh, closed loop (events/s)", format!("{:.0}", sqlite.fresh), format!("{:.0}", postgres.fresh));
        row("  CPU of this process per 1,000 events", ms(sqlite.fresh_cpu), ms(postgres.fresh_cpu));
        row("all-duplicate resend (events/s)", format!("{:.0}", sqlite.duplicate), format!("{:.0}", postgres.duplicate));
        row(
            "duplicate / fresh",
            format!("{:.2}x", sqlite.duplicate / sqlite.fresh),
            format!("{:.2}x", postgres.duplicate / postgres.fresh),
        );
        row(
            &format!("offered {OFFERED_EPS}/s: sustained (events/s)"),
            format!("{:.0}", sqlite.open.sustained),
            format!("{:.0}", postgres.open.sustained),
        );
        row("  ack latency p50", ms(sqlite.open.p50), ms(postgres.open.p50));
        row("  ack latency p99", ms(sqlite.open.p99), ms(postgres.open.p99));
        row(
            "  batches shed by generator / 5xx",
            format!("{} / {}", sqlite.open.shed, sqlite.open.unavailable),
            format!("{} / {}", postgres.open.shed, postgres.open.unavailable),
        );
        let probes = |o: &OpenLoop| {
            let shown = o.visible.iter().filter(|v| v.is_some()).count();
            format!("{} / {shown}", o.visible.len())
        };
        row("  probes acked / shown in rollups", probes(&sqlite.open), probes(&postgres.open));
        row("  visible in rollups p50", visible(&sqlite.open.visible, 0.5), visible(&postgres.open.visible, 0.5));
        row("  visible in rollups p99", visible(&sqlite.open.visible, 0.99), visible(&postgres.open.visible, 0.99));
        let fold = |r: &EngineResult| {
            let median = |f: fn(&Fold) -> Duration| {
                let mut sorted: Vec<Duration> = r.folds.iter().map(f).collect();
                sorted.sort();
                percentile(&sorted, 0.5)
            };
            let (wall, cpu) = (median(|f| f.wall), median(|f| f.cpu));
            let write = median(|f| f.write_cpu) * BATCH as u32 / FOLD_EVENTS as u32;
            (ms(wall), format!("{:.0}", FOLD_EVENTS as f64 / wall.as_secs_f64()), ms(cpu), ms(write))
        };
        let (sqlite_fold, postgres_fold) = (fold(&sqlite), fold(&postgres));
        row(&format!("fold alone, {FOLD_EVENTS} events (median of {FOLD_ROUNDS})"), sqlite_fold.0, postgres_fold.0);
        row("  folded (events/s)", sqlite_fold.1, postgres_fold.1);
        row("  CPU of this process per fold", sqlite_fold.2, postgres_fold.2);
        row("  writing them: CPU per 1,000 events", sqlite_fold.3, postgres_fold.3);
        row("raw COPY into events, 10k rows/txn (rows/s)", "-".into(), format!("{copy:.0}"));
    });
}
