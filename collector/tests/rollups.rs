//! Rollups against a direct computation over the raw events of a fixture: counts and sums
//! exact, percentiles within the sketch's stated error, late (out-of-order) events in the right
//! bucket, duplicates never counted twice, rows split by the rule that decided the events (what
//! the limits report reads), the caller cube and users sketches filled in for rows folded before
//! they existed — on SQLite and PostgreSQL.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use chrono::{Duration, Utc};
use common::{spawn_app, Backend, Fixture};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tollgate_collector::db::Storage;
use tollgate_collector::rollup::{decision_name, Granularity, SKETCH_RELATIVE_ERROR};
use tollgate_core::event::UsageEvent;
use tollgate_core::Verdict;

fn fixture(n: usize) -> Vec<UsageEvent> {
    let mut rng = StdRng::seed_from_u64(42);
    let mut fx = Fixture::new(11);
    let end = Utc::now() - Duration::minutes(2);
    let users = [Some("u1"), Some("u2"), Some("u3"), None];
    let routes = ["/v1/a", "/v1/b/{id}", "/v1/c", "/v2/d"];
    let statuses = [200, 200, 200, 201, 404, 429, 500, 503];
    let decisions = [Verdict::Allowed, Verdict::Limited, Verdict::ShadowLimited];
    let rules = ["per-user", "per-org"];
    (0..n)
        .map(|_| {
            let at = end - Duration::milliseconds(rng.random_range(0..3 * 3_600_000));
            let mut e = fx.event(
                if rng.random_bool(0.9) {
                    "acme"
                } else {
                    "globex"
                },
                at,
            );
            e.user = users[rng.random_range(0..users.len())].map(str::to_owned);
            e.route = routes[rng.random_range(0..routes.len())].into();
            e.method = if rng.random_bool(0.7) { "GET" } else { "POST" }.into();
            e.status = statuses[rng.random_range(0..statuses.len())];
            e.decision = decisions[rng.random_range(0..decisions.len())];
            // Log-uniform latency from 50 µs to 5 s.
            e.latency_us = (50.0 * 10f64.powf(rng.random_range(0.0..5.0))) as u64;
            e.request_bytes = rng.random_range(0..10_000);
            e.response_bytes = rng.random_range(0..100_000);
            e.cost = rng.random_range(1..5);
            // Rows then differ by rule too; the usage report, not grouping by it, merges them.
            if e.decision != Verdict::Allowed {
                e.rule = Some(rules[rng.random_range(0..rules.len())].into());
            }
            e
        })
        .collect()
}

#[derive(Default)]
struct Expected {
    calls: i64,
    errors: i64,
    cost: i64,
    request_bytes: i64,
    response_bytes: i64,
    latencies: Vec<u64>,
}

/// Whether `reported` is the nearest-rank `q` percentile of `sorted` within the sketch's error
/// (the rank allowed ±1 for floating-point rounding of `q × n`).
fn percentile_ok(sorted: &[u64], q: f64, reported: u64) -> bool {
    let n = sorted.len();
    let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
    let lo = sorted[rank.saturating_sub(2)] as f64;
    let hi = sorted[rank.min(n - 1)] as f64;
    let r = reported as f64;
    r >= lo * (1.0 - SKETCH_RELATIVE_ERROR) - 1.0 && r <= hi * (1.0 + SKETCH_RELATIVE_ERROR) + 1.0
}

