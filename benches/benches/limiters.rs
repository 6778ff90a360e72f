//! Decisions per second: Tollgate's token bucket and GCRA against governor's GCRA.
//!
//! Every line runs the same workload through the same driver ([`run_batch`]): batches of
//! [`BATCH`] decisions of cost 1, the clock advanced once before each batch, keys drawn from one
//! seeded xorshift generator. Only the limiter behind the [`Subject`] trait changes.
//!
//! Lines, in each workload:
//! - `tollgate_token_bucket`, `tollgate_gcra`: the typed API's `Algorithm::decide`, a state
//!   value per key (one local state for a single key, a `HashMap<u64, State>` for many): the
//!   verdict and the next state, the same work governor's `check` does. The algorithms are the
//!   forms the policy compiler picks for this quota (`TokenBucketNanos`, `GcraNanos`: one
//!   request per 1,000 ns is a whole number of nanoseconds, so a `u64` state is exact);
//! - `tollgate_token_bucket_exact`, `tollgate_gcra_exact` (paired comparison only): the `u128`
//!   forms a rule gets when its interval is not a whole number of nanoseconds (e.g. 7/hour);
//! - `tollgate_gcra_with_headers`: `Algorithm::acquire`, which also computes every number the
//!   response headers need (remaining, reset, retry-after), as the edges do per request;
//! - `tollgate_limiter_bytes`: the `Limiter` enum (GCRA) over byte-encoded state in a
//!   `HashMap<u64, Vec<u8>>`: decode, acquire with headers, encode into a reused buffer
//!   (`Limiter::acquire_into`), which is the path the runtimes with shared KV take;
//! - `governor_gcra`: `RateLimiter::direct` for a single key, the keyed limiter with its
//!   default `DashMap` store for many.
//!
//! Fairness:
//! - Clock: nobody reads the system clock. Tollgate is handed a synthetic `Timestamp`; governor
//!   runs on `FakeRelativeClock` (what `direct`/`keyed` build with the real clock replaced). Both
//!   follow the same schedule. Advancing the fake clock is an atomic add, paid once per batch of
//!   100, so it is amortised away; each governor check still does one relaxed atomic load for now.
//! - Hashing: both maps use std's `RandomState` (SipHash-1-3) over `u64` keys.
//! - Concurrency: governor's state is `Sync` (an atomic compare-and-swap per decision, a sharded
//!   `DashMap` lock for keyed). Tollgate's typed lines hold state behind `&mut`, single-threaded,
//!   as the Envoy filter (one VM per worker thread) and a Durable Object do; its shared-state
//!   story is the byte path plus the runtime's own store, which this benchmark does not model.
//! - Output: governor returns `Ok(())` or a `NotUntil` snapshot and computes the wait only when
//!   asked; Tollgate's `decide` lines likewise return only the verdict. The `_with_headers` and
//!   byte lines compute the whole `Outcome` and keep it alive with `black_box`.
//! - Memory per key: governor keeps 8 bytes (an `AtomicU64`) beside the key, as do Tollgate's
//!   nanosecond forms; the exact forms keep 16 (`GcraState`) and 24 (`TokenBucketState`); the
//!   byte path keeps a 24-byte `Vec` header plus a heap allocation per key.
//!
//! Before measuring, every line is primed until its keys are in steady state, then the share of
//! decisions allowed over a further window is printed: the lines must agree, which shows they did
//! the same work.

