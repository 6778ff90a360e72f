//! The filter's decisions through the real Envoy (`--concurrency 2`): exact enforcement under
//! concurrent load across both workers (one tier, and two tiers of one caller), every algorithm, tiers, shadow mode, overrides, bypass,
//! the failure mode, the status path, weighted cost and a rejected configuration.

use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};
use tollgate_e2e::{
    eventually, key_hash, load, send, tally, Envoy, EnvoySpec, FakeCollector, Response, Upstream,
};

fn start(policy: Value, extra: Value) -> Result<(Envoy, Upstream)> {
    let upstream = Upstream::start()?;
    let mut config = json!({"policy": policy, "slots": 4096});
    if let (Some(c), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    let envoy = Envoy::start(&EnvoySpec {
        filter_config: config,
        upstream_port: upstream.port,
        collector_port: None,
        policy_port: None,
        pre_filters: Vec::new(),
    })?;
    Ok((envoy, upstream))
}

fn get(envoy: &Envoy, path: &str, headers: &[(&str, &str)]) -> Result<Response> {
    send(&tollgate_e2e::client(), "GET", &envoy.url(path), headers)
}

fn statuses(envoy: &Envoy, n: usize, headers: &[(&str, &str)]) -> Result<Vec<u16>> {
    let agent = tollgate_e2e::client();
    (0..n)
        .map(|_| Ok(send(&agent, "GET", &envoy.url("/v1/items"), headers)?.status))
        .collect()
}

/// API keys `sk_alice` and `sk_bob`, on the enterprise plan (no built-in limits of its own).
fn alice_and_bob() -> Value {
    json!([
        {"id": "alice", "hash": key_hash("sk_alice"), "plan": "enterprise"},
        {"id": "bob", "hash": key_hash("sk_bob"), "plan": "enterprise"}
    ])
}

/// Both of Envoy's workers served connections (so the load crossed VMs), and the filter's stats
/// come to `expected` (stats reach the admin page on the next tick: waited for).
fn both_workers_served_and_stats_are(envoy: &Envoy, expected: &[(&str, u64)]) -> Result<()> {
    let workers = envoy.worker_connections()?;
    assert!(
        workers.iter().all(|&n| n > 0),
        "both workers must have served connections: {workers:?}"
    );
    eventually(Duration::from_secs(5), || {
        let got = expected
            .iter()
            .map(|(name, _)| Ok((*name, envoy.stat(name)?)))
            .collect::<Result<Vec<_>>>()?;
        anyhow::ensure!(got == expected, "stats {got:?}, expected {expected:?}");
        Ok(())
    })
}

#[test]
fn exact_enforcement_per_key_under_concurrent_load_across_both_workers() -> Result<()> {
    const LIMIT: usize = 50;
    let policy = json!({
        "version": 1,
        "keys": alice_and_bob(),
        "rules": [{"name": "per_key", "algorithm": "fixed_window", "limit": LIMIT, "window": "1h"}]
    });
    let (envoy, upstream) = start(policy, json!({}))?;
    // 25 connections, 300 requests, alternating keys: 150 per key for 50 allowed each.
    let port = envoy.port;
    let responses = load(25, 12, move |agent, i| {
        let key = if i % 2 == 0 { "sk_alice" } else { "sk_bob" };
        send(
            agent,
            "GET",
            &format!("http://127.0.0.1:{port}/v1/items"),
            &[("x-api-key", key)],
        )
    });
    let responses = match responses {
        Ok(r) => r,
        Err(e) => {
            let stats = envoy.stats()?;
            let active: Vec<_> = stats
                .iter()
                .filter(|(k, v)| {
                    **v > 0
                        && (k.contains("rq_active")
                            || k.contains("pending")
                            || k.contains("timeout")
                            || k.contains("cx_active")
                            || k.contains("rq_total"))
                })
                .collect();
            eprintln!("upstream hits {}; stats {active:?}", upstream.hits());
            return Err(e);
        }
    };
    let per_key = |parity: usize| {
        let subset: Vec<Response> = responses
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == parity)
            .map(|(_, r)| r.clone())
            .collect();
        tally(&subset)
    };
    for parity in [0, 1] {
        let t = per_key(parity);
        assert_eq!(t.get(&200).copied(), Some(LIMIT), "key {parity}: {t:?}");
        assert_eq!(
            t.get(&429).copied(),
            Some(150 - LIMIT),
            "key {parity}: {t:?}"
        );
    }
    assert_eq!(
        upstream.hits(),
        2 * LIMIT,
        "denied requests never reach the upstream"
    );
    both_workers_served_and_stats_are(&envoy, &[("allowed", 2 * LIMIT as u64), ("limited", 200)])
}

