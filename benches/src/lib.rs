//! Shared helpers for the benchmarks.

/// A deterministic generator (xorshift64*), so every engine and run gets the same data.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.unit();
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// Log-normal with this median and shape.
    pub fn log_normal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }

    /// An index drawn from cumulative weights (not empty).
    pub fn pick(&mut self, cumulative: &[f64]) -> usize {
        let total = cumulative.last().copied().unwrap_or(0.0);
        let x = self.unit() * total;
        cumulative
            .partition_point(|&c| c <= x)
            .min(cumulative.len() - 1)
    }
}

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

pub mod cluster {
    //! initdb, start and stop of a cluster in `dir/data` (logs in `dir/log`, socket in `dir`).

    use std::path::Path;

    use super::pg;

    fn run(
        bin: &Path,
        dir: &Path,
        as_postgres: bool,
        program: &str,
        args: &[&str],
    ) -> std::process::Output {
        pg::command(bin, dir, as_postgres, program)
            .args(args)
            .output()
            .expect("run a PostgreSQL binary")
    }

    /// A fresh cluster in `dir/data`, trusting local connections.
    pub fn initdb(bin: &Path, dir: &Path, as_postgres: bool) {
        let data = dir.join("data").display().to_string();
        let out = run(
            bin,
            dir,
            as_postgres,
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "-E", "UTF8"],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the cluster on 127.0.0.1:`port` with production durability (`fsync`,
    /// `synchronous_commit`) and `settings` (`-c name=value …`); panics with its log on failure.
    pub fn start(bin: &Path, dir: &Path, as_postgres: bool, port: u16, settings: &str) {
        let data = dir.join("data").display().to_string();
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on \
             {settings}",
            dir.display()
        );
        let log = dir.join("log");
        let log_s = log.display().to_string();
        let out = run(
            bin,
            dir,
            as_postgres,
            "pg_ctl",
            &[
                "-D", &data, "-o", &opts, "-l", &log_s, "-w", "-t", "300", "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Leaves `segments` WAL segments (16 MB each) written and recycled ahead, as a server that
    /// has been running holds them (`min_wal_size` must keep that many): WAL is written into
    /// segments earlier checkpoints recycled, not into new files. A fresh cluster instead
    /// creates and zero-fills a new segment every 16 MB of WAL while holding the WAL write
    /// lock, every ~0.4 s at the ingest bench's 100k events/s, and the commits behind it wait
    /// (`WALInitWrite`/`WALInitSync` in `pg_stat_activity`): a cost of a new server, not of
    /// ingest. Panics with psql's error on failure.
    pub fn recycle_wal(bin: &Path, dir: &Path, as_postgres: bool, port: u16, segments: u32) {
        let port = port.to_string();
        let socket = dir.display().to_string();
        // Each switch needs a WAL record since the last one, hence the insert.
        let fill = format!(
            "DO $$ BEGIN FOR i IN 1..{segments} LOOP \
             INSERT INTO recycle_wal VALUES (i); PERFORM pg_switch_wal(); END LOOP; END $$"
        );
        let out = run(
            bin,
            dir,
            as_postgres,
            "psql",
            &[
                "-h",
                &socket,
                "-p",
                &port,
                "-U",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                "CREATE TABLE recycle_wal (i int)",
                "-c",
                &fill,
                "-c",
                "DROP TABLE recycle_wal",
                "-c",
                "CHECKPOINT",
            ],
        );
        assert!(
            out.status.success(),
            "recycling WAL: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the cluster (fast shutdown), ignoring failures: it runs from `Drop`.
    pub fn stop(bin: &Path, dir: &Path, as_postgres: bool) {
        let data = dir.join("data").display().to_string();
        let _ = run(
            bin,
            dir,
            as_postgres,
            "pg_ctl",
            &["-D", &data, "-m", "fast", "-w", "-t", "300", "stop"],
        );
    }
}
