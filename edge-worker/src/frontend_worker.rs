//! The `fetch` handler: identify, decide in the caller's shard, answer or forward, then meter.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Duration;

use tollgate_core::event::{
    request_fingerprint, to_datetime, EdgeKind, EventIdGenerator, UsageEvent, NO_ORG,
};
use tollgate_core::gate::split_query;
use tollgate_core::policy::document::FailureMode;
use tollgate_core::{Timestamp, Verdict};
use worker::wasm_bindgen::JsValue;
use worker::{
    console_error, console_warn, event, Context, Delay, Env, Fetch, Headers, Method, Request,
    RequestInit, Response, ResponseBuilder, Result,
};

use crate::config::{EventSettings, WorkerConfig};
use crate::events::{Backoff, EventBuffer};
use crate::jwt;
use crate::runtime::{self, COUNTERS_DO};
use crate::shard::{GateInput, GateReply, ShardCall};

thread_local! {
    /// This isolate's usage events waiting for the collector.
    static EVENTS: RefCell<EventBuffer> = RefCell::new(EventBuffer::default());
    /// This isolate's event id generator, seeded from `crypto.getRandomValues` on first use.
    static IDS: RefCell<Option<EventIdGenerator>> = const { RefCell::new(None) };
    /// When this isolate's flusher started (ms), if one runs. A flusher older than the 30 s
    /// `waitUntil` limit was cancelled with the isolate's request and no longer counts.
    static FLUSHER: RefCell<Option<u64>> = const { RefCell::new(None) };
}

/// Longest a flusher keeps going: below the 30 s `waitUntil` limit.
const FLUSHER_BUDGET_MS: u64 = 25_000;

#[event(fetch)]
async fn fetch(req: Request, env: Env, ctx: Context) -> Result<Response> {
    let started_ms = worker::Date::now().as_millis();
    let Some(config) = runtime::config(&env, None).await else {
        console_warn!("tollgate: no configuration in KV yet; forwarding unlimited");
        return forward(&env, req, &[]).await;
    };
    let url = req.url()?;
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let method = req.method().to_string();
    let (bare_path, query) = split_query(&path);
    if config
        .document
        .gate
        .skip_paths
        .iter()
        .any(|p| p == bare_path)
    {
        return forward(&env, req, &[]).await;
    }

    let lookup = |name: &str| req.headers().get(name).ok().flatten();
    let now = config
        .clock_header()
        .and_then(|h| lookup(&h.to_ascii_lowercase()))
        .and_then(|ms| ms.trim().parse::<u64>().ok())
        .map_or_else(runtime::now, Timestamp::from_millis);
    let mut input = GateInput::new(&config.policy, &lookup, &method, &path);
    input.config_version = config.version;
    input.now_ns = now.as_nanos();
    input.client_ip = lookup("cf-connecting-ip");
    input.claims = verified_claims(&env, &config, &lookup, now);
    let identity = input.with_request(|r| {
        let mut key = None;
        config
            .policy
            .identify(&config.policy.credentials(r, &mut key))
    });
    let shard = config.shard_for(&identity);

    let reply = match call_shard(&env, &shard, &ShardCall::Gate(input.clone())).await {
        Ok(reply) => reply,
        Err(e) => {
            console_error!("tollgate: counter shard {shard} failed: {e}");
            match config.policy.failure_mode {
                FailureMode::Open => GateReply::Skip,
                FailureMode::Closed => {
                    return Response::error("rate limiter unavailable", 503);
                }
            }
        }
    };
    let request_bytes = lookup("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (response, verdict, rule, leases) = match reply {
        GateReply::Skip | GateReply::Done => (
            forward(&env, req, &[]).await?,
            Verdict::Allowed,
            None,
            Vec::new(),
        ),
        GateReply::Status { body } => {
            let headers = Headers::new();
            headers.set("content-type", "application/json")?;
            return Ok(ResponseBuilder::new()
                .with_status(200)
                .with_headers(headers)
                .fixed(body.into_bytes()));
        }
        GateReply::Reject {
            status,
            headers,
            body,
            verdict,
            rule,
        } => {
            let h = Headers::new();
            for (k, v) in &headers {
                h.append(k, v)?;
            }
            let response = ResponseBuilder::new()
                .with_status(status)
                .with_headers(h)
                .fixed(body.into_bytes());
            (response, verdict, rule, Vec::new())
        }
        GateReply::Proceed {
            headers,
            verdict,
            rule,
            leases,
        } => (forward(&env, req, &headers).await?, verdict, rule, leases),
    };

    let status = response.status_code();
    let charge = config
        .document
        .cost_header
        .as_deref()
        .and_then(|h| response.headers().get(h).ok().flatten())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&extra| extra > 0 && status < 400);
    let response_bytes = response
        .headers()
        .get("content-length")
        .ok()
        .flatten()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);

    // After the response: release leases and charge post-response cost in the shard.
    if !leases.is_empty() || charge.is_some() {
        let env2 = env.clone();
        let shard2 = shard.clone();
        let mut charge_input = input.clone();
        let version = config.version;
        ctx.wait_until(async move {
            let now_ns = runtime::now().as_nanos();
            if !leases.is_empty() {
                let call = ShardCall::Release {
                    config_version: version,
                    leases,
                    now_ns,
                };
                if let Err(e) = call_shard(&env2, &shard2, &call).await {
                    console_error!("tollgate: releasing leases failed: {e}");
                }
            }
            if let Some(extra) = charge {
                charge_input.cost = extra;
                charge_input.now_ns = now_ns;
                if let Err(e) = call_shard(&env2, &shard2, &ShardCall::Charge(charge_input)).await {
                    console_error!("tollgate: charging post-response cost failed: {e}");
                }
            }
        });
    }

    let event = UsageEvent {
        id: next_id(now),
        timestamp: to_datetime(now),
        org: identity.org.as_deref().unwrap_or(NO_ORG).to_string(),
        user: identity.user.as_deref().map(str::to_string),
        plan: identity.plan.to_string(),
        method: method.clone(),
        route: config.policy.route_for(bare_path).to_string(),
        status,
        latency_us: worker::Date::now()
            .as_millis()
            .saturating_sub(started_ms)
            .saturating_mul(1_000),
        request_bytes,
        response_bytes,
        cost: input.cost + charge.unwrap_or(0),
        decision: verdict,
        rule,
        edge: EdgeKind::Cloudflare,
        node: runtime::var_or(&env, "NODE", "cloudflare"),
        dimensions: BTreeMap::new(),
        metrics: BTreeMap::new(),
        fingerprint: Some(request_fingerprint(&method, bare_path, query)),
    };
    record(&env, &ctx, &config, event);
    Ok(response)
}

