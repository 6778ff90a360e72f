//! The wasm32 toolchain: finding or installing one, and building crates with it.
//!
//! Two routes, tried in this order:
//!
//! 1. **rustup**: the active toolchain with the `wasm32-unknown-unknown` target, added by
//!    `rustup target add` (which needs rustup's download server).
//! 2. **Debian**: Debian 12's `rustc-web` and `cargo-web` (a newer Rust than the distribution's
//!    own, at /usr/bin/rustc and /usr/bin/cargo). They ship no wasm32 standard library, so it is
//!    built from `rust-web-src` with `-Zbuild-std` (allowed on a stable compiler by
//!    `RUSTC_BOOTSTRAP=1`) and linked with `lld-22`'s `wasm-ld`. These builds get their own
//!    target dir, `target/wasm-debian`, so the two compilers never share one.
//!
//! The route is detected afresh for every build rather than recorded by `setup`: detection costs
//! one `rustup` call, and a recorded choice would go stale when a machine gains or loses a
//! toolchain. `TOLLGATE_WASM_TOOLCHAIN=rustup` or `=debian` forces one route, to exercise the
//! fallback or to skip a rustup that cannot reach its server.

use std::{
    env, fmt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use xshell::{cmd, Cmd, Shell};

use crate::{apt::Apt, cargo};

/// The target triple every wasm build uses.
pub const TARGET: &str = "wasm32-unknown-unknown";

/// Environment variable that forces one route: `rustup` or `debian`.
const ROUTE_VAR: &str = "TOLLGATE_WASM_TOOLCHAIN";

const DEBIAN_PACKAGES: [&str; 4] = ["rustc-web", "cargo-web", "rust-web-src", "lld-22"];
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_RUSTDOC: &str = "/usr/bin/rustdoc";
const DEBIAN_TARGET_DIR: &str = "target/wasm-debian";

/// Builds `package` for wasm32-unknown-unknown with cargo profile `profile`, with whichever
/// toolchain this machine has, and returns the build's main output: the `.wasm` module for a
/// `cdylib` crate, or the `.rlib` for a library-only one (which proves it compiles for wasm32).
///
/// Every verb that needs wasm builds it through here.
pub fn build_wasm(sh: &Shell, package: &str, profile: &str) -> Result<PathBuf> {
    let toolchain = Toolchain::detect(sh)?;
    step!("wasm32: building {package} (profile {profile}) with {toolchain}");
    let output = toolchain.build(sh, package, profile)?;
    step!("wasm32: built {}", output.display());
    Ok(output)
}

/// A Rust toolchain that can build for wasm32-unknown-unknown.
#[derive(Debug)]
pub enum Toolchain {
    /// rustup's active toolchain, with the wasm32 target installed.
    Rustup {
        /// `rustc --version`.
        rustc: String,
    },
    /// Debian's rustc-web, building std from source.
    Debian {
        /// `/usr/bin/rustc --version`.
        rustc: String,
        /// The `wasm-ld` to link with.
        linker: PathBuf,
    },
}

impl fmt::Display for Toolchain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rustup { rustc } => write!(f, "rustup's {rustc}"),
            Self::Debian { rustc, linker } => write!(
                f,
                "Debian's {rustc}, -Zbuild-std, linker {}",
                linker.display()
            ),
        }
    }
}

impl Toolchain {
    /// The toolchain this machine has, installing nothing; an error says what is missing.
    pub fn detect(sh: &Shell) -> Result<Self> {
        let mut missing = Vec::new();
        for route in Route::selected()? {
            match route.detect(sh) {
                Ok(toolchain) => return Ok(toolchain),
                Err(why) => missing.push(format!("{route}: {why}")),
            }
        }
        bail!(
            "no toolchain can build for {TARGET} ({}); run `cargo xtask setup`",
            missing.join("; ")
        )
    }

