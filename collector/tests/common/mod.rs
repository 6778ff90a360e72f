//! Test harness: one test body per backend (SQLite in a temp dir; PostgreSQL started by the
//! tests themselves with `initdb` + `pg_ctl` on a free port), an in-process app driven through
//! `tower::ServiceExt::oneshot`, and event fixtures.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::Router;
use chrono::{DateTime, Utc};
use tempfile::TempDir;
use tollgate_collector::auth::Role;
use tollgate_collector::cli::build_state;
use tollgate_collector::pricing::PolicyFile;
use tollgate_collector::{app, AppState, Limits, Storage};
use tollgate_core::event::{EdgeKind, EventIdGenerator, UsageEvent};
use tollgate_core::{Timestamp, Verdict};
use tower::ServiceExt;

/// Runs each named async test body (`async fn name(backend: Backend)`) once per backend.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

/// Which engine a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A PostgreSQL server in a temp dir on a free port, stopped on drop.
pub struct PgServer {
    pub port: u16,
    bin: PathBuf,
    dir: TempDir,
    as_postgres_user: bool,
}

/// The PostgreSQL binaries: `$TOLLGATE_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`.
pub fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("TOLLGATE_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/initdb and no \
             TOLLGATE_PG_BIN): run `cargo xtask setup --postgres` or `apt-get install postgresql`. \
             The PostgreSQL tests do not skip themselves."
        )
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PgServer {
    fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        let path = self.bin.join(program);
        let mut cmd = if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
        out
    }

    /// initdb + pg_ctl start, waiting until it accepts connections.
    pub fn start() -> Self {
        let bin = pg_bin();
        let dir = tempfile::Builder::new()
            .prefix("tollgate-pg-")
            .tempdir()
            .unwrap();
        let as_postgres_user = is_root();
        if as_postgres_user {
            // PostgreSQL refuses to run as root; the data dir must belong to `postgres`.
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown of the PostgreSQL temp dir failed");
        }
        let mut server = Self {
            port: 0,
            bin,
            dir,
            as_postgres_user,
        };
        let data = server.dir.path().join("data");
        let data_s = data.to_str().unwrap().to_owned();
        let out = server.run(
            "initdb",
            &[
                "-D",
                &data_s,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A free port can be taken between our probe and the server's bind: retry a few.
        for _ in 0..5 {
            let port = free_port();
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
                server.dir.path().display()
            );
            let log = server.dir.path().join("log").to_str().unwrap().to_owned();
            let out = server.run(
                "pg_ctl",
                &[
                    "-D", &data_s, "-o", &opts, "-l", &log, "-w", "-t", "60", "start",
                ],
            );
            if out.status.success() {
                server.port = port;
                return server;
            }
        }
        let log = std::fs::read_to_string(server.dir.path().join("log")).unwrap_or_default();
        panic!("PostgreSQL did not start:\n{log}");
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

static SERVER: Mutex<Weak<PgServer>> = Mutex::new(Weak::new());
static DB_SEQ: AtomicU64 = AtomicU64::new(0);

/// The server shared by the tests running now (started if none is), stopped when the last
/// test holding it ends.
pub fn shared_pg() -> Arc<PgServer> {
    let mut slot = SERVER.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = slot.upgrade() {
        return s;
    }
    let s = Arc::new(PgServer::start());
    *slot = Arc::downgrade(&s);
    s
}

/// A fresh, empty database of one backend.
pub struct TestDb {
    pub url: String,
    pub pg: Option<Arc<PgServer>>,
    pub dir: Option<TempDir>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("collector.db").display());
                Self {
                    url,
                    pg: None,
                    dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let pg = tokio::task::spawn_blocking(shared_pg).await.unwrap();
                let name = format!(
                    "t_{}_{}",
                    std::process::id(),
                    DB_SEQ.fetch_add(1, Ordering::Relaxed)
                );
                let admin = Storage::connect(&pg.url("postgres"), 2).await.unwrap();
                if let Storage::Postgres(p) = &admin {
                    sqlx::query(&format!("CREATE DATABASE {name}"))
                        .execute(&p.pool)
                        .await
                        .unwrap();
                }
                admin.close().await;
                Self {
                    url: pg.url(&name),
                    pg: Some(pg),
                    dir: None,
                }
            }
        }
    }

    pub async fn storage(&self) -> Storage {
        let s = Storage::connect(&self.url, 8).await.unwrap();
        s.migrate().await.unwrap();
        s
    }
}

