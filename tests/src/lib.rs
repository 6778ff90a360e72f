//! Harness for end-to-end tests: spawns the real programs on free loopback ports.
//!
//! - [`Envoy`]: the real Envoy (the one `cargo xtask test` provisions) with `--concurrency 2`,
//!   loading the filter's wasm, in front of an [`Upstream`] and a [`FakeCollector`].
//! - Readiness and assertions poll with a bound ([`eventually`]); nothing sleeps for
//!   correctness. Children are killed and servers stopped on `Drop`.
//! - Everything listens on and talks to 127.0.0.1 only; every load loop is bounded.
//!
//! The tests need the filter built for wasm32 and Envoy installed. `cargo xtask test` does both
//! and passes their paths in `TOLLGATE_FILTER_WASM` and `TOLLGATE_ENVOY`; without them the
//! harness looks in the usual places and otherwise fails, saying to run `cargo xtask test`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The core's conformance vectors, as the end-to-end tests replay them.
pub mod conformance;
/// The edge worker in workerd (`wrangler dev`), for the `worker_*` tests.
pub mod workerd;

/// Set by `cargo xtask test`: the filter's `.wasm`.
pub const FILTER_WASM_VAR: &str = "TOLLGATE_FILTER_WASM";
/// Set by `cargo xtask test`: the Envoy binary.
pub const ENVOY_VAR: &str = "TOLLGATE_ENVOY";

const RUN_XTASK: &str = "run `cargo xtask test` (it installs Envoy, builds the filter for wasm32 \
                         and runs these tests with both)";

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The filter's wasm: `$TOLLGATE_FILTER_WASM`, else the `release-wasm` build output, else
/// `dist/`. Fails (never skips) when there is none.
pub fn filter_wasm() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(FILTER_WASM_VAR) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!(
            "{FILTER_WASM_VAR}={} does not exist; {RUN_XTASK}",
            path.display()
        );
    }
    let root = workspace_root();
    for candidate in [
        "target/wasm32-unknown-unknown/release-wasm/tollgate_filter.wasm",
        "target/wasm-debian/wasm32-unknown-unknown/release-wasm/tollgate_filter.wasm",
        "dist/tollgate_filter.wasm",
    ] {
        let path = root.join(candidate);
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!("the filter's wasm is not built; {RUN_XTASK}")
}

/// The Envoy binary: `$TOLLGATE_ENVOY`, else the one in the project's venv. Fails (never
/// skips) when there is none.
pub fn envoy_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(ENVOY_VAR) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("{ENVOY_VAR}={} does not exist; {RUN_XTASK}", path.display());
    }
    let lib = workspace_root().join("target/tools/venv/lib");
    if let Ok(entries) = std::fs::read_dir(&lib) {
        for entry in entries.flatten() {
            let binary = entry.path().join("site-packages/envoy/_bin/envoy");
            if binary.is_file() {
                return Ok(binary);
            }
        }
    }
    bail!("Envoy is not installed; {RUN_XTASK}")
}

/// A free loopback port (bound, read, released), never one this process handed out before.
///
/// The kernel may give a just-released port to the next `bind(0)`: CI once saw Envoy's admin and
/// listener ports come out equal, so Envoy could not bind its listener.
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    for _ in 0..64 {
        let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
        let port = listener.local_addr()?.port();
        let mut handed_out = HANDED_OUT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    bail!("64 loopback ports in a row were ones this test process already used")
}