    /// The toolchain this machine has, installed first if there is none: rustup's target if
    /// rustup can add it, else Debian's packages. Fails with what to install by hand.
    pub fn ensure(sh: &Shell, apt: &mut Apt) -> Result<Self> {
        let routes = Route::selected()?;
        let mut missing = Vec::new();
        for &route in routes {
            match route.detect(sh) {
                Ok(toolchain) => {
                    step!("wasm32: ready ({toolchain})");
                    return Ok(toolchain);
                }
                Err(why) => missing.push((route, why)),
            }
        }

        let mut failures = Vec::new();
        for (route, why) in missing {
            step!("wasm32: {why}; installing it through {route}");
            let installed = route
                .install(sh, apt)
                .and_then(|()| route.detect(sh).map_err(anyhow::Error::msg));
            match installed {
                Ok(toolchain) => {
                    step!("wasm32: ready ({toolchain})");
                    return Ok(toolchain);
                }
                Err(error) => {
                    step!("wasm32: the {route} route failed: {error:#}");
                    failures.push(format!(
                        "  - {route}: {error:#}\n    fix: {}",
                        route.remedy()
                    ));
                }
            }
        }
        bail!(
            "no Rust toolchain here can build for {TARGET}, and installing one failed:\n{}",
            failures.join("\n")
        )
    }

    /// A cargo command set up to use this toolchain.
    fn cargo<'a>(&self, sh: &'a Shell) -> Result<Cmd<'a>> {
        match self {
            Self::Rustup { .. } => Ok(sh.cmd("cargo")),
            Self::Debian { linker, .. } => {
                // rustup's proxies come first on a typical PATH; Debian's tools must win here.
                let inherited = env::var_os("PATH").unwrap_or_default();
                let path = env::join_paths(
                    std::iter::once(PathBuf::from("/usr/bin")).chain(env::split_paths(&inherited)),
                )
                .context("cannot put /usr/bin first on PATH")?;
                Ok(sh
                    .cmd(DEBIAN_CARGO)
                    .env("PATH", path)
                    .env("RUSTC", DEBIAN_RUSTC)
                    .env("RUSTDOC", DEBIAN_RUSTDOC)
                    .env("RUSTC_BOOTSTRAP", "1")
                    .env("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER", linker))
            }
        }
    }

    /// Builds `package` and picks its output among the files cargo reports.
    fn build(&self, sh: &Shell, package: &str, profile: &str) -> Result<PathBuf> {
        let metadata = cargo::Metadata::load(self.cargo(sh)?)?;
        let id = &metadata.package(package)?.id;

        let mut build = self.cargo(sh)?.args([
            "build",
            "--package",
            package,
            "--profile",
            profile,
            "--target",
            TARGET,
        ]);
        if let Self::Debian { .. } = self {
            build = build.args([
                "-Zbuild-std=std,panic_abort",
                "--target-dir",
                DEBIAN_TARGET_DIR,
            ]);
        }
        let artifacts = cargo::build(build)
            .with_context(|| format!("building {package} for {TARGET} failed"))?;

        let lib = artifacts
            .iter()
            .rev()
            .find(|artifact| &artifact.package_id == id && artifact.target.is_lib())
            .with_context(|| format!("cargo built no library for {package}: does it have one?"))?;
        let with_extension = |ext: &str| {
            lib.filenames
                .iter()
                .find(|file| file.extension().is_some_and(|e| e == ext))
        };
        with_extension("wasm")
            .or_else(|| with_extension("rlib"))
            .cloned()
            .with_context(|| {
                format!(
                    "cargo reported no .wasm or .rlib for {package}: {:?}",
                    lib.filenames
                )
            })
    }
}

/// A way to get a wasm32 toolchain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Rustup,
    Debian,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Rustup => "rustup",
            Self::Debian => "Debian's rustc-web",
        })
    }
}

