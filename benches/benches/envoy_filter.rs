//! The Envoy filter under load: what Tollgate adds to a request, next to what no filter, Envoy's
//! native `local_ratelimit` and a do-nothing Rust wasm filter add, in one run.
//!
//! Every variant runs the same real Envoy (`--concurrency 1`, pinned to CPU 0 when the machine
//! has two or more) in front of the e2e harness's upstream, all on 127.0.0.1, driven by `wrk`
//! (one thread, pinned to CPU 1) whose Lua script gives every request a client identity in
//! `X-Forwarded-For`:
//!
//! - **none**: the router only.
//! - **local_ratelimit**: Envoy's native token bucket, one bucket for the listener, sized (10^9
//!   per second) so it never limits: it pays for a decision on every request and denies none,
//!   like the Tollgate variant. It has no per-client buckets, so it is comparable to Tollgate's
//!   global tier only.
//! - **wasm no-op**: `benches/passthrough-filter`, a proxy-wasm Rust filter that does nothing,
//!   on the same V8 runtime: the price of any Rust wasm filter.
//! - **tollgate**: the filter with four tiers (global GCRA, org sliding window, user token bucket,
//!   an endpoint fixed window on `GET /v1/items/{id}`), limits too high to deny, default
//!   response headers, and usage events on, batched to a local collector that answers 200.
//!
//! Identities: the listener keeps `use_remote_address: false` with no trusted hops, so Envoy
//! takes the client address from the last `X-Forwarded-For` entry and the filter reads it as
//! `source.address`; each request carries `10.a.b.c` for key `k` of 1, 100,000 or 1,000,000,
//! cycling through them in order; the table's `sent` column is how many distinct keys a cell
//! reached (a slow machine cannot send a million requests in a bounded run). The
//! policy lists no API keys, so the caller is identified by address: a per-client user and org
//! (a caller without an org is its own org), hence three counters per distinct key plus the
//! global one. This is how anonymous traffic is limited in production and costs no JWT
//! verification, which would be another filter's cost, not Tollgate's.
//!
//! Per cell: a saturation run (`SAT_CONNECTIONS` connections, closed loop) gives throughput;
//! µs/request = 1 / throughput, since one Envoy worker does all the work; Envoy's own CPU time
//! per request (from /proc/<pid>/stat) is shown beside it, being less sensitive to other load on
//! the machine. A second run at `LAT_CONNECTIONS` connections gives p50/p99 latency. Envoy's RSS
//! (/proc/<pid>/status) is read before and after each cell.
//!
//! Then the collector misbehaves, each with a fresh Envoy at 100k keys: slow (answers after 2 s,
//! past the 1 s call timeout), refusing (nothing listens on its port), blackholed (accepts TCP,
//! reads, never answers). User requests' p50/p99 are measured the same way.
//!
//! Run: `cargo xtask bench envoy_filter` (it installs Envoy and builds both wasm filters first),
//! or `cargo bench -p tollgate-benches --bench envoy_filter` with `TOLLGATE_ENVOY`,
//! `TOLLGATE_FILTER_WASM` and `TOLLGATE_PASSTHROUGH_WASM` set. `TOLLGATE_BENCH_QUICK=1` shortens
//! every run (a smoke test; its numbers mean little). Needs `wrk` (`apt-get install wrk`).
//!
//! **A/B of two builds of the filter**: with `TOLLGATE_BENCH_COMPARE_WASM=<other.wasm>` the
//! bench instead starts `none`, the filter and the other build (three Envoys, kept up), and runs
//! them in turn at 100,000 keys for `TOLLGATE_BENCH_ROUNDS` rounds (default 10), printing each
//! one's Envoy CPU per request and the median of what each build adds over `none` in its
//! round. Short alternating runs are what make a few-µs difference visible on a noisy machine:
//! a slow minute of the VM then shifts all three, not one.
//!
//! **Where the time goes**: a filter built with its `timing` feature logs each part of a
//! request's average time; the bench prints the latest such line of each cell (or build).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tollgate_e2e::{
    envoy_binary, eventually, filter_wasm, free_port, guarded, http_get, listener_bootstrap,
    scratch_dir, static_cluster,
};
use tollgate_filter::timing::REPORT_PREFIX;