/// Polls `check` every 25 ms until it succeeds or `within` passes; the last error explains.
pub fn eventually<T>(within: Duration, mut check: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        match check() {
            Ok(value) => return Ok(value),
            Err(error) if Instant::now() >= deadline => {
                return Err(error.context(format!("still failing after {within:?}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(25)),
        }
    }
}

static SCRATCH: AtomicU64 = AtomicU64::new(0);

/// A fresh scratch directory for one test's files.
pub fn scratch_dir(name: &str) -> Result<PathBuf> {
    let n = SCRATCH.fetch_add(1, Ordering::SeqCst);
    let dir = workspace_root()
        .join("target/e2e")
        .join(format!("{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

// ---------------------------------------------------------------------------------------------
// HTTP servers

/// A minimal HTTP/1.1 server: a thread per connection, keep-alive, `content-length` bodies
/// (all Envoy sends here). Written out rather than taken from a crate so that its behaviour
/// under many concurrent keep-alive connections is plain to see.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// A request as the handlers see it.
pub struct HttpRequest {
    /// Method.
    pub method: String,
    /// Path with query.
    pub path: String,
    /// Headers, lower-case names.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl HttpRequest {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

type Handler = Arc<dyn Fn(&HttpRequest) -> Reply + Send + Sync>;

/// What a handler answers.
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
    /// Wait this long first.
    pub delay: Duration,
}

impl Reply {
    /// `status` with `body`.
    pub fn new(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

fn read_request(reader: &mut impl std::io::BufRead) -> Option<HttpRequest> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    std::io::Read::read_exact(reader, &mut body).ok()?;
    Some(HttpRequest {
        method,
        path,
        headers,
        body,
    })
}

fn serve_connection(stream: TcpStream, handler: Handler, stop: Arc<AtomicBool>) {
    use std::io::Write;
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut writer = std::io::BufWriter::new(write_half);
    let mut reader = std::io::BufReader::new(stream);
    loop {
        // Wait for the next request, noticing a stop between requests.
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            match std::io::BufRead::fill_buf(&mut reader) {
                Ok([]) => return,
                Ok(_) => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(_) => return,
            }
        }
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(5)));
        let Some(request) = read_request(&mut reader) else {
            return;
        };
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)));
        let reply = handler(&request);
        if !reply.delay.is_zero() {
            std::thread::sleep(reply.delay);
        }
        let reason = match reply.status {
            200 => "OK",
            304 => "Not Modified",
            400 => "Bad Request",
            503 => "Service Unavailable",
            _ => "Status",
        };
        let mut head = format!("HTTP/1.1 {} {reason}\r\n", reply.status);
        for (k, v) in &reply.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if reply.status != 304 {
            head.push_str(&format!("content-length: {}\r\n", reply.body.len()));
        }
        head.push_str("\r\n");
        let written = writer
            .write_all(head.as_bytes())
            .and_then(|()| writer.write_all(reply.body.as_bytes()))
            .and_then(|()| writer.flush());
        if written.is_err() {
            return;
        }
    }
}

impl Server {
    /// Serves on a port the kernel picks, returned with it. The listener is kept from bind to
    /// serve: a port found free and bound again later can be taken in between by another test's
    /// process (CI once lost an upstream's port to a parallel workerd that way).
    fn start_on_any_port(handler: Handler) -> Result<(u16, Self)> {
        let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
        let port = listener.local_addr()?.port();
        Ok((port, Self::serve(listener, handler)?))
    }

    /// Serves on `port` again (a restart on the port a client already knows).
    fn start_on(port: u16, handler: Handler) -> Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
        Self::serve(listener, handler)
    }

    fn serve(listener: TcpListener, handler: Handler) -> Result<Self> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut connections = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let (handler, flag) = (handler.clone(), flag.clone());
                        connections.push(std::thread::spawn(move || {
                            serve_connection(stream, handler, flag)
                        }));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            drop(listener);
            for c in connections {
                let _ = c.join();
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The service behind Envoy: answers 200 `upstream ok`. Test hooks, by request header:
/// `x-test-delay-ms` delays the answer; `x-test-usage-tokens` is echoed back as
/// `x-usage-tokens` (the weighted-cost header).
pub struct Upstream {
    /// Its port.
    pub port: u16,
    hits: Arc<AtomicUsize>,
    _server: Server,
}

impl Upstream {
    /// Starts it on a free port.
    pub fn start() -> Result<Self> {
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let (port, server) = Server::start_on_any_port(Arc::new(move |req: &HttpRequest| {
            if req.path != "/healthz" {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            let mut reply = Reply::new(200, "upstream ok").header("content-type", "text/plain");
            if let Some(ms) = req.header("x-test-delay-ms").and_then(|v| v.parse().ok()) {
                reply.delay = Duration::from_millis(ms);
            }
            if let Some(tokens) = req.header("x-test-usage-tokens") {
                reply = reply.header("x-usage-tokens", tokens);
            }
            reply
        }))?;
        Ok(Self {
            port,
            hits,
            _server: server,
        })
    }

    /// Requests that reached it (health checks excluded).
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// What the fake collector has seen.
#[derive(Debug, Default)]
pub struct CollectorLog {
    /// Stored events by id (stored once: the real collector's unique index).
    pub events: HashMap<String, Value>,
    /// Batches answered 2xx.
    pub accepted_batches: usize,
    /// Batches answered 503.
    pub refused_batches: usize,
    /// Events that arrived again in an accepted batch after being stored.
    pub duplicates: usize,
    /// Batches that were not valid `EventBatch` JSON.
    pub malformed: usize,
}

/// A stand-in for the collector: `POST /v1/events` stores events by id; it can refuse the first
/// batches with 503, and be stopped (port closed) and started again on the same port.
pub struct FakeCollector {
    /// Its port.
    pub port: u16,
    log: Arc<Mutex<CollectorLog>>,
    refuse: Arc<AtomicUsize>,
    server: Option<Server>,
}

impl FakeCollector {
    /// Starts it on a free port, refusing the first `refuse_first` batches with 503.
    pub fn start(refuse_first: usize) -> Result<Self> {
        let log = Arc::default();
        let refuse = Arc::new(AtomicUsize::new(refuse_first));
        let (port, server) = Server::start_on_any_port(Self::handler(&log, &refuse))?;
        Ok(Self {
            port,
            log,
            refuse,
            server: Some(server),
        })
    }

    /// Closes its port: calls get connection refused.
    pub fn go_down(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.stop();
        }
    }

    /// Listens again on the same port.
    pub fn resume(&mut self) -> Result<()> {
        let handler = Self::handler(&self.log, &self.refuse);
        // The port was just released by `go_down`; another process may hold it for a moment.
        let server = eventually(Duration::from_secs(5), || {
            Server::start_on(self.port, handler.clone())
        })?;
        self.server = Some(server);
        Ok(())
    }

    fn handler(log: &Arc<Mutex<CollectorLog>>, refuse: &Arc<AtomicUsize>) -> Handler {
        let (log, refuse) = (log.clone(), refuse.clone());
        Arc::new(move |req: &HttpRequest| {
            if req.path == "/healthz" {
                return Reply::new(200, "ok");
            }
            let body = String::from_utf8_lossy(&req.body).to_string();
            if refuse
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                if let Ok(mut log) = log.lock() {
                    log.refused_batches += 1;
                }
                return Reply::new(503, "refused by the test");
            }
            let Ok(mut log) = log.lock() else {
                return Reply::new(500, "poisoned");
            };
            let batch: Value = match serde_json::from_str(&body) {
                Ok(b) => b,
                Err(_) => {
                    log.malformed += 1;
                    return Reply::new(400, "malformed");
                }
            };
            let events = batch["events"].as_array().cloned().unwrap_or_default();
            if batch["version"] != json!(1) || events.is_empty() {
                log.malformed += 1;
                return Reply::new(400, "malformed");
            }
            for event in events {
                let id = event["id"].as_str().unwrap_or_default().to_string();
                if log.events.insert(id, event).is_some() {
                    log.duplicates += 1;
                }
            }
            log.accepted_batches += 1;
            Reply::new(200, "{}").header("content-type", "application/json")
        })
    }

    /// Runs `f` on what it has seen.
    pub fn with_log<T>(&self, f: impl FnOnce(&CollectorLog) -> T) -> T {
        match self.log.lock() {
            Ok(log) => f(&log),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    /// Events stored.
    pub fn stored(&self) -> usize {
        self.with_log(|l| l.events.len())
    }
}

/// A policy server for `config_url`: serves whatever body is set, with an ETag, and answers
/// 304 to a matching `If-None-Match`.
pub struct PolicyServer {
    /// Its port.
    pub port: u16,
    state: Arc<Mutex<(String, u64)>>,
    fetches: Arc<AtomicUsize>,
    _server: Server,
}

impl PolicyServer {
    /// Starts it serving `body`.
    pub fn start(body: &str) -> Result<Self> {
        let state = Arc::new(Mutex::new((body.to_string(), 1)));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (s, f) = (state.clone(), fetches.clone());
        let (port, server) = Server::start_on_any_port(Arc::new(move |req: &HttpRequest| {
            f.fetch_add(1, Ordering::SeqCst);
            let Ok(state) = s.lock() else {
                return Reply::new(500, "poisoned");
            };
            let etag = format!("\"v{}\"", state.1);
            if req.header("if-none-match") == Some(etag.as_str()) {
                return Reply::new(304, "").header("etag", &etag);
            }
            Reply::new(200, state.0.clone())
                .header("etag", &etag)
                .header("content-type", "application/json")
        }))?;
        Ok(Self {
            port,
            state,
            fetches,
            _server: server,
        })
    }

    /// Serves `body` from now on, under a new ETag.
    pub fn set(&self, body: &str) {
        if let Ok(mut state) = self.state.lock() {
            state.0 = body.to_string();
            state.1 += 1;
        }
    }

    /// Requests served.
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------------
// Envoy

/// How to run Envoy.
pub struct EnvoySpec {
    /// The filter's `configuration` JSON (placeholders `{collector}` etc. are not used: the
    /// harness fills `collector.cluster` and `config_cluster` itself when given ports).
    pub filter_config: Value,
    /// Where the upstream listens.
    pub upstream_port: u16,
    /// Where the collector listens, if any (cluster `collector`).
    pub collector_port: Option<u16>,
    /// Where the policy server listens, if any (cluster `policy`).
    pub policy_port: Option<u16>,
    /// HTTP filters placed before Tollgate's (e.g. `jwt_authn`).
    pub pre_filters: Vec<Value>,
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    child: Child,
    /// Listener port.
    pub port: u16,
    /// Admin port.
    pub admin_port: u16,
    /// Its log file.
    pub log_path: PathBuf,
}

/// A static cluster of one loopback endpoint.
pub fn static_cluster(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]
        }
    })
}

/// `cluster` guarded as the shipped config guards the collector's: an HTTP health check on
/// `/healthz` every `interval` (a collector that is down is found out), and circuit breakers
/// allowing `max_requests` (the filter's calls never pile up behind it), no Envoy retries.
pub fn guarded(mut cluster: Value, timeout: &str, interval: &str, max_requests: u32) -> Value {
    cluster["health_checks"] = json!([{
        "timeout": timeout, "interval": interval,
        "unhealthy_threshold": 2, "healthy_threshold": 1,
        "http_health_check": {"path": "/healthz"}
    }]);
    cluster["circuit_breakers"] = json!({"thresholds": [{
        "max_connections": max_requests / 2, "max_pending_requests": max_requests,
        "max_requests": max_requests, "max_retries": 0
    }]});
    cluster
}

fn cluster(name: &str, port: u16, health_checked: bool) -> Value {
    let c = static_cluster(name, port);
    if health_checked {
        guarded(c, "0.25s", "1s", 16)
    } else {
        c
    }
}

/// A bootstrap with one HTTP listener on 127.0.0.1:`port` routing everything to the cluster
/// `upstream` through `http_filters`, the admin on `admin_port`, and `clusters`. `hcm` fields
/// are merged into the connection manager's config (e.g. `use_remote_address`).
pub fn listener_bootstrap(
    node: &str,
    port: u16,
    admin_port: u16,
    hcm: Value,
    route: Value,
    http_filters: Vec<Value>,
    clusters: Vec<Value>,
) -> Value {
    let mut manager = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "route_config": {"virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": route}]
        }]},
        "http_filters": http_filters
    });
    if let (Some(m), Value::Object(extra)) = (manager.as_object_mut(), hcm) {
        m.extend(extra);
    }
    json!({
        "node": {"id": node, "cluster": node},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "main",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": manager
                }]}]
            }],
            "clusters": clusters
        }
    })
}

