//! Debian packages, through `apt-get`, for the tools that come from Debian.
//!
//! Used today as the fallback route to a wasm32 toolchain; PostgreSQL comes the same way.

use anyhow::{bail, Context, Result};
use xshell::{cmd, Shell};

/// An apt session: refreshes the package lists at most once, and only when something is
/// actually installed.
#[derive(Debug, Default)]
pub struct Apt {
    updated: bool,
}

impl Apt {
    /// Installs `packages` (already-installed ones are left as they are), checking first that
    /// each has an installation candidate so that a missing one is named rather than buried in
    /// apt's output.
    pub fn install(&mut self, sh: &Shell, packages: &[&str]) -> Result<()> {
        if cmd!(sh, "apt-get --version")
            .quiet()
            .ignore_stdout()
            .run()
            .is_err()
        {
            bail!(
                "apt-get is not available, so the Debian packages {} cannot be installed here",
                packages.join(" ")
            );
        }
        // Another apt run (an unattended upgrade, say) may hold the lock for a while.
        let lock_timeout = "DPkg::Lock::Timeout=300";
        if !self.updated {
            step!("apt: updating package lists");
            cmd!(sh, "apt-get update -q -o {lock_timeout}")
                .run()
                .context("`apt-get update` failed (apt needs root: run as root or with sudo)")?;
            self.updated = true;
        }
        for package in packages {
            if candidate(sh, package)?.is_none() {
                bail!(
                    "Debian package `{package}` has no installation candidate here \
                     (`apt-cache policy {package}`); this machine's apt sources lack it"
                );
            }
        }
        step!("apt: installing {}", packages.join(" "));
        cmd!(
            sh,
            "apt-get install -y -q --no-install-recommends -o {lock_timeout} {packages...}"
        )
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()
        .with_context(|| format!("`apt-get install {}` failed", packages.join(" ")))
    }
}

/// The version apt would install for `package`, if any.
fn candidate(sh: &Shell, package: &str) -> Result<Option<String>> {
    let policy = cmd!(sh, "apt-cache policy {package}")
        .quiet()
        .read()
        .with_context(|| format!("`apt-cache policy {package}` failed"))?;
    Ok(parse_candidate(&policy))
}

fn parse_candidate(policy: &str) -> Option<String> {
    policy
        .lines()
        .find_map(|line| line.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|version| *version != "(none)")
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_lines() {
        let available = "lld-22:\n  Installed: (none)\n  Candidate: 1:22.1.8-1~deb12u1\n";
        assert_eq!(
            parse_candidate(available).as_deref(),
            Some("1:22.1.8-1~deb12u1")
        );
        let unavailable = "foo:\n  Installed: (none)\n  Candidate: (none)\n";
        assert_eq!(parse_candidate(unavailable), None);
        // `apt-cache policy` prints nothing at all for a name it has never heard of.
        assert_eq!(parse_candidate(""), None);
    }
}