/// Where `cargo xtask bench` puts the do-nothing filter's wasm.
const PASSTHROUGH_WASM_VAR: &str = "TOLLGATE_PASSTHROUGH_WASM";
/// Set to shorten every run.
const QUICK_VAR: &str = "TOLLGATE_BENCH_QUICK";
/// Another build of the filter to compare with (A/B mode).
const COMPARE_WASM_VAR: &str = "TOLLGATE_BENCH_COMPARE_WASM";
/// Rounds of the A/B mode.
const ROUNDS_VAR: &str = "TOLLGATE_BENCH_ROUNDS";
/// Keys of the A/B mode's runs.
const COMPARE_KEYS: u64 = 100_000;
/// Connections of the saturation runs.
const SAT_CONNECTIONS: u32 = 32;
/// Connections of the latency runs: a moderate, fixed load.
const LAT_CONNECTIONS: u32 = 4;
/// Distinct client identities per cell.
const KEY_COUNTS: [u64; 3] = [1, 100_000, 1_000_000];
/// Counter slots: above the largest key count, so 1M live keys rarely share a slot. The table
/// is written whole at startup, so memory does not depend on the keys seen.
const SLOTS: u32 = 1 << 20;
/// The request every run sends.
const PATH: &str = "/v1/items/42";

/// Run lengths.
#[derive(Clone, Copy)]
struct Durations {
    warmup: Duration,
    saturation: Duration,
    /// The 1M-key saturation run: longer, to reach more of the keys (the table shows how many
    /// distinct keys a cell actually sent: all of them only where throughput allows).
    saturation_1m: Duration,
    latency: Duration,
    /// Collector conditions: long enough for timeouts, retries and a full buffer.
    collector: Duration,
}

impl Durations {
    fn from_env() -> Self {
        if std::env::var_os(QUICK_VAR).is_some() {
            let s = Duration::from_secs(2);
            Self {
                warmup: Duration::from_secs(1),
                saturation: s,
                saturation_1m: s,
                latency: s,
                collector: Duration::from_secs(3),
            }
        } else {
            Self {
                warmup: Duration::from_secs(2),
                saturation: Duration::from_secs(6),
                saturation_1m: Duration::from_secs(20),
                latency: Duration::from_secs(5),
                collector: Duration::from_secs(10),
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    None,
    LocalRatelimit,
    WasmNoop,
    Tollgate,
    /// The A/B mode's other build of the filter.
    TollgateB,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::LocalRatelimit => "local_ratelimit",
            Self::WasmNoop => "wasm no-op",
            Self::Tollgate => "tollgate 4 tiers",
            Self::TollgateB => "tollgate B",
        }
    }
}

/// How the fake collector behaves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum CollectorMode {
    Accepting,
    Slow,
    Refusing,
    Blackholed,
}