use std::collections::HashMap;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput};
use governor::clock::{Clock, FakeRelativeClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tollgate_core::algorithm::{Gcra, GcraNanos, TokenBucket, TokenBucketNanos};
use tollgate_core::time::NANOS_PER_SEC;
use tollgate_core::{Algorithm, Limiter, Timestamp};

/// Requests allowed per second, per key, on every line.
const RATE_PER_SEC: u32 = 1_000_000;
/// Requests allowed at once, per key. Small enough that priming 10,000 keys to steady state
/// takes a fraction of a second; the cost of a decision does not depend on it.
const BURST: u32 = 100;
/// Offered load as a fraction of the rate (5/4): in steady state 80 % of decisions are allowed.
const OVERLOAD_NUM: u64 = 5;
/// Denominator of the offered load fraction.
const OVERLOAD_DEN: u64 = 4;
/// Decisions per measured iteration; the clock advances once per batch.
const BATCH: u64 = 100;
/// Seed of the key generator, the same for every line.
const SEED: u64 = 0x9E37_79B9_7F4A_7C15;
/// Batches run before the reported window: enough synthetic time to drain every key's burst.
const PRIME_BURSTS: u64 = 3;
/// Batches over which the share of allowed decisions is reported.
const REPORT_BATCHES: u64 = 10_000;

/// One workload: how many keys share the traffic.
struct Workload {
    /// Criterion group name.
    name: &'static str,
    /// Number of distinct keys, chosen uniformly.
    keys: u64,
}

impl Workload {
    /// Synthetic nanoseconds per batch such that each key is offered `OVERLOAD × RATE_PER_SEC`.
    fn tick_nanos(&self) -> u64 {
        BATCH * NANOS_PER_SEC * OVERLOAD_DEN / (self.keys * u64::from(RATE_PER_SEC) * OVERLOAD_NUM)
    }

    /// Batches after which every key is in steady state (its burst drained, with margin).
    fn prime_batches(&self) -> u64 {
        // Each key gains (OVERLOAD - 1) × RATE of excess demand per second.
        let drain_nanos = u64::from(BURST) * NANOS_PER_SEC * OVERLOAD_DEN
            / ((OVERLOAD_NUM - OVERLOAD_DEN) * u64::from(RATE_PER_SEC));
        PRIME_BURSTS * drain_nanos / self.tick_nanos()
    }
}

/// A single key: every decision hits the same state.
const SINGLE_KEY: Workload = Workload {
    name: "single_key",
    keys: 1,
};
/// 10,000 keys chosen pseudo-randomly.
const KEYS_10K: Workload = Workload {
    name: "keys_10k",
    keys: 10_000,
};

/// xorshift64*: a few instructions per key, identical for every line.
struct XorShift(u64);

impl XorShift {
    /// A key uniformly below `n` (Lemire's multiply-shift, no division).
    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        // The high half of a 64×64 product is below n, so the cast is lossless.
        ((u128::from(r) * u128::from(n)) >> 64) as u64
    }
}

/// A limiter under test, driven by [`run_batch`].
trait Subject {
    /// Moves this subject's notion of now forward.
    fn advance(&mut self, nanos: u64);
    /// Decides one request of cost 1 for `key`; true when allowed.
    fn decide(&mut self, key: u64) -> bool;
}

/// Where a Tollgate line keeps per-key values: one slot, or one per key in a map.
trait Slots<T> {
    /// The value for `key`, created with `Default` the first time.
    fn slot(&mut self, key: u64) -> &mut T;
}

/// A single slot, for the single-key workload.
#[derive(Default)]
struct One<T>(T);

impl<T> Slots<T> for One<T> {
    fn slot(&mut self, _key: u64) -> &mut T {
        &mut self.0
    }
}

/// A std `HashMap` (SipHash, `RandomState`), for the keyed workload.
struct Map<T>(HashMap<u64, T>);

impl<T> Default for Map<T> {
    fn default() -> Self {
        Self(HashMap::new())
    }
}

impl<T: Default> Slots<T> for Map<T> {
    fn slot(&mut self, key: u64) -> &mut T {
        self.0.entry(key).or_default()
    }
}

/// Tollgate's typed API on a state value: `Algorithm::decide`, or `acquire` with headers.
struct Typed<A: Algorithm, S> {
    /// The algorithm and its parameters.
    algorithm: A,
    /// Per-key states.
    states: S,
    /// Synthetic time, nanoseconds.
    now: u64,
    /// Compute the header numbers too (`acquire`) rather than the verdict only (`decide`).
    headers: bool,
}

impl<A: Algorithm, S: Slots<A::State> + Default> Typed<A, S> {
    /// A fresh line deciding only: every key unseen, time at 0.
    fn new(algorithm: A) -> Self {
        Self {
            algorithm,
            states: S::default(),
            now: 0,
            headers: false,
        }
    }

    /// A fresh line that also computes every header number.
    fn with_headers(algorithm: A) -> Self {
        Self {
            headers: true,
            ..Self::new(algorithm)
        }
    }
}

impl<A: Algorithm, S: Slots<A::State>> Subject for Typed<A, S> {
    fn advance(&mut self, nanos: u64) {
        self.now += nanos;
    }

    fn decide(&mut self, key: u64) -> bool {
        let state = self.states.slot(key);
        let now = Timestamp::from_nanos(self.now);
        if self.headers {
            let (outcome, next) = self.algorithm.acquire(state, now, 1);
            *state = next;
            black_box(outcome).allowed
        } else {
            let (allowed, next) = self.algorithm.decide(state, now, 1);
            *state = next;
            black_box(allowed)
        }
    }
}

