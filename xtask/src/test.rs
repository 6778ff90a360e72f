//! `cargo xtask test`: the one command CI runs (`.ci/run`), and the one to run before pushing.
//!
//! Steps, in order, stopping at the first failure: setup (wasm32 toolchain, Envoy and
//! PostgreSQL), `cargo fmt --check`, clippy with warnings denied, tollgate-core built for wasm32
//! (the engine must stay wasm-clean), the Envoy filter built for wasm32, `envoy --mode validate`
//! on every shipped config, the edge worker's bundle (worker-build with the provisioned
//! wasm-bindgen, wasm-opt and esbuild), and `cargo test --workspace`.
//!
//! The tests are handed what this run built and installed, so the end-to-end harness loads
//! exactly that: the filter's wasm in [`FILTER_WASM_VAR`], Envoy's binary in [`ENVOY_VAR`], and
//! PostgreSQL's `bin` directory in [`PG_BIN_VAR`] (the collector's tests start their own server),
//! the Worker bundle, Node and wrangler in [`WORKER_BUNDLE_VAR`], [`NODE_VAR`], [`WRANGLER_VAR`].

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use xshell::{cmd, Shell};

use crate::{
    dist, envoy,
    output::human_duration,
    setup::{self, Tool},
    wasm, workerd,
};

/// Environment variable holding the path of the filter's `.wasm`, for the tests.
pub const FILTER_WASM_VAR: &str = "TOLLGATE_FILTER_WASM";
/// Environment variable holding the path of the Envoy binary, for the tests.
pub const ENVOY_VAR: &str = "TOLLGATE_ENVOY";
/// Environment variable holding PostgreSQL's `bin` directory, for the collector's tests.
pub const PG_BIN_VAR: &str = "TOLLGATE_PG_BIN";
/// Environment variable holding the edge worker's built bundle directory, for the tests.
pub const WORKER_BUNDLE_VAR: &str = "TOLLGATE_WORKER_BUNDLE";
/// Environment variable holding the Node.js binary that runs wrangler, for the tests.
pub const NODE_VAR: &str = "TOLLGATE_NODE";
/// Environment variable holding `wrangler.js` (run with [`NODE_VAR`]), for the tests.
pub const WRANGLER_VAR: &str = "TOLLGATE_WRANGLER";

/// Runs every check, in order; the error names the step that failed.
pub fn run(sh: &Shell) -> Result<()> {
    let mut steps = Steps::new();

    let provisioned = steps.run("setup", || {
        setup::run(sh, &[Tool::Envoy, Tool::Postgres, Tool::Workerd])
    })?;
    let envoy = provisioned
        .envoy
        .context("setup was asked for Envoy but returned none")?;
    let pg_bin = provisioned
        .postgres
        .context("setup was asked for PostgreSQL but returned none")?;
    let workerd = provisioned
        .workerd
        .context("setup was asked for workerd but returned none")?;
    steps.run("fmt", || {
        cmd!(sh, "cargo fmt --all -- --check")
            .run()
            .context("the code is not formatted: run `cargo fmt --all`")
    })?;
    steps.run("clippy", || {
        cmd!(sh, "cargo clippy --workspace --all-targets -- -D warnings")
            .run()
            .context("clippy found problems (listed above)")
    })?;
    steps.run("wasm32 core", || {
        wasm::build_wasm(sh, "tollgate-core", "release")
    })?;
    let filter_wasm = steps.run("wasm32 filter", || {
        wasm::build_wasm(sh, dist::FILTER_PACKAGE, dist::FILTER_PROFILE)
    })?;
    steps.run("envoy configs", || {
        // The shipped configs load `dist/tollgate_filter.wasm`, and `--mode validate` loads it
        // too (running the filter's configure on each config's `configuration`): put this
        // run's build there first.
        let dist = sh.current_dir().join(dist::DIST_DIR);
        sh.create_dir(&dist)?;
        sh.copy_file(&filter_wasm, dist.join(dist::FILTER_WASM))?;
        envoy::validate_configs(sh, || Ok(envoy.clone()))
    })?;
    let worker_bundle = steps.run("edge worker bundle", || workerd::build_bundle(sh, &workerd))?;
    steps.run("cargo test", || {
        cmd!(sh, "cargo test --workspace")
            .env(WORKER_BUNDLE_VAR, &worker_bundle)
            .env(NODE_VAR, &workerd.node)
            .env(WRANGLER_VAR, &workerd.wrangler)
            .env(FILTER_WASM_VAR, &filter_wasm)
            .env(ENVOY_VAR, &envoy)
            .env(PG_BIN_VAR, &pg_bin)
            .run()
            .context("tests failed (listed above)")
    })?;

    steps.finish();
    Ok(())
}

/// The steps run so far and how long each took, for the closing summary line.
struct Steps {
    started: Instant,
    passed: Vec<(&'static str, Duration)>,
}

impl Steps {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            passed: Vec::new(),
        }
    }

    /// Runs one step, announcing it first; on failure prints the summary line and returns the
    /// error with the step's name on it.
    fn run<T>(&mut self, name: &'static str, step: impl FnOnce() -> Result<T>) -> Result<T> {
        step!("test: {name}");
        let started = Instant::now();
        match step() {
            Ok(value) => {
                self.passed.push((name, started.elapsed()));
                Ok(value)
            }
            Err(error) => {
                step!(
                    "test: FAILED at step `{name}` after {} ({} steps passed before it)",
                    human_duration(self.started.elapsed()),
                    self.passed.len()
                );
                Err(error.context(format!("`cargo xtask test` failed at step `{name}`")))
            }
        }
    }

    /// Prints the closing summary line of a run in which every step passed.
    fn finish(self) {
        let timings: Vec<String> = self
            .passed
            .iter()
            .map(|(name, took)| format!("{name} {}", human_duration(*took)))
            .collect();
        step!(
            "test: all {} steps passed in {} ({})",
            self.passed.len(),
            human_duration(self.started.elapsed()),
            timings.join(", ")
        );
    }
}