/// An app on a fresh database, with an admin key.
pub struct TestApp {
    pub state: AppState,
    pub router: Router,
    pub admin: String,
    pub db: TestDb,
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, Limits::default(), None).await
}

pub async fn spawn_app_with(
    backend: Backend,
    limits: Limits,
    policy: Option<PolicyFile>,
) -> TestApp {
    let db = TestDb::new(backend).await;
    let storage = db.storage().await;
    let committers = storage.default_committers();
    let (state, _task) = build_state(storage, limits, policy, committers);
    let router = app(state.clone());
    let mut app = TestApp {
        state,
        router,
        admin: String::new(),
        db,
    };
    app.admin = app.key("*", Role::Admin).await;
    app
}

/// A response, read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl TestApp {
    /// Creates a key directly in storage; returns its secret.
    pub async fn key(&self, org: &str, role: Role) -> String {
        let (_, new) =
            tollgate_collector::api::create_key_record(&self.state.storage, org, role, None)
                .await
                .unwrap();
        new.reveal().to_owned()
    }

    pub async fn send(
        &self,
        method: Method,
        uri: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        for (h, v) in headers {
            req = req.header(*h, *v);
        }
        let response = self
            .router
            .clone()
            .oneshot(req.body(body.into()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, uri: &str, key: &str) -> Reply {
        self.send(Method::GET, uri, Some(key), &[], Body::empty())
            .await
    }

    /// Folds every queued event into the rollups (the background folder does this within
    /// ~100 ms; tests do it now, to be deterministic).
    pub async fn settle(&self) {
        self.state.storage.fold_all().await.unwrap();
        assert_eq!(self.state.storage.queued_for_rollup().await.unwrap(), 0);
    }

    /// Posts events as the core's JSON batch.
    pub async fn ingest(&self, key: &str, events: &[UsageEvent]) -> Reply {
        let body = tollgate_core::event::EventBatch::new(events.to_vec()).to_json();
        self.send(
            Method::POST,
            "/v1/events",
            Some(key),
            &[("content-type", "application/json")],
            body,
        )
        .await
    }
}

/// Builds events for fixtures.
pub struct Fixture {
    ids: EventIdGenerator,
}

impl Fixture {
    pub fn new(seed: u64) -> Self {
        Self {
            ids: EventIdGenerator::new(seed),
        }
    }

    pub fn event(&mut self, org: &str, at: DateTime<Utc>) -> UsageEvent {
        let millis = at.timestamp_millis() as u64;
        UsageEvent {
            id: self.ids.next_id(Timestamp::from_millis(millis)),
            timestamp: at,
            org: org.into(),
            user: Some("user-1".into()),
            plan: "pro".into(),
            method: "GET".into(),
            route: "/v1/items/{id}".into(),
            status: 200,
            latency_us: 1_500,
            request_bytes: 100,
            response_bytes: 2_000,
            cost: 1,
            decision: Verdict::Allowed,
            rule: None,
            edge: EdgeKind::Envoy,
            node: "envoy-1".into(),
            dimensions: BTreeMap::new(),
            metrics: BTreeMap::new(),
            fingerprint: None,
        }
    }

    /// `n` events of `org` a second apart, ending a minute ago.
    pub fn events(&mut self, org: &str, n: usize) -> Vec<UsageEvent> {
        let end = Utc::now() - chrono::Duration::seconds(60);
        (0..n)
            .map(|i| self.event(org, end - chrono::Duration::milliseconds(i as i64 * 7)))
            .collect()
    }
}

pub fn tmp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
