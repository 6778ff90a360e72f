//! `cargo xtask demo`: the whole Tollgate stack on this machine, on embedded defaults, until
//! Ctrl-C.
//!
//! It builds the release artifacts (`dist`), then starts, as child processes on loopback:
//! - the collector on SQLite (`target/demo/collector.db`) at 127.0.0.1:8081, with an ingest key
//!   for the filter and an admin key for you, both made fresh and printed once;
//! - a demo upstream at 127.0.0.1:8080 (a few lines of Python's standard library that answer
//!   every request with JSON and an `x-usage-tokens` header);
//! - Envoy with `envoy/envoy.yaml`, which loads the filter from `dist/`, listening on
//!   127.0.0.1:10000. The config is copied to `target/demo/envoy.yaml` with the ingest key
//!   added, so no secret is ever written into the repository.
//!
//! Ctrl-C in a terminal reaches the whole foreground process group, so every service gets it
//! along with xtask; [`Services`] also kills them when xtask stops for any other reason.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    thread,
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use xshell::{cmd, Shell};

use crate::{dist, envoy};

/// The demo's Envoy config, relative to the workspace root.
const DEMO_CONFIG: &str = "envoy/envoy.yaml";
/// Where the demo keeps its database and generated config, relative to the workspace root.
const DEMO_DIR: &str = "target/demo";
/// The collector's address; `envoy/envoy.yaml`'s `collector` cluster points here.
const COLLECTOR_ADDR: &str = "127.0.0.1:8081";
/// The upstream's port; `envoy/envoy.yaml`'s `upstream` cluster points here.
const UPSTREAM_PORT: &str = "8080";
/// How often to check whether a service has exited.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The demo upstream: answers every method and path with a small JSON body and reports a token
/// cost, so weighted limiting shows up in the demo too.
const UPSTREAM_PY: &str = r#"
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Upstream(BaseHTTPRequestHandler):
    def answer(self):
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps({"ok": True, "method": self.command, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("x-usage-tokens", "1")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = answer
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Upstream).serve_forever()
"#;

/// Builds the artifacts, starts the stack, and runs until Ctrl-C or until a service exits.
pub fn run(sh: &Shell) -> Result<()> {
    let dist = dist::run(sh)?;
    dist::check_wasm(&dist.filter_wasm)?;
    let collector = dist
        .collector
        .context("the collector binary was not built; run `cargo xtask dist` to see why")?;
    let root = sh.current_dir();
    let demo_dir = root.join(DEMO_DIR);
    sh.create_dir(&demo_dir)?;
    let database = format!("sqlite://{}", demo_dir.join("collector.db").display());

    let ingest_key = create_key(sh, &collector, &database, "ingest", "demo: envoy")?;
    let admin_key = create_key(sh, &collector, &database, "admin", "demo: you")?;
    let config = envoy_config_with_token(&root, &demo_dir, &ingest_key)?;

    let envoy = envoy::ensure(sh)?;
    envoy::validate(sh, &envoy, &config)?;
    let mut services = Services::default();

    let mut upstream = Command::new("python3");
    upstream.args(["-c", UPSTREAM_PY, UPSTREAM_PORT]);
    services.start("upstream", upstream)?;

    let mut serve = Command::new(&collector);
    serve
        .args(["--database", &database, "serve", "--listen", COLLECTOR_ADDR])
        .env("RUST_LOG", "info");
    services.start("collector", serve)?;

    let mut envoy_command = Command::new(&envoy);
    envoy_command
        .arg("-c")
        .arg(&config)
        .args(["--log-level", "warn"])
        .current_dir(&root);
    services.start("envoy", envoy_command)?;

    step!("demo: running; press Ctrl-C to stop. Try:");
    step!("  curl -i -H 'x-api-key: sk_demo_free' http://127.0.0.1:10000/v1/items/1");
    step!("  curl -s -H 'x-api-key: sk_demo_free' http://127.0.0.1:10000/.well-known/ratelimit");
    step!("  curl -s http://127.0.0.1:9901/stats | grep tollgate");
    step!("  curl -s -H 'authorization: Bearer {admin_key}' 'http://{COLLECTOR_ADDR}/v1/usage?org=demo'");
    step!("  curl -s -H 'authorization: Bearer {admin_key}' 'http://{COLLECTOR_ADDR}/v1/reports/overview?org=demo&days=1'");
    services.wait_any()
}

/// Creates a collector key with `role` for every org and returns its secret (printed once by
/// the collector, alone on stdout).
fn create_key(
    sh: &Shell,
    collector: &Path,
    database: &str,
    role: &str,
    name: &str,
) -> Result<String> {
    let secret = cmd!(
        sh,
        "{collector} --database {database} keys create --org * --role {role} --name {name}"
    )
    .read()
    .with_context(|| format!("cannot create the demo's {role} key"))?;
    let secret = secret.trim().to_owned();
    ensure!(
        !secret.is_empty() && !secret.contains(char::is_whitespace),
        "the collector printed no {role} key"
    );
    Ok(secret)
}

/// Writes `target/demo/envoy.yaml`: the shipped config with the filter's collector token added.
fn envoy_config_with_token(root: &Path, demo_dir: &Path, token: &str) -> Result<PathBuf> {
    let source = root.join(DEMO_CONFIG);
    let text = std::fs::read_to_string(&source)
        .with_context(|| format!("cannot read {}", source.display()))?;
    let anchor = r#""authority": "collector","#;
    if text.matches(anchor).count() != 1 {
        bail!("{DEMO_CONFIG} no longer has exactly one `{anchor}` in its filter configuration, where the demo adds the collector token; update xtask/src/demo.rs");
    }
    let config = demo_dir.join("envoy.yaml");
    let with_token = text.replace(anchor, &format!(r#"{anchor} "token": "{token}","#));
    std::fs::write(&config, with_token)
        .with_context(|| format!("cannot write {}", config.display()))?;
    Ok(config)
}

/// The demo's child processes; dropping this kills those still running, so none outlives the
/// demo whichever way it ends.
#[derive(Debug, Default)]
struct Services {
    running: Vec<(&'static str, Child)>,
}

impl Services {
    /// Starts one service.
    fn start(&mut self, name: &'static str, mut command: Command) -> Result<()> {
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name}: {command:?}"))?;
        step!("demo: started {name} (pid {})", child.id());
        self.running.push((name, child));
        Ok(())
    }

    /// Waits until any service exits, which ends the demo: a clean exit is fine, any other is
    /// an error naming the service.
    fn wait_any(&mut self) -> Result<()> {
        if self.running.is_empty() {
            return Ok(());
        }
        loop {
            for (name, child) in &mut self.running {
                let status = child
                    .try_wait()
                    .with_context(|| format!("cannot check on {name} (pid {})", child.id()))?;
                match status {
                    Some(status) if status.success() => {
                        step!("demo: {name} exited");
                        return Ok(());
                    }
                    Some(status) => bail!("{name} exited with {status}"),
                    None => {}
                }
            }
            thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for (name, child) in &mut self.running {
            if let Ok(None) = child.try_wait() {
                step!("demo: stopping {name} (pid {})", child.id());
                // Best effort: the process may exit on its own between the check and the kill.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
