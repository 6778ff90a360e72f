//! Shared helpers for the benchmarks.

pub mod pg {
    //! Starting a throwaway PostgreSQL for a benchmark: where the server binaries are, whether
    //! they must run as the `postgres` user (they refuse root), a free port.

    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// The newest `/usr/lib/postgresql/*/bin` with an `initdb` (apt's `postgresql`).
    pub fn bin_dir() -> PathBuf {
        let mut bins: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries (/usr/lib/postgresql/*/bin): install `postgresql`")
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .collect();
        bins.sort();
        bins.pop().expect("no /usr/lib/postgresql/*/bin/initdb")
    }

    /// Whether this process is root, so PostgreSQL's programs must run as `postgres`.
    pub fn as_postgres() -> bool {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    }

    /// Gives `dir` to the `postgres` user when the programs run as it.
    pub fn own(dir: &Path, as_postgres: bool) {
        if as_postgres {
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir)
                .status()
                .expect("chown");
        }
    }

    /// A free loopback port.
    pub fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port")
    }

    /// `program` from `bin`, in `dir`, as `postgres` when `as_postgres`.
    pub fn command(bin: &Path, dir: &Path, as_postgres: bool, program: &str) -> Command {
        let path = bin.join(program);
        let mut cmd = if as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        cmd.current_dir(dir);
        cmd
    }

    /// The connection URL of a server on `port` that trusts loopback.
    pub fn url(port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    }
}
