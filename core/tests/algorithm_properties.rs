//! Property tests for the seven limiting algorithms in `tollgate_core::algorithm`, and for the
//! nanosecond forms of the token bucket and GCRA (which must answer as the exact forms do).
//!
//! Every algorithm is driven through arbitrary arrival sequences (a start time plus random gaps:
//! zero, tiny, a fraction or a few multiples of the algorithm's window or period, or months),
//! with weighted costs (0, 1, up to the limit, above it, `u64::MAX`) and random valid
//! parameters, and checked against what its module documentation promises:
//!
//! 1. safety: the allowed cost never exceeds the algorithm's bound over the relevant spans;
//! 2. liveness: waiting `retry_after` after a denial lets the same request through (and not a
//!    nanosecond earlier), and `remaining` is exactly the cost that still fits;
//! 3. state bytes round-trip, and torn, extended, mistagged or random bytes are errors, never
//!    panics;
//! 4. a clock stepping back never panics and never grants what the latest time seen would deny;
//! 5. refund undoes an acquire at the same instant, and huge charges never panic.
//!
//! Sequences are at most 200 steps so the whole file stays fast in debug builds.

use std::collections::HashMap;

use chrono::Datelike;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tollgate_core::algorithm::{
    Algorithm, CalendarPeriod, CalendarQuota, Concurrency, FixedWindow, Gcra, GcraNanos, Limiter,
    Outcome, SlidingLog, SlidingLogState, SlidingWindow, TokenBucket, TokenBucketNanos,
};
use tollgate_core::time::{Timestamp, NANOS_PER_SEC};

const SEC: u64 = NANOS_PER_SEC;
const DAY: u64 = 86_400 * SEC;
const Y2000: u64 = 946_684_800 * SEC;
const Y2100: u64 = 4_102_444_800 * SEC;
const MAX_STEPS: usize = 200;

type R = Result<(), TestCaseError>;

// ---------------------------------------------------------------------------------------------
// Generation: raw gaps and amounts, resolved against each algorithm's time scale and limit.
// ---------------------------------------------------------------------------------------------

/// How the clock moves before a step.
#[derive(Clone, Copy, Debug)]
enum Gap {
    Zero,
    Tiny(u64),
    /// Up to one `scale` (the window, period or refill time).
    Part(u64),
    /// Up to twenty `scale`s.
    Multi(u64),
    /// Up to ~115 days, whatever the scale.
    Huge(u64),
    /// Back by up to three `scale`s.
    Back(u64),
    /// Back by up to ~115 days.
    BackFar(u64),
}

impl Gap {
    fn apply(self, t: u64, scale: u64) -> u64 {
        match self {
            Gap::Zero => t,
            Gap::Tiny(n) | Gap::Huge(n) => t.saturating_add(n),
            Gap::Part(r) => t.saturating_add(r % scale.saturating_add(1)),
            Gap::Multi(r) => t.saturating_add(r % scale.saturating_mul(20).saturating_add(1)),
            Gap::Back(r) => t.saturating_sub(r % scale.saturating_mul(3).saturating_add(1)),
            Gap::BackFar(n) => t.saturating_sub(n),
        }
    }
}

/// Gaps are drawn from a selector byte and a raw number: flat primitives generate (and shrink)
/// an order of magnitude faster than nested `prop_oneof!`s in debug builds. Selector 0 (what
/// shrinking aims for) is no gap.
fn gap_of(sel: u8, r: u64, back: bool) -> Gap {
    match sel % if back { 15 } else { 11 } {
        0..=2 => Gap::Zero,
        3 => Gap::Tiny(1 + r % 15),
        4..=7 => Gap::Part(r),
        8 | 9 => Gap::Multi(r),
        10 => Gap::Huge(r % (10_000_000 * SEC)),
        11..=13 => Gap::Back(r),
        _ => Gap::BackFar(r % (10_000_000 * SEC)),
    }
}

/// A cost, relative to the algorithm's limit (`cap`).
#[derive(Clone, Copy, Debug)]
enum Amount {
    Zero,
    One,
    UpTo(u64),
    Above(u64),
    Max,
}

impl Amount {
    fn resolve(self, cap: u64) -> u64 {
        match self {
            Amount::Zero => 0,
            Amount::One => 1,
            Amount::UpTo(r) => match cap.checked_add(1) {
                Some(m) => r % m,
                None => r,
            },
            Amount::Above(r) => cap.saturating_add(1 + r % 1000),
            Amount::Max => u64::MAX,
        }
    }
}

/// Selector 0 is a zero cost; one unit and anything up to the limit are the common cases.
fn amount_of(sel: u8, r: u64) -> Amount {
    match sel % 11 {
        0 => Amount::Zero,
        1..=4 => Amount::One,
        5..=8 => Amount::UpTo(r),
        9 => Amount::Above(r),
        _ => Amount::Max,
    }
}

/// Charges and refunds that stay within the limit (a `u64::MAX` charge is tested separately).
fn small_amount_of(sel: u8, r: u64) -> Amount {
    match sel % 5 {
        0 => Amount::Zero,
        1 | 2 => Amount::One,
        _ => Amount::UpTo(r),
    }
}

fn amounts() -> impl Strategy<Value = Amount> {
    (any::<u8>(), any::<u64>()).prop_map(|(sel, r)| amount_of(sel, r))
}

#[derive(Clone, Copy, Debug)]
enum RawOp {
    Acquire(Amount),
    Charge(Amount),
    Refund(Amount),
    Peek,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Acquire(u64),
    Charge(u64),
    Refund(u64),
    Peek,
}

type Raw = Vec<(Gap, RawOp)>;

/// Which clock moves a sequence may make.
#[derive(Clone, Copy, Debug)]
enum Clock {
    Forward,
    /// Forward, and back by up to three scales or up to ~115 days.
    Any,
}

fn steps(clock: Clock, op_of: fn(u8, u64) -> RawOp) -> impl Strategy<Value = Raw> {
    let back = matches!(clock, Clock::Any);
    let step = (any::<u8>(), any::<u64>(), any::<u8>(), any::<u64>())
        .prop_map(move |(gs, gr, os, or)| (gap_of(gs, gr, back), op_of(os, or)));
    prop::collection::vec(step, 1..=MAX_STEPS)
}

/// Arrivals: acquires with the occasional charge (charges only make the limits stricter).
fn arrivals(clock: Clock) -> impl Strategy<Value = Raw> {
    steps(clock, |sel, r| match sel / 16 {
        0..=13 => RawOp::Acquire(amount_of(sel, r)),
        _ => RawOp::Charge(small_amount_of(sel, r)),
    })
}

/// Every operation, refunds and peeks included.
fn mixed(clock: Clock) -> impl Strategy<Value = Raw> {
    steps(clock, |sel, r| match sel / 16 {
        0..=9 => RawOp::Acquire(amount_of(sel, r)),
        10 | 11 => RawOp::Charge(small_amount_of(sel, r)),
        12..=14 => RawOp::Refund(amount_of(sel, r)),
        _ => RawOp::Peek,
    })
}

/// Start instants: mostly 2000–2100, sometimes the first days after the epoch.
fn starts() -> impl Strategy<Value = u64> {
    prop_oneof![1 => 0..3 * DAY, 4 => Y2000..Y2100]
}

