//! PostgreSQL's server binaries (Debian's `postgresql`), which the collector's tests and its
//! benchmark start themselves (`initdb` + `pg_ctl` on a free port, as the `postgres` user when
//! run as root).

use std::path::PathBuf;

use anyhow::{Context, Result};
use xshell::Shell;

use crate::apt::Apt;

/// Where Debian installs the server binaries, one directory per major version.
const ROOT: &str = "/usr/lib/postgresql";

/// The newest `/usr/lib/postgresql/*/bin` holding `initdb`, if any.
pub fn find_bin() -> Option<PathBuf> {
    let mut bins: Vec<PathBuf> = std::fs::read_dir(ROOT)
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    // Major versions sort as numbers would as long as they have the same number of digits.
    bins.sort();
    bins.pop()
}

/// Makes sure the server binaries are installed; returns their directory.
pub fn ensure(sh: &Shell, apt: &mut Apt) -> Result<PathBuf> {
    if let Some(bin) = find_bin() {
        step!("postgres: server binaries already in {}", bin.display());
        return Ok(bin);
    }
    apt.install(sh, &["postgresql"])?;
    let bin = find_bin().with_context(|| {
        format!("`postgresql` was installed but no {ROOT}/*/bin/initdb appeared")
    })?;
    step!("postgres: installed server binaries in {}", bin.display());
    Ok(bin)
}