/// The bootstrap for `spec`, as JSON (which Envoy reads as YAML).
pub fn bootstrap(spec: &EnvoySpec, port: u16, admin_port: u16, wasm: &Path) -> Value {
    let mut config = spec.filter_config.clone();
    if spec.collector_port.is_some() && config.get("collector").is_none() {
        config["collector"] = json!({"cluster": "collector", "timeout_ms": 500});
    }
    if let Some(p) = spec.policy_port {
        if config.get("config_url").is_none() {
            config["config_url"] = json!(format!("http://127.0.0.1:{p}/policy.json"));
            config["config_cluster"] = json!("policy");
        }
    }
    let mut clusters = vec![cluster("upstream", spec.upstream_port, false)];
    if let Some(p) = spec.collector_port {
        clusters.push(cluster("collector", p, true));
    }
    if let Some(p) = spec.policy_port {
        clusters.push(cluster("policy", p, false));
    }
    let http_filters = spec.pre_filters.iter().cloned().chain([
                            json!({
                                "name": "envoy.filters.http.wasm",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                                    "config": {
                                        "name": "tollgate",
                                        "root_id": "tollgate",
                                        "failure_policy": "FAIL_OPEN",
                                        "vm_config": {
                                            "vm_id": "tollgate",
                                            "runtime": "envoy.wasm.runtime.v8",
                                            "code": {"local": {"filename": wasm.to_string_lossy()}}
                                        },
                                        "configuration": {
                                            "@type": "type.googleapis.com/google.protobuf.StringValue",
                                            "value": config.to_string()
                                        }
                                    }
                                }
                            }),
                            json!({
                                "name": "envoy.filters.http.router",
                                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
                            })
                        ]).collect::<Vec<Value>>();
    listener_bootstrap(
        "e2e-envoy",
        port,
        admin_port,
        json!({}),
        json!({"cluster": "upstream"}),
        http_filters,
        clusters,
    )
}