async fn rollups_match_raw_events(backend: Backend) {
    let app = spawn_app(backend).await;
    let events = fixture(6_000);
    // Send out of order, so older buckets keep receiving late events; then resend some.
    let mut shuffled = events.clone();
    shuffled.shuffle(&mut StdRng::seed_from_u64(7));
    for batch in shuffled.chunks(250) {
        let r = app.ingest(&app.admin, batch).await;
        assert_eq!(r.json()["accepted"], batch.len(), "{}", r.text());
    }
    for batch in shuffled.chunks(250).take(3) {
        assert_eq!(
            app.ingest(&app.admin, batch).await.json()["duplicates"],
            250
        );
    }
    app.settle().await;
    // Reports must come from the rollups alone: drop the raw events first.
    let far = Utc::now() + Duration::days(2);
    app.state
        .storage
        .prune(far, Utc::now() - Duration::days(30))
        .await
        .unwrap();
    assert_eq!(app.state.storage.count_events("acme").await.unwrap().0, 0);

    let from = (Utc::now() - Duration::hours(4)).to_rfc3339();
    let to = Utc::now().to_rfc3339();
    for g in Granularity::ALL {
        let mut expected: BTreeMap<(i64, String, String, String, i64, String), Expected> =
            BTreeMap::new();
        for e in events.iter().filter(|e| e.org == "acme") {
            let key = (
                g.bucket(e.timestamp),
                e.user.clone().unwrap_or_default(),
                e.route.clone(),
                e.method.clone(),
                i64::from(e.status / 100),
                decision_name(e.decision).to_owned(),
            );
            let x = expected.entry(key).or_default();
            x.calls += 1;
            x.errors += i64::from(e.status >= 500);
            x.cost += e.cost as i64;
            x.request_bytes += e.request_bytes as i64;
            x.response_bytes += e.response_bytes as i64;
            x.latencies.push(e.latency_us);
        }
        let gname = serde_json::to_value(g).unwrap();
        let uri = format!(
            "/v1/usage?org=acme&granularity={}&from={}&to={}&group_by=bucket,user,route,method,status_class,decision",
            gname.as_str().unwrap(),
            urlencode(&from),
            urlencode(&to)
        );
        let report = app.get(&uri, &app.admin).await;
        let rows = report.json()["rows"].as_array().unwrap().clone();
        assert_eq!(rows.len(), expected.len(), "{g:?}: row count");
        for row in &rows {
            let bucket = chrono::DateTime::parse_from_rfc3339(row["bucket"].as_str().unwrap())
                .unwrap()
                .timestamp();
            let key = (
                bucket,
                row["user"].as_str().unwrap().to_owned(),
                row["route"].as_str().unwrap().to_owned(),
                row["method"].as_str().unwrap().to_owned(),
                row["status_class"].as_i64().unwrap(),
                row["decision"].as_str().unwrap().to_owned(),
            );
            let x = expected
                .get_mut(&key)
                .unwrap_or_else(|| panic!("unexpected row {row}"));
            let got = |f: &str| row[f].as_i64().unwrap();
            assert_eq!(
                (
                    got("calls"),
                    got("errors"),
                    got("cost"),
                    got("request_bytes"),
                    got("response_bytes")
                ),
                (x.calls, x.errors, x.cost, x.request_bytes, x.response_bytes),
                "{g:?} {key:?}"
            );
            x.latencies.sort_unstable();
            for (q, field) in [(0.5, "p50_us"), (0.95, "p95_us"), (0.99, "p99_us")] {
                let p = row[field].as_u64().unwrap();
                assert!(
                    percentile_ok(&x.latencies, q, p),
                    "{g:?} {key:?} {field}={p} vs {:?}",
                    x.latencies
                );
            }
        }
    }

    // The whole range in one row: percentiles over all of acme's events.
    let r = app
        .get(
            &format!(
                "/v1/usage?org=acme&granularity=hour&from={}&to={}",
                urlencode(&from),
                urlencode(&to)
            ),
            &app.admin,
        )
        .await
        .json();
    let mut all: Vec<u64> = events
        .iter()
        .filter(|e| e.org == "acme")
        .map(|e| e.latency_us)
        .collect();
    all.sort_unstable();
    let row = &r["rows"][0];
    assert_eq!(row["calls"].as_u64().unwrap() as usize, all.len());
    for (q, field) in [(0.5, "p50_us"), (0.95, "p95_us"), (0.99, "p99_us")] {
        assert!(
            percentile_ok(&all, q, row[field].as_u64().unwrap()),
            "{field}: {row}"
        );
    }
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

/// Events as the edges send them: plain allowed requests without a rule, limited and shadow
/// limited ones naming one of two rules; a few users and routes over two hours, so that many
/// rollup rows differ only by their rule.
fn limits_fixture(n: usize) -> Vec<UsageEvent> {
    let mut rng = StdRng::seed_from_u64(1_234);
    let mut fx = Fixture::new(12);
    let end = Utc::now() - Duration::minutes(2);
    let users = [Some("u1"), Some("u2"), Some("u3"), None];
    let routes = ["/v1/a", "/v1/b/{id}"];
    let rules = ["per-user", "per-org"];
    (0..n)
        .map(|_| {
            let at = end - Duration::milliseconds(rng.random_range(0..2 * 3_600_000));
            let org = if rng.random_bool(0.9) {
                "acme"
            } else {
                "globex"
            };
            let mut e = fx.event(org, at);
            e.user = users[rng.random_range(0..users.len())].map(str::to_owned);
            e.route = routes[rng.random_range(0..routes.len())].into();
            e.method = if rng.random_bool(0.7) { "GET" } else { "POST" }.into();
            e.decision = match rng.random_range(0..4) {
                0 | 1 => Verdict::Allowed,
                2 => Verdict::Limited,
                _ => Verdict::ShadowLimited,
            };
            e.rule = (e.decision != Verdict::Allowed)
                .then(|| rules[rng.random_range(0..rules.len())].to_owned());
            e.status = match e.decision {
                Verdict::Limited => 429,
                _ => [200, 200, 201, 500][rng.random_range(0..4)],
            };
            e.latency_us = rng.random_range(100..200_000);
            e.request_bytes = rng.random_range(0..1_000);
            e.response_bytes = rng.random_range(0..10_000);
            e.cost = rng.random_range(1..4);
            e
        })
        .collect()
}

/// A rollup row's whole key: bucket, user, route, method, status class, decision, rule.
type FullKey = (i64, String, String, String, i64, String, String);

/// calls, errors, cost, request bytes, response bytes.
type Sums = (i64, i64, i64, i64, i64);

fn add(into: &mut Sums, other: Sums) {
    into.0 += other.0;
    into.1 += other.1;
    into.2 += other.2;
    into.3 += other.3;
    into.4 += other.4;
}

async fn rollups_split_by_rule(backend: Backend) {
    let app = spawn_app(backend).await;
    let events = limits_fixture(4_000);
    // The fixture must hold what the test is about: both rules, each limiting and shadow
    // limiting, and allowed requests without a rule.
    let pairs: BTreeSet<(&str, Option<&str>)> = events
        .iter()
        .map(|e| (decision_name(e.decision), e.rule.as_deref()))
        .collect();
    assert_eq!(
        pairs,
        BTreeSet::from([
            ("allowed", None),
            ("limited", Some("per-org")),
            ("limited", Some("per-user")),
            ("shadow_limited", Some("per-org")),
            ("shadow_limited", Some("per-user")),
        ])
    );

    // Two halves, each folded: the second updates rows the first created (the merge path),
    // with events out of order; then a resend, which must not count.
    let mut shuffled = events.clone();
    shuffled.shuffle(&mut StdRng::seed_from_u64(8));
    let (first, second) = shuffled.split_at(shuffled.len() / 2);
    for half in [first, second] {
        for batch in half.chunks(250) {
            let r = app.ingest(&app.admin, batch).await;
            assert_eq!(r.json()["accepted"], batch.len(), "{}", r.text());
        }
        app.settle().await;
    }
    let r = app.ingest(&app.admin, &shuffled[..250]).await;
    assert_eq!(r.json()["duplicates"], 250, "{}", r.text());
    app.settle().await;

    for g in Granularity::ALL {
        let mut expected: BTreeMap<FullKey, Sums> = BTreeMap::new();
        for e in events.iter().filter(|e| e.org == "acme") {
            let key = (
                g.bucket(e.timestamp),
                e.user.clone().unwrap_or_default(),
                e.route.clone(),
                e.method.clone(),
                i64::from(e.status / 100),
                decision_name(e.decision).to_owned(),
                e.rule.clone().unwrap_or_default(),
            );
            let sums = (
                1,
                i64::from(e.status >= 500),
                e.cost as i64,
                e.request_bytes as i64,
                e.response_bytes as i64,
            );
            add(expected.entry(key).or_default(), sums);
        }

        let rows = app
            .state
            .storage
            .rollup_rows("acme", g, 0, i64::MAX)
            .await
            .unwrap();
        let mut stored: BTreeMap<FullKey, Sums> = BTreeMap::new();
        for row in rows {
            assert_eq!(
                row.values.sketch.len(),
                row.values.calls as u64,
                "{g:?}: one latency per call"
            );
            let key = (
                row.bucket,
                row.user,
                row.route,
                row.method,
                row.status_class,
                row.decision,
                row.rule,
            );
            let v = &row.values;
            let sums = (v.calls, v.errors, v.cost, v.request_bytes, v.response_bytes);
            assert!(
                stored.insert(key.clone(), sums).is_none(),
                "{g:?}: two rows for {key:?}"
            );
        }
        // Every row carries its rule: row for row, the rollups are the raw events grouped by
        // the whole key.
        assert_eq!(stored, expected, "{g:?}: rollup rows");
        // And rows that differ only by their rule exist: the rule splits rows, not just labels
        // them.
        let without_rule: BTreeSet<_> = stored
            .keys()
            .map(|k| (k.0, &k.1, &k.2, &k.3, k.4, &k.5))
            .collect();
        assert!(without_rule.len() < stored.len(), "{g:?}");

        // What the limits report sums: per (rule, decision, user), from the rollups and from
        // the raw events directly.
        let mut from_rollups: BTreeMap<(String, String, String), Sums> = BTreeMap::new();
        for ((_, user, _, _, _, decision, rule), sums) in &stored {
            add(
                from_rollups
                    .entry((rule.clone(), decision.clone(), user.clone()))
                    .or_default(),
                *sums,
            );
        }
        let mut from_events: BTreeMap<(String, String, String), Sums> = BTreeMap::new();
        for e in events.iter().filter(|e| e.org == "acme") {
            add(
                from_events
                    .entry((
                        e.rule.clone().unwrap_or_default(),
                        decision_name(e.decision).to_owned(),
                        e.user.clone().unwrap_or_default(),
                    ))
                    .or_default(),
                (
                    1,
                    i64::from(e.status >= 500),
                    e.cost as i64,
                    e.request_bytes as i64,
                    e.response_bytes as i64,
                ),
            );
        }
        assert_eq!(from_rollups, from_events, "{g:?}: per rule, decision, user");
        // 2 rules × 2 decisions × 4 users, plus allowed (no rule) × 4 users.
        assert_eq!(from_rollups.len(), 20, "{g:?}: {:?}", from_rollups.keys());
    }

    // globex's events are in globex's rows, split by rule the same way.
    let globex = app
        .state
        .storage
        .rollup_rows("globex", Granularity::Day, 0, i64::MAX)
        .await
        .unwrap();
    let mut per_rule: BTreeMap<(String, String), i64> = BTreeMap::new();
    for row in &globex {
        *per_rule
            .entry((row.rule.clone(), row.decision.clone()))
            .or_default() += row.values.calls;
    }
    let mut expected: BTreeMap<(String, String), i64> = BTreeMap::new();
    for e in events.iter().filter(|e| e.org == "globex") {
        *expected
            .entry((
                e.rule.clone().unwrap_or_default(),
                decision_name(e.decision).to_owned(),
            ))
            .or_default() += 1;
    }
    assert_eq!(per_rule, expected);
}

/// Runs `sql` on the app's database, whichever engine.
async fn execute(storage: &Storage, sql: &str) {
    match storage {
        Storage::Sqlite(pool) => sqlx::query(sql).execute(pool).await.map(|_| ()),
        Storage::Postgres(pg) => sqlx::query(sql).execute(&pg.pool).await.map(|_| ()),
    }
    .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The rollups as a collector from before migration 0006 leaves them: route-and-user rows (6),
/// no caller rows (7), no users sketches. Its route-and-user rows of every granularity but the
/// minute are summed here from the full cube's hours (the full cube keeps no days or weeks).
fn older_collector() -> [String; 3] {
    let hours = |g: Granularity| {
        format!(
            "SELECT {code} AS g, {bucket} AS b, org, user_id, route, method, calls, errors, \
             cost, request_bytes, response_bytes FROM rollups WHERE cube = 0 AND granularity = 1",
            code = g.code(),
            bucket = g.bucket_sql("bucket"),
        )
    };
    [
        format!(
            "INSERT INTO rollups (cube, granularity, bucket, org, key_hash, user_id, route, \
             method, status_class, decision, rule, calls, errors, cost, request_bytes, \
             response_bytes) \
             SELECT 6, g, b, org, -ROW_NUMBER() OVER (ORDER BY org, g, b, route, method, user_id), \
             user_id, route, method, 0, '', '', SUM(calls), SUM(errors), SUM(cost), \
             SUM(request_bytes), SUM(response_bytes) FROM ({} UNION ALL {} UNION ALL {}) AS h \
             GROUP BY org, g, b, route, method, user_id",
            hours(Granularity::Hour),
            hours(Granularity::Day),
            hours(Granularity::Week),
        ),
        "DELETE FROM rollups WHERE cube = 7".into(),
        "UPDATE rollups SET users_sketch = NULL".into(),
    ]
}

async fn callers_are_backfilled_for_rows_folded_before_them(backend: Backend) {
    let app = spawn_app(backend).await;
    for batch in fixture(2_000).chunks(500) {
        assert_eq!(app.ingest(&app.admin, batch).await.status, 200);
    }
    app.settle().await;
    let reports = [
        "/v1/reports/overview?org=acme&days=2",
        "/v1/reports/top?dimension=users&days=2&limit=20",
    ];
    let mut before = Vec::new();
    for uri in reports {
        let r = app.get(uri, &app.admin).await;
        assert_eq!(r.status, 200, "{}", r.text());
        before.push(r.json());
    }
    assert!(
        before[0]["rows"][0]["unique_users"].as_i64() > Some(0),
        "{}",
        before[0]
    );
    assert!(!before[1]["rows"].as_array().unwrap().is_empty());

    // The rollups as a collector before migration 0006 left them: a route-and-user cube (6),
    // no caller cube (7), no users sketches; and the backfill owed.
    let storage = &app.state.storage;
    for sql in older_collector() {
        execute(storage, &sql).await;
    }
    execute(
        storage,
        "INSERT INTO rollup_backfills (name) VALUES ('callers')",
    )
    .await;
    let r = app.get(reports[1], &app.admin).await;
    assert_eq!(
        r.json()["rows"],
        serde_json::json!([]),
        "no callers before the backfill"
    );

    storage.migrate().await.unwrap();
    for (uri, before) in reports.iter().zip(&before) {
        let r = app.get(uri, &app.admin).await;
        assert_eq!(&r.json(), before, "{uri} after the backfill");
    }
    // It ran once: the route-and-user cube is gone and nothing is owed.
    storage.migrate().await.unwrap();
    let r = app.get(reports[0], &app.admin).await;
    assert_eq!(&r.json(), &before[0]);
    // A collector from before 0006 still running folds route-and-user rows and no caller rows:
    // the next start rebuilds both, with no marker.
    for sql in older_collector() {
        execute(storage, &sql).await;
    }
    let r = app.get(reports[1], &app.admin).await;
    assert_eq!(r.json()["rows"], serde_json::json!([]));
    storage.migrate().await.unwrap();
    for (uri, before) in reports.iter().zip(&before) {
        let r = app.get(uri, &app.admin).await;
        assert_eq!(&r.json(), before, "{uri} after the second backfill");
    }
    let left: i64 = match storage {
        Storage::Sqlite(pool) => sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM rollups WHERE cube = 6) \
             + (SELECT COUNT(*) FROM rollup_backfills)",
        )
        .fetch_one(pool)
        .await
        .unwrap(),
        Storage::Postgres(pg) => sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM rollups WHERE cube = 6) \
             + (SELECT COUNT(*) FROM rollup_backfills)",
        )
        .fetch_one(&pg.pool)
        .await
        .unwrap(),
    };
    assert_eq!(left, 0);
}

