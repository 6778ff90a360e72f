//! Replays the core's conformance vectors (`core/tests/conformance/vectors.json`) through the
//! edge worker in workerd (`wrangler dev`): every step's status, limiter headers and body must
//! be exactly what the file says, as they are through the Envoy filter (`filter_conformance`).
//!
//! The vectors carry fixed timestamps, so the worker runs with its test-only clock header
//! (`test_only.clock_header` in the config document, refused unless `enabled: true` is spelled
//! out). A step's `client_ip` travels as `CF-Connecting-IP`, the header the worker reads the
//! client address from. Each case gets a fresh runtime with its own state directory.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use tollgate_e2e::workerd::{WorkerSpec, Wrangler, CLOCK_HEADER};
use tollgate_e2e::{scratch_dir, send, workspace_root, PolicyServer, Upstream};

#[derive(Deserialize)]
struct Vectors {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    policy: Value,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct Step {
    at_ms: u64,
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    #[serde(default)]
    client_ip: Option<String>,
    #[serde(default)]
    note: Option<String>,
    expect: Expect,
}

#[derive(Deserialize, Debug, PartialEq)]
struct Expect {
    status: u16,
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: Option<String>,
}

#[test]
fn the_worker_reproduces_the_conformance_vectors() -> Result<()> {
    let path = workspace_root().join("core/tests/conformance/vectors.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let vectors: Vectors = serde_json::from_str(&text)?;
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
            let mut headers: Vec<(&str, &str)> = step
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            headers.push((CLOCK_HEADER, &at));
            if let Some(ip) = &step.client_ip {
                headers.push(("cf-connecting-ip", ip));
            }
            let response = send(&agent, &step.method, &worker.url(&step.path), &headers)?;
            let mut want_headers = step.expect.headers.clone();
            let want_type = want_headers.remove("content-type");
            let mut got = Expect {
                status: response.status,
                headers: response.limiter_headers(),
                body: step.expect.body.as_ref().map(|_| response.body.clone()),
            };
            if let Some(t) = want_type {
                if response.header("content-type") != Some(t.as_str()) {
                    got.headers.insert(
                        "content-type".into(),
                        format!("{:?}", response.header("content-type")),
                    );
                }
            }
            let want = Expect {
                status: step.expect.status,
                headers: want_headers,
                body: step.expect.body.clone(),
            };
            if got != want {
                failures.push(format!(
                    "{} step {i} ({} {}; {}):\n  expected {want:?}\n  got      {got:?}",
                    case.name,
                    step.method,
                    step.path,
                    step.note.as_deref().unwrap_or("")
                ));
            }
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