/// Claims of a verified JWT, when the config asks for JWTs and the `JWT_SECRET` secret is set.
fn verified_claims(
    env: &Env,
    config: &WorkerConfig,
    lookup: &dyn Fn(&str) -> Option<String>,
    now: Timestamp,
) -> Option<crate::shard::OwnedClaims> {
    let jwt_config = config.document.jwt.as_ref()?;
    let value = lookup(&jwt_config.header.to_ascii_lowercase())?;
    let token = jwt::bearer(&value)?;
    let secret = env.secret("JWT_SECRET").ok()?.to_string();
    jwt::verify(
        token,
        secret.as_bytes(),
        jwt_config,
        now.as_millis() / 1_000,
    )
}

/// Sends one call to the shard's Durable Object.
async fn call_shard(env: &Env, shard: &str, call: &ShardCall) -> Result<GateReply> {
    let stub = env
        .durable_object(COUNTERS_DO)?
        .id_from_name(shard)?
        .get_stub()?;
    let body = serde_json::to_string(call).map_err(|e| worker::Error::RustError(e.to_string()))?;
    let mut init = RequestInit::new();
    init.with_method(Method::Post)
        .with_body(Some(JsValue::from_str(&body)));
    let request = Request::new_with_init("https://counter-shard/", &init)?;
    let mut response = stub.fetch_with_request(request).await?;
    let text = response.text().await?;
    if response.status_code() != 200 {
        return Err(worker::Error::RustError(format!(
            "status {}: {text}",
            response.status_code()
        )));
    }
    serde_json::from_str(&text).map_err(|e| worker::Error::RustError(e.to_string()))
}