/// Returns once a session of the test database waits on a lock (bounded: 10 s, then fails
/// naming `who` never waited).
async fn wait_for_a_lock_wait(pool: &sqlx::PgPool, who: &str) {
    let started = std::time::Instant::now();
    loop {
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(started.elapsed().as_secs() < 10, "{who} never waited");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A resent batch is found stored id by id, each day's ids in that day's partition, so it
/// never reaches COPY: its ids are not COPYed again (which would fail on the unique index and
/// send the group through the staging table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_resent_batch_over_two_days_is_found_stored_before_any_copy() {
    let (_db, storage, pool) = migrated_postgres().await;
    let mut fx = Fixture::new(6);
    let now = Utc::now();
    // The sampled lookup probes the first event; the rest span yesterday and today.
    let events: Vec<UsageEvent> = (0..6)
        .map(|i| {
            fx.event(
                "acme",
                now - Duration::days(1 - i % 2) - Duration::minutes(i),
            )
        })
        .collect();
    let first = storage.write_events(&events, now, &[]).await.unwrap();
    assert_eq!(first, vec![true; 6]);
    let again = storage.write_events(&events, now, &[]).await.unwrap();
    assert_eq!(again, vec![false; 6]);
    let staging: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM pg_class WHERE relname = 'staging_events'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        staging, 0,
        "the resent batch went through the staging table"
    );
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 6);
}