fn resolve(start: u64, raw: &[(Gap, RawOp)], shape: Shape) -> Vec<(Timestamp, Op)> {
    let mut t = start;
    raw.iter()
        .map(|&(gap, op)| {
            t = gap.apply(t, shape.scale);
            let op = match op {
                RawOp::Acquire(a) => Op::Acquire(a.resolve(shape.cap)),
                RawOp::Charge(a) => Op::Charge(a.resolve(shape.cap)),
                RawOp::Refund(a) => Op::Refund(a.resolve(shape.cap)),
                RawOp::Peek => Op::Peek,
            };
            (Timestamp::from_nanos(t), op)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Parameters.
// ---------------------------------------------------------------------------------------------

/// The time scale gaps are drawn against, and the largest cost that can ever fit.
#[derive(Clone, Copy, Debug)]
struct Shape {
    scale: u64,
    cap: u64,
}

fn limits() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 1..=10u64,
        2 => 1..=1000u64,
        1 => 1..=u64::from(u32::MAX),
        // Not u64::MAX: counters saturate there, so it behaves as "unlimited" (see
        // `unlimited_limit_never_panics`).
        1 => Just(u64::MAX - 1),
    ]
}

fn windows() -> impl Strategy<Value = u64> {
    prop_oneof![2 => 1..=1000u64, 2 => 1..=SEC, 3 => SEC..=3600 * SEC]
}

/// Time for a bucket of `burst` to refill at `rate` per `period`, clamped to a useful scale.
fn refill_time(rate: u64, period: u64, burst: u64) -> u64 {
    let t = (u128::from(burst) * u128::from(period)).div_ceil(u128::from(rate));
    u64::try_from(t.clamp(1, u128::from(30 * DAY))).unwrap()
}

fn bucket_shape((rate, period, burst): (u64, u64, u64)) -> Shape {
    Shape {
        scale: refill_time(rate, period, burst),
        cap: burst,
    }
}

fn window_shape(limit: u64, window: u64) -> Shape {
    Shape {
        scale: window,
        cap: limit,
    }
}

fn calendar_shape(limit: u64, period: CalendarPeriod) -> Shape {
    let scale = match period {
        CalendarPeriod::Day => DAY,
        CalendarPeriod::Month => 31 * DAY,
    };
    Shape { scale, cap: limit }
}

fn bucket_params() -> impl Strategy<Value = (u64, u64, u64)> {
    (limits(), windows(), limits())
}

fn token_bucket() -> impl Strategy<Value = (TokenBucket, Shape)> {
    bucket_params().prop_map(|(rate, period, burst)| {
        let shape = bucket_shape((rate, period, burst));
        (TokenBucket::new(rate, period, burst).unwrap(), shape)
    })
}

fn gcra() -> impl Strategy<Value = (Gcra, Shape)> {
    bucket_params().prop_map(|(rate, period, burst)| {
        let shape = bucket_shape((rate, period, burst));
        (Gcra::new(rate, period, burst).unwrap(), shape)
    })
}

/// Bucket parameters whose nanosecond forms exist: the interval `period / rate` is a whole
/// number of nanoseconds and `burst` intervals span at most `MAX_NANOS_TOLERANCE`.
fn nanos_params() -> impl Strategy<Value = (u64, u64, u64)> {
    let intervals = prop_oneof![2 => 1..=1000u64, 2 => 1..=SEC, 1 => SEC..=3600 * SEC];
    (limits(), intervals, limits()).prop_filter_map(
        "a nanosecond form applies",
        |(rate, interval, burst)| {
            let period = rate.checked_mul(interval)?;
            Gcra::new(rate, period, burst).ok()?.in_nanos()?;
            Some((rate, period, burst))
        },
    )
}

/// `nanos_params` whose TAT cannot pass `u64::MAX` in a test sequence (200 steps, each charge at
/// most a full bucket, from before the year 2163), where the two forms must agree exactly. Past
/// it the nanosecond form saturates (see `GcraNanos`), which the safety properties cover.
fn equivalence_params() -> impl Strategy<Value = (u64, u64, u64)> {
    nanos_params().prop_filter("TAT stays below u64::MAX", |&(rate, period, burst)| {
        (period / rate).saturating_mul(burst) <= 1 << 56
    })
}

fn token_bucket_nanos() -> impl Strategy<Value = (TokenBucketNanos, Shape)> {
    nanos_params().prop_map(|(rate, period, burst)| {
        let shape = bucket_shape((rate, period, burst));
        let nanos = TokenBucketNanos::new(rate, period, burst).unwrap().unwrap();
        (nanos, shape)
    })
}

fn gcra_nanos() -> impl Strategy<Value = (GcraNanos, Shape)> {
    nanos_params().prop_map(|(rate, period, burst)| {
        let shape = bucket_shape((rate, period, burst));
        (GcraNanos::new(rate, period, burst).unwrap().unwrap(), shape)
    })
}

fn fixed_window() -> impl Strategy<Value = (FixedWindow, Shape)> {
    (limits(), windows()).prop_map(|(limit, window)| {
        (
            FixedWindow::new(limit, window).unwrap(),
            window_shape(limit, window),
        )
    })
}

fn sliding_window() -> impl Strategy<Value = (SlidingWindow, Shape)> {
    (limits(), windows()).prop_map(|(limit, window)| {
        (
            SlidingWindow::new(limit, window).unwrap(),
            window_shape(limit, window),
        )
    })
}

fn log_limits() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 1..=10u64, 1 => 1..=SlidingLog::MAX_LIMIT]
}

fn sliding_log() -> impl Strategy<Value = (SlidingLog, Shape)> {
    (log_limits(), windows()).prop_map(|(limit, window)| {
        (
            SlidingLog::new(limit, window).unwrap(),
            window_shape(limit, window),
        )
    })
}

fn concurrency() -> impl Strategy<Value = (Concurrency, Shape)> {
    (limits(), windows()).prop_map(|(limit, max_hold)| {
        (
            Concurrency::new(limit, max_hold).unwrap(),
            window_shape(limit, max_hold),
        )
    })
}

fn periods() -> impl Strategy<Value = CalendarPeriod> {
    prop_oneof![Just(CalendarPeriod::Day), Just(CalendarPeriod::Month)]
}

fn anchors() -> impl Strategy<Value = Option<Timestamp>> {
    prop_oneof![
        1 => Just(None),
        1 => (0..Y2100).prop_map(|n| Some(Timestamp::from_nanos(n))),
        // The last days of months, where short months clamp the anchor day.
        1 => (1970..2100i32, 1..=12u32, 28..=31u32, 0..86_400u32).prop_map(|(y, m, d, s)| {
            let date = (28..=d)
                .rev()
                .find_map(|d| chrono::NaiveDate::from_ymd_opt(y, m, d))
                .unwrap();
            let at = date.and_hms_opt(s / 3600, s / 60 % 60, s % 60).unwrap().and_utc();
            Some(Timestamp::from_secs(u64::try_from(at.timestamp()).unwrap()))
        }),
    ]
}

fn calendar_params() -> impl Strategy<Value = (u64, CalendarPeriod, Option<Timestamp>)> {
    (limits(), periods(), anchors())
}

fn calendar_quota() -> impl Strategy<Value = (CalendarQuota, Shape)> {
    calendar_params().prop_map(|(limit, period, anchor)| {
        let shape = calendar_shape(limit, period);
        (CalendarQuota::new(limit, period, anchor).unwrap(), shape)
    })
}

// ---------------------------------------------------------------------------------------------
// Running sequences.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Step<S> {
    at: Timestamp,
    op: Op,
    before: S,
    after: S,
    outcome: Option<Outcome>,
}

impl<S> Step<S> {
    /// The cost this step was allowed (0 for denials and anything but an acquire).
    fn allowed(&self) -> u64 {
        match (self.op, self.outcome) {
            (Op::Acquire(c), Some(o)) if o.allowed => c,
            _ => 0,
        }
    }
}

fn run<A: Algorithm>(a: &A, seq: &[(Timestamp, Op)]) -> Vec<Step<A::State>> {
    let mut state = A::State::default();
    let mut trace = Vec::with_capacity(seq.len());
    for &(at, op) in seq {
        let (outcome, after) = match op {
            Op::Acquire(c) => {
                let (o, s) = a.acquire(&state, at, c);
                (Some(o), s)
            }
            Op::Charge(c) => (None, a.charge(&state, at, c)),
            Op::Refund(c) => (None, a.refund(&state, at, c)),
            Op::Peek => (Some(a.peek(&state, at)), state.clone()),
        };
        let before = std::mem::replace(&mut state, after.clone());
        trace.push(Step {
            at,
            op,
            before,
            after,
            outcome,
        });
    }
    trace
}

