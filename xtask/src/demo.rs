//! `cargo xtask demo`: Tollgate running in Envoy on this machine, until Ctrl-C.
//!
//! The demo builds the release artifacts (`dist`), then starts its services as child processes:
//! Envoy with `envoy/envoy.yaml`, which loads the filter from `dist/`; the demo upstream and the
//! collector join [`Services`] as their issues land. Until `envoy/envoy.yaml` exists, the demo
//! stops after checking the artifacts and says what it will run.
//!
//! Ctrl-C in a terminal reaches the whole foreground process group, so every service gets it
//! along with xtask; [`Services`] also kills them when xtask stops for any other reason.

use std::{
    process::{Child, Command},
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use xshell::Shell;

use crate::{dist, envoy};

/// The demo's Envoy config, relative to the workspace root.
const DEMO_CONFIG: &str = "envoy/envoy.yaml";
/// How often to check whether a service has exited.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Builds and checks the artifacts, then runs the demo until Ctrl-C or until a service exits.
pub fn run(sh: &Shell) -> Result<()> {
    let dist = dist::run(sh)?;
    dist::check_wasm(&dist.filter_wasm)?;
    step!(
        "demo: {}/{} is a valid wasm module",
        dist::DIST_DIR,
        dist::FILTER_WASM
    );
    let collector = match &dist.collector {
        Some(binary) => format!("the collector ({})", binary.display()),
        None => "the collector (once it has a binary)".to_owned(),
    };

    let config = sh.current_dir().join(DEMO_CONFIG);
    if !config.is_file() {
        step!("demo: {DEMO_CONFIG} does not exist yet, so there is nothing to start");
        step!(
            "demo: once it does, the demo runs Envoy with it, loading {}/{}, in front of the \
             demo upstream, and {collector} receiving usage events",
            dist::DIST_DIR,
            dist::FILTER_WASM
        );
        return Ok(());
    }

    let envoy = envoy::ensure(sh)?;
    envoy::validate(sh, &envoy, &config)?;
    let mut services = Services::default();
    let mut envoy_command = Command::new(&envoy);
    envoy_command
        .arg("-c")
        .arg(&config)
        .current_dir(sh.current_dir());
    services.start("envoy", envoy_command)?;
    step!("demo: running with {DEMO_CONFIG}; press Ctrl-C to stop");
    services.wait_any()
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