/// PostgreSQL's fast path COPYs events it has just checked are new; an id that another
/// transaction stores in between makes COPY fail, and the group goes again through the path that
/// skips stored ids. Forced here: the other transaction holds the id uncommitted while the write
/// checks, and commits once the write waits on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_event_stored_meanwhile_by_another_transaction_is_a_duplicate() {
    let (_db, storage, pool) = migrated_postgres().await;
    let mut fx = Fixture::new(5);
    let events = fx.events("acme", 3);
    let mut other = pool.begin().await.unwrap();
    let columns = tollgate_collector::db::EVENT_COLUMNS;
    let mut copy = other
        .copy_in_raw(&format!(
            "COPY events ({columns}) FROM STDIN (FORMAT binary)"
        ))
        .await
        .unwrap();
    copy.send(
        tollgate_collector::db::copy_binary(&events[..1])
            .unwrap()
            .as_slice(),
    )
    .await
    .unwrap();
    copy.finish().await.unwrap();
    sqlx::query(
        "INSERT INTO rollup_queue (ts, org, user_id, route, method, status, decision, \
         latency_us, request_bytes, response_bytes, cost) \
         VALUES ($1, 'acme', '', '/', 'GET', 200, 'allowed', 1, 0, 0, 1)",
    )
    .bind(events[0].timestamp.timestamp())
    .execute(&mut *other)
    .await
    .unwrap();

    let write = {
        let (storage, events) = (storage.clone(), events.clone());
        tokio::spawn(async move { storage.write_events(&events, Utc::now(), &[]).await })
    };
    // Commit only once the write is blocked on the other transaction's index entry.
    wait_for_a_lock_wait(&pool, "the write").await;
    other.commit().await.unwrap();

    let stored = write.await.unwrap().unwrap();
    assert_eq!(stored, [false, true, true]);
    assert_eq!(storage.count_events("acme").await.unwrap(), (3, 3));
    // The other transaction's one row in the per-event queue, the write's two in its batch.
    assert_eq!(
        storage.queued_for_rollup().await.unwrap(),
        3,
        "each event queued for the rollups once"
    );
}

/// PostgreSQL's fold locks and reads the rows that exist, then inserts the missing ones. A row
/// another folder (another replica) inserts in between is not inserted twice nor skipped: the
/// insert leaves it alone and the fold adds to it. Forced here: the other transaction holds the
/// row uncommitted while the fold reads, and commits once the fold's insert waits on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_rollup_row_inserted_meanwhile_by_another_folder_is_added_to() {
    use tollgate_collector::rollup::{aggregate, Cube, Sample};
    let (_db, storage, pool) = migrated_postgres().await;
    let mut fx = Fixture::new(11);
    let events = fx.events("acme", 4);
    storage
        .write_events(&events, Utc::now(), &[])
        .await
        .unwrap();
    let samples: Vec<Sample> = events.iter().map(|e| Sample::of(e, &[])).collect();
    let deltas = aggregate(&samples);
    let (key, hash, delta) = deltas
        .iter()
        .find(|(k, _, _)| k.cube == Cube::Org && k.granularity == Granularity::Day)
        .expect("an org row of the day");
    let mut other = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO rollups (org, key_hash, granularity, bucket, user_id, route, method, \
         status_class, decision, rule, calls, errors, cost, request_bytes, response_bytes, \
         latency_sketch, cube, dimension, dimension_value, users_sketch) \
         VALUES ($1, $2, $3, $4, '', '', '', $5, $6, '', 100, 0, 100, 0, 0, NULL, $7, '', '', NULL)",
    )
    .bind(&key.org)
    .bind(hash)
    .bind(key.granularity.code())
    .bind(key.bucket)
    .bind(key.status_class)
    .bind(&key.decision)
    .bind(key.cube.code())
    .execute(&mut *other)
    .await
    .unwrap();

    let fold = {
        let storage = storage.clone();
        tokio::spawn(async move { storage.fold(1_000).await })
    };
    wait_for_a_lock_wait(&pool, "the fold").await;
    other.commit().await.unwrap();
    assert_eq!(fold.await.unwrap().unwrap(), 4);

    let (calls, sketched): (i64, bool) = sqlx::query_as(
        "SELECT calls, latency_sketch IS NOT NULL FROM rollups WHERE org = $1 AND key_hash = $2",
    )
    .bind(&key.org)
    .bind(hash)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        calls,
        100 + delta.calls,
        "the other folder's 100 calls and this fold's"
    );
    assert!(sketched, "the fold's latencies are merged into the row");
    // Every other row of the fold is there once, with the fold's own numbers.
    let (rows, total) = rows_and_calls(&pool, "acme").await;
    assert_eq!(rows, deltas.len() as i64);
    assert_eq!(
        total,
        100 + deltas.iter().map(|(_, _, d)| d.calls).sum::<i64>()
    );
}