/// Tollgate's dynamic `Limiter` over byte-encoded state, as stored in KV.
struct Bytes<S> {
    /// The limiter (GCRA in its nanosecond form here).
    limiter: Limiter,
    /// Per-key encoded states; an empty `Vec` is a key never seen.
    states: S,
    /// Synthetic time, nanoseconds.
    now: u64,
    /// The buffer the next state is written into, swapped with the key's slot: runtimes reuse
    /// one buffer the same way (`Limiter::acquire_into`).
    scratch: Vec<u8>,
}

impl<S: Slots<Vec<u8>> + Default> Bytes<S> {
    /// A fresh line: every key unseen, time at 0.
    fn new(limiter: Limiter) -> Self {
        Self {
            limiter,
            states: S::default(),
            now: 0,
            scratch: Vec::with_capacity(64),
        }
    }
}

impl<S: Slots<Vec<u8>>> Subject for Bytes<S> {
    fn advance(&mut self, nanos: u64) {
        self.now += nanos;
    }

    fn decide(&mut self, key: u64) -> bool {
        let slot = self.states.slot(key);
        let current = (!slot.is_empty()).then_some(slot.as_slice());
        let outcome = self.limiter.acquire_into(
            current,
            Timestamp::from_nanos(self.now),
            1,
            &mut self.scratch,
        );
        std::mem::swap(slot, &mut self.scratch);
        black_box(outcome).allowed
    }
}

/// The middleware type governor's constructors pick for a clock.
type NoOp = NoOpMiddleware<<FakeRelativeClock as Clock>::Instant>;

/// governor's direct (single-state) limiter on a fake clock.
struct GovernorDirect {
    /// The limiter.
    limiter: RateLimiter<NotKeyed, InMemoryState, FakeRelativeClock, NoOp>,
    /// A handle on the limiter's clock (clones share the time).
    clock: FakeRelativeClock,
}

impl GovernorDirect {
    /// A fresh limiter at fake time 0.
    fn new() -> Self {
        let clock = FakeRelativeClock::default();
        Self {
            limiter: RateLimiter::direct_with_clock(quota(), clock.clone()),
            clock,
        }
    }
}

impl Subject for GovernorDirect {
    fn advance(&mut self, nanos: u64) {
        self.clock.advance(Duration::from_nanos(nanos));
    }

    fn decide(&mut self, _key: u64) -> bool {
        black_box(self.limiter.check()).is_ok()
    }
}

/// governor's keyed limiter with its default store (`DashMap`, std `RandomState`) on a fake
/// clock.
struct GovernorKeyed {
    /// The limiter.
    limiter: RateLimiter<u64, DashMapStateStore<u64>, FakeRelativeClock, NoOp>,
    /// A handle on the limiter's clock (clones share the time).
    clock: FakeRelativeClock,
}

impl GovernorKeyed {
    /// A fresh limiter at fake time 0, no key seen.
    fn new() -> Self {
        let clock = FakeRelativeClock::default();
        Self {
            limiter: RateLimiter::dashmap_with_clock(quota(), clock.clone()),
            clock,
        }
    }
}

impl Subject for GovernorKeyed {
    fn advance(&mut self, nanos: u64) {
        self.clock.advance(Duration::from_nanos(nanos));
    }

    fn decide(&mut self, key: u64) -> bool {
        black_box(self.limiter.check_key(&key)).is_ok()
    }
}

/// governor's quota for `RATE_PER_SEC` with `BURST`.
fn quota() -> Quota {
    let rate = NonZeroU32::new(RATE_PER_SEC).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(BURST).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(burst)
}

/// Tollgate's token bucket with the same parameters, in its exact `u128` form.
fn token_bucket_exact() -> TokenBucket {
    TokenBucket::new(RATE_PER_SEC.into(), NANOS_PER_SEC, BURST.into())
        .unwrap_or_else(|e| panic!("token bucket parameters: {e}"))
}

/// The token bucket as the policy compiler builds it for this quota: one token per 1,000 ns is
/// a whole number of nanoseconds, so the `u64` form (`policy::compile` makes the same choice).
fn token_bucket() -> TokenBucketNanos {
    token_bucket_exact()
        .in_nanos()
        .unwrap_or_else(|| panic!("1,000,000/s has a whole-nanosecond interval"))
}

/// Tollgate's GCRA with the same parameters, in its exact `u128` form.
fn gcra_exact() -> Gcra {
    Gcra::new(RATE_PER_SEC.into(), NANOS_PER_SEC, BURST.into())
        .unwrap_or_else(|e| panic!("GCRA parameters: {e}"))
}

