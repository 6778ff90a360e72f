//! Cargo's machine-readable interfaces: `cargo metadata` for what the workspace contains, and
//! `--message-format=json` for the exact files a build wrote.
//!
//! Reading these instead of guessing `target/<triple>/<profile>/<name>` keeps xtask right when a
//! crate renames its lib, a target dir moves, or a stale file from an older build lies around.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Deserialize;
use xshell::Cmd;

/// The part of `cargo metadata --no-deps` that xtask reads.
#[derive(Debug, Deserialize)]
pub struct Metadata {
    /// The workspace's own packages.
    pub packages: Vec<Package>,
}

/// One workspace package.
#[derive(Debug, Deserialize)]
pub struct Package {
    /// Cargo's package id, the same string build messages carry as `package_id`.
    pub id: String,
    /// The package name, as in its Cargo.toml.
    pub name: String,
    /// Its lib, bin, test, bench and example targets.
    pub targets: Vec<Target>,
}

/// One build target of a package.
#[derive(Debug, Deserialize)]
pub struct Target {
    /// The target's name (for a lib, the crate name with underscores).
    pub name: String,
    /// Its kinds: `lib`, `cdylib`, `rlib`, `bin`, `test`, `bench`, ...
    pub kind: Vec<String>,
}

impl Target {
    /// Whether this is an executable (`[[bin]]` or `src/main.rs`).
    pub fn is_bin(&self) -> bool {
        self.kind.iter().any(|kind| kind == "bin")
    }

    /// Whether this is the package's library, in any of its crate types.
    pub fn is_lib(&self) -> bool {
        const LIB_KINDS: [&str; 5] = ["lib", "rlib", "cdylib", "dylib", "staticlib"];
        self.kind
            .iter()
            .any(|kind| LIB_KINDS.contains(&kind.as_str()))
    }
}

impl Metadata {
    /// Runs `metadata --no-deps` with the given cargo command (the host's cargo, or the one a
    /// wasm toolchain uses, so that ids match that cargo's build messages).
    pub fn load(cargo: Cmd<'_>) -> Result<Self> {
        let json = cargo
            .args(["metadata", "--no-deps", "--format-version", "1"])
            .quiet()
            .read()
            .context("`cargo metadata` failed: is the workspace's Cargo.toml valid?")?;
        serde_json::from_str(&json).context("cannot parse the output of `cargo metadata`")
    }

    /// The workspace package called `name`.
    pub fn package(&self, name: &str) -> Result<&Package> {
        self.packages
            .iter()
            .find(|package| package.name == name)
            .with_context(|| format!("the workspace has no package named `{name}`"))
    }
}

/// What cargo reports for each crate it compiled (a `compiler-artifact` message).
#[derive(Debug, Deserialize)]
pub struct Artifact {
    /// The id of the package the target belongs to.
    pub package_id: String,
    /// The target that was compiled.
    pub target: Target,
    /// Every file the compilation produced (`.rlib`, `.wasm`, `.so`, ...).
    pub filenames: Vec<PathBuf>,
    /// The executable, for bin targets.
    pub executable: Option<PathBuf>,
}

/// Runs a `cargo build` command and returns the artifacts it reported. Diagnostics and
/// progress still go to the terminal as usual.
pub fn build(cargo_build: Cmd<'_>) -> Result<Vec<Artifact>> {
    let cargo_build = cargo_build.arg("--message-format=json-render-diagnostics");
    // `read` does not echo the command the way `run` does; say what runs all the same.
    eprintln!("$ {cargo_build}");
    let stdout = cargo_build
        .read()
        .context("the build failed; the compiler's messages above say why")?;
    parse_artifacts(&stdout)
}

/// One line of cargo's JSON message stream; only artifacts matter here.
#[derive(Deserialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
enum Message {
    CompilerArtifact(Artifact),
    #[serde(other)]
    Other,
}

fn parse_artifacts(stdout: &str) -> Result<Vec<Artifact>> {
    let mut artifacts = Vec::new();
    for line in stdout.lines().filter(|line| line.starts_with('{')) {
        let message: Message = serde_json::from_str(line)
            .with_context(|| format!("cannot parse cargo's build message: {line}"))?;
        if let Message::CompilerArtifact(artifact) = message {
            artifacts.push(artifact);
        }
    }
    Ok(artifacts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_artifacts_and_skips_other_messages() {
        let stdout = concat!(
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/filter#tollgate-filter@0.1.0","manifest_path":"/w/filter/Cargo.toml","target":{"kind":["cdylib","rlib"],"crate_types":["cdylib","rlib"],"name":"tollgate_filter","src_path":"/w/filter/src/lib.rs"},"filenames":["/w/target/wasm32-unknown-unknown/release-wasm/tollgate_filter.wasm","/w/target/wasm32-unknown-unknown/release-wasm/libtollgate_filter.rlib"],"executable":null,"fresh":true}"#,
            "\n",
            r#"{"reason":"build-finished","success":true}"#,
            "\n",
        );
        let artifacts = parse_artifacts(stdout).unwrap();
        assert_eq!(artifacts.len(), 1);
        let artifact = &artifacts[0];
        assert_eq!(
            artifact.package_id,
            "path+file:///w/filter#tollgate-filter@0.1.0"
        );
        assert!(artifact.target.is_lib() && !artifact.target.is_bin());
        assert_eq!(artifact.filenames.len(), 2);
        assert_eq!(artifact.executable, None);
    }

    #[test]
    fn rejects_a_garbled_message() {
        assert!(parse_artifacts(r#"{"reason":"compiler-artifact"}"#).is_err());
    }
}
