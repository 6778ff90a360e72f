//! Usage events from the edge worker in workerd reach the collector exactly once, although the
//! collector refuses the first batches: the worker retries the same batch (same UUIDv7 ids)
//! with backoff inside `ctx.wait_until`.

use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::json;
use tollgate_e2e::workerd::{WorkerSpec, Wrangler, CLOCK_HEADER};
use tollgate_e2e::{
    eventually, key_hash, scratch_dir, send, FakeCollector, PolicyServer, Upstream,
};

#[test]
fn events_arrive_exactly_once_while_the_collector_refuses_the_first_batches() -> Result<()> {
    let upstream = Upstream::start()?;
    let collector = FakeCollector::start(3)?;
    let document = json!({
        "policy": {
            "version": 1,
            "keys": [{"id": "alice", "hash": key_hash("sk_alice"), "org": "acme", "plan": "enterprise"}],
            "rules": [{"name": "api", "algorithm": "fixed_window", "limit": 15, "window": "1h"}],
            "routes": ["/v1/items/{id}"]
        },
        "events": {"batch_size": 5, "flush_delay_ms": 200, "retry_initial_ms": 100, "retry_max_ms": 400, "max_attempts": 8},
        "test_only": {"enabled": true, "clock_header": CLOCK_HEADER}
    });
    let config = PolicyServer::start(&document.to_string())?;
    let worker = Wrangler::start(&WorkerSpec {
        origin_port: upstream.port,
        config_port: Some(config.port),
        collector_port: Some(collector.port),
        state_dir: scratch_dir("worker-events")?,
        config_ttl_ms: 0,
        jwt_secret: None,
    })?;
    let alice = [("x-api-key", "sk_alice"), (CLOCK_HEADER, "1800000000000")];
    worker.await_config(&alice, |b| b.get("limits").is_some())?;

    let agent = tollgate_e2e::client();
    for n in 0..20 {
        let r = send(
            &agent,
            "GET",
            &worker.url(&format!("/v1/items/{n}?secret=x")),
            &alice,
        )?;
        ensure!(
            r.status == if n < 15 { 200 } else { 429 },
            "request {n}: {}",
            r.status
        );
    }
    eventually(Duration::from_secs(45), || {
        let stored = collector.stored();
        ensure!(stored >= 20, "{stored} of 20 events stored");
        Ok(())
    })
    .map_err(|e| e.context(worker.log_tail(30)))?;
    // Nothing more arrives late, and nothing arrived twice.
    std::thread::sleep(Duration::from_secs(2));
    collector.with_log(|log| -> Result<()> {
        ensure!(log.events.len() == 20, "{} events stored", log.events.len());
        ensure!(log.duplicates == 0, "{} duplicates", log.duplicates);
        ensure!(log.refused_batches == 3, "{} refused", log.refused_batches);
        ensure!(log.malformed == 0, "{} malformed batches", log.malformed);
        let allowed = log
            .events
            .values()
            .filter(|e| e["decision"] == "allowed")
            .count();
        ensure!(allowed == 15, "{allowed} allowed events");
        for event in log.events.values() {
            ensure!(
                event["edge"] == "cloudflare" && event["org"] == "acme",
                "{event}"
            );
            ensure!(
                event["route"] == "/v1/items/{id}",
                "raw paths never leave the edge: {event}"
            );
            ensure!(event["node"] == "e2e-worker");
        }
        Ok(())
    })
}