/// A caller's tiers share one shared-data entry and are decided together, with one CAS write per
/// request. Under concurrent load from both workers each caller gets exactly its budget (a lost
/// update would grant more) and the endpoint never more than its limit. (That a request the
/// endpoint denies gives its budget unit back in that same write, never holding it, is shown by
/// the core's `grouped_denial_refunds_the_tiers_of_the_same_subject`: the window a separate
/// refund leaves is too short for a load test to hit reliably.)
#[test]
fn tiers_of_one_caller_are_decided_together_under_concurrent_load() -> Result<()> {
    const BUDGET: usize = 60;
    const ITEMS: usize = 25;
    let policy = json!({
        "version": 1,
        "keys": alice_and_bob(),
        "rules": [
            {"name": "budget", "algorithm": "fixed_window", "limit": BUDGET, "window": "1h"},
            {"name": "items", "algorithm": "fixed_window", "limit": ITEMS, "window": "1h",
             "endpoint": {"method": "GET", "path": "/v1/items"}}
        ]
    });
    let (envoy, upstream) = start(policy, json!({}))?;
    // 300 requests from 25 connections: per key 75 to the endpoint and 75 elsewhere.
    let port = envoy.port;
    let responses = load(25, 12, move |agent, i| {
        let key = if i % 2 == 0 { "sk_alice" } else { "sk_bob" };
        let path = if (i / 2) % 2 == 0 {
            "/v1/items"
        } else {
            "/v1/other"
        };
        send(
            agent,
            "GET",
            &format!("http://127.0.0.1:{port}{path}"),
            &[("x-api-key", key)],
        )
    })?;
    for parity in [0, 1] {
        let mine: Vec<(usize, &Response)> = responses
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == parity)
            .collect();
        let allowed = |items: bool| {
            mine.iter()
                .filter(|(i, r)| ((i / 2) % 2 == 0) == items && r.status == 200)
                .count()
        };
        let (items, other) = (allowed(true), allowed(false));
        assert_eq!(items + other, BUDGET, "key {parity}: {items} + {other}");
        assert!(
            items <= ITEMS,
            "key {parity}: {items} endpoint requests allowed"
        );
        let limited = mine.iter().filter(|(_, r)| r.status == 429).count();
        assert_eq!(limited, 150 - BUDGET, "key {parity}");
    }
    assert_eq!(upstream.hits(), 2 * BUDGET);
    both_workers_served_and_stats_are(&envoy, &[("allowed", 2 * BUDGET as u64), ("fail_open", 0)])
}

/// Limit 3 for every algorithm: three requests pass, the next two are denied.
#[test]
fn each_algorithm_through_envoy() -> Result<()> {
    let rules: Vec<Value> = [
        ("tb", json!({"algorithm": "token_bucket", "window": "1h"})),
        ("gcra", json!({"algorithm": "gcra", "window": "1h"})),
        ("fw", json!({"algorithm": "fixed_window", "window": "1h"})),
        ("sw", json!({"algorithm": "sliding_window", "window": "1h"})),
        ("sl", json!({"algorithm": "sliding_log", "window": "1h"})),
        (
            "cq",
            json!({"algorithm": "calendar_quota", "period": "month"}),
        ),
    ]
    .into_iter()
    .map(|(name, mut rule)| {
        rule["name"] = json!(name);
        rule["limit"] = json!(3);
        rule["endpoint"] = json!({"path": format!("/{name}")});
        rule
    })
    .collect();
    let mut all = rules.clone();
    all.push(
        json!({"name": "conc", "algorithm": "concurrency", "limit": 2,
                    "endpoint": {"path": "/conc"}}),
    );
    let (envoy, _upstream) = start(json!({"version": 1, "rules": all}), json!({}))?;
    let agent = tollgate_e2e::client();
    for rule in &rules {
        let name = rule["name"].as_str().unwrap_or_default();
        let got: Vec<u16> = (0..5)
            .map(|_| Ok(send(&agent, "GET", &envoy.url(&format!("/{name}")), &[])?.status))
            .collect::<Result<_>>()?;
        assert_eq!(got, [200, 200, 200, 429, 429], "{name}");
    }
    // Concurrency: 4 requests held open by a slow upstream, 2 in flight allowed.
    let port = envoy.port;
    let held = load(4, 1, move |agent, _| {
        send(
            agent,
            "GET",
            &format!("http://127.0.0.1:{port}/conc"),
            &[("x-test-delay-ms", "1500")],
        )
    })?;
    assert_eq!(tally(&held).get(&200), Some(&2), "{:?}", tally(&held));
    assert_eq!(tally(&held).get(&429), Some(&2), "{:?}", tally(&held));
    // Leases were released when those requests ended.
    assert_eq!(get(&envoy, "/conc", &[])?.status, 200);
    Ok(())
}