impl CollectorMode {
    fn name(self) -> &'static str {
        match self {
            Self::Accepting => "accepting",
            Self::Slow => "slow (2 s)",
            Self::Refusing => "refusing",
            Self::Blackholed => "blackholed",
        }
    }
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; nothing else is understood.
    let durations = Durations::from_env();
    let tools = Tools::find()?;
    let upstream = tollgate_e2e::Upstream::start()?;
    if tools.compare_wasm.is_some() {
        return compare(&tools, &upstream, durations);
    }
    let mut cells = Vec::new();
    // Part-by-part timing lines of a `timing` build of the filter, by cell.
    let mut timings = Vec::new();
    for variant in [
        Variant::None,
        Variant::LocalRatelimit,
        Variant::WasmNoop,
        Variant::Tollgate,
    ] {
        let collector = FakeCollector::start(CollectorMode::Accepting)?;
        let envoy = BenchEnvoy::start(&tools, variant, upstream.port, collector.port)?;
        eprintln!("envoy_filter: {} (pid {})", variant.name(), envoy.pid());
        if variant == Variant::Tollgate {
            envoy.check_identity_from_xff()?;
        }
        let wrk = Wrk::new(&tools, &envoy)?;
        wrk.run(1, SAT_CONNECTIONS, durations.warmup)?;
        for keys in KEY_COUNTS {
            let rss_before = envoy.rss_kib()?;
            let cpu_before = envoy.cpu_ticks()?;
            let sat_time = if keys >= 1_000_000 {
                durations.saturation_1m
            } else {
                durations.saturation
            };
            let sat = wrk.run(keys, SAT_CONNECTIONS, sat_time)?;
            let cpu_ticks = envoy.cpu_ticks()? - cpu_before;
            let lat = wrk.run(keys, LAT_CONNECTIONS, durations.latency)?;
            let rss_after = envoy.rss_kib()?;
            let events = envoy.events()?;
            eprintln!(
                "envoy_filter:   {keys} keys: {:.0} req/s, {} requests, p99 {} µs, events {events}",
                sat.throughput(),
                sat.requests,
                lat.p99_us
            );
            if let Some(timing) = envoy.timing() {
                timings.push(format!("{} at {keys} keys: {timing}", variant.name()));
            }
            cells.push(Cell {
                variant,
                keys,
                sat,
                cpu_us_per_request: ticks_to_us(cpu_ticks, tools.clock_ticks) / sat.requests_f64(),
                lat,
                rss_before,
                rss_after,
                events,
            });
        }
    }

    let mut conditions = Vec::new();
    for mode in [
        CollectorMode::Accepting,
        CollectorMode::Slow,
        CollectorMode::Refusing,
        CollectorMode::Blackholed,
    ] {
        let collector = FakeCollector::start(mode)?;
        let envoy = BenchEnvoy::start(&tools, Variant::Tollgate, upstream.port, collector.port)?;
        eprintln!(
            "envoy_filter: collector {} (pid {})",
            mode.name(),
            envoy.pid()
        );
        let wrk = Wrk::new(&tools, &envoy)?;
        let rss_before = envoy.rss_kib()?;
        let run = wrk.run(100_000, LAT_CONNECTIONS, durations.collector)?;
        let rss_after = envoy.rss_kib()?;
        conditions.push(Condition {
            mode,
            run,
            rss_before,
            rss_after,
            events: envoy.events()?,
        });
    }

    print_tables(&tools, &cells, &conditions);
    print_timings(&timings);
    Ok(())
}