/// Each step's time as the algorithms must treat it: the latest instant seen so far.
fn running_max<S>(trace: &[Step<S>]) -> Vec<u64> {
    let mut max = 0;
    trace
        .iter()
        .map(|s| {
            max = max.max(s.at.as_nanos());
            max
        })
        .collect()
}

fn encode<A: Algorithm>(state: &A::State) -> Vec<u8> {
    let mut out = Vec::new();
    A::encode(state, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// Safety bounds, over the times given (actual times, or the running maximum).
// ---------------------------------------------------------------------------------------------

/// Token bucket and GCRA: allowed cost at times in [t_i, t_j] ≤ burst + rate·(t_j − t_i)/period.
fn check_rate_bound<S: std::fmt::Debug>(
    trace: &[Step<S>],
    times: &[u64],
    (rate, period, burst): (u64, u64, u64),
) -> R {
    let period = u128::from(period);
    for i in 0..trace.len() {
        let mut sum = 0u128;
        for j in i..trace.len() {
            let cost = trace[j].allowed();
            if cost == 0 {
                continue;
            }
            sum += u128::from(cost);
            let dt = u128::from(times[j] - times[i]);
            let Some(bound) = u128::from(rate)
                .checked_mul(dt)
                .and_then(|r| r.checked_add(u128::from(burst) * period))
            else {
                continue;
            };
            prop_assert!(
                sum * period <= bound,
                "allowed {sum} over steps {i}..={j} (t {}..={}), more than burst {burst} + \
                 rate {rate} × {dt} ns / period {period}; step {j}: {:?}",
                times[i],
                times[j],
                trace[j]
            );
        }
    }
    Ok(())
}

/// Allowed cost per aligned window `floor(t / window)` ≤ `limit`.
fn check_per_window<S>(trace: &[Step<S>], times: &[u64], window: u64, limit: u64) -> R {
    let mut per: HashMap<u64, u128> = HashMap::new();
    for (st, &t) in trace.iter().zip(times) {
        let sum = per.entry(t / window).or_default();
        *sum += u128::from(st.allowed());
        prop_assert!(
            *sum <= u128::from(limit),
            "window {} (t = {t}) allowed {sum} > limit {limit}",
            t / window
        );
    }
    Ok(())
}

/// Allowed cost in any span of steps whose times are less than `span` apart (or at most `span`
/// apart when `closed`) ≤ `bound`. Times must not decrease.
fn check_span<S: std::fmt::Debug>(
    trace: &[Step<S>],
    times: &[u64],
    span: u64,
    closed: bool,
    bound: u128,
) -> R {
    for j in 0..trace.len() {
        if trace[j].allowed() == 0 {
            continue;
        }
        let mut sum = 0u128;
        for i in (0..=j).rev() {
            let dt = times[j] - times[i];
            if dt > span || (dt == span && !closed) {
                break;
            }
            sum += u128::from(trace[i].allowed());
            prop_assert!(
                sum <= bound,
                "allowed {sum} > {bound} in steps {i}..={j} (t {}..={}, span {span}); \
                 step {j}: {:?}",
                times[i],
                times[j],
                trace[j]
            );
        }
    }
    Ok(())
}

/// Calendar quota: allowed cost per period `bounds(t)` ≤ `limit`.
fn check_per_period<S>(trace: &[Step<S>], times: &[u64], q: &CalendarQuota, limit: u64) -> R {
    let mut per: HashMap<(Timestamp, Timestamp), u128> = HashMap::new();
    for (st, &t) in trace.iter().zip(times) {
        let bounds = q.bounds(Timestamp::from_nanos(t));
        let sum = per.entry(bounds).or_default();
        *sum += u128::from(st.allowed());
        prop_assert!(
            *sum <= u128::from(limit),
            "period {bounds:?} (t = {t}) allowed {sum} > limit {limit}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Properties every algorithm shares.
// ---------------------------------------------------------------------------------------------

/// After an allowed acquire, a request of exactly `remaining` at the same instant fits and one
/// more unit does not.
fn prop_remaining_is_exact<A: Algorithm>(a: &A, trace: &[Step<A::State>]) -> R {
    for (i, st) in trace.iter().enumerate() {
        let (Op::Acquire(_), Some(o)) = (st.op, st.outcome) else {
            continue;
        };
        if !o.allowed {
            continue;
        }
        let (fits, _) = a.acquire(&st.after, st.at, o.remaining);
        prop_assert!(
            fits.allowed,
            "step {i}: reported remaining {} but a request of that cost is denied: {fits:?}; {st:?}",
            o.remaining
        );
        if let Some(more) = o.remaining.checked_add(1) {
            let (over, _) = a.acquire(&st.after, st.at, more);
            prop_assert!(
                !over.allowed,
                "step {i}: reported remaining {} but {more} is allowed: {over:?}; {st:?}",
                o.remaining
            );
        }
    }
    Ok(())
}

/// Waiting `retry_after` after a denial (no other traffic) lets the same cost through; with
/// `tight`, one nanosecond earlier is still denied.
fn prop_retry_after_suffices<A: Algorithm>(
    a: &A,
    trace: &[Step<A::State>],
    cap: u64,
    tight: bool,
) -> R {
    for (i, st) in trace.iter().enumerate() {
        let (Op::Acquire(cost), Some(o)) = (st.op, st.outcome) else {
            continue;
        };
        if o.allowed {
            prop_assert_eq!(o.retry_after, 0, "step {}: allowed with a retry_after", i);
            continue;
        }
        prop_assert!(
            o.retry_after > 0,
            "step {i}: denied with retry_after 0: {st:?}"
        );
        if cost > cap {
            continue;
        }
        let Some(later) = st.at.as_nanos().checked_add(o.retry_after) else {
            continue;
        };
        let (then, _) = a.acquire(&st.before, Timestamp::from_nanos(later), cost);
        prop_assert!(
            then.allowed,
            "step {i}: cost {cost} still denied {} ns later, as retry_after said: {then:?}; {st:?}",
            o.retry_after
        );
        if tight {
            let (early, _) = a.acquire(&st.before, Timestamp::from_nanos(later - 1), cost);
            prop_assert!(
                !early.allowed,
                "step {i}: cost {cost} already allowed 1 ns before retry_after {}: {st:?}",
                o.retry_after
            );
        }
    }
    Ok(())
}

/// A denial charges nothing: the returned state decides and peeks exactly as the old one.
fn prop_denial_charges_nothing<A: Algorithm>(a: &A, trace: &[Step<A::State>]) -> R {
    for (i, st) in trace.iter().enumerate() {
        let (Op::Acquire(cost), Some(o)) = (st.op, st.outcome) else {
            continue;
        };
        if o.allowed {
            continue;
        }
        prop_assert_eq!(
            a.peek(&st.after, st.at),
            a.peek(&st.before, st.at),
            "step {}: {:?}",
            i,
            st
        );
        prop_assert_eq!(
            a.acquire(&st.after, st.at, cost).0,
            o,
            "step {}: {:?}",
            i,
            st
        );
    }
    Ok(())
}

/// Refunding an allowed acquire at the same instant restores the standing before it; so does
/// refunding it later with no traffic in between (as if it had never been acquired), for
/// leases only while the lease cannot have expired (a release then frees another lease's slot).
fn prop_refund_restores<A: Algorithm>(
    a: &A,
    trace: &[Step<A::State>],
    shape: Shape,
    leases: bool,
) -> R {
    // For leases, `scale` is max_hold: refund well before any lease can have expired.
    for (i, st) in trace.iter().enumerate() {
        let cost = st.allowed();
        if !matches!(st.op, Op::Acquire(_)) || !st.outcome.is_some_and(|o| o.allowed) {
            continue;
        }
        let later = [0, 1, shape.scale / 3, shape.scale, 2 * shape.scale + 1];
        for delta in later
            .into_iter()
            .filter(|&d| !leases || d <= shape.scale / 3)
        {
            let at = st.at.plus_nanos(delta);
            let back = a.refund(&st.after, at, cost);
            prop_assert_eq!(
                a.peek(&back, at),
                a.peek(&st.before, at),
                "step {}: refund of {} {} ns after {:?}",
                i,
                cost,
                delta,
                st
            );
        }
    }
    Ok(())
}

/// Charging `u64::MAX` (twice) never panics, exhausts the limit, and the state still works.
fn prop_huge_charges<A: Algorithm>(a: &A, trace: &[Step<A::State>], shape: Shape) -> R {
    for (i, st) in trace.iter().enumerate() {
        let s = a.charge(&st.after, st.at, u64::MAX);
        let s = a.charge(&s, st.at, u64::MAX);
        let (o, _) = a.acquire(&s, st.at, 1);
        if shape.cap < u64::MAX {
            prop_assert!(
                !o.allowed,
                "step {i}: allowed right after a u64::MAX charge: {o:?}"
            );
        }
        let later = st.at.plus_nanos(shape.scale);
        let _ = a.acquire(&s, later, u64::MAX);
        let _ = a.peek(&s, Timestamp::from_nanos(u64::MAX));
        let r = a.refund(&s, st.at, u64::MAX);
        let _ = a.acquire(&r, st.at, 1);
        prop_assert_eq!(A::decode(&encode::<A>(&s)), Ok(s));
    }
    Ok(())
}

/// Every state round-trips; torn, extended and mistagged bytes are errors, never panics.
fn prop_round_trip<A: Algorithm>(trace: &[Step<A::State>], variable: bool) -> R {
    for (i, st) in trace.iter().enumerate() {
        let bytes = encode::<A>(&st.after);
        prop_assert_eq!(A::decode(&bytes), Ok(st.after.clone()), "step {}", i);
        if i % 16 == 0 || i + 1 == trace.len() {
            check_corruptions::<A>(&bytes, variable)?;
        }
    }
    Ok(())
}

/// Whether a sliding log body of `len` bytes (tag and high-water mark included) is well formed.
fn log_len_ok(len: usize) -> bool {
    len >= 9 && (len - 9) % 12 == 0
}

fn check_corruptions<A: Algorithm>(bytes: &[u8], variable: bool) -> R {
    let valid = |len: usize| variable && log_len_ok(len);
    for len in 0..bytes.len() {
        let r = A::decode(&bytes[..len]);
        prop_assert_eq!(
            r.is_ok(),
            valid(len),
            "truncated to {} of {} bytes: {:?}",
            len,
            bytes.len(),
            r
        );
    }
    for extra in 1..=25 {
        let mut longer = bytes.to_vec();
        longer.extend(std::iter::repeat_n(0xA5, extra));
        let r = A::decode(&longer);
        prop_assert_eq!(
            r.is_ok(),
            valid(longer.len()),
            "extended by {}: {:?}",
            extra,
            r
        );
    }
    let mut other = bytes.to_vec();
    for tag in (0..=u8::MAX).filter(|&t| t != bytes[0]) {
        other[0] = tag;
        prop_assert!(A::decode(&other).is_err(), "tag {tag:#04x} accepted");
    }
    Ok(())
}

/// For every acquire: allowed at the (possibly earlier) time given implies allowed at the
/// latest time seen, and `remaining` is never larger at the earlier time.
fn prop_clock_back_grants_nothing<A: Algorithm>(a: &A, trace: &[Step<A::State>]) -> R {
    let times = running_max(trace);
    for (i, (st, &max)) in trace.iter().zip(&times).enumerate() {
        let latest = Timestamp::from_nanos(max);
        if let (Op::Acquire(cost), Some(o)) = (st.op, st.outcome) {
            if o.allowed {
                let (at_max, _) = a.acquire(&st.before, latest, cost);
                prop_assert!(
                    at_max.allowed,
                    "step {i}: cost {cost} allowed at {:?} but denied at the latest time seen \
                     {max}: {at_max:?}; {st:?}",
                    st.at
                );
            }
        }
        let then = a.peek(&st.before, st.at).remaining;
        let now = a.peek(&st.before, latest).remaining;
        prop_assert!(
            then <= now,
            "step {i}: remaining {then} at {:?} but only {now} at the latest time {max}; {st:?}",
            st.at
        );
    }
    Ok(())
}

/// `Limiter`'s byte path gives the same outcomes and the encodings of the typed states.
fn prop_bytes_match_typed<A: Algorithm>(limiter: &Limiter, a: &A, seq: &[(Timestamp, Op)]) -> R {
    let mut typed = A::State::default();
    let mut bytes: Option<Vec<u8>> = None;
    for (i, &(at, op)) in seq.iter().enumerate() {
        let b = bytes.as_deref();
        let next = match op {
            Op::Acquire(c) => {
                let (o, nb) = limiter.acquire(b, at, c);
                let (to, ts) = a.acquire(&typed, at, c);
                prop_assert_eq!(o, to, "step {}: {:?}", i, op);
                typed = ts;
                nb
            }
            Op::Charge(c) => {
                typed = a.charge(&typed, at, c);
                limiter.charge(b, at, c)
            }
            Op::Refund(c) => {
                typed = a.refund(&typed, at, c);
                limiter.refund(b, at, c)
            }
            Op::Peek => {
                prop_assert_eq!(limiter.peek(b, at), a.peek(&typed, at), "step {}", i);
                continue;
            }
        };
        prop_assert_eq!(&next, &encode::<A>(&typed), "step {}: {:?}", i, op);
        bytes = Some(next);
    }
    Ok(())
}

/// Arbitrary bytes decode to an error or to a state that encodes back to the same bytes.
fn prop_random_bytes<A: Algorithm>(bytes: &[u8]) -> R {
    if let Ok(state) = A::decode(bytes) {
        prop_assert_eq!(encode::<A>(&state), bytes.to_vec());
    }
    Ok(())
}

/// A well-formed but arbitrary state (corrupt KV, another version's numbers): no operation
/// panics, at any time and cost.
fn prop_corrupt_state<A: Algorithm>(
    limiter: &Limiter,
    body: &[u8],
    ops: &[(u64, RawOp)],
    cap: u64,
) -> R {
    let template = encode::<A>(&A::State::default());
    let mut bytes = vec![template[0]];
    if template.len() == 1 {
        // Variable length (the sliding log): whole entries only.
        bytes.extend_from_slice(&body[..body.len() / 12 * 12]);
    } else {
        bytes.extend(
            body.iter()
                .copied()
                .chain(std::iter::repeat(0))
                .take(template.len() - 1),
        );
    }
    prop_assert!(A::decode(&bytes).is_ok());
    for &(t, op) in ops {
        let now = Timestamp::from_nanos(t);
        bytes = match op {
            RawOp::Acquire(c) => limiter.acquire(Some(&bytes), now, c.resolve(cap)).1,
            RawOp::Charge(c) => limiter.charge(Some(&bytes), now, c.resolve(cap)),
            RawOp::Refund(c) => limiter.refund(Some(&bytes), now, c.resolve(cap)),
            RawOp::Peek => {
                let _ = limiter.peek(Some(&bytes), now);
                bytes
            }
        };
    }
    Ok(())
}

fn corrupt_ops() -> impl Strategy<Value = Vec<(u64, RawOp)>> {
    let time = prop_oneof![any::<u64>(), Y2000..Y2100, Just(u64::MAX), Just(0u64)];
    let op = prop_oneof![
        3 => amounts().prop_map(RawOp::Acquire),
        1 => amounts().prop_map(RawOp::Charge),
        1 => amounts().prop_map(RawOp::Refund),
        1 => Just(RawOp::Peek),
    ];
    prop::collection::vec((time, op), 1..20)
}

/// The shared properties, instantiated once per algorithm.
macro_rules! shared_properties {
    ($name:ident, $strategy:expr, $variant:path, leases: $leases:expr, tight: $tight:expr,
     variable_len: $variable:expr) => {
        mod $name {
            use super::*;

            proptest! {
                #[test]
                fn remaining_is_exact(
                    (a, shape) in $strategy, start in starts(), raw in arrivals(Clock::Forward)
                ) {
                    let trace = run(&a, &resolve(start, &raw, shape));
                    prop_remaining_is_exact(&a, &trace)?;
                }

                #[test]
                fn retry_after_suffices(
                    (a, shape) in $strategy, start in starts(), raw in arrivals(Clock::Forward)
                ) {
                    let trace = run(&a, &resolve(start, &raw, shape));
                    if !$leases {
                        prop_retry_after_suffices(&a, &trace, shape.cap, $tight)?;
                    }
                    prop_denial_charges_nothing(&a, &trace)?;
                }

                #[test]
                fn refund_restores_and_huge_charges_are_safe(
                    (a, shape) in $strategy, start in starts(), raw in mixed(Clock::Forward)
                ) {
                    let trace = run(&a, &resolve(start, &raw, shape));
                    prop_refund_restores(&a, &trace, shape, $leases)?;
                    prop_huge_charges(&a, &trace, shape)?;
                }

                #[test]
                fn states_round_trip(
                    (a, shape) in $strategy, start in starts(), raw in mixed(Clock::Any)
                ) {
                    let trace = run(&a, &resolve(start, &raw, shape));
                    fn typed<A: Algorithm>(_: &A, trace: &[Step<A::State>], v: bool) -> R {
                        prop_round_trip::<A>(trace, v)
                    }
                    typed(&a, &trace, $variable)?;
                }

                #[test]
                fn clock_stepping_back_grants_nothing(
                    (a, shape) in $strategy, start in starts(), raw in mixed(Clock::Any)
                ) {
                    let trace = run(&a, &resolve(start, &raw, shape));
                    prop_clock_back_grants_nothing(&a, &trace)?;
                }

                #[test]
                fn byte_path_matches_typed(
                    (a, shape) in $strategy, start in starts(), raw in mixed(Clock::Any)
                ) {
                    let limiter = $variant(a.clone());
                    prop_bytes_match_typed(&limiter, &a, &resolve(start, &raw, shape))?;
                }

                #[test]
                fn random_bytes_never_panic(
                    (a, _shape) in $strategy,
                    bytes in prop::collection::vec(any::<u8>(), 0..200),
                ) {
                    fn check<A: Algorithm>(_: &A, bytes: &[u8]) -> R {
                        prop_random_bytes::<A>(bytes)?;
                        // The same bytes under this algorithm's own tag.
                        let mut tagged = encode::<A>(&A::State::default())[..1].to_vec();
                        tagged.extend_from_slice(bytes);
                        prop_random_bytes::<A>(&tagged)
                    }
                    check(&a, &bytes)?;
                }

                #[test]
                fn corrupt_state_never_panics(
                    (a, shape) in $strategy,
                    body in prop::collection::vec(any::<u8>(), 0..400),
                    ops in corrupt_ops(),
                ) {
                    fn check<A: Algorithm>(
                        a: &A, l: &Limiter, body: &[u8], ops: &[(u64, RawOp)], cap: u64,
                    ) -> R {
                        let _ = a;
                        prop_corrupt_state::<A>(l, body, ops, cap)
                    }
                    let limiter = $variant(a.clone());
                    check(&a, &limiter, &body, &ops, shape.cap)?;
                }
            }
        }
    };
}

shared_properties!(token_bucket, token_bucket(), Limiter::TokenBucket,
    leases: false, tight: true, variable_len: false);
shared_properties!(gcra, gcra(), Limiter::Gcra,
    leases: false, tight: true, variable_len: false);
shared_properties!(token_bucket_nanos, token_bucket_nanos(), Limiter::TokenBucketNanos,
    leases: false, tight: true, variable_len: false);
shared_properties!(gcra_nanos, gcra_nanos(), Limiter::GcraNanos,
    leases: false, tight: true, variable_len: false);
shared_properties!(fixed_window, fixed_window(), Limiter::FixedWindow,
    leases: false, tight: true, variable_len: false);
shared_properties!(sliding_window, sliding_window(), Limiter::SlidingWindow,
    leases: false, tight: true, variable_len: false);
shared_properties!(sliding_log, sliding_log(), Limiter::SlidingLog,
    leases: false, tight: true, variable_len: true);
shared_properties!(concurrency, concurrency(), Limiter::Concurrency,
    leases: true, tight: false, variable_len: false);
shared_properties!(calendar_quota, calendar_quota(), Limiter::CalendarQuota,
    leases: false, tight: true, variable_len: false);

// ---------------------------------------------------------------------------------------------
// Safety bounds, one algorithm at a time.
// ---------------------------------------------------------------------------------------------

fn actual_times<S>(trace: &[Step<S>]) -> Vec<u64> {
    trace.iter().map(|s| s.at.as_nanos()).collect()
}

/// Lease counting over `[start, start + max_hold)`, where no lease can have expired.
#[derive(Clone, Copy, Debug)]
enum LeaseOp {
    Acquire(Amount),
    /// Releases up to `outstanding + 1` (sometimes more than is held, as a buggy caller would).
    Release(u64),
}

fn lease_ops() -> impl Strategy<Value = Vec<(u64, LeaseOp)>> {
    let op = (any::<u8>(), any::<u64>()).prop_map(|(sel, r)| match sel / 16 {
        0..=9 => LeaseOp::Acquire(amount_of(sel, r)),
        _ => LeaseOp::Release(r),
    });
    prop::collection::vec((any::<u64>(), op), 1..=MAX_STEPS)
}

fn datetime(t: Timestamp) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_nanos(i64::try_from(t.as_nanos()).unwrap())
}

fn decodes<A: Algorithm>(bytes: &[u8]) -> bool {
    A::decode(bytes).is_ok()
}

/// Runs both forms over one sequence; every outcome (verdict and header numbers) must agree.
/// One exception: a request whose cost spans 2^63 ns or more (a cost near `u64::MAX`) is
/// denied by both with a wait of centuries, which the exact form's `u128` arithmetic may round
/// by a nanosecond or two where it saturates: there both must deny and wait at least 2^62 ns.
fn prop_same_answers<A: Algorithm, B: Algorithm>(
    a: &A,
    b: &B,
    interval: u64,
    seq: &[(Timestamp, Op)],
) -> R {
    let (exact, nanos) = (run(a, seq), run(b, seq));
    for (i, (x, y)) in exact.iter().zip(&nanos).enumerate() {
        let astronomical = matches!(x.op, Op::Acquire(c)
            if u128::from(c) * u128::from(interval) >= 1 << 63);
        if let (true, Some(ox), Some(oy)) = (astronomical, x.outcome, y.outcome) {
            prop_assert!(
                !ox.allowed && !oy.allowed,
                "step {}: {:?} / {:?}",
                i,
                ox,
                oy
            );
            prop_assert!(ox.retry_after >= 1 << 62 && oy.retry_after >= 1 << 62);
            continue;
        }
        prop_assert_eq!(
            x.outcome,
            y.outcome,
            "step {} ({:?} at {:?})",
            i,
            x.op,
            x.at
        );
    }
    Ok(())
}

proptest! {
    #[test]
    fn token_bucket_nanos_answers_as_the_exact_form_while_time_moves_forward(
        (rate, period, burst) in equivalence_params(), start in starts(),
        raw in mixed(Clock::Forward)
    ) {
        let exact = TokenBucket::new(rate, period, burst).unwrap();
        let nanos = exact.in_nanos().unwrap();
        let seq = resolve(start, &raw, bucket_shape((rate, period, burst)));
        prop_same_answers(&exact, &nanos, period / rate, &seq)?;
    }

    #[test]
    fn gcra_nanos_answers_as_the_exact_form(
        (rate, period, burst) in equivalence_params(), start in starts(), raw in mixed(Clock::Any)
    ) {
        let exact = Gcra::new(rate, period, burst).unwrap();
        let nanos = exact.in_nanos().unwrap();
        let seq = resolve(start, &raw, bucket_shape((rate, period, burst)));
        prop_same_answers(&exact, &nanos, period / rate, &seq)?;
    }

    #[test]
    fn nanos_forms_allow_at_most_burst_plus_rate_even_when_the_clock_steps_back(
        params in nanos_params(), start in starts(), raw in arrivals(Clock::Any)
    ) {
        let (rate, period, burst) = params;
        let shape = bucket_shape(params);
        let bucket = TokenBucketNanos::new(rate, period, burst).unwrap().unwrap();
        let trace = run(&bucket, &resolve(start, &raw, shape));
        check_rate_bound(&trace, &running_max(&trace), params)?;
        let meter = GcraNanos::new(rate, period, burst).unwrap().unwrap();
        let trace = run(&meter, &resolve(start, &raw, shape));
        check_rate_bound(&trace, &running_max(&trace), params)?;
    }

    #[test]
    fn token_bucket_allows_at_most_burst_plus_rate(
        params in bucket_params(), start in starts(), raw in arrivals(Clock::Forward)
    ) {
        let a = TokenBucket::new(params.0, params.1, params.2).unwrap();
        let trace = run(&a, &resolve(start, &raw, bucket_shape(params)));
        check_rate_bound(&trace, &actual_times(&trace), params)?;
    }

    #[test]
    fn token_bucket_bound_holds_at_latest_time_when_clock_steps_back(
        params in bucket_params(), start in starts(), raw in arrivals(Clock::Any)
    ) {
        let a = TokenBucket::new(params.0, params.1, params.2).unwrap();
        let trace = run(&a, &resolve(start, &raw, bucket_shape(params)));
        check_rate_bound(&trace, &running_max(&trace), params)?;
    }

    #[test]
    fn gcra_allows_at_most_burst_plus_rate(
        params in bucket_params(), start in starts(), raw in arrivals(Clock::Forward)
    ) {
        let a = Gcra::new(params.0, params.1, params.2).unwrap();
        let trace = run(&a, &resolve(start, &raw, bucket_shape(params)));
        check_rate_bound(&trace, &actual_times(&trace), params)?;
    }

    #[test]
    fn gcra_bound_holds_at_latest_time_when_clock_steps_back(
        params in bucket_params(), start in starts(), raw in arrivals(Clock::Any)
    ) {
        let a = Gcra::new(params.0, params.1, params.2).unwrap();
        let trace = run(&a, &resolve(start, &raw, bucket_shape(params)));
        check_rate_bound(&trace, &running_max(&trace), params)?;
    }

    #[test]
    fn fixed_window_allows_at_most_limit_per_window(
        limit in limits(), window in windows(), start in starts(), raw in arrivals(Clock::Any)
    ) {
        let a = FixedWindow::new(limit, window).unwrap();
        let forward: Raw = raw.iter().map(|&(g, op)| match g {
            Gap::Back(_) | Gap::BackFar(_) => (Gap::Zero, op),
            g => (g, op),
        }).collect();
        let trace = run(&a, &resolve(start, &forward, window_shape(limit, window)));
        check_per_window(&trace, &actual_times(&trace), window, limit)?;
        // The clock stepping back: per window of the latest time seen.
        let trace = run(&a, &resolve(start, &raw, window_shape(limit, window)));
        check_per_window(&trace, &running_max(&trace), window, limit)?;
    }

    #[test]
    fn sliding_window_allows_at_most_limit_per_window_and_twice_per_span(
        limit in limits(), window in windows(), start in starts(), raw in arrivals(Clock::Any)
    ) {
        let a = SlidingWindow::new(limit, window).unwrap();
        let twice = 2 * u128::from(limit);
        let forward: Raw = raw.iter().map(|&(g, op)| match g {
            Gap::Back(_) | Gap::BackFar(_) => (Gap::Zero, op),
            g => (g, op),
        }).collect();
        let trace = run(&a, &resolve(start, &forward, window_shape(limit, window)));
        let times = actual_times(&trace);
        check_per_window(&trace, &times, window, limit)?;
        check_span(&trace, &times, window, true, twice)?;
        let trace = run(&a, &resolve(start, &raw, window_shape(limit, window)));
        let times = running_max(&trace);
        check_per_window(&trace, &times, window, limit)?;
        check_span(&trace, &times, window, true, twice)?;
    }

    #[test]
    fn sliding_log_allows_at_most_limit_in_any_window(
        limit in log_limits(), window in windows(), start in starts(),
        raw in arrivals(Clock::Forward)
    ) {
        let a = SlidingLog::new(limit, window).unwrap();
        let trace = run(&a, &resolve(start, &raw, window_shape(limit, window)));
        check_span(&trace, &actual_times(&trace), window, false, u128::from(limit))?;
    }

    #[test]
    fn sliding_log_stays_ordered_and_within_limit_when_clock_steps_back(
        limit in log_limits(), window in windows(), start in starts(), raw in arrivals(Clock::Any)
    ) {
        // Acquires only: then every logged unit was allowed, so the log never holds more than
        // `limit` and stays ordered (entries are stamped no earlier than the newest).
        let a = SlidingLog::new(limit, window).unwrap();
        let acquires: Raw = raw.into_iter().filter(|r| matches!(r.1, RawOp::Acquire(_))).collect();
        let trace = run(&a, &resolve(start, &acquires, window_shape(limit, window)));
        for (i, st) in trace.iter().enumerate() {
            let stamps: Vec<u64> = st.after.entries.iter().map(|e| e.at.as_nanos()).collect();
            prop_assert!(stamps.windows(2).all(|w| w[0] < w[1]), "step {i}: unordered {st:?}");
            let used: u64 = st.after.entries.iter().map(|e| u64::from(e.cost)).sum();
            prop_assert!(used <= limit, "step {i}: log holds {used} > {limit}: {st:?}");
        }
    }

    #[test]
    fn concurrency_holds_at_most_limit_of_unexpired_leases(
        limit in limits(), max_hold in windows(), start in starts(), raw in arrivals(Clock::Any)
    ) {
        let a = Concurrency::new(limit, max_hold).unwrap();
        let shape = window_shape(limit, max_hold);
        let forward: Raw = raw.iter().map(|&(g, op)| match g {
            Gap::Back(_) | Gap::BackFar(_) => (Gap::Zero, op),
            g => (g, op),
        }).collect();
        let trace = run(&a, &resolve(start, &forward, shape));
        check_span(&trace, &actual_times(&trace), max_hold, false, u128::from(limit))?;
        // Leases expire at the latest 16 × ⌈max_hold / 15⌉ after they were taken.
        let lifetime = 16 * max_hold.div_ceil(15);
        for (i, st) in trace.iter().enumerate() {
            let Some(later) = st.at.as_nanos().checked_add(lifetime) else { continue };
            let (o, _) = a.acquire(&st.after, Timestamp::from_nanos(later), limit);
            prop_assert!(o.allowed, "step {i}: leases still held {lifetime} ns later: {st:?}");
        }
        let trace = run(&a, &resolve(start, &raw, shape));
        check_span(&trace, &running_max(&trace), max_hold, false, u128::from(limit))?;
    }

    #[test]
    fn concurrency_acquired_minus_released_stays_within_limit(
        limit in limits(), max_hold in windows(), start in starts(), raw in lease_ops()
    ) {
        let a = Concurrency::new(limit, max_hold).unwrap();
        let mut steps: Vec<(u64, LeaseOp)> =
            raw.iter().map(|&(r, op)| (start + r % max_hold, op)).collect();
        steps.sort_by_key(|s| s.0);
        let mut state = Default::default();
        let (mut acquired, mut released) = (0i128, 0i128);
        let mut held = 0u128; // what the algorithm should count: releases clamp at zero
        for (i, &(t, op)) in steps.iter().enumerate() {
            let now = Timestamp::from_nanos(t);
            match op {
                LeaseOp::Acquire(c) => {
                    let cost = c.resolve(limit);
                    let (o, next) = a.acquire(&state, now, cost);
                    prop_assert_eq!(
                        o.allowed,
                        held + u128::from(cost) <= u128::from(limit),
                        "step {}: {} held, cost {}, {:?}", i, held, cost, o
                    );
                    if o.allowed {
                        acquired += i128::from(cost);
                        held += u128::from(cost);
                    }
                    state = next;
                }
                LeaseOp::Release(r) => {
                    let cost = u64::try_from(u128::from(r) % (held + 2)).unwrap_or(u64::MAX);
                    state = a.refund(&state, now, cost);
                    released += i128::from(cost);
                    held = held.saturating_sub(u128::from(cost));
                }
            }
            prop_assert!(
                acquired - released <= i128::from(limit),
                "step {i}: {acquired} acquired − {released} released > limit {limit}"
            );
            let remaining = a.peek(&state, now).remaining;
            prop_assert_eq!(
                u128::from(remaining),
                u128::from(limit) - held,
                "step {}: peek disagrees with the {} leases held", i, held
            );
        }
    }

    #[test]
    fn calendar_quota_allows_at_most_limit_per_period(
        (limit, period, anchor) in calendar_params(), start in starts(),
        raw in arrivals(Clock::Any)
    ) {
        let a = CalendarQuota::new(limit, period, anchor).unwrap();
        let shape = calendar_shape(limit, period);
        let forward: Raw = raw.iter().map(|&(g, op)| match g {
            Gap::Back(_) | Gap::BackFar(_) => (Gap::Zero, op),
            g => (g, op),
        }).collect();
        let trace = run(&a, &resolve(start, &forward, shape));
        check_per_period(&trace, &actual_times(&trace), &a, limit)?;
        let trace = run(&a, &resolve(start, &raw, shape));
        check_per_period(&trace, &running_max(&trace), &a, limit)?;
    }

    #[test]
    fn calendar_bounds_tile_time(
        (limit, period, anchor) in calendar_params(),
        t in prop_oneof![0..3 * DAY, 0..40 * DAY, Y2000..Y2100],
    ) {
        let a = CalendarQuota::new(limit, period, anchor).unwrap();
        let now = Timestamp::from_nanos(t);
        let (start, end) = a.bounds(now);
        prop_assert!(start <= now && now < end, "{now:?} outside {start:?}..{end:?}");
        prop_assert_eq!(a.bounds(start), (start, end), "from the start");
        prop_assert_eq!(
            a.bounds(Timestamp::from_nanos(end.as_nanos() - 1)),
            (start, end),
            "from the last nanosecond"
        );
        prop_assert_eq!(a.bounds(end).0, end, "the next period starts where this one ends");
        let len = end.nanos_since(start);
        let (shortest, longest) = match period {
            CalendarPeriod::Day => (DAY, DAY),
            CalendarPeriod::Month => (28 * DAY, 31 * DAY),
        };
        // Only the first period after the epoch may be cut short.
        prop_assert!(
            len <= longest && (len >= shortest || start.as_nanos() == 0),
            "period {start:?}..{end:?} is {len} ns"
        );
        let (o, _) = a.acquire(&Default::default(), now, 1);
        prop_assert_eq!(o.reset_after, end.nanos_since(now));
        // Boundaries fall at the anchor's time of day and, for months, on the anchor's day of
        // the month clamped to the month's length (UTC midnight on the 1st without an anchor).
        let (anchor_day, anchor_time) = anchor.map_or((1, 0), |at| {
            let dt = datetime(at);
            (dt.day(), at.as_nanos() % DAY)
        });
        for boundary in [start, end].into_iter().filter(|b| b.as_nanos() != 0) {
            prop_assert_eq!(boundary.as_nanos() % DAY, anchor_time, "{:?} vs anchor", boundary);
            if period == CalendarPeriod::Month {
                let dt = datetime(boundary);
                let days_in_month = (28..=31u32)
                    .rev()
                    .find(|&d| chrono::NaiveDate::from_ymd_opt(dt.year(), dt.month(), d).is_some())
                    .unwrap();
                prop_assert_eq!(dt.day(), anchor_day.min(days_in_month), "{}", dt);
            }
        }
    }

    #[test]
    fn concurrency_releases_the_oldest_leases_first(
        limit in 2..=1000u64, max_hold in 1_000..=3600 * SEC, t0 in Y2000..Y2100,
        (a_frac, b_frac, r_frac, d_frac) in (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
    ) {
        // Lease `a` at t0, lease `b` later; a release while both are held is taken from `a`, so
        // once `a` has surely expired and `b` surely has not, exactly `b` remains.
        let c = Concurrency::new(limit, max_hold).unwrap();
        let a_cost = 1 + a_frac % (limit - 1);
        let b_cost = 1 + b_frac % (limit - a_cost);
        let released = 1 + r_frac % a_cost;
        let lifetime = 16 * max_hold.div_ceil(15); // the longest a lease can be counted
        let earliest = lifetime - max_hold + 1; // b must still be counted at t0 + lifetime
        prop_assume!(earliest < max_hold);
        let t1 = t0 + earliest + d_frac % (max_hold - earliest);
        let (_, s) = c.acquire(&Default::default(), Timestamp::from_nanos(t0), a_cost);
        let (ob, s) = c.acquire(&s, Timestamp::from_nanos(t1), b_cost);
        prop_assert!(ob.allowed);
        let s = c.refund(&s, Timestamp::from_nanos(t1), released);
        let later = Timestamp::from_nanos(t0 + lifetime);
        prop_assert_eq!(c.peek(&s, later).remaining, limit - b_cost, "t1 = t0 + {}", t1 - t0);
    }

    #[test]
    fn no_algorithm_reads_another_algorithms_state(
        (tb, s1) in token_bucket(), (g, s2) in gcra(), (fw, s3) in fixed_window(),
        (sw, s4) in sliding_window(), (sl, s5) in sliding_log(), (c, s6) in concurrency(),
        (q, s7) in calendar_quota(), start in starts(), raw in mixed(Clock::Forward),
    ) {
        fn last<A: Algorithm>(a: &A, start: u64, raw: &[(Gap, RawOp)], shape: Shape) -> Vec<u8> {
            let trace = run(a, &resolve(start, raw, shape));
            encode::<A>(&trace.last().unwrap().after)
        }
        let states = [
            last(&tb, start, &raw, s1),
            last(&g, start, &raw, s2),
            last(&fw, start, &raw, s3),
            last(&sw, start, &raw, s4),
            last(&sl, start, &raw, s5),
            last(&c, start, &raw, s6),
            last(&q, start, &raw, s7),
        ];
        let readers: [fn(&[u8]) -> bool; 7] = [
            decodes::<TokenBucket>,
            decodes::<Gcra>,
            decodes::<FixedWindow>,
            decodes::<SlidingWindow>,
            decodes::<SlidingLog>,
            decodes::<Concurrency>,
            decodes::<CalendarQuota>,
        ];
        for (i, bytes) in states.iter().enumerate() {
            for (j, read) in readers.iter().enumerate() {
                prop_assert_eq!(read(bytes), i == j, "state of {} read by {}", i, j);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reference models: on forward time, decisions match the documented rule exactly (so the
// algorithms neither allow too much nor deny what fits).
// ---------------------------------------------------------------------------------------------

/// Units counted by a step: the allowed cost of an acquire, or a charge.
fn counted<S>(st: &Step<S>) -> u128 {
    match st.op {
        Op::Charge(c) => u128::from(c),
        _ => u128::from(st.allowed()),
    }
}

/// Checks each acquire's decision and `remaining` against `used`, the units the rule counts
/// for it (before it), then lets `record` count the step.
fn check_model<S: std::fmt::Debug>(
    trace: &[Step<S>],
    limit: u64,
    mut used: impl FnMut(u64) -> u128,
    mut record: impl FnMut(u64, u128),
) -> R {
    let limit_u = u128::from(limit);
    for (i, st) in trace.iter().enumerate() {
        let t = st.at.as_nanos();
        if let (Op::Acquire(cost), Some(o)) = (st.op, st.outcome) {
            let before = used(t);
            let fits = before + u128::from(cost) <= limit_u;
            prop_assert_eq!(
                o.allowed,
                fits,
                "step {}: model counts {} used: {:?}",
                i,
                before,
                st
            );
            let after = if fits {
                before + u128::from(cost)
            } else {
                before
            };
            prop_assert_eq!(
                u128::from(o.remaining),
                limit_u.saturating_sub(after),
                "step {}: remaining vs model {} used: {:?}",
                i,
                after,
                st
            );
        }
        record(t, counted(st));
    }
    Ok(())
}

/// Limits whose per-window sums stay well inside u64 (the states' counters saturate there).
fn modest_limits() -> impl Strategy<Value = u64> {
    prop_oneof![6 => 1..=10u64, 2 => 1..=1000u64, 1 => 1..=u64::from(u32::MAX)]
}

proptest! {
    #[test]
    fn token_bucket_and_gcra_are_the_same_meter(
        params in bucket_params(), start in starts(), raw in mixed(Clock::Forward)
    ) {
        // A bucket's deficit is exactly GCRA's TAT ahead of now (both in units of 1/rate ns),
        // so on a forward clock the two give identical outcomes, refunds and charges included.
        let tb = TokenBucket::new(params.0, params.1, params.2).unwrap();
        let g = Gcra::new(params.0, params.1, params.2).unwrap();
        let seq = resolve(start, &raw, bucket_shape(params));
        for (i, (x, y)) in run(&tb, &seq).iter().zip(run(&g, &seq)).enumerate() {
            prop_assert_eq!(x.outcome, y.outcome, "step {}: {:?} vs {:?}", i, x, y);
        }
    }

    #[test]
    fn fixed_window_matches_its_counter(
        limit in modest_limits(), window in windows(), start in starts(),
        raw in arrivals(Clock::Forward)
    ) {
        let a = FixedWindow::new(limit, window).unwrap();
        let trace = run(&a, &resolve(start, &raw, window_shape(limit, window)));
        let counts = std::cell::RefCell::new(HashMap::<u64, u128>::new());
        check_model(
            &trace,
            limit,
            |t| counts.borrow().get(&(t / window)).copied().unwrap_or(0),
            |t, n| *counts.borrow_mut().entry(t / window).or_default() += n,
        )?;
    }

    #[test]
    fn sliding_window_matches_the_documented_estimate(
        limit in modest_limits(), window in windows(), start in starts(),
        raw in arrivals(Clock::Forward)
    ) {
        // previous × (unelapsed share of the current window), rounded up, + current.
        let a = SlidingWindow::new(limit, window).unwrap();
        let trace = run(&a, &resolve(start, &raw, window_shape(limit, window)));
        let counts = std::cell::RefCell::new(HashMap::<u64, u128>::new());
        let w = u128::from(window);
        check_model(
            &trace,
            limit,
            |t| {
                let counts = counts.borrow();
                let index = t / window;
                let current = counts.get(&index).copied().unwrap_or(0);
                let previous = index
                    .checked_sub(1)
                    .and_then(|p| counts.get(&p).copied())
                    .unwrap_or(0);
                let unelapsed = u128::from(window - t % window);
                (previous * unelapsed).div_ceil(w) + current
            },
            |t, n| *counts.borrow_mut().entry(t / window).or_default() += n,
        )?;
    }

    #[test]
    fn sliding_log_matches_an_exact_log(
        limit in log_limits(), window in windows(), start in starts(),
        raw in arrivals(Clock::Forward)
    ) {
        let a = SlidingLog::new(limit, window).unwrap();
        let trace = run(&a, &resolve(start, &raw, window_shape(limit, window)));
        let log = std::cell::RefCell::new(Vec::<(u64, u128)>::new());
        check_model(
            &trace,
            limit,
            |t| {
                log.borrow()
                    .iter()
                    .filter(|e| e.0.saturating_add(window) > t)
                    .map(|e| e.1)
                    .sum()
            },
            |t, n| log.borrow_mut().push((t, n)),
        )?;
    }

    #[test]
    fn calendar_quota_matches_its_period_counter(
        (_, period, anchor) in calendar_params(), limit in modest_limits(), start in starts(),
        raw in arrivals(Clock::Forward)
    ) {
        let a = CalendarQuota::new(limit, period, anchor).unwrap();
        let trace = run(&a, &resolve(start, &raw, calendar_shape(limit, period)));
        let counts = std::cell::RefCell::new(HashMap::<(Timestamp, Timestamp), u128>::new());
        let key = |t| a.bounds(Timestamp::from_nanos(t));
        check_model(
            &trace,
            limit,
            |t| counts.borrow().get(&key(t)).copied().unwrap_or(0),
            |t, n| *counts.borrow_mut().entry(key(t)).or_default() += n,
        )?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A limit of `u64::MAX` is accepted; counters saturate there, so it acts as "unlimited".
    /// Whatever it does, it must not panic and its states must round-trip.
    #[test]
    fn unlimited_limit_never_panics(
        window in windows(), start in starts(), raw in mixed(Clock::Any),
    ) {
        fn exercise<A: Algorithm>(a: &A, start: u64, raw: &[(Gap, RawOp)], scale: u64) -> R {
            let shape = Shape { scale, cap: u64::MAX };
            let trace = run(a, &resolve(start, raw, shape));
            prop_huge_charges(a, &trace, shape)?;
            prop_round_trip::<A>(&trace, false)
        }
        let max = u64::MAX;
        exercise(&TokenBucket::new(max, window, max).unwrap(), start, &raw, window)?;
        exercise(&Gcra::new(max, window, max).unwrap(), start, &raw, window)?;
        exercise(&FixedWindow::new(max, window).unwrap(), start, &raw, window)?;
        exercise(&SlidingWindow::new(max, window).unwrap(), start, &raw, window)?;
        exercise(&Concurrency::new(max, window).unwrap(), start, &raw, window)?;
        let q = CalendarQuota::new(max, CalendarPeriod::Month, None).unwrap();
        exercise(&q, start, &raw, 31 * DAY)?;
    }
}

/// The stronger reading of "the clock stepping back grants nothing": treating every request as
/// arriving at the latest time seen, the log allows at most `limit` per window. Regression: an
/// entry logged while the clock was behind used to be stamped at that earlier time and left the
/// window early; the state now keeps a high-water mark of time.
#[test]
fn sliding_log_bound_at_latest_time_when_clock_steps_back() {
    let w = 100 * SEC;
    let log = SlidingLog::new(2, w).unwrap();
    let s = SlidingLogState::default();
    let (a, s) = log.acquire(&s, Timestamp::from_nanos(0), 1);
    let (p, s) = log.acquire(&s, Timestamp::from_nanos(90 * SEC), 0); // latest time: 90 s
    let (b, s) = log.acquire(&s, Timestamp::from_nanos(10 * SEC), 1); // clock 80 s behind
    let (c, _) = log.acquire(&s, Timestamp::from_nanos(115 * SEC), 2);
    assert!(a.allowed && p.allowed && b.allowed);
    // Taken at 90 s (the latest time seen), `b` would still count at 115 s: 1 + 2 > 2.
    assert!(
        !c.allowed,
        "3 units allowed within 90 s..115 s of a window of 100 s"
    );
}
