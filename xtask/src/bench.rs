//! `cargo xtask bench`: the side-by-side benchmarks in `benches/`.

use anyhow::{Context, Result};
use xshell::Shell;

/// The benchmarks' package.
const BENCH_PACKAGE: &str = "tollgate-benches";

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
    if !harness_args.is_empty() {
        bench = bench.arg("--").args(harness_args);
    }
    bench.run().context("the benchmarks failed (see above)")
}
