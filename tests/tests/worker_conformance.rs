//! Replays the core's conformance vectors (`core/tests/conformance/vectors.json`) through the
//! edge worker in workerd (`wrangler dev`): every step's status, limiter headers and body must
//! be exactly what the file says, as they are through the Envoy filter (`filter_conformance`).
//!
//! The vectors carry fixed timestamps, so the worker runs with its test-only clock header
//! (`test_only.clock_header` in the config document, refused unless `enabled: true` is spelled
//! out). A step's `client_ip` travels as `CF-Connecting-IP`, the header the worker reads the
//! client address from. Each case gets a fresh runtime with its own state directory.

use anyhow::{Context, Result};
use serde_json::json;
use tollgate_e2e::workerd::{WorkerSpec, Wrangler, CLOCK_HEADER};
use tollgate_e2e::{conformance, scratch_dir, send, PolicyServer, Upstream};

#[test]
fn the_worker_reproduces_the_conformance_vectors() -> Result<()> {
    let vectors = conformance::load()?;
    let upstream = Upstream::start()?;
    let mut failures = Vec::new();
    let mut steps = 0;
    for case in &vectors.cases {
        let document = json!({
            "policy": case.policy,
            "test_only": {"enabled": true, "clock_header": CLOCK_HEADER}
        });
        let config = PolicyServer::start(&document.to_string())?;
        let worker = Wrangler::start(&WorkerSpec {
            origin_port: upstream.port,
            config_port: Some(config.port),
            collector_port: None,
            state_dir: scratch_dir("worker-conformance-state")?,
            config_ttl_ms: 0,
            jwt_secret: None,
        })
        .with_context(|| format!("case {}", case.name))?;
        // The status path never charges, so waiting on it leaves the counters untouched.
        worker
            .await_config(&[], |body| body.get("limits").is_some())
            .with_context(|| format!("case {}", case.name))?;
        let agent = tollgate_e2e::client();
        for (i, step) in case.steps.iter().enumerate() {
            steps += 1;
            let at = step.at_ms.to_string();
            let headers = step.request_headers(CLOCK_HEADER, &at, "cf-connecting-ip");
            let response = send(&agent, &step.method, &worker.url(&step.path), &headers)?;
            failures.extend(step.check(&case.name, i, &response));
        }
    }
    assert!(steps >= 20, "only {steps} steps replayed");
    assert!(
        failures.is_empty(),
        "{} step(s) differ through the worker:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}
