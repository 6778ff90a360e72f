//! The edge worker in workerd (`wrangler dev --local`) in front of a local origin: exact
//! enforcement through the Durable Object under concurrent requests, counters that survive a
//! restart of the runtime, and configuration refreshed from the config URL through KV.

use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::{json, Value};
use tollgate_e2e::workerd::{WorkerSpec, Wrangler, CLOCK_HEADER};
use tollgate_e2e::{
    eventually, free_port, key_hash, load, scratch_dir, send, tally, PolicyServer, Upstream,
};

/// A fixed `now` (the test-only clock), so no window boundary falls inside a test.
const NOW_MS: &str = "1800000000000";

fn document(limit: u64) -> Value {
    json!({
        "policy": {
            "version": 1,
            "keys": [
                {"id": "alice", "hash": key_hash("sk_alice"), "org": "acme", "plan": "enterprise"},
                {"id": "bob", "hash": key_hash("sk_bob"), "org": "bobco", "plan": "enterprise"}
            ],
            "rules": [{"name": "api", "algorithm": "fixed_window", "limit": limit, "window": "1h"}]
        },
        "test_only": {"enabled": true, "clock_header": CLOCK_HEADER}
    })
}

fn limit_is(body: &Value, limit: u64) -> bool {
    body["limits"]
        .as_array()
        .is_some_and(|l| l.iter().any(|r| r["rule"] == "api" && r["limit"] == limit))
}

fn spec(upstream: &Upstream, config: &PolicyServer, state: std::path::PathBuf) -> WorkerSpec {
    WorkerSpec {
        origin_port: upstream.port,
        config_port: Some(config.port),
        collector_port: None,
        state_dir: state,
        config_ttl_ms: 0,
        jwt_secret: None,
    }
}

#[test]
fn the_durable_object_enforces_exactly_under_concurrent_requests() -> Result<()> {
    let upstream = Upstream::start()?;
    let config = PolicyServer::start(&document(50).to_string())?;
    let worker = Wrangler::start(&spec(&upstream, &config, scratch_dir("worker-exact")?))?;
    let alice = [("x-api-key", "sk_alice"), (CLOCK_HEADER, NOW_MS)];
    worker.await_config(&alice, |b| limit_is(b, 50))?;

    let before = upstream.hits();
    let url = worker.url("/v1/items");
    let responses = load(8, 20, move |agent, _| {
        send(
            agent,
            "GET",
            &url,
            &[("x-api-key", "sk_alice"), (CLOCK_HEADER, NOW_MS)],
        )
    })?;
    let counts = tally(&responses);
    ensure!(
        counts.get(&200) == Some(&50) && counts.get(&429) == Some(&110),
        "160 concurrent requests against a limit of 50: {counts:?}\n{}",
        worker.log_tail(20)
    );
    ensure!(
        upstream.hits() - before == 50,
        "the origin saw {}",
        upstream.hits() - before
    );
    // Allowed responses come from the origin with the limiter's headers added.
    let ok = responses.iter().find(|r| r.status == 200).unwrap();
    ensure!(ok.body == "upstream ok" && ok.header("x-ratelimit-limit") == Some("50"));
    let remaining: Vec<u64> = responses
        .iter()
        .filter(|r| r.status == 200)
        .filter_map(|r| r.header("x-ratelimit-remaining")?.parse().ok())
        .collect();
    ensure!(
        tollgate_e2e::distinct(remaining.iter().copied()) == 50,
        "each allowed request saw its own remaining count: {remaining:?}"
    );
    // Another org's caller has its own counter.
    let bob = send(
        &tollgate_e2e::client(),
        "GET",
        &worker.url("/v1/items"),
        &[("x-api-key", "sk_bob"), (CLOCK_HEADER, NOW_MS)],
    )?;
    ensure!(bob.status == 200 && bob.header("x-ratelimit-remaining") == Some("49"));
    Ok(())
}