/// The A/B mode: `none`, the filter and the other build, each in its own Envoy started once,
/// then one saturation run each per round, in turn; prints Envoy's CPU per request and what
/// each build adds over `none`.
fn compare(tools: &Tools, upstream: &tollgate_e2e::Upstream, durations: Durations) -> Result<()> {
    let rounds: usize = match std::env::var(ROUNDS_VAR) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{ROUNDS_VAR}={v:?} is not a number of rounds"))?,
        Err(_) => 10,
    };
    let variants = [Variant::None, Variant::Tollgate, Variant::TollgateB];
    // All three stay up: an idle Envoy costs nothing measurable, and short alternating runs of
    // long-lived processes put many more pairs in the same minutes than restarts would.
    let mut running = Vec::new();
    for variant in variants {
        let collector = FakeCollector::start(CollectorMode::Accepting)?;
        let envoy = BenchEnvoy::start(tools, variant, upstream.port, collector.port)?;
        let wrk = Wrk::new(tools, &envoy)?;
        wrk.run(COMPARE_KEYS, SAT_CONNECTIONS, durations.warmup)?;
        running.push((collector, envoy, wrk));
    }
    // cpu µs per request, by round then variant.
    let mut cpu = vec![[0.0f64; 3]; rounds];
    for (round, row) in cpu.iter_mut().enumerate() {
        // The order turns each round, so no build always runs first or right after another
        // (whose Envoy may still be sending that run's events on the same CPU).
        for i in (0..variants.len()).map(|k| (k + round) % variants.len()) {
            let (_, envoy, wrk) = &running[i];
            let before = envoy.cpu_ticks()?;
            let sat = wrk.run(COMPARE_KEYS, SAT_CONNECTIONS, durations.latency)?;
            let ticks = envoy.cpu_ticks()? - before;
            row[i] = ticks_to_us(ticks, tools.clock_ticks) / sat.requests_f64();
            eprintln!(
                "envoy_filter: round {} {}: {:.0} req/s, {:.1} cpu µs/req",
                round + 1,
                variants[i].name(),
                sat.throughput(),
                row[i]
            );
        }
    }
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let b = tools.compare_wasm.as_deref().unwrap_or(Path::new(""));
    println!(
        "\nenvoy_filter A/B at {COMPARE_KEYS} keys, Envoy CPU µs per request (+ over none)\n\
         A = {} ({} B)\nB = {} ({} B)",
        tools.filter_wasm.display(),
        size(&tools.filter_wasm),
        b.display(),
        size(b)
    );
    println!("{:>5} {:>8} {:>16} {:>16}", "round", "none", "A", "B");
    let (mut added_a, mut added_b, mut b_minus_a) = (Vec::new(), Vec::new(), Vec::new());
    for (round, row) in cpu.iter().enumerate() {
        let (a, b) = (row[1] - row[0], row[2] - row[0]);
        added_a.push(a);
        added_b.push(b);
        b_minus_a.push(row[2] - row[1]);
        println!(
            "{:>5} {:>8.1} {:>7.1} ({a:>+6.1}) {:>7.1} ({b:>+6.1})",
            round + 1,
            row[0],
            row[1],
            row[2]
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    };
    let cheaper = b_minus_a.iter().filter(|d| **d < 0.0).count();
    let (a, b, d) = (
        median(&mut added_a),
        median(&mut added_b),
        median(&mut b_minus_a),
    );
    println!(
        "median added: A {a:+.1} µs, B {b:+.1} µs; median of the rounds' B − A {d:+.1} µs \
         (B cheaper in {cheaper} of {rounds} rounds)"
    );
    let timings: Vec<String> = ["A", "B"]
        .iter()
        .zip(&running[1..])
        .filter_map(|(side, (_, envoy, _))| envoy.timing().map(|t| format!("{side}: {t}")))
        .collect();
    print_timings(&timings);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Programs

struct Tools {
    envoy: PathBuf,
    filter_wasm: PathBuf,
    passthrough_wasm: PathBuf,
    /// The A/B mode's other build of the filter.
    compare_wasm: Option<PathBuf>,
    wrk: PathBuf,
    /// `taskset` and two CPUs: Envoy on CPU 0, wrk on CPU 1.
    pin: bool,
    clock_ticks: u64,
}

impl Tools {
    fn find() -> Result<Self> {
        let envoy = envoy_binary()?;
        let filter_wasm = filter_wasm()?;
        let passthrough_wasm = match std::env::var_os(PASSTHROUGH_WASM_VAR) {
            Some(path) => PathBuf::from(path),
            None => tollgate_e2e::workspace_root()
                .join("target/wasm32-unknown-unknown/release-wasm/tollgate_bench_passthrough.wasm"),
        };
        if !passthrough_wasm.is_file() {
            bail!(
                "{} does not exist: run `cargo xtask bench envoy_filter`, which builds it",
                passthrough_wasm.display()
            );
        }
        let compare_wasm = std::env::var_os(COMPARE_WASM_VAR).map(PathBuf::from);
        if let Some(path) = compare_wasm.as_ref().filter(|p| !p.is_file()) {
            bail!("{COMPARE_WASM_VAR}={} is not a file", path.display());
        }
        let wrk = which("wrk").context("wrk is not installed: `apt-get install -y wrk`")?;
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let pin = cpus >= 2 && which("taskset").is_some();
        let clock_ticks = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100);
        Ok(Self {
            envoy,
            filter_wasm,
            passthrough_wasm,
            compare_wasm,
            wrk,
            pin,
            clock_ticks,
        })
    }

    /// `program`, under `taskset -c <cpu>` when pinning.
    fn command(&self, program: &Path, cpu: u32) -> Command {
        if self.pin {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(program);
            c
        } else {
            Command::new(program)
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

fn ticks_to_us(ticks: u64, clock_ticks: u64) -> f64 {
    ticks as f64 * 1e6 / clock_ticks as f64
}

// ---------------------------------------------------------------------------------------------
// Envoy

fn tollgate_config() -> Value {
    let huge = 1_000_000_000u64;
    json!({
        "policy": {
            "version": 1,
            // Callers known by address get the anonymous plan; without this its built-in hourly
            // limit would be a fifth counter (and deny).
            "plans": {"anonymous": {"unlimited": true}},
            "rules": [
                {"name": "global", "scope": "global", "algorithm": "gcra",
                 "limit": huge, "window": "1s", "burst": huge},
                {"name": "org", "scope": "org", "algorithm": "sliding_window",
                 "limit": huge, "window": "1m"},
                {"name": "user", "scope": "user", "algorithm": "token_bucket",
                 "limit": huge, "window": "1s"},
                {"name": "items", "scope": "user", "algorithm": "fixed_window",
                 "limit": huge, "window": "1m",
                 "endpoint": {"method": "GET", "path": "/v1/items/{id}"}}
            ],
            "routes": ["/v1/items/{id}"]
        },
        "collector": {"cluster": "collector", "timeout_ms": 1000},
        "batch_size": 1000,
        "buffer_cap": 20000,
        "slots": SLOTS
    })
}

fn wasm_filter(name: &str, root_id: &str, wasm: &Path, configuration: &str) -> Value {
    json!({
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name,
                "root_id": root_id,
                "failure_policy": "FAIL_OPEN",
                "vm_config": {
                    "vm_id": name,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": wasm.to_string_lossy()}}
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": configuration
                }
            }
        }
    })
}

fn http_filters(tools: &Tools, variant: Variant) -> Vec<Value> {
    let mut filters = match variant {
        Variant::None => vec![],
        Variant::LocalRatelimit => vec![json!({
            "name": "envoy.filters.http.local_ratelimit",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                "stat_prefix": "bench_rl",
                "token_bucket": {
                    "max_tokens": 1_000_000_000u64,
                    "tokens_per_fill": 1_000_000_000u64,
                    "fill_interval": "1s"
                },
                "filter_enabled": {"runtime_key": "bench_rl_enabled",
                    "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                "filter_enforced": {"runtime_key": "bench_rl_enforced",
                    "default_value": {"numerator": 100, "denominator": "HUNDRED"}}
            }
        })],
        Variant::WasmNoop => vec![wasm_filter("passthrough", "", &tools.passthrough_wasm, "")],
        Variant::Tollgate | Variant::TollgateB => {
            let wasm = match (variant, &tools.compare_wasm) {
                (Variant::TollgateB, Some(other)) => other,
                _ => &tools.filter_wasm,
            };
            vec![wasm_filter(
                "tollgate",
                "tollgate",
                wasm,
                &tollgate_config().to_string(),
            )]
        }
    };
    filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    }));
    filters
}