impl Envoy {
    fn spawn(spec: &EnvoySpec, name: &str) -> Result<Self> {
        let binary = envoy_binary()?;
        let wasm = filter_wasm()?;
        let dir = scratch_dir(name)?;
        let port = free_port()?;
        let admin_port = free_port()?;
        let config_path = dir.join("envoy.yaml");
        let log_path = dir.join("envoy.log");
        std::fs::write(
            &config_path,
            serde_json::to_string_pretty(&bootstrap(spec, port, admin_port, &wasm))?,
        )?;
        // `--disable-hot-restart`: no shared memory nor domain socket keyed by a base id, so
        // parallel tests (and leftovers of killed runs) never meet.
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", "2", "--disable-hot-restart", "-l", "info"])
            .args(["--file-flush-interval-msec", "100"])
            .arg("--log-path")
            .arg(&log_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        Ok(Self {
            child,
            port,
            admin_port,
            log_path,
        })
    }

    /// Starts Envoy and waits (bounded) until it is ready and its listener accepts.
    pub fn start(spec: &EnvoySpec) -> Result<Self> {
        // A port found free can be taken by another process before Envoy binds it; new ports
        // then, a bounded number of times.
        let mut attempt = 1;
        loop {
            match Self::start_once(spec) {
                Err(error)
                    if attempt < 3 && format!("{error:#}").contains("Address already in use") =>
                {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn start_once(spec: &EnvoySpec) -> Result<Self> {
        let mut envoy = Self::spawn(spec, "envoy")?;
        let ready = eventually(Duration::from_secs(30), || {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                bail!("Envoy exited with {status}");
            }
            let body = http_get(&format!("http://127.0.0.1:{}/ready", envoy.admin_port))?;
            if body.trim() != "LIVE" {
                bail!("admin /ready says {body:?}");
            }
            TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], envoy.port)),
                Duration::from_millis(200),
            )?;
            Ok(())
        });
        if let Err(error) = ready {
            let log = envoy.log();
            let tail: String = log
                .lines()
                .filter(|l| !l.contains("server.cc:467"))
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            return Err(error.context(format!("Envoy did not become ready; log tail:\n{tail}")));
        }
        Ok(envoy)
    }

