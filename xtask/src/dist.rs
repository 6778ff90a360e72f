//! `cargo xtask dist`: the release artifacts, in `dist/`.
//!
//! - `dist/tollgate_filter.wasm`: the Envoy filter, built with the `release-wasm` profile.
//! - `dist/tollgate-collector`: the collector, once its crate has that binary target.
//! - `dist/edge-worker/`: the Cloudflare Worker's bundle and its `wrangler.toml`, ready for
//!   `wrangler deploy` ([`edge_worker`]; `cargo xtask dist` only, not the demo).
//!
//! `dist/` is emptied first, so it never holds an artifact from an older run.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use xshell::{cmd, Shell};

use crate::{apt::Apt, cargo, output::human_size, wasm, workerd};

/// The directory the artifacts go to, relative to the workspace root.
pub const DIST_DIR: &str = "dist";
/// The Envoy filter's package.
pub const FILTER_PACKAGE: &str = "tollgate-filter";
/// The cargo profile the filter ships with (speed-optimised, panics abort).
pub const FILTER_PROFILE: &str = "release-wasm";
/// The filter's file name in `dist/`, which Envoy configs refer to.
pub const FILTER_WASM: &str = "tollgate_filter.wasm";
/// The collector's package, and the name of its binary.
const COLLECTOR: &str = "tollgate-collector";

/// What `dist` wrote.
#[derive(Debug)]
pub struct Dist {
    /// `dist/tollgate_filter.wasm`.
    pub filter_wasm: PathBuf,
    /// `dist/tollgate-collector`, once the collector has a binary.
    pub collector: Option<PathBuf>,
}

/// Builds every artifact into a fresh `dist/` and lists each with its size.
pub fn run(sh: &Shell) -> Result<Dist> {
    wasm::Toolchain::ensure(sh, &mut Apt::default())?;
    let dir = sh.current_dir().join(DIST_DIR);
    sh.remove_path(&dir)?;
    sh.create_dir(&dir)?;

    let wasm = wasm::build_wasm(sh, FILTER_PACKAGE, FILTER_PROFILE)?;
    check_wasm(&wasm)?;
    let filter_wasm = dir.join(FILTER_WASM);
    sh.copy_file(&wasm, &filter_wasm)?;

    let collector = match build_collector(sh)? {
        Some(binary) => {
            let shipped = dir.join(COLLECTOR);
            sh.copy_file(&binary, &shipped)?;
            Some(shipped)
        }
        None => None,
    };

    for artifact in std::iter::once(&filter_wasm).chain(&collector) {
        let size = std::fs::metadata(artifact)
            .with_context(|| format!("cannot read {}", artifact.display()))?
            .len();
        let shown = artifact.strip_prefix(sh.current_dir()).unwrap_or(artifact);
        step!("dist: {}: {}", shown.display(), human_size(size));
    }
    Ok(Dist {
        filter_wasm,
        collector,
    })
}

/// Writes `dist/edge-worker/` (provisioning the Worker build tools first); run after [`run`],
/// which empties `dist/`.
pub fn edge_worker(sh: &Shell) -> Result<PathBuf> {
    let tools = workerd::ensure(sh)?;
    let dir = sh.current_dir().join(DIST_DIR);
    let written = workerd::write_dist(sh, &tools, &dir)?;
    let shown = written.strip_prefix(sh.current_dir()).unwrap_or(&written);
    step!(
        "dist: {}: wrangler.toml and build/ (deploy with `wrangler deploy` there)",
        shown.display()
    );
    Ok(written)
}

/// Builds the collector's binary in release mode, if its crate has one yet.
fn build_collector(sh: &Shell) -> Result<Option<PathBuf>> {
    let metadata = cargo::Metadata::load(sh.cmd("cargo"))?;
    let package = metadata.package(COLLECTOR)?;
    if !package
        .targets
        .iter()
        .any(|target| target.is_bin() && target.name == COLLECTOR)
    {
        step!("dist: {COLLECTOR} has no binary target yet; skipping it");
        return Ok(None);
    }
    step!("dist: building {COLLECTOR} (release)");
    let artifacts = cargo::build(cmd!(
        sh,
        "cargo build --release --package {COLLECTOR} --bin {COLLECTOR}"
    ))?;
    artifacts
        .into_iter()
        .find(|artifact| artifact.package_id == package.id && artifact.target.is_bin())
        .and_then(|artifact| artifact.executable)
        .map(Some)
        .with_context(|| format!("cargo reported no executable for {COLLECTOR}"))
}

/// Checks that `path` is a WebAssembly module (by its magic number and version), so a broken
/// build fails here rather than when Envoy loads it.
pub fn check_wasm(path: &Path) -> Result<()> {
    const HEADER: [u8; 8] = *b"\0asm\x01\0\0\0";
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !bytes.starts_with(&HEADER) {
        bail!("{} is not a WebAssembly (version 1) module", path.display());
    }
    Ok(())
}