#[test]
fn counters_survive_a_restart_of_the_runtime() -> Result<()> {
    let upstream = Upstream::start()?;
    let config = PolicyServer::start(&document(5).to_string())?;
    let state = scratch_dir("worker-persist")?;
    let alice = [("x-api-key", "sk_alice"), (CLOCK_HEADER, NOW_MS)];
    let agent = tollgate_e2e::client();
    {
        let worker = Wrangler::start(&spec(&upstream, &config, state.clone()))?;
        worker.await_config(&alice, |b| limit_is(b, 5))?;
        for n in 0..3 {
            let r = send(&agent, "GET", &worker.url("/v1/items"), &alice)?;
            ensure!(r.status == 200, "request {n}: {}", r.status);
        }
    } // wrangler and workerd are stopped here.
    let worker = Wrangler::start(&spec(&upstream, &config, state))?;
    worker.await_config(&alice, |b| limit_is(b, 5))?;
    let statuses: Vec<(u16, Option<String>)> = (0..3)
        .map(|_| {
            send(&agent, "GET", &worker.url("/v1/items"), &alice).map(|r| {
                (
                    r.status,
                    r.header("x-ratelimit-remaining").map(str::to_string),
                )
            })
        })
        .collect::<Result<_>>()?;
    ensure!(
        statuses
            == vec![
                (200, Some("1".into())),
                (200, Some("0".into())),
                (429, Some("0".into()))
            ],
        "after the restart the counter went on from 3 of 5: {statuses:?}"
    );
    Ok(())
}

#[test]
fn the_cron_brings_a_new_policy_through_kv_and_refuses_a_bad_one() -> Result<()> {
    let upstream = Upstream::start()?;
    let config = PolicyServer::start(&document(2).to_string())?;
    let worker = Wrangler::start(&spec(&upstream, &config, scratch_dir("worker-config")?))?;
    let alice = [("x-api-key", "sk_alice"), (CLOCK_HEADER, NOW_MS)];
    worker.await_config(&alice, |b| limit_is(b, 2))?;
    let agent = tollgate_e2e::client();
    let r = send(&agent, "GET", &worker.url("/v1/items"), &alice)?;
    ensure!(
        r.header("x-ratelimit-limit") == Some("2"),
        "{:?}",
        r.headers
    );

    config.set(&document(7).to_string());
    worker.await_config(&alice, |b| limit_is(b, 7))?;
    let r = send(&agent, "GET", &worker.url("/v1/items"), &alice)?;
    ensure!(
        r.header("x-ratelimit-limit") == Some("7"),
        "{:?}",
        r.headers
    );

    // A policy that does not compile is refused whole: the last good one stays.
    let mut bad = document(9);
    bad["policy"]["rules"][0]["algorithm"] = json!("no_such_algorithm");
    config.set(&bad.to_string());
    let fetched = config.fetches();
    eventually(Duration::from_secs(20), || {
        worker.run_cron()?;
        ensure!(config.fetches() > fetched, "the cron has not fetched yet");
        Ok(())
    })?;
    worker.await_config(&alice, |b| limit_is(b, 7))?;
    let r = send(&agent, "GET", &worker.url("/v1/items"), &alice)?;
    ensure!(
        r.header("x-ratelimit-limit") == Some("7"),
        "{:?}",
        r.headers
    );
    Ok(())
}

/// A port another process holds and answers HTTP on is not taken for wrangler's: the start
/// says the port was taken (and `Wrangler::start` then tries new ports). It used to pass its
/// readiness probe on the other server's answers while wrangler had failed to bind.
#[test]
fn a_start_on_a_port_another_server_holds_reports_it_taken() -> Result<()> {
    let upstream = Upstream::start()?;
    let config = PolicyServer::start(&document(5).to_string())?;
    let spec = spec(&upstream, &config, scratch_dir("worker-taken")?);
    let start = Wrangler::start_on(&spec, upstream.port, free_port()?)?;
    ensure!(
        start.is_err(),
        "wrangler was taken as ready on a port it could not bind"
    );
    Ok(())
}