    /// Starts Envoy expecting it to refuse the config and exit; returns its log.
    pub fn start_expecting_rejection(spec: &EnvoySpec) -> Result<String> {
        let mut envoy = Self::spawn(spec, "envoy-rejected")?;
        let status = eventually(Duration::from_secs(30), || {
            envoy.child.try_wait()?.context("Envoy is still running")
        })?;
        if status.success() {
            bail!("Envoy exited successfully; a rejected config should make it fail");
        }
        Ok(envoy.log())
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every counter and gauge on admin `/stats`, by name.
    pub fn stats(&self) -> Result<BTreeMap<String, u64>> {
        let text = http_get(&format!("http://127.0.0.1:{}/stats", self.admin_port))?;
        Ok(text
            .lines()
            .filter_map(|line| {
                let (name, value) = line.split_once(": ")?;
                Some((name.to_string(), value.trim().parse().ok()?))
            })
            .collect())
    }

    /// One of the filter's stats (`allowed` → `wasmcustom.tollgate.allowed`), 0 when absent.
    pub fn stat(&self, name: &str) -> Result<u64> {
        Ok(self
            .stats()?
            .get(&format!("wasmcustom.tollgate.{name}"))
            .copied()
            .unwrap_or(0))
    }

    /// Connections each worker accepted on the listener.
    pub fn worker_connections(&self) -> Result<Vec<u64>> {
        let stats = self.stats()?;
        Ok((0..2)
            .map(|w| {
                stats
                    .iter()
                    .filter(|(k, _)| {
                        k.starts_with("listener.127.0.0.1_")
                            && k.ends_with(&format!("worker_{w}.downstream_cx_total"))
                    })
                    .map(|(_, v)| *v)
                    .sum()
            })
            .collect())
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// A response, whatever its status.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, lower-case names, in order.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
}

impl Response {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The limiter's headers (rate-limit and quota families, IETF fields, Retry-After).
    pub fn limiter_headers(&self) -> BTreeMap<String, String> {
        self.headers
            .iter()
            .filter(|(k, _)| is_limiter_header(k))
            .cloned()
            .collect()
    }
}

/// Whether `name` is one of the headers the limiter adds.
pub fn is_limiter_header(name: &str) -> bool {
    name.starts_with("x-ratelimit-")
        || name.starts_with("x-quota-")
        || name == "ratelimit"
        || name == "ratelimit-policy"
        || name == "retry-after"
}

/// A client with its own connection (keep-alive), for one thread.
pub fn client() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .max_idle_connections_per_host(1)
        .build()
}

/// Sends `method url` with `headers`; any status is a response.
pub fn send(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Response> {
    let mut request = agent.request(method, url);
    for (name, value) in headers {
        request = request.set(name, value);
    }
    let response = match request.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(anyhow::Error::new(e).context(format!("{method} {url}"))),
    };
    let status = response.status();
    let headers = response
        .headers_names()
        .into_iter()
        .flat_map(|name| {
            response
                .all(&name)
                .into_iter()
                .map(|v| (name.to_ascii_lowercase(), v.to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    let body = response.into_string()?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// `GET url` with a fresh agent, body as text; errors on non-2xx.
pub fn http_get(url: &str) -> Result<String> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(2))
        .build();
    Ok(agent.get(url).call()?.into_string()?)
}

/// Runs `per_thread` requests on each of `threads` threads (one connection each) and returns
/// every response status, bounded by the client timeout.
pub fn load(
    threads: usize,
    per_thread: usize,
    request: impl Fn(&ureq::Agent, usize) -> Result<Response> + Send + Sync + 'static,
) -> Result<Vec<Response>> {
    let request = Arc::new(request);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let request = request.clone();
            std::thread::spawn(move || -> Result<Vec<Response>> {
                let agent = client();
                (0..per_thread)
                    .map(|i| request(&agent, t * per_thread + i))
                    .collect()
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.extend(
            h.join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))??,
        );
    }
    Ok(out)
}

/// `sha256:<hex>` of a secret, as policies store keys.
pub fn key_hash(secret: &str) -> String {
    tollgate_core::hash::sha256_tagged(secret)
}

/// Counts statuses.
pub fn tally(responses: &[Response]) -> BTreeMap<u16, usize> {
    let mut out = BTreeMap::new();
    for r in responses {
        *out.entry(r.status).or_default() += 1;
    }
    out
}

/// Distinct values.
pub fn distinct<T: std::hash::Hash + Eq>(items: impl IntoIterator<Item = T>) -> usize {
    items.into_iter().collect::<HashSet<_>>().len()
}

// ---------------------------------------------------------------------------------------------
// JWTs for Envoy's jwt_authn (HS256, enough for tests)

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    block[..key.len().min(64)].copy_from_slice(&key[..key.len().min(64)]);
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// An HS256 JWT of `claims`, signed with `secret`.
pub fn jwt_hs256(secret: &[u8], claims: &Value) -> String {
    let header = base64url(br#"{"alg":"HS256","typ":"JWT","kid":"e2e"}"#);
    let payload = base64url(claims.to_string().as_bytes());
    let signing_input = format!("{header}.{payload}");
    let signature = base64url(&hmac_sha256(secret, signing_input.as_bytes()));
    format!("{signing_input}.{signature}")
}

/// An `envoy.filters.http.jwt_authn` filter verifying HS256 tokens from `issuer` signed with
/// `secret`, putting the payload in dynamic metadata under `payload_key`. Requests without a
/// token pass (unverified); a bad token is refused with 401 by Envoy.
pub fn jwt_authn_filter(issuer: &str, secret: &[u8], payload_key: &str) -> Value {
    let jwks =
        json!({"keys": [{"kty": "oct", "alg": "HS256", "kid": "e2e", "k": base64url(secret)}]});
    json!({
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"e2e": {
                "issuer": issuer,
                "local_jwks": {"inline_string": jwks.to_string()},
                "payload_in_metadata": payload_key
            }},
            "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
                {"provider_name": "e2e"}, {"allow_missing": {}}
            ]}}}]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_and_hmac_match_known_answers() {
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        // RFC 4231 test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            mac.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
