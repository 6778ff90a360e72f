//! Callers identified by a verified JWT in the edge worker (HS256, secret `JWT_SECRET`): a good
//! token is the caller's identity and its own counter; a token signed with another key is no
//! identity (the caller falls back to its address).

use anyhow::{ensure, Result};
use serde_json::{json, Value};
use tollgate_e2e::workerd::{WorkerSpec, Wrangler, CLOCK_HEADER};
use tollgate_e2e::{jwt_hs256, scratch_dir, send, PolicyServer, Upstream};

const SECRET: &str = "e2e-jwt-secret";

#[test]
fn a_verified_jwt_identifies_the_caller_and_a_forged_one_does_not() -> Result<()> {
    let upstream = Upstream::start()?;
    let document = json!({
        "policy": {
            "version": 1,
            "rules": [{"name": "api", "algorithm": "fixed_window", "limit": 2, "window": "1h"}]
        },
        "jwt": {"issuer": "e2e"},
        "test_only": {"enabled": true, "clock_header": CLOCK_HEADER}
    });
    let config = PolicyServer::start(&document.to_string())?;
    let worker = Wrangler::start(&WorkerSpec {
        origin_port: upstream.port,
        config_port: Some(config.port),
        collector_port: None,
        state_dir: scratch_dir("worker-jwt")?,
        config_ttl_ms: 0,
        jwt_secret: Some(SECRET.into()),
    })?;
    let token = |secret: &str, sub: &str| {
        let claims = json!({"iss": "e2e", "sub": sub, "org": "jwt-org", "plan": "pro", "exp": 4_000_000_000u64});
        format!("Bearer {}", jwt_hs256(secret.as_bytes(), &claims))
    };
    let (u1, u2, forged) = (
        token(SECRET, "u1"),
        token(SECRET, "u2"),
        token("wrong", "u1"),
    );
    let now = "1800000000000";
    worker.await_config(
        &[("authorization", &u1), (CLOCK_HEADER, now)],
        |b: &Value| b["identity"]["user"] == "u1" && b["identity"]["org"] == "jwt-org",
    )?;
    let agent = tollgate_e2e::client();
    let get = |auth: &str| {
        send(
            &agent,
            "GET",
            &worker.url("/v1/items"),
            &[("authorization", auth), (CLOCK_HEADER, now)],
        )
    };
    let statuses: Vec<u16> = [&u1, &u1, &u1, &u2]
        .iter()
        .map(|auth| get(auth).map(|r| r.status))
        .collect::<Result<_>>()?;
    ensure!(
        statuses == [200, 200, 429, 200],
        "u1 ×3 then u2: {statuses:?}"
    );

    let status = send(
        &agent,
        "GET",
        &worker.url("/.well-known/ratelimit"),
        &[("authorization", &forged), (CLOCK_HEADER, now)],
    )?;
    let body: Value = serde_json::from_str(&status.body)?;
    ensure!(
        body["identity"]["user"] != "u1",
        "a forged token identified u1: {body}"
    );
    Ok(())
}
