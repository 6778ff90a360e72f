//! Rollups against a direct computation over the raw events of a fixture: counts and sums
//! exact, percentiles within the sketch's stated error, late (out-of-order) events in the right
//! bucket, duplicates never counted twice — on SQLite and PostgreSQL.

mod common;

use std::collections::BTreeMap;

use chrono::{Duration, Utc};
use common::{spawn_app, Backend, Fixture};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
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

backend_tests!(rollups_match_raw_events);