impl Route {
    /// The routes to consider, in order of preference, as `TOLLGATE_WASM_TOOLCHAIN` allows.
    fn selected() -> Result<&'static [Route]> {
        match env::var(ROUTE_VAR) {
            Err(env::VarError::NotPresent) => Ok(&[Route::Rustup, Route::Debian]),
            Ok(value) => match value.as_str() {
                "" => Ok(&[Route::Rustup, Route::Debian]),
                "rustup" => Ok(&[Route::Rustup]),
                "debian" => Ok(&[Route::Debian]),
                other => bail!("{ROUTE_VAR}={other:?}: use `rustup` or `debian`, or unset it"),
            },
            Err(env::VarError::NotUnicode(value)) => {
                bail!("{ROUTE_VAR}={value:?}: use `rustup` or `debian`, or unset it")
            }
        }
    }

    /// A ready toolchain through this route, or what it lacks.
    fn detect(self, sh: &Shell) -> Result<Toolchain, String> {
        match self {
            Route::Rustup => detect_rustup(sh),
            Route::Debian => detect_debian(sh),
        }
    }

    fn install(self, sh: &Shell, apt: &mut Apt) -> Result<()> {
        match self {
            Route::Rustup => cmd!(sh, "rustup target add {TARGET}")
                .run()
                .context("`rustup target add` failed (is rustup installed, its server reachable?)"),
            Route::Debian => apt.install(sh, &DEBIAN_PACKAGES),
        }
    }

    /// What a person can do by hand to make this route work.
    fn remedy(self) -> String {
        match self {
            Route::Rustup => format!(
                "install Rust with rustup, then run `rustup target add {TARGET}` \
                 (it downloads from rustup's server)"
            ),
            Route::Debian => format!(
                "on Debian 12 with bookworm-security in its apt sources, as root: \
                 `apt-get install {}`",
                DEBIAN_PACKAGES.join(" ")
            ),
        }
    }
}

fn detect_rustup(sh: &Shell) -> Result<Toolchain, String> {
    let installed = cmd!(sh, "rustup target list --installed")
        .quiet()
        .ignore_stderr()
        .read()
        .map_err(|_| "rustup is missing or has no active toolchain".to_owned())?;
    if !installed.lines().any(|line| line.trim() == TARGET) {
        return Err(format!(
            "the active rustup toolchain lacks the {TARGET} target"
        ));
    }
    let rustc = version(sh, "rustc")?;
    Ok(Toolchain::Rustup { rustc })
}

fn detect_debian(sh: &Shell) -> Result<Toolchain, String> {
    for (program, package) in [(DEBIAN_RUSTC, "rustc-web"), (DEBIAN_CARGO, "cargo-web")] {
        if !Path::new(program).is_file() {
            return Err(format!("{program} is missing (Debian package {package})"));
        }
    }
    let sysroot = cmd!(sh, "{DEBIAN_RUSTC} --print sysroot")
        .quiet()
        .read()
        .map_err(|error| format!("{DEBIAN_RUSTC} does not run: {error}"))?;
    let library = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library");
    if !library.join("std").is_dir() {
        return Err(format!(
            "the standard library's source is missing at {} (Debian package rust-web-src)",
            library.display()
        ));
    }
    let linker = newest_wasm_ld()
        .ok_or("no /usr/lib/llvm-*/bin/wasm-ld linker (Debian package lld-22)".to_owned())?;
    let rustc = version(sh, DEBIAN_RUSTC)?;
    Ok(Toolchain::Debian { rustc, linker })
}

/// The newest `/usr/lib/llvm-N/bin/wasm-ld`. That path, rather than `/usr/bin/wasm-ld-N`, has
/// the plain name from which rustc recognises the linker's flavor.
fn newest_wasm_ld() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let major: u32 = entry
                .file_name()
                .to_str()?
                .strip_prefix("llvm-")?
                .parse()
                .ok()?;
            let linker = entry.path().join("bin/wasm-ld");
            linker.is_file().then_some((major, linker))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, linker)| linker)
}

/// `program --version`, for saying which compiler is in use.
fn version(sh: &Shell, program: &str) -> Result<String, String> {
    cmd!(sh, "{program} --version")
        .quiet()
        .read()
        .map_err(|error| format!("`{program} --version` failed: {error}"))
}