/// GCRA as the policy compiler builds it for this quota (the `u64` nanosecond form).
fn gcra() -> GcraNanos {
    gcra_exact()
        .in_nanos()
        .unwrap_or_else(|| panic!("1,000,000/s has a whole-nanosecond interval"))
}

/// One measured iteration: advance the clock, then `BATCH` decisions. Returns how many were
/// allowed.
fn run_batch<S: Subject>(subject: &mut S, keys: &mut XorShift, workload: &Workload) -> u64 {
    subject.advance(workload.tick_nanos());
    let mut allowed = 0;
    for _ in 0..BATCH {
        allowed += u64::from(subject.decide(keys.below(workload.keys)));
    }
    allowed
}

/// Primes `subject` to steady state, prints the share of decisions it allows there, then
/// measures it as `<workload>/<line>`.
fn bench_line<S: Subject>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    workload: &Workload,
    line: &str,
    mut subject: S,
) {
    let mut keys = XorShift(SEED);
    for _ in 0..workload.prime_batches() {
        run_batch(&mut subject, &mut keys, workload);
    }
    let allowed: u64 = (0..REPORT_BATCHES)
        .map(|_| run_batch(&mut subject, &mut keys, workload))
        .sum();
    let decisions = REPORT_BATCHES * BATCH;
    eprintln!(
        "{}/{line}: {allowed} of {decisions} decisions allowed in steady state ({:.1} %)",
        workload.name,
        100.0 * allowed as f64 / decisions as f64,
    );
    group.bench_function(line, |b| {
        b.iter(|| black_box(run_batch(&mut subject, &mut keys, workload)))
    });
}

/// A benchmark group for `workload` with the short timings this suite uses.
fn group<'a>(c: &'a mut Criterion, workload: &Workload) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(workload.name);
    group
        .throughput(Throughput::Elements(BATCH))
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    group
}

/// All four lines on a single key.
fn single_key(c: &mut Criterion) {
    let w = &SINGLE_KEY;
    let mut g = group(c, w);
    bench_line(
        &mut g,
        w,
        "tollgate_token_bucket",
        Typed::<_, One<_>>::new(token_bucket()),
    );
    bench_line(&mut g, w, "tollgate_gcra", Typed::<_, One<_>>::new(gcra()));
    bench_line(
        &mut g,
        w,
        "tollgate_gcra_with_headers",
        Typed::<_, One<_>>::with_headers(gcra()),
    );
    bench_line(
        &mut g,
        w,
        "tollgate_limiter_bytes",
        Bytes::<One<_>>::new(Limiter::GcraNanos(gcra())),
    );
    bench_line(&mut g, w, "governor_gcra", GovernorDirect::new());
    g.finish();
}

/// All four lines on 10,000 pseudo-random keys.
fn keys_10k(c: &mut Criterion) {
    let w = &KEYS_10K;
    let mut g = group(c, w);
    bench_line(
        &mut g,
        w,
        "tollgate_token_bucket",
        Typed::<_, Map<_>>::new(token_bucket()),
    );
    bench_line(&mut g, w, "tollgate_gcra", Typed::<_, Map<_>>::new(gcra()));
    bench_line(
        &mut g,
        w,
        "tollgate_gcra_with_headers",
        Typed::<_, Map<_>>::with_headers(gcra()),
    );
    bench_line(
        &mut g,
        w,
        "tollgate_limiter_bytes",
        Bytes::<Map<_>>::new(Limiter::GcraNanos(gcra())),
    );
    bench_line(&mut g, w, "governor_gcra", GovernorKeyed::new());
    g.finish();
}

/// Rounds of the paired comparison: every line runs once per round.
const PAIRED_ROUNDS: usize = 3_000;
/// Batches each line runs per round (1,000 decisions: a few microseconds, so every line sees
/// the same moment of the host).
const PAIRED_BATCHES: u64 = 10;

/// A line of the paired comparison: a subject with its own key sequence, timed per round.
trait TimedLine {
    /// The line's name.
    fn name(&self) -> &'static str;
    /// Runs `PAIRED_BATCHES` batches; returns the elapsed time.
    fn round(&mut self, workload: &Workload) -> Duration;
}

/// A primed subject and its key generator.
struct Paired<S> {
    /// Line name.
    name: &'static str,
    /// The limiter under test.
    subject: S,
    /// The same seeded sequence every line gets.
    keys: XorShift,
}