/// Global, org, plan and endpoint tiers: the tightest one denies and is named.
#[test]
fn tier_precedence() -> Result<()> {
    let policy = json!({
        "version": 1,
        "plans": {"pro": {"limits": [
            {"name": "hourly", "algorithm": "fixed_window", "limit": 10, "window": "1h"}
        ]}},
        "keys": [
            {"id": "k1", "hash": key_hash("sk_1"), "org": "acme", "plan": "pro"},
            {"id": "k2", "hash": key_hash("sk_2"), "org": "acme", "plan": "pro"},
            {"id": "k3", "hash": key_hash("sk_3"), "org": "other", "plan": "pro"}
        ],
        "rules": [
            {"name": "global", "scope": "global", "algorithm": "fixed_window", "limit": 100, "window": "1h"},
            {"name": "org", "scope": "org", "algorithm": "fixed_window", "limit": 4, "window": "1h"},
            {"name": "search", "algorithm": "fixed_window", "limit": 1, "window": "1h",
             "endpoint": {"method": "GET", "path": "/v1/search"}}
        ]
    });
    let (envoy, _upstream) = start(policy, json!({}))?;
    // The endpoint tier is the tightest on its endpoint.
    assert_eq!(
        get(&envoy, "/v1/search", &[("x-api-key", "sk_1")])?.status,
        200
    );
    let denied = get(&envoy, "/v1/search", &[("x-api-key", "sk_1")])?;
    assert_eq!(denied.status, 429);
    assert!(denied.body.contains("Rule 'search'"), "{}", denied.body);
    // The org tier: k1 and k2 share acme's 4 (one already spent on /v1/search).
    assert_eq!(statuses(&envoy, 2, &[("x-api-key", "sk_1")])?, [200, 200]);
    assert_eq!(statuses(&envoy, 2, &[("x-api-key", "sk_2")])?, [200, 429]);
    let denied = get(&envoy, "/v1/items", &[("x-api-key", "sk_2")])?;
    assert!(denied.body.contains("Rule 'org'"), "{}", denied.body);
    // Another org is not affected; its plan's hourly limit shows in the headers.
    let ok = get(&envoy, "/v1/items", &[("x-api-key", "sk_3")])?;
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.header("x-ratelimit-limit"),
        Some("4"),
        "{:?}",
        ok.headers
    );
    assert_eq!(ok.header("x-ratelimit-remaining"), Some("3"));
    let ietf = ok.header("ratelimit-policy").unwrap_or_default();
    assert!(ietf.contains("\"pro.hourly\";q=10"), "{ietf}");
    Ok(())
}

#[test]
fn shadow_rules_never_block_but_are_reported() -> Result<()> {
    let upstream = Upstream::start()?;
    let collector = FakeCollector::start(0)?;
    let envoy = Envoy::start(&EnvoySpec {
        filter_config: json!({
            "policy": {"version": 1, "rules": [
                {"name": "trial", "algorithm": "fixed_window", "limit": 2, "window": "1h",
                 "mode": "shadow"}
            ]},
            "flush_interval_ms": 100
        }),
        upstream_port: upstream.port,
        collector_port: Some(collector.port),
        policy_port: None,
        pre_filters: Vec::new(),
    })?;
    assert_eq!(statuses(&envoy, 5, &[])?, [200; 5]);
    assert_eq!(upstream.hits(), 5);
    let r = get(&envoy, "/v1/items", &[])?;
    let shown = r.header("ratelimit-policy").unwrap_or_default();
    assert!(
        !shown.contains("trial"),
        "shadow rules stay out of headers: {shown}"
    );
    eventually(Duration::from_secs(5), || {
        let shadow = envoy.stat("shadow_limited")?;
        anyhow::ensure!(shadow == 4, "shadow_limited = {shadow}");
        Ok(())
    })?;
    // ...and reported in usage events, naming the rule.
    eventually(Duration::from_secs(10), || {
        let (total, shadowed) = collector.with_log(|l| {
            let shadowed = l
                .events
                .values()
                .filter(|e| e["decision"] == "shadow_limited" && e["rule"] == "trial")
                .count();
            (l.events.len(), shadowed)
        });
        anyhow::ensure!(
            (total, shadowed) == (6, 4),
            "events {total}, shadow-limited {shadowed}"
        );
        Ok(())
    })
}

