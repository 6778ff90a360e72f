//! The edge worker under a bounded loopback load, in the real workerd (`wrangler dev --local`):
//! requests/s and p50/p99 latency through the worker with the limiter (every request decided
//! in its Durable Object) and without it (a skip path: the same worker forwards to the origin
//! with no decision), in one run.
//!
//! `wrangler dev` is a development server (one workerd process, with wrangler's proxy in front),
//! so the numbers bound what the code costs on one machine, not what Cloudflare's edge does.
//! Each line sends `REQUESTS` requests over `CONNECTIONS` keep-alive connections (closed loop),
//! after `WARMUP` requests; every caller is one of `KEYS` API keys across 16 orgs, with limits
//! too high to deny.
//!
//! Run: `cargo xtask test` first (it provisions wrangler and builds the bundle), then
//! `cargo bench -p tollgate-benches --bench edge_worker`. `TOLLGATE_BENCH_QUICK=1` shortens it.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_json::json;
use tollgate_e2e::workerd::{WorkerSpec, Wrangler};
use tollgate_e2e::{client, key_hash, scratch_dir, send, PolicyServer, Upstream};

const CONNECTIONS: usize = 8;
const KEYS: usize = 64;

fn main() -> Result<()> {
    let quick = std::env::var_os("TOLLGATE_BENCH_QUICK").is_some();
    let (warmup, requests) = if quick { (100, 400) } else { (500, 4_000) };
    let upstream = Upstream::start()?;
    let keys: Vec<_> = (0..KEYS)
        .map(|k| {
            json!({"id": format!("user{k}"), "hash": key_hash(&format!("sk_{k}")),
                   "org": format!("org{}", k % 16), "plan": "enterprise"})
        })
        .collect();
    let document = json!({
        "policy": {
            "version": 1,
            "keys": keys,
            "rules": [
                {"name": "user", "algorithm": "token_bucket", "limit": 1_000_000, "window": "1s", "burst": 1_000_000},
                {"name": "org", "scope": "org", "algorithm": "sliding_window", "limit": 100_000_000, "window": "1h"}
            ]
        },
        "gate": {"skip_paths": ["/unlimited"]}
    });
    let config = PolicyServer::start(&document.to_string())?;
    let worker = Wrangler::start(&WorkerSpec {
        origin_port: upstream.port,
        config_port: Some(config.port),
        collector_port: None,
        state_dir: scratch_dir("bench-edge-worker")?,
        config_ttl_ms: 10_000,
        jwt_secret: None,
    })?;
    worker.await_config(&[("x-api-key", "sk_0")], |b| b.get("limits").is_some())?;
    println!("edge_worker: {requests} requests over {CONNECTIONS} connections per line, after {warmup} warm-up");
    for (line, path) in [
        ("no limiter (skip path)", "/unlimited"),
        ("limiter (Durable Object)", "/v1/items"),
    ] {
        run(&worker, path, warmup)?;
        let (rps, p50, p99) = run(&worker, path, requests)?;
        println!("  {line:<26} {rps:>8.0} req/s   p50 {p50:>7.2} ms   p99 {p99:>7.2} ms");
    }
    Ok(())
}

/// Sends `total` requests; returns (requests/s, p50 ms, p99 ms).
fn run(worker: &Wrangler, path: &str, total: usize) -> Result<(f64, f64, f64)> {
    let url = worker.url(path);
    let per = total / CONNECTIONS;
    let started = Instant::now();
    let handles: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let url = url.clone();
            std::thread::spawn(move || -> Result<Vec<Duration>> {
                let agent = client();
                let mut latencies = Vec::with_capacity(per);
                for i in 0..per {
                    let key = format!("sk_{}", (c * per + i) % KEYS);
                    let t = Instant::now();
                    let r = send(&agent, "GET", &url, &[("x-api-key", &key)])?;
                    latencies.push(t.elapsed());
                    ensure!(r.status == 200, "status {}", r.status);
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(
            h.join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))??,
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct =
        |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1e3;
    Ok((all.len() as f64 / elapsed, pct(0.50), pct(0.99)))
}
