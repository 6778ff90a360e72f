//! The real binary's `report` subcommand on an SQLite file: the same numbers as the events
//! written, in each output format, and bad input refused with a message naming it.

mod common;

use std::process::{Command, Output};

use common::Fixture;
use tempfile::TempDir;
use tollgate_collector::Storage;
use tollgate_core::event::UsageEvent;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate-collector");

/// A migrated SQLite database holding, for the last minute: `acme` 5 calls on
/// `/v1/items/{id}` (one a 503) and 3 on `/v1/search`, `globex` 2 on `/v1/items/{id}`.
struct Db {
    url: String,
    _dir: TempDir,
}

/// Runs the binary on `db` with `args`; no environment fallbacks leak in.
fn run(db: &Db, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--database")
        .arg(&db.url)
        .args(args)
        .env_remove("TOLLGATE_DATABASE")
        .env_remove("TOLLGATE_DB_CONNECTIONS")
        .env_remove("TOLLGATE_POLICY")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"))
}

/// Runs the binary and returns its stdout, failing the test if it failed.
fn ok(db: &Db, args: &[&str]) -> String {
    let out = run(db, args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// Runs the binary expecting it to fail; returns its stderr.
fn fails(db: &Db, args: &[&str]) -> String {
    let out = run(db, args);
    assert!(
        !out.status.success(),
        "{args:?} should have failed; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn db() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("collector.db").display());
    let db = Db { url, _dir: dir };
    // The binary creates and migrates the file.
    let out = tokio::task::block_in_place(|| ok(&db, &["migrate"]));
    assert!(out.contains("migrated"), "{out}");

    let mut fx = Fixture::new(7);
    let mut events: Vec<UsageEvent> = Vec::new();
    let mut add = |org: &str, route: &str, n: usize| {
        for mut e in fx.events(org, n) {
            e.route = route.into();
            events.push(e);
        }
    };
    add("acme", "/v1/items/{id}", 5);
    add("acme", "/v1/search", 3);
    add("globex", "/v1/items/{id}", 2);
    events[0].status = 503;

    let storage = Storage::connect(&db.url, 2).await.unwrap();
    storage.migrate().await.unwrap();
    let stored = storage
        .write_events(&events, chrono::Utc::now(), &[])
        .await
        .unwrap();
    assert!(stored.iter().all(|s| *s), "every event is new: {stored:?}");
    storage.fold_all().await.unwrap();
    storage.close().await;
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_overview_in_every_format() {
    let db = db().await;
    tokio::task::block_in_place(|| {
        let json = ok(
            &db,
            &[
                "report", "overview", "--org", "acme", "--days", "2", "--format", "json",
            ],
        );
        let doc: serde_json::Value =
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("not JSON ({e}): {json}"));
        assert_eq!(doc["org"], "acme", "{doc}");
        assert_eq!(doc["calls"], 8, "{doc}");
        assert_eq!(doc["errors"], 1, "{doc}");
        assert_eq!(doc["cost"], 8, "{doc}");
        assert_eq!(doc["unique_users"], 1, "{doc}");
        assert_eq!(doc["group_by"], serde_json::json!(["route"]), "{doc}");
        let rows = doc["rows"].as_array().expect("rows");
        assert_eq!(rows.len(), 2, "{doc}");
        assert_eq!(rows[0]["dimensions"]["route"], "/v1/items/{id}", "{doc}");
        assert_eq!(rows[0]["calls"], 5, "{doc}");
        assert_eq!(rows[1]["dimensions"]["route"], "/v1/search", "{doc}");
        assert_eq!(rows[1]["calls"], 3, "{doc}");

        let csv = ok(
            &db,
            &[
                "report", "overview", "--org", "acme", "--days", "2", "--format", "csv",
            ],
        );
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines,
            [
                "route,calls,errors,error_rate,cost,cost_per_call,unique_users",
                "/v1/items/{id},5,1,0.2000,5,1.0000,1",
                "/v1/search,3,0,0.0000,3,1.0000,1",
            ],
            "{csv}"
        );

        // `table` is the default format.
        for args in [
            &[
                "report", "overview", "--org", "acme", "--days", "2", "--format", "table",
            ][..],
            &["report", "overview", "--org", "acme", "--days", "2"][..],
        ] {
            let text = ok(&db, args);
            let mut lines = text.lines();
            let header = lines.next().unwrap_or_default();
            assert!(header.starts_with("route "), "{text}");
            assert!(header.contains("calls"), "{text}");
            let first = lines.next().unwrap_or_default();
            assert!(first.starts_with("/v1/items/{id}"), "{text}");
            assert!(text.contains("/v1/search"), "{text}");
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_without_org_covers_every_org() {
    let db = db().await;
    tokio::task::block_in_place(|| {
        let json = ok(
            &db,
            &[
                "report",
                "overview",
                "--days",
                "1",
                "--group-by",
                "org",
                "--format",
                "json",
            ],
        );
        let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(doc["org"], serde_json::Value::Null, "{doc}");
        assert_eq!(doc["calls"], 10, "{doc}");
        let by_org: Vec<(String, i64)> = doc["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["dimensions"]["org"].as_str().unwrap().to_owned(),
                    r["calls"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            by_org,
            [("acme".to_owned(), 8), ("globex".to_owned(), 2)],
            "{doc}"
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_refuses_bad_input() {
    let db = db().await;
    tokio::task::block_in_place(|| {
        let err = fails(&db, &["report", "overview", "--days", "0"]);
        assert!(err.contains("`days`"), "{err}");
        assert!(err.contains("1 to 90"), "{err}");

        // A parameter this report does not take is refused by name, not ignored.
        let err = fails(&db, &["report", "overview", "--month", "2026-01"]);
        assert!(err.contains("`month`"), "{err}");

        // clap refuses an unknown report and lists the real ones.
        let err = fails(&db, &["report", "nosuch"]);
        assert!(err.contains("nosuch"), "{err}");
        assert!(err.contains("overview"), "{err}");

        let err = fails(&db, &["report", "overview", "--format", "xml"]);
        assert!(err.contains("xml"), "{err}");
    });
}

#[test]
fn report_help_lists_the_reports() {
    let out = Command::new(BIN)
        .args(["report", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for name in tollgate_collector::reports::NAMES {
        assert!(help.contains(name), "{name} missing from:\n{help}");
    }
}