fn bootstrap(
    tools: &Tools,
    variant: Variant,
    port: u16,
    admin_port: u16,
    upstream_port: u16,
    collector_port: u16,
) -> Value {
    // As in envoy/envoy.yaml: health checks, circuit breakers, no Envoy-level retries.
    let collector = guarded(static_cluster("collector", collector_port), "0.5s", "5s", 8);
    listener_bootstrap(
        "bench-envoy",
        port,
        admin_port,
        // The client is the last X-Forwarded-For entry (the bench's clients).
        json!({"stat_prefix": "bench", "use_remote_address": false}),
        json!({"cluster": "upstream", "timeout": "15s"}),
        http_filters(tools, variant),
        vec![static_cluster("upstream", upstream_port), collector],
    )
}

/// A running Envoy, killed on drop.
struct BenchEnvoy {
    child: Child,
    port: u16,
    admin_port: u16,
    log: PathBuf,
}

impl BenchEnvoy {
    fn start(
        tools: &Tools,
        variant: Variant,
        upstream_port: u16,
        collector_port: u16,
    ) -> Result<Self> {
        let dir = scratch_dir("bench-envoy")?;
        let port = free_port()?;
        let admin_port = free_port()?;
        let config = dir.join("envoy.json");
        let config_json = bootstrap(
            tools,
            variant,
            port,
            admin_port,
            upstream_port,
            collector_port,
        );
        std::fs::write(&config, serde_json::to_string_pretty(&config_json)?)?;
        let log = dir.join("envoy.log");
        let child = tools
            .command(&tools.envoy, 0)
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", "1", "--disable-hot-restart", "-l", "warn"])
            .arg("--log-path")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", tools.envoy.display()))?;
        let mut envoy = Self {
            child,
            port,
            admin_port,
            log: log.clone(),
        };
        // A million counter slots are written at startup: allow for it.
        let ready = eventually(Duration::from_secs(90), || {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                bail!("Envoy exited with {status}");
            }
            let body = http_get(&format!("http://127.0.0.1:{admin_port}/ready"))?;
            if body.trim() != "LIVE" {
                bail!("admin /ready says {body:?}");
            }
            TcpStream::connect(("127.0.0.1", port))?;
            Ok(())
        });
        if let Err(error) = ready {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(20).collect();
            return Err(error.context(format!(
                "Envoy ({}) did not become ready; log tail (newest first):\n{}",
                variant.name(),
                tail.join("\n")
            )));
        }
        Ok(envoy)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The filter's latest part-by-part timing line, when it is a build with the `timing`
    /// feature (`filter/src/timing.rs`); `None` otherwise.
    fn timing(&self) -> Option<String> {
        let log = std::fs::read_to_string(&self.log).ok()?;
        log.lines()
            .rev()
            .find_map(|l| l.find(REPORT_PREFIX).map(|at| l[at..].to_string()))
    }