impl<S: Subject> Paired<S> {
    /// Primes `subject` to steady state on `workload`.
    fn boxed(name: &'static str, mut subject: S, workload: &Workload) -> Box<dyn TimedLine>
    where
        S: 'static,
    {
        let mut keys = XorShift(SEED);
        for _ in 0..workload.prime_batches() {
            run_batch(&mut subject, &mut keys, workload);
        }
        Box::new(Self {
            name,
            subject,
            keys,
        })
    }
}

impl<S: Subject> TimedLine for Paired<S> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn round(&mut self, workload: &Workload) -> Duration {
        // One dynamic call per round; the decisions inside are monomorphised like criterion's.
        let start = std::time::Instant::now();
        for _ in 0..PAIRED_BATCHES {
            black_box(run_batch(&mut self.subject, &mut self.keys, workload));
        }
        start.elapsed()
    }
}

/// The median of `values` (not empty).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs every line in turn, round after round, rotating who goes first, and prints each line's
/// median decisions/s and its median per-round ratio to the last line (governor).
///
/// Why besides criterion: criterion measures lines one after another, seconds apart, and on a
/// shared virtual machine the speed of the host drifts by tens of percent over that time (we
/// saw the same line's estimate move by 2× between runs). Interleaving half-millisecond rounds
/// exposes every line to the same drift, so the per-round ratio is what the comparison means.
fn paired(workload: &Workload, mut lines: Vec<Box<dyn TimedLine>>) {
    let n = lines.len();
    let mut times = vec![Vec::with_capacity(PAIRED_ROUNDS); n];
    for round in 0..PAIRED_ROUNDS {
        for i in 0..n {
            let line = (round + i) % n;
            times[line].push(lines[line].round(workload).as_secs_f64());
        }
    }
    let decisions = (PAIRED_BATCHES * BATCH) as f64;
    let reference = n - 1;
    eprintln!(
        "\npaired/{}: {PAIRED_ROUNDS} interleaved rounds of {decisions} decisions per line",
        workload.name
    );
    eprintln!(
        "  {:<28} {:>14} {:>16}",
        "line", "decisions/s", "vs governor"
    );
    for (i, line) in lines.iter().enumerate() {
        let mut rates: Vec<f64> = times[i].iter().map(|t| decisions / t).collect();
        let mut ratios: Vec<f64> = times[i]
            .iter()
            .zip(&times[reference])
            .map(|(ours, theirs)| theirs / ours)
            .collect();
        eprintln!(
            "  {:<28} {:>12.1} M {:>15.3}×",
            line.name(),
            median(&mut rates) / 1e6,
            median(&mut ratios)
        );
    }
}

/// The paired comparison on both workloads; governor last (the reference).
fn paired_all() {
    let w = &SINGLE_KEY;
    paired(
        w,
        vec![
            Paired::boxed(
                "tollgate_token_bucket",
                Typed::<_, One<_>>::new(token_bucket()),
                w,
            ),
            Paired::boxed("tollgate_gcra", Typed::<_, One<_>>::new(gcra()), w),
            Paired::boxed(
                "tollgate_token_bucket_exact",
                Typed::<_, One<_>>::new(token_bucket_exact()),
                w,
            ),
            Paired::boxed(
                "tollgate_gcra_exact",
                Typed::<_, One<_>>::new(gcra_exact()),
                w,
            ),
            Paired::boxed("governor_gcra", GovernorDirect::new(), w),
        ],
    );
    let w = &KEYS_10K;
    paired(
        w,
        vec![
            Paired::boxed(
                "tollgate_token_bucket",
                Typed::<_, Map<_>>::new(token_bucket()),
                w,
            ),
            Paired::boxed("tollgate_gcra", Typed::<_, Map<_>>::new(gcra()), w),
            Paired::boxed(
                "tollgate_token_bucket_exact",
                Typed::<_, Map<_>>::new(token_bucket_exact()),
                w,
            ),
            Paired::boxed(
                "tollgate_gcra_exact",
                Typed::<_, Map<_>>::new(gcra_exact()),
                w,
            ),
            Paired::boxed("governor_gcra", GovernorKeyed::new(), w),
        ],
    );
}

/// What `criterion_group!`/`criterion_main!` expand to, written out so it can carry docs.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    single_key(&mut c);
    keys_10k(&mut c);
    c.final_summary();
    // The paired comparison runs in a plain `cargo bench`, and with a filter that names it;
    // not under `--list`, `--profile-time` or a filter for criterion lines only.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filter = args.iter().find(|a| !a.starts_with('-'));
    let special = args
        .iter()
        .any(|a| a == "--list" || a == "--profile-time" || a == "--test");
    if !special && filter.is_none_or(|f| f.contains("paired")) {
        paired_all();
    }
}