#[test]
fn an_override_lifts_a_limit_and_a_bypass_credential_skips_it() -> Result<()> {
    let policy = json!({
        "version": 1,
        "keys": [
            {"id": "capped", "hash": key_hash("sk_capped"), "plan": "enterprise"},
            {"id": "vip", "hash": key_hash("sk_vip"), "plan": "enterprise"}
        ],
        "rules": [{"name": "api", "algorithm": "fixed_window", "limit": 2, "window": "1h"}],
        "overrides": [{"subject": "user:vip", "rule": "api", "unlimited": true,
                       "expires_at": "2099-01-01T00:00:00Z", "reason": "e2e"}],
        "bypass": [{"name": "loadtest", "hash": key_hash("let-me-through")}]
    });
    let (envoy, _upstream) = start(policy, json!({}))?;
    assert_eq!(
        statuses(&envoy, 3, &[("x-api-key", "sk_capped")])?,
        [200, 200, 429]
    );
    assert_eq!(statuses(&envoy, 5, &[("x-api-key", "sk_vip")])?, [200; 5]);
    let bypassed = get(
        &envoy,
        "/v1/items",
        &[
            ("x-api-key", "sk_capped"),
            ("x-tollgate-bypass", "let-me-through"),
        ],
    )?;
    assert_eq!(bypassed.status, 200);
    assert!(
        bypassed.limiter_headers().is_empty(),
        "{:?}",
        bypassed.headers
    );
    let wrong = get(
        &envoy,
        "/v1/items",
        &[("x-api-key", "sk_capped"), ("x-tollgate-bypass", "guess")],
    )?;
    assert_eq!(wrong.status, 429);
    eventually(Duration::from_secs(5), || {
        anyhow::ensure!(envoy.stat("bypassed")? == 1, "bypassed stat");
        Ok(())
    })
}

#[test]
fn failure_mode_open_lets_through_and_closed_denies_with_503() -> Result<()> {
    let rule = json!([{"name": "api", "algorithm": "fixed_window", "limit": 1, "window": "1h"}]);
    let inject = json!({"test_only": {"enabled": true, "fail_store": true}});
    let (open, _u1) = start(json!({"version": 1, "rules": rule}), inject.clone())?;
    assert_eq!(statuses(&open, 3, &[])?, [200; 3]);
    eventually(Duration::from_secs(5), || {
        anyhow::ensure!(open.stat("fail_open")? >= 3, "fail_open stat");
        Ok(())
    })?;
    let (closed, upstream) = start(
        json!({"version": 1, "rules": rule, "failure_mode": "closed"}),
        inject,
    )?;
    let r = get(&closed, "/v1/items", &[])?;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("unavailable"), "{}", r.body);
    assert_eq!(upstream.hits(), 0);
    eventually(Duration::from_secs(5), || {
        anyhow::ensure!(closed.stat("fail_closed")? == 1, "fail_closed stat");
        Ok(())
    })
}