    /// VmRSS from /proc/<pid>/status, in KiB.
    fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS in /proc/<pid>/status")
    }

    /// User + system CPU time of the whole process, in clock ticks.
    fn cpu_ticks(&self) -> Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // Fields after the `(comm)`: state is field 3; utime and stime are fields 14 and 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Result<u64> {
            fields
                .get(n - 3)
                .and_then(|v| v.parse().ok())
                .context("unreadable /proc/<pid>/stat")
        };
        Ok(field(14)? + field(15)?)
    }

    fn stats(&self) -> Result<String> {
        http_get(&format!("http://127.0.0.1:{}/stats", self.admin_port))
    }

    /// The filter's event counters: `queued/sent/dropped`, or `-` without the filter.
    fn events(&self) -> Result<String> {
        let stats = self.stats()?;
        let stat = |name: &str| -> Option<u64> {
            stats.lines().find_map(|l| {
                l.strip_prefix(&format!("wasmcustom.tollgate.{name}: "))
                    .and_then(|v| v.trim().parse().ok())
            })
        };
        Ok(
            match (
                stat("events_queued"),
                stat("events_sent"),
                stat("events_dropped"),
            ) {
                (Some(q), Some(s), Some(d)) => format!("{q}/{s}/{d}"),
                _ => "-".into(),
            },
        )
    }

    /// Checks that the filter sees the X-Forwarded-For address as the client: two addresses
    /// must show as two users on the status path.
    fn check_identity_from_xff(&self) -> Result<()> {
        let agent = tollgate_e2e::client();
        let url = format!("http://127.0.0.1:{}/.well-known/ratelimit", self.port);
        for ip in ["10.1.2.3", "10.4.5.6"] {
            let response = tollgate_e2e::send(&agent, "GET", &url, &[("x-forwarded-for", ip)])?;
            if !response.body.contains(ip) {
                bail!(
                    "the filter does not identify the caller by X-Forwarded-For {ip}: {}",
                    response.body
                );
            }
        }
        Ok(())
    }
}

impl Drop for BenchEnvoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Load generator

/// What one wrk run saw.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    requests: u64,
    duration_us: u64,
    p50_us: u64,
    p99_us: u64,
    /// Non-2xx responses, connection errors and timeouts.
    errors: u64,
}

impl Run {
    fn requests_f64(&self) -> f64 {
        self.requests.max(1) as f64
    }

    fn throughput(&self) -> f64 {
        self.requests as f64 * 1e6 / self.duration_us.max(1) as f64
    }

    fn us_per_request(&self) -> f64 {
        1e6 / self.throughput().max(1e-9)
    }
}

struct Wrk<'t> {
    tools: &'t Tools,
    dir: PathBuf,
    url: String,
}

impl<'t> Wrk<'t> {
    fn new(tools: &'t Tools, envoy: &BenchEnvoy) -> Result<Self> {
        Ok(Self {
            tools,
            dir: scratch_dir("bench-wrk")?,
            url: format!("http://127.0.0.1:{}{PATH}", envoy.port),
        })
    }