/// How many rollup rows `org` has (every cube and granularity), and their calls summed.
async fn rows_and_calls(pool: &sqlx::PgPool, org: &str) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), CAST(sum(calls) AS BIGINT) FROM rollups WHERE org = $1")
        .bind(org)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Migration 0009 partitions PostgreSQL's rollups by cube. Rows stored before it keep every
/// value, land in their cube's partition, and are found and added to by the next fold; and the
/// full cube's rows are then updated in place (HOT), which is why the table is partitioned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rollups_stored_before_the_partitioning_are_kept_and_folded_into() {
    use tollgate_collector::rollup::{aggregate, Sample};
    let db = common::TestDb::new(Backend::Postgres).await;
    let storage = Storage::connect(&db.url, 4).await.unwrap();
    let Storage::Postgres(pg) = &storage else {
        unreachable!("a PostgreSQL database")
    };
    let mut before = sqlx::migrate!("./migrations/postgres");
    before.migrations = before
        .migrations
        .iter()
        .filter(|m| m.version < 9)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    before.run(&pg.pool).await.unwrap();

    // The rows a fold of these events makes, stored by a collector from before 0009.
    let mut fx = Fixture::new(21);
    let events = fx.events("acme", 40);
    let deltas = aggregate(
        &events
            .iter()
            .map(|e| Sample::of(e, &[]))
            .collect::<Vec<_>>(),
    );
    for (key, hash, delta) in &deltas {
        sqlx::query(
            "INSERT INTO rollups (org, key_hash, granularity, bucket, user_id, route, method, \
             status_class, decision, rule, calls, errors, cost, request_bytes, response_bytes, \
             latency_sketch, cube, dimension, dimension_value, users_sketch) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, NULL, $16, \
             $17, $18, NULL)",
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
        .bind(key.cube.code())
        .bind(&key.dimension)
        .bind(&key.dimension_value)
        .execute(&pg.pool)
        .await
        .unwrap();
    }
    const ROWS: &str = "SELECT CAST(row_to_json(r) AS TEXT) FROM (SELECT org, key_hash, \
        granularity, bucket, user_id, route, method, status_class, decision, rule, calls, \
        errors, cost, request_bytes, response_bytes, cube, dimension, dimension_value \
        FROM rollups ORDER BY org, cube, key_hash) AS r";
    let stored: Vec<(String,)> = sqlx::query_as(ROWS).fetch_all(&pg.pool).await.unwrap();
    assert_eq!(stored.len(), deltas.len());

    storage.migrate().await.unwrap();
    let migrated: Vec<(String,)> = sqlx::query_as(ROWS).fetch_all(&pg.pool).await.unwrap();
    assert_eq!(migrated, stored, "every row and value kept");
    let misplaced: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM rollups WHERE tableoid::regclass::text <> CASE cube \
         WHEN 0 THEN 'rollups_cube0' WHEN 4 THEN 'rollups_cube4' WHEN 7 THEN 'rollups_cube7' \
         ELSE 'rollups_cubes' END",
    )
    .fetch_one(&pg.pool)
    .await
    .unwrap();
    assert_eq!(misplaced, 0, "each row in its cube's partition");

    // The same events again: every row exists, so the fold adds to each (none inserted).
    storage
        .write_events(&events, Utc::now(), &[])
        .await
        .unwrap();
    assert_eq!(storage.fold(1_000).await.unwrap(), events.len());
    let (rows, total) = rows_and_calls(&pg.pool, "acme").await;
    assert_eq!(rows, deltas.len() as i64);
    assert_eq!(
        total,
        2 * deltas.iter().map(|(_, _, d)| d.calls).sum::<i64>()
    );

    // Statistics reach the view within a second or so of the fold's commit.
    let mut hot: i64 = 0;
    for _ in 0..50 {
        hot = sqlx::query_scalar(
            "SELECT n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'rollups_cube0'",
        )
        .fetch_one(&pg.pool)
        .await
        .unwrap();
        if hot > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(hot > 0, "the full cube's rows were updated in place");
}

/// Events an older collector queued one row each (`rollup_queue`, before migration 0007) are
/// folded with the newer batches, each once.
async fn events_queued_by_an_older_collector_are_folded(backend: Backend) {
    let db = common::TestDb::new(backend).await;
    let storage = db.storage().await;
    let mut fx = Fixture::new(9);
    let at = Utc::now() - Duration::minutes(5);
    let events = vec![fx.event("acme", at), fx.event("acme", at)];
    storage
        .write_events(&events, Utc::now(), &[])
        .await
        .unwrap();
    execute(
        &storage,
        &format!(
            "INSERT INTO rollup_queue (ts, org, user_id, route, method, status, decision, \
             latency_us, request_bytes, response_bytes, cost) \
             VALUES ({}, 'acme', '', '/old', 'GET', 200, 'allowed', 1, 0, 0, 1)",
            at.timestamp()
        ),
    )
    .await;
    assert_eq!(storage.queued_for_rollup().await.unwrap(), 3);
    storage.fold_all().await.unwrap();
    assert_eq!(storage.queued_for_rollup().await.unwrap(), 0);
    assert_eq!(day_calls(&storage, "acme", at).await, 3);
}

/// Calls in the day rollups of `org` for the day of `at`.
async fn day_calls(storage: &Storage, org: &str, at: chrono::DateTime<Utc>) -> i64 {
    let day = at.timestamp() - at.timestamp().rem_euclid(86_400);
    let rows = storage
        .rollup_rows(org, Granularity::Day, day, day + 86_400)
        .await
        .unwrap();
    rows.iter().map(|r| r.values.calls).sum()
}

