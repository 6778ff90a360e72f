//! Usage events through the real Envoy to a fake collector: one per request (skip paths
//! excepted), delivered exactly once while the collector refuses batches and while it is down.

use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::json;
use tollgate_e2e::{eventually, key_hash, load, send, Envoy, EnvoySpec, FakeCollector, Upstream};

fn start(collector: &FakeCollector, upstream: &Upstream, buffer_cap: usize) -> Result<Envoy> {
    Envoy::start(&EnvoySpec {
        filter_config: json!({
            "policy": {
                "version": 1,
                "keys": [{"id": "alice", "hash": key_hash("sk_alice"), "org": "acme", "plan": "enterprise"}],
                "rules": [{"name": "api", "algorithm": "fixed_window", "limit": 250, "window": "1h"}],
                "routes": ["/v1/items/{id}"]
            },
            "collector": {"cluster": "collector", "timeout_ms": 500},
            "flush_interval_ms": 100,
            "batch_size": 50,
            "buffer_cap": buffer_cap,
            "retry_initial_ms": 100,
            "retry_max_ms": 400,
            "node": "e2e-node"
        }),
        upstream_port: upstream.port,
        collector_port: Some(collector.port),
        policy_port: None,
        pre_filters: Vec::new(),
    })
}

fn traffic(envoy: &Envoy, threads: usize, per_thread: usize, offset: usize) -> Result<usize> {
    let port = envoy.port;
    let responses = load(threads, per_thread, move |agent, i| {
        send(
            agent,
            "GET",
            &format!("http://127.0.0.1:{port}/v1/items/{}?q=1", i + offset),
            &[("x-api-key", "sk_alice")],
        )
    })?;
    Ok(responses.len())
}

#[test]
fn events_arrive_exactly_once_through_refusals_and_an_outage() -> Result<()> {
    let upstream = Upstream::start()?;
    // The first three batches are refused with 503.
    let mut collector = FakeCollector::start(3)?;
    let envoy = start(&collector, &upstream, 10_000)?;

    // Phase 1: 200 requests over 10 connections while the collector refuses.
    let mut sent = traffic(&envoy, 10, 20, 0)?;
    // Skip paths are neither limited nor reported.
    let agent = tollgate_e2e::client();
    for _ in 0..5 {
        ensure!(send(&agent, "GET", &envoy.url("/healthz"), &[])?.status == 200);
    }
    eventually(Duration::from_secs(20), || {
        let stored = collector.stored();
        ensure!(stored == sent, "collector has {stored} of {sent}");
        Ok(())
    })?;
    ensure!(collector.with_log(|l| l.refused_batches) == 3);

    // Phase 2: the collector goes down; 100 more requests (some over the limit: 429s are
    // reported too); it comes back after the filter has retried a while.
    collector.go_down();
    sent += traffic(&envoy, 5, 20, 1000)?;
    eventually(Duration::from_secs(10), || {
        let retried = envoy.stat("events_retried")?;
        ensure!(
            retried >= 100,
            "events_retried = {retried}: still waiting for failures"
        );
        Ok(())
    })?;
    collector.resume()?;
    eventually(Duration::from_secs(30), || {
        let stored = collector.stored();
        ensure!(stored == sent, "collector has {stored} of {sent}");
        Ok(())
    })?;

    collector.with_log(|log| -> Result<()> {
        ensure!(log.duplicates == 0, "duplicates stored: {}", log.duplicates);
        ensure!(log.malformed == 0, "malformed batches: {}", log.malformed);
        let mut limited = 0;
        for event in log.events.values() {
            ensure!(
                event["org"] == "acme" && event["user"] == "alice",
                "{event}"
            );
            ensure!(event["route"] == "/v1/items/{id}", "{event}");
            ensure!(
                event["edge"] == "envoy" && event["node"] == "e2e-node",
                "{event}"
            );
            ensure!(
                event["id"].as_str().is_some_and(|id| id.len() == 36),
                "{event}"
            );
            if event["status"] == 429 {
                ensure!(
                    event["decision"] == "limited" && event["rule"] == "api",
                    "{event}"
                );
                limited += 1;
            }
        }
        ensure!(
            limited == 50,
            "300 requests against a limit of 250: {limited} limited"
        );
        Ok(())
    })?;
    eventually(Duration::from_secs(5), || {
        let (sent_stat, dropped) = (envoy.stat("events_sent")?, envoy.stat("events_dropped")?);
        ensure!(sent_stat == sent as u64, "events_sent = {sent_stat}");
        ensure!(dropped == 0, "events_dropped = {dropped}");
        ensure!(envoy.stat("events_queued")? == sent as u64, "events_queued");
        Ok(())
    })?;
    Ok(())
}

#[test]
fn a_full_buffer_drops_the_oldest_and_counts_them() -> Result<()> {
    let upstream = Upstream::start()?;
    let mut collector = FakeCollector::start(0)?;
    collector.go_down();
    let envoy = start(&collector, &upstream, 60)?;
    let sent = traffic(&envoy, 4, 25, 0)?;
    // The flusher drains the queue into its bounded buffer: 100 events, room for 60.
    eventually(Duration::from_secs(10), || {
        let dropped = envoy.stat("events_dropped")?;
        ensure!(dropped == 40, "events_dropped = {dropped}");
        Ok(())
    })?;
    collector.resume()?;
    eventually(Duration::from_secs(30), || {
        let stored = collector.stored();
        ensure!(stored == sent - 40, "collector has {stored}");
        Ok(())
    })?;
    ensure!(collector.with_log(|l| l.duplicates) == 0);
    Ok(())
}

#[test]
fn events_carry_the_request_and_response_body_sizes() -> Result<()> {
    let upstream = Upstream::start()?;
    let collector = FakeCollector::start(0)?;
    let envoy = start(&collector, &upstream, 1000)?;
    let agent = tollgate_e2e::client();
    let url = envoy.url("/v1/items/1");
    send(&agent, "GET", &url, &[("x-api-key", "sk_alice")])?;
    // A body: the filter sums the frames it sees, so a body sent in several is counted whole.
    agent
        .post(&url)
        .set("x-api-key", "sk_alice")
        .send_string(&"x".repeat(100_000))?;
    eventually(Duration::from_secs(10), || {
        let stored = collector.stored();
        ensure!(stored == 2, "collector has {stored} of 2");
        Ok(())
    })?;
    let mut sizes: Vec<(String, u64, u64)> = collector.with_log(|log| {
        log.events
            .values()
            .map(|e| {
                (
                    e["method"].as_str().unwrap_or_default().to_string(),
                    e["request_bytes"].as_u64().unwrap_or(u64::MAX),
                    e["response_bytes"].as_u64().unwrap_or(u64::MAX),
                )
            })
            .collect()
    });
    sizes.sort();
    // The upstream answers `upstream ok`: 11 bytes.
    let want = [
        ("GET".to_string(), 0, 11),
        ("POST".to_string(), 100_000, 11),
    ];
    ensure!(sizes == want, "{sizes:?}");
    Ok(())
}