    /// One bounded closed-loop run: `connections` connections on one thread for `time`, each
    /// request from the next of `keys` client addresses.
    fn run(&self, keys: u64, connections: u32, time: Duration) -> Result<Run> {
        let script = self.dir.join(format!("keys-{keys}.lua"));
        std::fs::write(&script, lua_script(keys))?;
        let secs = time.as_secs().max(1);
        let output = self
            .tools
            .command(&self.tools.wrk, 1)
            .args(["-t1", "--timeout", "5s"])
            .arg(format!("-c{connections}"))
            .arg(format!("-d{secs}s"))
            .arg("-s")
            .arg(&script)
            .arg(&self.url)
            .stdin(Stdio::null())
            .output()
            .context("cannot run wrk")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "wrk failed: {stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        parse_wrk(&stdout).with_context(|| format!("unexpected wrk output:\n{stdout}"))
    }
}

/// The wrk script: request `i` comes from client `10.a.b.c` with `a.b.c` = `i mod keys`, and
/// `done` prints one machine-readable line.
fn lua_script(keys: u64) -> String {
    format!(
        r#"local keys = {keys}
local i = 0
request = function()
  local k = i % keys
  i = i + 1
  local ip = string.format("10.%d.%d.%d", math.floor(k / 65536) % 256, math.floor(k / 256) % 256, k % 256)
  return wrk.format("GET", "{PATH}", {{ ["X-Forwarded-For"] = ip }})
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d errors=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"#
    )
}

fn parse_wrk(stdout: &str) -> Option<Run> {
    let line = stdout.lines().find_map(|l| l.strip_prefix("BENCH "))?;
    let mut run = Run::default();
    for pair in line.split_whitespace() {
        let (name, value) = pair.split_once('=')?;
        let value: u64 = value.parse().ok()?;
        match name {
            "requests" => run.requests = value,
            "duration_us" => run.duration_us = value,
            "p50_us" => run.p50_us = value,
            "p99_us" => run.p99_us = value,
            "errors" => run.errors = value,
            _ => {}
        }
    }
    Some(run)
}

// ---------------------------------------------------------------------------------------------
// The fake collector

/// A stand-in for the collector, on its own thread per connection, in one fixed mode:
/// `Accepting` reads each batch and answers 200 without parsing it (its cost should not compete
/// with Envoy's); `Slow` answers after 2 s; `Blackholed` reads and never answers; `Refusing`
/// listens nowhere (its port was free and stays closed).
struct FakeCollector {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    #[allow(dead_code)]
    batches: Arc<AtomicU64>,
}

impl FakeCollector {
    fn start(mode: CollectorMode) -> Result<Self> {
        let port = free_port()?;
        let stop = Arc::new(AtomicBool::new(false));
        let batches = Arc::new(AtomicU64::new(0));
        let thread = if mode == CollectorMode::Refusing {
            None
        } else {
            let listener = TcpListener::bind(("127.0.0.1", port))?;
            listener.set_nonblocking(true)?;
            let (stop, batches) = (stop.clone(), batches.clone());
            Some(std::thread::spawn(move || {
                let mut connections = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (stop, batches) = (stop.clone(), batches.clone());
                            connections.push(std::thread::spawn(move || {
                                let _ = serve_collector(stream, mode, &stop, &batches);
                            }));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                for c in connections {
                    let _ = c.join();
                }
            }))
        };
        Ok(Self {
            port,
            stop,
            thread,
            batches,
        })
    }
}

