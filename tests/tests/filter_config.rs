//! Policy updates through the real Envoy: the filter polls `config_url` with If-None-Match,
//! swaps to a good new policy on every worker, and keeps the last good one when a fetched policy
//! is bad. Also: the filter's stats are on Envoy's admin `/stats`.

use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::{json, Value};
use tollgate_e2e::{eventually, load, send, Envoy, EnvoySpec, PolicyServer, Upstream};

fn policy(rule: &str) -> Value {
    json!({"version": 1, "rules": [
        {"name": rule, "algorithm": "fixed_window", "limit": 1000, "window": "1h", "scope": "global"}
    ]})
}

/// Whether every one of 20 requests over 4 connections runs under rule `rule`.
fn all_under(envoy: &Envoy, rule: &str) -> Result<()> {
    let port = envoy.port;
    let responses = load(4, 5, move |agent, _| {
        send(
            agent,
            "GET",
            &format!("http://127.0.0.1:{port}/v1/items"),
            &[],
        )
    })?;
    let needle = format!("\"{rule}\";q=1000");
    for r in &responses {
        let shown = r.header("ratelimit-policy").unwrap_or_default();
        ensure!(shown.contains(&needle), "want {rule}, got {shown}");
    }
    Ok(())
}

#[test]
fn policies_are_polled_swapped_atomically_and_bad_ones_rejected() -> Result<()> {
    let upstream = Upstream::start()?;
    let server = PolicyServer::start(&policy("v1").to_string())?;
    let envoy = Envoy::start(&EnvoySpec {
        filter_config: json!({"policy": policy("v0"), "config_poll_ms": 200}),
        upstream_port: upstream.port,
        collector_port: None,
        policy_port: Some(server.port),
        pre_filters: Vec::new(),
    })?;
    eventually(Duration::from_secs(10), || all_under(&envoy, "v1"))?;
    // Stats reach Envoy on the VM's tick.
    eventually(Duration::from_secs(5), || {
        ensure!(envoy.stat("policy_updates")? == 1, "policy_updates");
        Ok(())
    })?;

    // A bad policy is refused, counted, and the last good one stays on every worker.
    server.set(r#"{"version": 1, "rules": [{"name": "x", "algorithm": "gcra", "limit": 1}]}"#);
    eventually(Duration::from_secs(10), || {
        ensure!(envoy.stat("policy_rejected")? == 1, "not rejected yet");
        Ok(())
    })?;
    all_under(&envoy, "v1")?;
    eventually(Duration::from_secs(15), || {
        ensure!(
            envoy.log().contains(
                "fetched policy rejected, keeping the last good one: invalid policy at `rules[0].window`"
            ),
            "the rejection names the field"
        );
        Ok(())
    })?;

    // Unchanged content is answered 304 and applies nothing; a good new one applies.
    let before = server.fetches();
    eventually(Duration::from_secs(10), || {
        ensure!(server.fetches() >= before + 3, "still polling");
        Ok(())
    })?;
    ensure!(envoy.stat("policy_updates")? == 1 && envoy.stat("policy_rejected")? == 1);
    server.set(&policy("v2").to_string());
    eventually(Duration::from_secs(10), || all_under(&envoy, "v2"))?;
    eventually(Duration::from_secs(5), || {
        ensure!(envoy.stat("policy_updates")? == 2, "policy_updates");
        Ok(())
    })?;
    Ok(())
}

#[test]
fn the_filter_stats_are_on_the_admin_page() -> Result<()> {
    let upstream = Upstream::start()?;
    let envoy = Envoy::start(&EnvoySpec {
        filter_config: json!({"policy": policy("v0")}),
        upstream_port: upstream.port,
        collector_port: None,
        policy_port: None,
        pre_filters: Vec::new(),
    })?;
    let agent = tollgate_e2e::client();
    ensure!(send(&agent, "GET", &envoy.url("/x"), &[])?.status == 200);
    let stats = envoy.stats()?;
    for name in [
        "allowed",
        "limited",
        "shadow_limited",
        "cas_retries",
        "fail_open",
        "fail_closed",
        "events_sent",
        "events_retried",
        "events_dropped",
        "policy_updates",
    ] {
        let full = format!("wasmcustom.tollgate.{name}");
        ensure!(stats.contains_key(&full), "{full} missing from /stats");
    }
    let text = tollgate_e2e::http_get(&format!("http://127.0.0.1:{}/stats", envoy.admin_port))?;
    ensure!(
        text.contains("wasmcustom.tollgate.flush_latency_ms"),
        "histogram missing"
    );
    Ok(())
}