#[test]
fn the_status_path_answers_without_consuming() -> Result<()> {
    let policy = json!({"version": 1, "rules": [
        {"name": "api", "algorithm": "fixed_window", "limit": 3, "window": "1h"}
    ]});
    let (envoy, upstream) = start(policy, json!({}))?;
    assert_eq!(statuses(&envoy, 1, &[])?, [200]);
    for _ in 0..3 {
        let s = get(&envoy, "/.well-known/ratelimit", &[])?;
        assert_eq!(s.status, 200);
        assert_eq!(s.header("content-type"), Some("application/json"));
        let body: Value = serde_json::from_str(&s.body)?;
        let api = body["limits"]
            .as_array()
            .and_then(|l| l.iter().find(|r| r["rule"] == "api"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(api["remaining"], 2, "{body}");
    }
    assert_eq!(
        upstream.hits(),
        1,
        "the status path never reaches the upstream"
    );
    // Skip paths are neither limited nor decorated.
    for _ in 0..5 {
        let h = get(&envoy, "/healthz", &[])?;
        assert_eq!(h.status, 200);
        assert!(h.limiter_headers().is_empty());
    }
    assert_eq!(statuses(&envoy, 3, &[])?, [200, 200, 429]);
    Ok(())
}

#[test]
fn a_weighted_cost_header_is_charged_after_the_response() -> Result<()> {
    let policy = json!({
        "version": 1,
        "keys": [{"id": "llm", "hash": key_hash("sk_llm"), "plan": "enterprise"}],
        "rules": [{"name": "tokens", "algorithm": "fixed_window", "limit": 100, "window": "1h"}]
    });
    let (envoy, _upstream) = start(policy, json!({"cost_header": "x-usage-tokens"}))?;
    let get = |path: &str, tokens: &[(&'static str, &'static str)]| {
        let mut headers = vec![("x-api-key", "sk_llm")];
        headers.extend_from_slice(tokens);
        send(&tollgate_e2e::client(), "GET", &envoy.url(path), &headers)
    };
    let first = get("/v1/chat", &[("x-test-usage-tokens", "60")])?;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.header("x-ratelimit-remaining"),
        Some("99"),
        "charged after"
    );
    let second = get("/v1/chat", &[("x-test-usage-tokens", "30")])?;
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-ratelimit-remaining"), Some("39"));
    let third = get("/v1/chat", &[("x-test-usage-tokens", "30")])?;
    assert_eq!(third.header("x-ratelimit-remaining"), Some("9"));
    // 100 tokens spent: the next request is denied.
    assert_eq!(get("/v1/chat", &[])?.status, 429);
    Ok(())
}

#[test]
fn a_bad_configuration_is_rejected_at_load_naming_the_field() -> Result<()> {
    let upstream = Upstream::start()?;
    let log = Envoy::start_expecting_rejection(&EnvoySpec {
        filter_config: json!({"policy": {"version": 1, "rules": [
            {"name": "api", "algorithm": "gcra", "limit": 5}
        ]}}),
        upstream_port: upstream.port,
        collector_port: None,
        policy_port: None,
        pre_filters: Vec::new(),
    })?;
    assert!(
        log.contains("tollgate: invalid configuration at policy.rules[0].window"),
        "log:\n{log}"
    );
    Ok(())
}

/// Claims verified by Envoy's own `jwt_authn` identify the caller (user, org, plan); a token
/// that fails verification never reaches the filter.
#[test]
fn verified_jwt_claims_identify_the_caller() -> Result<()> {
    let secret = b"e2e-shared-secret-0123456789abcdef";
    let upstream = Upstream::start()?;
    let policy = json!({
        "version": 1,
        "plans": {"pro": {"limits": [
            {"name": "hourly", "algorithm": "fixed_window", "limit": 3, "window": "1h"}
        ]}}
    });
    let envoy = Envoy::start(&EnvoySpec {
        filter_config: json!({"policy": policy, "slots": 1024}),
        upstream_port: upstream.port,
        collector_port: None,
        policy_port: None,
        pre_filters: vec![tollgate_e2e::jwt_authn_filter(
            "tollgate-e2e",
            secret,
            "jwt_payload",
        )],
    })?;
    let claims = json!({"iss": "tollgate-e2e", "sub": "user-42", "org": "acme", "plan": "pro",
                        "exp": 4_102_444_800u64});
    let token = tollgate_e2e::jwt_hs256(secret, &claims);
    let bearer = format!("Bearer {token}");
    let auth = [("authorization", bearer.as_str())];
    let status = get(&envoy, "/.well-known/ratelimit", &auth)?;
    let body: Value = serde_json::from_str(&status.body)?;
    assert_eq!(
        body["identity"],
        json!({"kind": "jwt", "user": "user-42", "org": "acme", "plan": "pro"}),
        "{body}"
    );
    assert_eq!(statuses(&envoy, 4, &auth)?, [200, 200, 200, 429]);
    let denied = get(&envoy, "/v1/items", &auth)?;
    assert!(denied.body.contains("Rule 'pro.hourly'"), "{}", denied.body);
    // A forged token is refused by jwt_authn, never trusted as claims.
    let forged = tollgate_e2e::jwt_hs256(b"not-the-secret", &claims);
    let forged = format!("Bearer {forged}");
    assert_eq!(
        get(&envoy, "/v1/items", &[("authorization", forged.as_str())])?.status,
        401
    );
    // Without a token the caller is known by address, on the anonymous plan.
    let anon = get(&envoy, "/.well-known/ratelimit", &[])?;
    let body: Value = serde_json::from_str(&anon.body)?;
    assert_eq!(body["identity"]["kind"], "client_ip", "{body}");
    Ok(())
}