/// A batch whose ids are partly stored already: in its first chunk of 1,000 one stored id among
/// new ones, its second chunk starting with a stored id. Exactly the new events are stored and
/// queued, and the rollups count every event once.
async fn a_batch_mixing_stored_and_new_ids_stores_only_the_new(backend: Backend) {
    let db = common::TestDb::new(backend).await;
    let storage = db.storage().await;
    let mut fx = Fixture::new(12);
    let at = Utc::now() - Duration::minutes(5);
    let stored: Vec<_> = (0..1_500).map(|_| fx.event("acme", at)).collect();
    storage
        .write_events(&stored, Utc::now(), &[])
        .await
        .unwrap();
    storage.fold_all().await.unwrap();
    let new: Vec<_> = (0..1_100).map(|_| fx.event("acme", at)).collect();
    let mut batch = Vec::new();
    batch.extend_from_slice(&new[..500]);
    batch.push(stored[0].clone());
    batch.extend_from_slice(&new[500..999]);
    batch.push(stored[1].clone());
    batch.extend_from_slice(&new[999..]);
    let flags = storage.write_events(&batch, Utc::now(), &[]).await.unwrap();
    let expected: Vec<bool> = (0..batch.len()).map(|i| i != 500 && i != 1_000).collect();
    assert_eq!(flags, expected);
    assert_eq!(storage.count_events("acme").await.unwrap().0, 2_600);
    assert_eq!(storage.queued_for_rollup().await.unwrap(), 1_100);
    storage.fold_all().await.unwrap();
    assert_eq!(day_calls(&storage, "acme", at).await, 2_600);
}

backend_tests!(
    events_queued_by_an_older_collector_are_folded,
    a_batch_mixing_stored_and_new_ids_stores_only_the_new,
    rollups_match_raw_events,
    rollups_split_by_rule,
    callers_are_backfilled_for_rows_folded_before_them
);

/// SQLite keeps the rollups in a file of their own, so folds and ingest commits take different
/// write locks. These check what that layout promises.
mod sqlite_rollups_file {
    use super::*;

    /// A fresh SQLite database, its fixture and a time two minutes ago.
    async fn empty(seed: u64) -> (common::TestDb, Storage, Fixture, chrono::DateTime<Utc>) {
        let db = common::TestDb::new(Backend::Sqlite).await;
        let storage = db.storage().await;
        (
            db,
            storage,
            Fixture::new(seed),
            Utc::now() - Duration::minutes(2),
        )
    }

    /// A fresh SQLite database with `n` events of acme (two minutes old) written, not folded.
    async fn with_events(
        seed: u64,
        n: usize,
    ) -> (common::TestDb, Storage, Fixture, chrono::DateTime<Utc>) {
        let (db, storage, mut fx, at) = empty(seed).await;
        let events: Vec<UsageEvent> = (0..n).map(|_| fx.event("acme", at)).collect();
        storage
            .write_events(&events, Utc::now(), &[])
            .await
            .unwrap();
        (db, storage, fx, at)
    }

    fn pool(storage: &Storage) -> &sqlx::SqlitePool {
        match storage {
            Storage::Sqlite(pool) => pool,
            Storage::Postgres(_) => unreachable!("SQLite only"),
        }
    }

    async fn scalar(storage: &Storage, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(pool(storage))
            .await
            .unwrap()
    }

    /// The point of the second file: a fold completes while an ingest transaction holds the
    /// main file's write lock (it used to wait for it, and ingest for the fold).
    #[tokio::test]
    async fn a_fold_runs_while_the_events_file_is_locked() {
        let (_db, storage, mut fx, at) = with_events(21, 5).await;
        let pool = pool(&storage);
        // Another writer holds the events' file.
        let mut locker = pool.acquire().await.unwrap();
        sqlx::query("BEGIN").execute(&mut *locker).await.unwrap();
        sqlx::query("INSERT INTO orgs (id, name, plan, created_at) VALUES ('x', 'x', NULL, 0)")
            .execute(&mut *locker)
            .await
            .unwrap();
        let folded = tokio::time::timeout(std::time::Duration::from_secs(5), storage.fold(1_000))
            .await
            .expect("the fold waited for the events' file's lock");
        assert_eq!(folded.unwrap(), 5);
        assert_eq!(storage.queued_for_rollup().await.unwrap(), 0);
        assert_eq!(day_calls(&storage, "acme", at).await, 5);
        sqlx::query("ROLLBACK").execute(&mut *locker).await.unwrap();
        // The folded batch is deleted by the next ingest transaction, and counted once.
        let more = vec![fx.event("acme", at)];
        storage.write_events(&more, Utc::now(), &[]).await.unwrap();
        let batches: i64 = scalar(&storage, "SELECT COUNT(*) FROM rollup_batches").await;
        assert_eq!(batches, 1, "only the new batch is left");
        storage.fold_all().await.unwrap();
        assert_eq!(day_calls(&storage, "acme", at).await, 6);
    }

    /// A crash after a fold committed its rows and mark, before the folded batch left the
    /// events' file: the batch is never folded twice, and an idle fold deletes it.
    #[tokio::test]
    async fn a_batch_the_mark_covers_is_not_folded_again() {
        let (_db, storage, mut fx, at) = with_events(22, 3).await;
        let pool = pool(&storage);
        storage.fold_all().await.unwrap();
        // Put the folded batch back, as if its delete never ran.
        let seq: i64 = scalar(
            &storage,
            "SELECT seq FROM rollupdb.fold_progress WHERE name = 'batches'",
        )
        .await;
        sqlx::query("INSERT INTO rollup_batches (seq, events, samples) VALUES ($1, 3, x'00')")
            .bind(seq)
            .execute(pool)
            .await
            .unwrap();
        assert_eq!(storage.queued_for_rollup().await.unwrap(), 0);
        assert_eq!(storage.fold(1_000).await.unwrap(), 0);
        let left: i64 = scalar(&storage, "SELECT COUNT(*) FROM rollup_batches").await;
        assert_eq!(left, 0, "the idle fold deletes what the mark covers");
        assert_eq!(day_calls(&storage, "acme", at).await, 3);
        // New batches get new seqs (AUTOINCREMENT), past the mark.
        storage
            .write_events(&[fx.event("acme", at)], Utc::now(), &[])
            .await
            .unwrap();
        assert_eq!(storage.queued_for_rollup().await.unwrap(), 1);
        storage.fold_all().await.unwrap();
        assert_eq!(day_calls(&storage, "acme", at).await, 4);
    }

    /// Every row's sketch holds exactly its events' latencies (its count equals `calls`).
    async fn sketches_match_calls(storage: &Storage, g: Granularity, at: chrono::DateTime<Utc>) {
        let start = g.bucket(at);
        let rows = storage
            .rollup_rows("acme", g, start, start + g.seconds())
            .await
            .unwrap();
        assert!(!rows.is_empty());
        for r in rows {
            assert_eq!(
                r.values.sketch.len() as i64,
                r.values.calls,
                "{g:?} {}",
                r.route
            );
        }
    }