/// Forwards `req` to `ORIGIN_URL` (same method, path, query, headers and body) and adds
/// `extra` headers to the origin's response.
async fn forward(env: &Env, mut req: Request, extra: &[(String, String)]) -> Result<Response> {
    let origin = runtime::var_or(env, "ORIGIN_URL", "");
    let mut url = worker::Url::parse(&origin)
        .map_err(|e| worker::Error::RustError(format!("ORIGIN_URL {origin:?}: {e}")))?;
    let incoming = req.url()?;
    url.set_path(incoming.path());
    url.set_query(incoming.query());
    let method = req.method();
    let headers = Headers::new();
    for (k, v) in req.headers().entries() {
        headers.append(&k, &v)?;
    }
    let mut init = RequestInit::new();
    init.with_method(method.clone()).with_headers(headers);
    if !matches!(method, Method::Get | Method::Head) {
        let body = req.bytes().await?;
        if !body.is_empty() {
            init.with_body(Some(
                worker::js_sys::Uint8Array::from(body.as_slice()).into(),
            ));
        }
    }
    let upstream = Fetch::Request(Request::new_with_init(url.as_str(), &init)?)
        .send()
        .await?;
    // A fetched response's headers are immutable: copy them, then add ours.
    let status = upstream.status_code();
    let headers = Headers::new();
    for (k, v) in upstream.headers().entries() {
        headers.append(&k, &v)?;
    }
    for (k, v) in extra {
        headers.set(k, v)?;
    }
    let (_, body) = upstream.into_parts();
    Ok(ResponseBuilder::new()
        .with_status(status)
        .with_headers(headers)
        .body(body))
}

fn next_id(now: Timestamp) -> uuid::Uuid {
    IDS.with(|ids| {
        ids.borrow_mut()
            .get_or_insert_with(|| EventIdGenerator::new(runtime::random_seed()))
            .next_id(now)
    })
}

/// Queues the event and makes sure a flusher runs in this isolate.
fn record(env: &Env, ctx: &Context, config: &WorkerConfig, event: UsageEvent) {
    let Ok(collector) = env.var("COLLECTOR_URL").map(|v| v.to_string()) else {
        return;
    };
    if collector.is_empty() {
        return;
    }
    let settings = config.document.events.clone();
    EVENTS.with(|b| b.borrow_mut().push(event, settings.buffer_cap));
    let now_ms = worker::Date::now().as_millis();
    let start = FLUSHER.with(|f| {
        let mut f = f.borrow_mut();
        let idle = f.is_none_or(|since| now_ms.saturating_sub(since) > 30_000);
        if idle {
            *f = Some(now_ms);
        }
        idle
    });
    if start {
        let token = env.secret("COLLECTOR_TOKEN").ok().map(|s| s.to_string());
        ctx.wait_until(flush(collector, token, settings, now_ms));
    }
}

/// Sends batches until the buffer is empty or the budget is spent; a batch is retried with
/// backoff, the same events (same ids) each time.
async fn flush(collector: String, token: Option<String>, settings: EventSettings, started_ms: u64) {
    Delay::from(Duration::from_millis(settings.flush_delay_ms)).await;
    let backoff = Backoff::new(&settings);
    let seed = runtime::random_seed();
    'batches: while let Some(batch) =
        EVENTS.with(|b| b.borrow_mut().take_batch(settings.batch_size))
    {
        let body = batch.to_json();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match post(&collector, token.as_deref(), &body).await {
                Ok(status) if (200..300).contains(&status) => {
                    let n = batch.events.len() as u64;
                    EVENTS.with(|b| b.borrow_mut().sent += n);
                    break;
                }
                Ok(status) if status != 429 && (400..500).contains(&status) => {
                    // The collector will never take this batch: drop it, counted.
                    console_error!("tollgate: collector refused a batch with {status}; dropped");
                    let n = batch.events.len() as u64;
                    EVENTS.with(|b| b.borrow_mut().dropped += n);
                    break;
                }
                outcome => {
                    let wait = backoff.delay_ms(attempt, seed.wrapping_add(u64::from(attempt)));
                    let spent = worker::Date::now().as_millis().saturating_sub(started_ms);
                    if attempt >= settings.max_attempts || spent + wait > FLUSHER_BUDGET_MS {
                        console_error!(
                            "tollgate: collector unavailable ({outcome:?}); keeping the batch for later"
                        );
                        EVENTS.with(|b| b.borrow_mut().put_back(batch, settings.buffer_cap));
                        break 'batches;
                    }
                    Delay::from(Duration::from_millis(wait)).await;
                }
            }
        }
    }
    FLUSHER.with(|f| *f.borrow_mut() = None);
}

async fn post(url: &str, token: Option<&str>, body: &str) -> Result<u16> {
    let headers = Headers::new();
    headers.set("content-type", "application/json")?;
    if let Some(token) = token {
        headers.set("authorization", &format!("Bearer {token}"))?;
    }
    let mut init = RequestInit::new();
    init.with_method(Method::Post)
        .with_headers(headers)
        .with_body(Some(JsValue::from_str(body)));
    let mut response = Fetch::Request(Request::new_with_init(url, &init)?)
        .send()
        .await?;
    let _ = response.text().await;
    Ok(response.status_code())
}
