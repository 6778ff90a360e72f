//! The real binary under fault: kill -9 during concurrent ingest, restart, and every
//! acknowledged event is there exactly once (raw and in the rollups); SIGTERM during ingest
//! finishes the in-flight batches and exits cleanly. SQLite, on a file in a temp dir.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Fixture;
use tollgate_collector::Storage;
use tollgate_core::event::{EventBatch, UsageEvent};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate-collector");

fn cli(db: &str, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .env("TOLLGATE_DATABASE", db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A running collector, killed on drop.
struct Collector {
    child: Child,
    url: String,
}

impl Collector {
    fn start(db: &str) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("TOLLGATE_DATABASE", db)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("listening on ") {
                    let _ = tx.send(url.to_owned());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the collector did not report its address within 30 s");
        Self { child, url }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Posts batches from `workers` tasks until told to stop or the server goes away; returns the
/// acknowledged ids and every sent batch.
async fn ingest_until(
    url: &str,
    key: &str,
    workers: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
    acked: Arc<Mutex<HashSet<Uuid>>>,
    sent: Arc<Mutex<Vec<Vec<UsageEvent>>>>,
) {
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (client, url, key) = (client.clone(), url.to_owned(), key.to_owned());
        let (stop, acked, sent) = (stop.clone(), acked.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut fx = Fixture::new(1_000 + w);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch = fx.events("acme", 100);
                sent.lock().unwrap().push(batch.clone());
                let r = client
                    .post(format!("{url}/v1/events"))
                    .bearer_auth(&key)
                    .header("content-type", "application/json")
                    .body(EventBatch::new(batch.clone()).to_json())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        let body: serde_json::Value = r.json().await.unwrap();
                        assert_eq!(body["rejected"], serde_json::json!([]));
                        acked.lock().unwrap().extend(batch.iter().map(|e| e.id));
                    }
                    Ok(r) if r.status().as_u16() == 503 => {}
                    Ok(r) => panic!("unexpected status {}", r.status()),
                    Err(_) => return, // the server is gone
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn wait_for(acked: &Mutex<HashSet<Uuid>>, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} events acknowledged in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn check_exactly_once(db_path: &Path, acked: &HashSet<Uuid>) -> i64 {
    let storage = Storage::connect(&format!("sqlite://{}", db_path.display()), 2)
        .await
        .unwrap();
    for id in acked {
        assert!(
            storage.has_event(*id).await.unwrap(),
            "acknowledged event {id} was lost"
        );
    }
    let (rows, distinct) = storage.count_events("acme").await.unwrap();
    assert_eq!(rows, distinct);
    assert!(rows as usize >= acked.len());
    // The rollups (plus what is still queued for them) hold exactly the raw events: nothing
    // counted twice, nothing missed.
    let queued = storage.queued_for_rollup().await.unwrap();
    let day = tollgate_collector::rollup::Granularity::Day;
    let calls: i64 = storage
        .rollup_rows("acme", day, 0, i64::MAX)
        .await
        .unwrap()
        .iter()
        .map(|r| r.values.calls)
        .sum();
    assert_eq!(calls + queued, rows);
    storage.close().await;
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_ingest_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("crash.db");
    let db = format!("sqlite://{}", db_path.display());
    let key = cli(&db, &["keys", "create", "--org", "*", "--role", "ingest"])
        .trim()
        .to_owned();

    let server = Collector::start(&db);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let sent = Arc::new(Mutex::new(Vec::new()));
    let load = tokio::spawn({
        let (url, key) = (server.url.clone(), key.clone());
        let (stop, acked, sent) = (stop.clone(), acked.clone(), sent.clone());
        async move { ingest_until(&url, &key, 8, stop, acked, sent).await }
    });
    wait_for(&acked, 5_000).await;
    drop(server); // SIGKILL, mid-ingest
    load.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    let rows = check_exactly_once(&db_path, &acked).await;
    eprintln!("{} acknowledged, {rows} stored after kill -9", acked.len());

    // Restart and resend everything that was sent: acknowledged events come back as
    // duplicates, the rest land once.
    let server = Collector::start(&db);
    let client = reqwest::Client::new();
    let batches = sent.lock().unwrap().clone();
    let mut all = HashSet::new();
    for batch in &batches {
        all.extend(batch.iter().map(|e| e.id));
        let r: serde_json::Value = client
            .post(format!("{}/v1/events", server.url))
            .bearer_auth(&key)
            .body(EventBatch::new(batch.clone()).to_json())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let dups = r["duplicates"].as_u64().unwrap() as usize;
        let acked_here = batch.iter().filter(|e| acked.contains(&e.id)).count();
        assert!(dups >= acked_here, "{r}");
    }
    drop(server);
    let rows = check_exactly_once(&db_path, &all).await;
    assert_eq!(rows as usize, all.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_batches() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("term.db");
    let db = format!("sqlite://{}", db_path.display());
    let key = cli(
        &db,
        &["keys", "create", "--org", "acme", "--role", "ingest"],
    )
    .trim()
    .to_owned();
    let mut server = Collector::start(&db);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let sent = Arc::new(Mutex::new(Vec::new()));
    let load = tokio::spawn({
        let (url, key) = (server.url.clone(), key.clone());
        let (stop, acked, sent) = (stop.clone(), acked.clone(), sent.clone());
        async move { ingest_until(&url, &key, 4, stop, acked, sent).await }
    });
    wait_for(&acked, 1_000).await;
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit within 30 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    check_exactly_once(&db_path, &acked).await;

    // The CLI's key commands on the same file.
    let listed = cli(&db, &["keys", "list"]);
    assert!(listed.contains("ingest") && !listed.contains(&key));
    let id = listed
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert!(cli(&db, &["keys", "revoke", &id]).contains("revoked"));
    assert!(cli(&db, &["keys", "list"]).contains("revoked"));
    cli(&db, &["orgs", "create", "acme", "--plan", "pro"]);
    assert!(cli(&db, &["orgs", "list"]).contains("acme"));
}