    /// The folder reuses the sketches it wrote instead of reading them back: folds into the
    /// same rows keep every latency once, and a prune between folds (which deletes rows behind
    /// the folder's back) is not undone by a stale sketch.
    #[tokio::test]
    async fn the_folders_sketches_stay_what_is_stored() {
        let (_db, storage, mut fx, at) = empty(24).await;
        for round in 0..3 {
            let events: Vec<UsageEvent> = (0..4).map(|_| fx.event("acme", at)).collect();
            storage
                .write_events(&events, Utc::now(), &[])
                .await
                .unwrap();
            storage.fold_all().await.unwrap();
            assert_eq!(day_calls(&storage, "acme", at).await, 4 * (round + 1));
            for g in [Granularity::Minute, Granularity::Day] {
                sketches_match_calls(&storage, g, at).await;
            }
        }
        // Old minutes pruned (every minute row is older than a cutoff in the future), then
        // events of the same minute: their minute rows start again from these events alone.
        storage
            .prune(
                Utc::now() - Duration::days(365),
                Utc::now() + Duration::minutes(1),
            )
            .await
            .unwrap();
        let minute = Granularity::Minute.bucket(at);
        let rows = storage
            .rollup_rows("acme", Granularity::Minute, minute, minute + 60)
            .await
            .unwrap();
        assert!(rows.is_empty());
        let events: Vec<UsageEvent> = (0..2).map(|_| fx.event("acme", at)).collect();
        storage
            .write_events(&events, Utc::now(), &[])
            .await
            .unwrap();
        storage.fold_all().await.unwrap();
        sketches_match_calls(&storage, Granularity::Minute, at).await;
        sketches_match_calls(&storage, Granularity::Day, at).await;
        assert_eq!(day_calls(&storage, "acme", at).await, 14);
    }

    /// The folder holds the buckets it folds into whole (every row, not only the last fold's),
    /// and takes a row it does not hold in such a bucket for a new one: a row an earlier fold
    /// wrote and the last one left alone keeps its sketch; so does a row of a bucket that
    /// had rows before the folder first wrote into it (it is read back).
    #[tokio::test]
    async fn a_row_the_last_fold_left_alone_keeps_its_sketch() {
        let (_db, storage, mut fx, at) = empty(26).await;
        let mut on = |route: &str, n: usize| -> Vec<UsageEvent> {
            (0..n)
                .map(|_| UsageEvent {
                    route: route.into(),
                    ..fx.event("acme", at)
                })
                .collect()
        };
        let mut folds = vec![on("/a", 2), on("/b", 1), on("/b", 1), on("/a", 1)];
        // Between them, a prune (which forgets what the folder holds; it deletes no row here):
        // the rows of /a are then in buckets that had rows before the folder held them.
        folds.push(on("/b", 1));
        folds.push(on("/a", 3));
        for (i, events) in folds.into_iter().enumerate() {
            if i == 4 {
                storage
                    .prune(
                        Utc::now() - Duration::days(365),
                        Utc::now() - Duration::days(30),
                    )
                    .await
                    .unwrap();
            }
            storage
                .write_events(&events, Utc::now(), &[])
                .await
                .unwrap();
            storage.fold_all().await.unwrap();
            for g in Granularity::ALL {
                sketches_match_calls(&storage, g, at).await;
            }
        }
        assert_eq!(day_calls(&storage, "acme", at).await, 9);
    }

    /// A rollups file newer than the main file beside it (a mismatched restore): its mark is
    /// past every batch seq the main file has handed out. New batches still get counted.
    #[tokio::test]
    async fn batches_after_a_mismatched_restore_are_not_lost() {
        let (db, storage, mut fx, at) = with_events(25, 2).await;
        storage.fold_all().await.unwrap();
        sqlx::query("UPDATE rollupdb.fold_progress SET seq = seq + 1000 WHERE name = 'batches'")
            .execute(pool(&storage))
            .await
            .unwrap();
        drop(storage);
        let storage = db.storage().await;
        let events: Vec<UsageEvent> = (0..3).map(|_| fx.event("acme", at)).collect();
        storage
            .write_events(&events, Utc::now(), &[])
            .await
            .unwrap();
        assert_eq!(storage.queued_for_rollup().await.unwrap(), 3);
        storage.fold_all().await.unwrap();
        assert_eq!(day_calls(&storage, "acme", at).await, 5);
    }

    /// A database from before the rollups' file keeps its rollups: they move there at start,
    /// once, also after a start that crashed between the copy and the drop.
    #[tokio::test]
    async fn rollups_of_an_older_database_move_to_their_file() {
        let (db, storage, _, at) = with_events(23, 4).await;
        let pool = pool(&storage);
        storage.fold_all().await.unwrap();
        let rows: i64 = scalar(&storage, "SELECT COUNT(*) FROM rollupdb.rollups").await;
        assert!(rows > 0);
        // The older layout: the tables in the main file. Half a copy is left in the rollups'
        // file, as a start that crashed after copying would leave it (plus a stray row).
        for sql in [
            "CREATE TABLE main.rollups AS SELECT * FROM rollupdb.rollups",
            "CREATE TABLE main.rollup_epochs AS SELECT * FROM rollupdb.rollup_epochs",
            "CREATE TABLE main.rollup_backfills AS SELECT * FROM rollupdb.rollup_backfills",
            "DELETE FROM rollupdb.rollups WHERE cube <> 0",
            "UPDATE rollupdb.rollups SET calls = calls + 100",
        ] {
            sqlx::query(sql).execute(pool).await.unwrap();
        }
        drop(storage);
        let storage = db.storage().await;
        let in_main = scalar(
            &storage,
            "SELECT COUNT(*) FROM main.sqlite_master WHERE name LIKE 'rollup%' AND type = 'table' \
             AND name <> 'rollup_batches' AND name <> 'rollup_queue'",
        )
        .await;
        assert_eq!(in_main, 0);
        let moved: i64 = scalar(&storage, "SELECT COUNT(*) FROM rollupdb.rollups").await;
        assert_eq!(moved, rows);
        assert_eq!(day_calls(&storage, "acme", at).await, 4);
    }
}

/// A fresh, migrated PostgreSQL database: its handle (dropping it ends the test's use of the
/// database), its storage and its pool.
async fn migrated_postgres() -> (common::TestDb, Storage, sqlx::PgPool) {
    let db = common::TestDb::new(Backend::Postgres).await;
    let storage = db.storage().await;
    let Storage::Postgres(pg) = &storage else {
        unreachable!("a PostgreSQL database")
    };
    let pool = pg.pool.clone();
    (db, storage, pool)
}

