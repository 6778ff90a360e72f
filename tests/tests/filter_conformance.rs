//! Replays the core's conformance vectors (`core/tests/conformance/vectors.json`) through the
//! real Envoy: every step's status, limiter headers and body must be exactly what the file says.
//!
//! The vectors carry fixed timestamps, so the filter runs with its test-only clock header
//! (`test_only.clock_header`, refused unless `enabled: true` is spelled out), which makes the
//! replay exact rather than "where timing allows". A step's `client_ip` travels as
//! `x-forwarded-for`, which Envoy's connection manager (default `use_remote_address: false`)
//! turns into the downstream address the filter reads from `source.address`.

use anyhow::{Context, Result};
use serde_json::json;
use tollgate_e2e::{conformance, send, Envoy, EnvoySpec, Upstream};

const CLOCK: &str = "x-tollgate-test-now";

#[test]
fn envoy_reproduces_the_conformance_vectors() -> Result<()> {
    let vectors = conformance::load()?;
    let upstream = Upstream::start()?;
    let mut failures = Vec::new();
    let mut steps = 0;
    for case in &vectors.cases {
        let envoy = Envoy::start(&EnvoySpec {
            filter_config: json!({
                "policy": case.policy,
                "slots": 1024,
                "test_only": {"enabled": true, "clock_header": CLOCK}
            }),
            upstream_port: upstream.port,
            collector_port: None,
            policy_port: None,
            pre_filters: Vec::new(),
        })
        .with_context(|| format!("case {}", case.name))?;
        let agent = tollgate_e2e::client();
        for (i, step) in case.steps.iter().enumerate() {
            steps += 1;
            let at = step.at_ms.to_string();
            let headers = step.request_headers(CLOCK, &at, "x-forwarded-for");
            let response = send(&agent, &step.method, &envoy.url(&step.path), &headers)?;
            failures.extend(step.check(&case.name, i, &response));
        }
    }
    assert!(steps >= 20, "only {steps} steps replayed");
    assert!(
        failures.is_empty(),
        "{} step(s) differ through Envoy:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}
