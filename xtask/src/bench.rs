//! `cargo xtask bench`: the side-by-side benchmarks in `benches/`.

use anyhow::{Context, Result};
use xshell::Shell;

use crate::{apt::Apt, dist, envoy, test, wasm};

/// The benchmarks' package.
const BENCH_PACKAGE: &str = "tollgate-benches";
/// The bench that runs the real Envoy with the filter's wasm (and a do-nothing wasm filter).
const ENVOY_BENCH: &str = "envoy_filter";
/// The do-nothing proxy-wasm filter `envoy_filter` compares against, and where its path goes.
const PASSTHROUGH_PACKAGE: &str = "tollgate-bench-passthrough";
const PASSTHROUGH_WASM_VAR: &str = "TOLLGATE_PASSTHROUGH_WASM";

/// Runs every bench target of the benchmarks' package, or only `name`, passing `harness_args`
/// to the bench harness.
pub fn run(sh: &Shell, name: Option<&str>, harness_args: &[String]) -> Result<()> {
    let mut bench = sh.cmd("cargo").args(["bench", "--package", BENCH_PACKAGE]);
    match name {
        Some(name) => {
            step!("bench: running {name}");
            bench = bench.args(["--bench", name]);
        }
        None => step!("bench: running every benchmark"),
    }
    if name.is_none_or(|name| name == ENVOY_BENCH) {
        // Provisioned first, as for the tests: Envoy, both filters built for wasm32, and the
        // load generator (Debian's `wrk`).
        if which("wrk").is_none() {
            Apt::default().install(sh, &["wrk"])?;
        }
        let envoy = envoy::ensure(sh)?;
        let filter = wasm::build_wasm(sh, dist::FILTER_PACKAGE, dist::FILTER_PROFILE)?;
        let passthrough = wasm::build_wasm(sh, PASSTHROUGH_PACKAGE, dist::FILTER_PROFILE)?;
        bench = bench
            .env(test::ENVOY_VAR, envoy)
            .env(test::FILTER_WASM_VAR, filter)
            .env(PASSTHROUGH_WASM_VAR, passthrough);
    }
    if !harness_args.is_empty() {
        bench = bench.arg("--").args(harness_args);
    }
    bench.run().context("the benchmarks failed (see above)")
}

/// The path of `program` on `PATH`, if it is there.
fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}