/// Stores `rows` one-call rollup rows of `org` in each of `cubes`, keyed 1..=rows.
async fn fill_rollups(pool: &sqlx::PgPool, org: &str, rows: i64, cubes: &[i16]) {
    sqlx::query(
        "INSERT INTO rollups (org, key_hash, granularity, bucket, user_id, route, method, \
         status_class, decision, rule, calls, errors, cost, request_bytes, response_bytes, \
         cube, dimension, dimension_value) \
         SELECT $1, i, 0, 0, '', '', '', 2, 'allowed', '', 1, 0, 1, 0, 0, c, '', '' \
         FROM generate_series(1, $2) AS i, UNNEST($3::int2[]) AS c",
    )
    .bind(org)
    .bind(rows)
    .bind(cubes)
    .execute(pool)
    .await
    .unwrap();
}

/// Rows read by sequential scans of the rollups' partitions so far, and index scans.
async fn rollup_scans(pool: &sqlx::PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT CAST(sum(seq_tup_read) AS BIGINT), CAST(sum(idx_scan) AS BIGINT) \
         FROM pg_stat_user_tables WHERE relname LIKE 'rollups_%'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A fold finds its rows through the primary key, one probe per key, however many keys it has
/// and however big the table: left to itself, PostgreSQL hashed the whole table for a fold of
/// some tens of thousands of keys, which took seconds on millions of rows and stalled folds in
/// the ingest bench for 8 to 15 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_folds_probe_rows_by_key_instead_of_scanning_the_table() {
    let (_db, storage, pool) = migrated_postgres().await;
    // Another org's rows make the table big enough that hashing it looks cheaper to the planner
    // than the fold's probes.
    fill_rollups(&pool, "filler", 150_000, &[0, 2, 4, 7]).await;
    sqlx::query("ANALYZE rollups").execute(&pool).await.unwrap();

    // Events of 10,000 callers in one minute: tens of thousands of rollup rows per fold.
    let mut fx = Fixture::new(31);
    let at = Utc::now() - chrono::Duration::minutes(2);
    let mut batch = |n: usize| -> Vec<UsageEvent> {
        (0..n)
            .map(|i| {
                let mut e = fx.event("acme", at);
                e.user = Some(format!("user-{i}"));
                e
            })
            .collect()
    };
    let (first, second) = (batch(10_000), batch(10_000));
    let before = rollup_scans(&pool).await;
    // The first fold inserts the rows, the second (the same callers again) adds to them.
    for events in [&first, &second] {
        for chunk in events.chunks(1_000) {
            storage.write_events(chunk, Utc::now(), &[]).await.unwrap();
        }
        assert_eq!(storage.fold(100_000).await.unwrap(), events.len());
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM rollups WHERE org = 'acme'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(rows >= 30_000, "a fold of {rows} keys is too few to test");
    // Statistics reach the view a second or so after a fold's commit: wait for the probes of
    // both folds (the first looks for every row, the second looks for and updates each).
    let probes = 3 * rows;
    let mut after = rollup_scans(&pool).await;
    for _ in 0..50 {
        if after.1 - before.1 >= probes {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        after = rollup_scans(&pool).await;
    }
    assert!(
        after.1 - before.1 >= probes,
        "the folds' probes: {before:?} → {after:?}"
    );
    assert_eq!(
        after.0, before.0,
        "no fold read rows by scanning a partition"
    );
}

/// Stores `n` new events of acme and folds them.
async fn write_and_fold(storage: &Storage, fx: &mut Fixture, n: usize) {
    storage
        .write_events(&fx.events("acme", n), Utc::now(), &[])
        .await
        .unwrap();
    assert_eq!(storage.fold(1_000).await.unwrap(), n);
}

/// Manual ANALYZEs of the full cube's partition so far.
async fn cube0_analyzes(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT analyze_count FROM pg_stat_user_tables WHERE relname = 'rollups_cube0'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A fold analyzes the rollup partitions that have outgrown their statistics (a new table
/// that autovacuum has not analyzed yet), so the next fold's probes by key pick the primary
/// key; the planner's guesses without statistics made folds read an org's whole cube per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_folds_analyze_rollups_that_outgrew_their_statistics() {
    let (_db, storage, pool) = migrated_postgres().await;
    let mut fx = Fixture::new(41);
    // The migrations analyzed the empty table; a fold of a few rows leaves it be.
    let before = cube0_analyzes(&pool).await;
    write_and_fold(&storage, &mut fx, 10).await;
    assert_eq!(cube0_analyzes(&pool).await, before, "nothing outgrown yet");

    fill_rollups(&pool, "acme", 30_000, &[0]).await;
    write_and_fold(&storage, &mut fx, 10).await;
    // The statistics view may show the count a moment after the ANALYZE.
    let mut analyzed = cube0_analyzes(&pool).await;
    for _ in 0..50 {
        if analyzed > before {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        analyzed = cube0_analyzes(&pool).await;
    }
    assert_eq!(
        analyzed,
        before + 1,
        "the fold analyzed the grown partition"
    );
    let tuples: f32 =
        sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE relname = 'rollups_cube0'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(tuples >= 30_000.0, "statistics of {tuples} rows");
    // Grown by less than double since: not again.
    write_and_fold(&storage, &mut fx, 10).await;
    assert_eq!(cube0_analyzes(&pool).await, before + 1, "analyzed once");
}

/// A fold does not wait for a partition that autovacuum (or another replica) holds for
/// vacuuming or analyzing: the partition's ANALYZE is skipped, and the fold goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_folds_do_not_wait_to_analyze_a_partition_being_vacuumed() {
    let (_db, storage, pool) = migrated_postgres().await;
    fill_rollups(&pool, "acme", 30_000, &[0]).await;
    // The lock VACUUM and ANALYZE take, held as they would hold it.
    let mut vacuum = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE rollups_cube0 IN SHARE UPDATE EXCLUSIVE MODE")
        .execute(&mut *vacuum)
        .await
        .unwrap();
    let before = cube0_analyzes(&pool).await;
    let mut fx = Fixture::new(47);
    // Bounded only so that a fold that waits fails the test instead of hanging it.
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        write_and_fold(&storage, &mut fx, 10),
    )
    .await
    .expect("the fold waited for the partition's lock");
    assert_eq!(cube0_analyzes(&pool).await, before, "skipped, not analyzed");
    vacuum.rollback().await.unwrap();
}