impl Drop for FakeCollector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves one connection until the peer closes it or the collector stops.
fn serve_collector(
    stream: TcpStream,
    mode: CollectorMode,
    stop: &AtomicBool,
    batches: &AtomicU64,
) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    while !stop.load(Ordering::SeqCst) {
        // Wait for a request line, noticing a stop between requests.
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e.into()),
        }
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.trim().eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        match mode {
            CollectorMode::Accepting | CollectorMode::Refusing => {}
            CollectorMode::Slow => {
                // Bounded: the stop flag is checked every 100 ms.
                for _ in 0..20 {
                    if stop.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            CollectorMode::Blackholed => {
                // Never answer: hold the connection until the peer gives up or we stop.
                let mut sink = [0u8; 4096];
                while !stop.load(Ordering::SeqCst) {
                    match reader.read(&mut sink) {
                        Ok(0) => return Ok(()),
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                return Ok(());
            }
        }
        batches.fetch_add(1, Ordering::Relaxed);
        writer.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The report

struct Cell {
    variant: Variant,
    keys: u64,
    sat: Run,
    cpu_us_per_request: f64,
    lat: Run,
    rss_before: u64,
    rss_after: u64,
    events: String,
}

struct Condition {
    mode: CollectorMode,
    run: Run,
    rss_before: u64,
    rss_after: u64,
    events: String,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Prints where a request's time went inside Envoy, when the filter is a `timing` build.
fn print_timings(timings: &[String]) {
    if timings.is_empty() {
        return;
    }
    println!("\nwhere a request's time goes inside the filter (its `timing` build; the latest report of each)");
    for line in timings {
        println!("{line}");
    }
}

fn print_tables(tools: &Tools, cells: &[Cell], conditions: &[Condition]) {
    let wasm_size = std::fs::metadata(&tools.filter_wasm).map_or(0, |m| m.len());
    let noop_size = std::fs::metadata(&tools.passthrough_wasm).map_or(0, |m| m.len());
    println!();
    println!(
        "envoy_filter: Envoy --concurrency 1{}, wrk -t1 ({SAT_CONNECTIONS} connections for throughput, \
         {LAT_CONNECTIONS} for latency); tollgate_filter.wasm {wasm_size} B, no-op {noop_size} B",
        if tools.pin { " on CPU 0, wrk on CPU 1" } else { "" }
    );
    println!(
        "{:<17} {:>9} {:>8} {:>9} {:>8} {:>7} {:>8} {:>7} {:>7} {:>7} {:>20} {:>6} {:>24}",
        "variant",
        "keys",
        "sent",
        "req/s",
        "µs/req",
        "+µs",
        "cpu µs",
        "+cpu",
        "p50 µs",
        "p99 µs",
        "RSS MiB before→after",
        "errors",
        "events queued/sent/drop"
    );
    for cell in cells {
        let base = cells
            .iter()
            .find(|c| c.variant == Variant::None && c.keys == cell.keys);
        let (added, added_cpu) = match base {
            Some(b) if cell.variant != Variant::None => (
                format!("{:+.1}", cell.sat.us_per_request() - b.sat.us_per_request()),
                format!("{:+.1}", cell.cpu_us_per_request - b.cpu_us_per_request),
            ),
            _ => ("-".into(), "-".into()),
        };
        println!(
            "{:<17} {:>9} {:>8} {:>9.0} {:>8.1} {:>7} {:>8.1} {:>7} {:>7} {:>7} {:>20} {:>6} {:>24}",
            cell.variant.name(),
            cell.keys,
            cell.keys.min(cell.sat.requests.max(cell.lat.requests)),
            cell.sat.throughput(),
            cell.sat.us_per_request(),
            added,
            cell.cpu_us_per_request,
            added_cpu,
            cell.lat.p50_us,
            cell.lat.p99_us,
            format!("{:.1}→{:.1}", mib(cell.rss_before), mib(cell.rss_after)),
            cell.sat.errors + cell.lat.errors,
            cell.events,
        );
    }
    println!();
    println!("collector conditions: tollgate 4 tiers, 100000 keys, {LAT_CONNECTIONS} connections");
    println!(
        "{:<12} {:>9} {:>7} {:>7} {:>20} {:>6} {:>24}",
        "collector",
        "req/s",
        "p50 µs",
        "p99 µs",
        "RSS MiB before→after",
        "errors",
        "events queued/sent/drop"
    );
    for c in conditions {
        println!(
            "{:<12} {:>9.0} {:>7} {:>7} {:>20} {:>6} {:>24}",
            c.mode.name(),
            c.run.throughput(),
            c.run.p50_us,
            c.run.p99_us,
            format!("{:.1}→{:.1}", mib(c.rss_before), mib(c.rss_after)),
            c.run.errors,
            c.events,
        );
    }
}
