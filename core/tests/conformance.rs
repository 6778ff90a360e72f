//! Replays `tests/conformance/vectors.json` through the core's edge flow (`Policy::gate`) with an
//! in-memory store, once with one entry per counter (as the Worker's Durable Object keeps them)
//! and once grouped by subject (as the Envoy filter's shared data does). The Envoy filter and the Worker end-to-end tests replay the same file over
//! HTTP; all three must produce exactly the statuses, headers and bodies written there.

use std::collections::BTreeMap;

use serde::Deserialize;
use tollgate_core::gate::{GateAction, GateOptions, HttpRequest};
use tollgate_core::{MemoryStore, Policy, Timestamp};

#[derive(Deserialize)]
struct Vectors {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    policy: serde_json::Value,
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
    cost: u64,
    expect: Expect,
    #[serde(default)]
    note: Option<String>,
}

#[derive(Deserialize, Debug, PartialEq)]
struct Expect {
    status: u16,
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: Option<String>,
}

fn respond(policy: &Policy, store: &mut MemoryStore, step: &Step) -> Expect {
    let lookup = |name: &str| step.headers.get(name).cloned();
    let req = HttpRequest {
        method: &step.method,
        path: &step.path,
        header: &lookup,
        client_ip: step.client_ip.as_deref(),
        claims: None,
        cost: step.cost,
    };
    let headers = |h: Vec<(&str, String)>| h.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    match policy.gate(
        &GateOptions::default(),
        &req,
        Timestamp::from_millis(step.at_ms),
        store,
    ) {
        GateAction::Skip => Expect {
            status: 200,
            headers: BTreeMap::new(),
            body: None,
        },
        GateAction::Status { body, .. } => Expect {
            status: 200,
            headers: BTreeMap::new(),
            body: Some(body),
        },
        GateAction::Proceed { headers: h, .. } => Expect {
            status: 200,
            headers: headers(h),
            body: None,
        },
        GateAction::Reject {
            status,
            headers: h,
            body,
            ..
        } => Expect {
            status,
            headers: headers(h),
            body: Some(body),
        },
    }
}

#[test]
fn core_matches_the_conformance_vectors() {
    let text = include_str!("conformance/vectors.json");
    let vectors: Vectors = serde_json::from_str(text).unwrap();
    assert!(vectors.cases.len() >= 4);
    let mut failures = Vec::new();
    for (layout, fresh) in [
        ("per counter", MemoryStore::new as fn() -> MemoryStore),
        ("grouped", MemoryStore::grouped),
    ] {
        for case in &vectors.cases {
            replay(case, layout, fresh(), &mut failures);
        }
    }
    assert!(
        failures.is_empty(),
        "{} step(s) differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn replay(case: &Case, layout: &str, mut store: MemoryStore, failures: &mut Vec<String>) {
    let policy = Policy::from_json(&case.policy.to_string())
        .unwrap_or_else(|e| panic!("case {}: {e}", case.name));
    for (i, step) in case.steps.iter().enumerate() {
        let mut got = respond(&policy, &mut store, step);
        if step.expect.body.is_none() {
            got.body = None; // the vector does not pin a body for this step
        }
        if got != step.expect {
            failures.push(format!(
                "{} ({layout}) step {i} ({} {}; {}):\n  expected {:?}\n  got      {:?}",
                case.name,
                step.method,
                step.path,
                step.note.as_deref().unwrap_or(""),
                step.expect,
                got
            ));
        }
    }
}
