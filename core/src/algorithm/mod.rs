//! The limiting algorithms, each a pure state transition `(state, now, cost) -> (outcome, state)`.
//!
//! States encode to a few bytes (a tag byte, then little-endian fields) so that runtimes can keep
//! them in shared KV and update them with compare-and-swap. A state that fails to decode (another
//! algorithm's, or corrupt) is an error the caller turns into a fresh state: changing a rule's
//! algorithm resets its counters, which is the only safe reading of bytes we did not write.
//!
//! Arithmetic is exact integer arithmetic (u128 where products can overflow u64), so every
//! runtime — native, Envoy's V8, workerd — computes bit-identical answers.

mod calendar_quota;
mod codec;
mod concurrency;
mod divisor;
mod fixed_window;
mod gcra;
mod sliding_log;
mod sliding_window;
mod token_bucket;

pub use calendar_quota::{CalendarPeriod, CalendarQuota, CalendarQuotaState};
pub use codec::StateError;
pub use concurrency::{Concurrency, ConcurrencyState};
pub use fixed_window::{FixedWindow, FixedWindowState};
pub use gcra::{Gcra, GcraNanos, GcraNanosState, GcraState, MAX_NANOS_TOLERANCE};
pub use sliding_log::{SlidingLog, SlidingLogState};
pub use sliding_window::{SlidingWindow, SlidingWindowState};
pub use token_bucket::{TokenBucket, TokenBucketNanos, TokenBucketNanosState, TokenBucketState};

use crate::time::Timestamp;

/// What one algorithm says about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the request fits.
    pub allowed: bool,
    /// The limit to advertise (requests or cost units per window, burst for buckets).
    pub limit: u64,
    /// Units left after this request (before it, when denied).
    pub remaining: u64,
    /// Nanoseconds until the limit is fully restored (window end, bucket full, quota period end).
    pub reset_after: u64,
    /// Nanoseconds until a request of the same cost could be allowed; 0 when allowed.
    pub retry_after: u64,
}

/// Invalid algorithm parameters; the policy compiler names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// A limit, rate or burst of zero would deny everything; use a deny rule instead.
    #[error("must be at least 1")]
    Zero,
    /// A window or period of zero has no meaning.
    #[error("window must be longer than 0")]
    ZeroWindow,
    /// The value is beyond what the algorithm supports.
    #[error("must be at most {max}")]
    TooLarge {
        /// The largest accepted value.
        max: u64,
    },
}

/// A limiting algorithm: a pure function of its state, the time and the request's cost.
pub trait Algorithm {
    /// The per-key state; `Default` is the state of a key never seen.
    type State: Clone + Default + PartialEq + core::fmt::Debug;

    /// Decides a request of `cost` units. On denial the returned state charges nothing.
    fn acquire(&self, state: &Self::State, now: Timestamp, cost: u64) -> (Outcome, Self::State);

    /// Gives back `cost` units taken by an earlier `acquire` (a request denied by another tier,
    /// or a concurrency slot released).
    fn refund(&self, state: &Self::State, now: Timestamp, cost: u64) -> Self::State;

    /// Charges `cost` units unconditionally (cost known only after the response, e.g. tokens).
    fn charge(&self, state: &Self::State, now: Timestamp, cost: u64) -> Self::State;

    /// Appends the state's byte encoding to `out`.
    fn encode(state: &Self::State, out: &mut Vec<u8>);

    /// Decodes bytes written by `encode`.
    fn decode(bytes: &[u8]) -> Result<Self::State, StateError>;

    /// Decides a request and returns only the verdict and the next state, for callers that send
    /// no headers. Every `acquire` is `#[inline]`, so the header numbers it computes (each a
    /// division) are dropped by the optimiser here: a bare decision costs what the algorithm
    /// costs, the same work a limiter like governor's `check` does.
    #[inline]
    fn decide(&self, state: &Self::State, now: Timestamp, cost: u64) -> (bool, Self::State) {
        let (outcome, next) = self.acquire(state, now, cost);
        (outcome.allowed, next)
    }

    /// The current standing without consuming anything.
    fn peek(&self, state: &Self::State, now: Timestamp) -> Outcome {
        self.acquire(state, now, 0).0
    }
}

/// Whether an algorithm limits a rate (windows, buckets), a quota (calendar) or concurrency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    /// Requests or units over a rolling or fixed time window.
    Rate,
    /// Units per calendar period (day, month).
    Quota,
    /// Requests in flight at once.
    Concurrency,
}

/// Any algorithm with its parameters: what a compiled rule holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Limiter {
    /// Token bucket.
    TokenBucket(TokenBucket),
    /// Token bucket whose state is one `u64` (the compiler's choice when that is exact).
    TokenBucketNanos(TokenBucketNanos),
    /// GCRA (leaky bucket as a meter).
    Gcra(Gcra),
    /// GCRA on a `u64` nanosecond TAT (the compiler's choice when that is exact).
    GcraNanos(GcraNanos),
    /// Fixed window counter.
    FixedWindow(FixedWindow),
    /// Sliding window counter (two-window weighted estimate).
    SlidingWindow(SlidingWindow),
    /// Sliding log (exact, for small limits).
    SlidingLog(SlidingLog),
    /// In-flight requests.
    Concurrency(Concurrency),
    /// Daily or monthly quota.
    CalendarQuota(CalendarQuota),
}

/// Calls `$body` with `$a` bound to the concrete algorithm inside a `Limiter`.
macro_rules! dispatch {
    ($limiter:expr, $a:ident => $body:expr) => {
        match $limiter {
            Limiter::TokenBucket($a) => $body,
            Limiter::TokenBucketNanos($a) => $body,
            Limiter::Gcra($a) => $body,
            Limiter::GcraNanos($a) => $body,
            Limiter::FixedWindow($a) => $body,
            Limiter::SlidingWindow($a) => $body,
            Limiter::SlidingLog($a) => $body,
            Limiter::Concurrency($a) => $body,
            Limiter::CalendarQuota($a) => $body,
        }
    };
}

/// Decodes `bytes` (or starts fresh when absent or unreadable) for algorithm `A`.
fn load<A: Algorithm>(bytes: Option<&[u8]>) -> A::State {
    bytes.and_then(|b| A::decode(b).ok()).unwrap_or_default()
}

fn store<A: Algorithm>(state: &A::State) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    A::encode(state, &mut out);
    out
}

fn acquire_bytes<A: Algorithm>(
    a: &A,
    bytes: Option<&[u8]>,
    now: Timestamp,
    cost: u64,
    out: &mut Vec<u8>,
) -> Outcome {
    let (outcome, next) = a.acquire(&load::<A>(bytes), now, cost);
    out.clear();
    A::encode(&next, out);
    outcome
}

fn refund_bytes<A: Algorithm>(a: &A, bytes: Option<&[u8]>, now: Timestamp, cost: u64) -> Vec<u8> {
    store::<A>(&a.refund(&load::<A>(bytes), now, cost))
}

fn charge_bytes<A: Algorithm>(a: &A, bytes: Option<&[u8]>, now: Timestamp, cost: u64) -> Vec<u8> {
    store::<A>(&a.charge(&load::<A>(bytes), now, cost))
}

impl Limiter {
    /// Decides against encoded state; returns the outcome and the state to write when allowed.
    pub fn acquire(&self, state: Option<&[u8]>, now: Timestamp, cost: u64) -> (Outcome, Vec<u8>) {
        let mut out = Vec::with_capacity(32);
        let outcome = self.acquire_into(state, now, cost, &mut out);
        (outcome, out)
    }

    /// `acquire`, writing the new state into `out` (cleared first): a caller deciding many
    /// requests reuses one buffer instead of allocating per decision.
    pub fn acquire_into(
        &self,
        state: Option<&[u8]>,
        now: Timestamp,
        cost: u64,
        out: &mut Vec<u8>,
    ) -> Outcome {
        dispatch!(self, a => acquire_bytes(a, state, now, cost, out))
    }

    /// The standing of encoded state, consuming nothing.
    pub fn peek(&self, state: Option<&[u8]>, now: Timestamp) -> Outcome {
        dispatch!(self, a => a.peek(&load_for(a, state), now))
    }

    /// Returns `cost` units to encoded state.
    pub fn refund(&self, state: Option<&[u8]>, now: Timestamp, cost: u64) -> Vec<u8> {
        dispatch!(self, a => refund_bytes(a, state, now, cost))
    }

    /// Charges `cost` units to encoded state without checking the limit.
    pub fn charge(&self, state: Option<&[u8]>, now: Timestamp, cost: u64) -> Vec<u8> {
        dispatch!(self, a => charge_bytes(a, state, now, cost))
    }

    /// Whether this limits a rate, a quota or concurrency (decides which headers it drives).
    pub fn kind(&self) -> LimitKind {
        match self {
            Limiter::CalendarQuota(_) => LimitKind::Quota,
            Limiter::Concurrency(_) => LimitKind::Concurrency,
            _ => LimitKind::Rate,
        }
    }

    /// The advertised window in seconds for `RateLimit-Policy` (`w`), when there is one.
    pub fn window_secs(&self, now: Timestamp) -> Option<u64> {
        match self {
            Limiter::TokenBucket(a) => Some(a.window_secs()),
            Limiter::TokenBucketNanos(a) => Some(a.window_secs()),
            Limiter::Gcra(a) => Some(a.window_secs()),
            Limiter::GcraNanos(a) => Some(a.window_secs()),
            Limiter::FixedWindow(a) => Some(a.window_secs()),
            Limiter::SlidingWindow(a) => Some(a.window_secs()),
            Limiter::SlidingLog(a) => Some(a.window_secs()),
            Limiter::Concurrency(_) => None,
            Limiter::CalendarQuota(a) => Some(a.period_secs(now)),
        }
    }
}

/// Type inference helper: the state type of the algorithm `a` refers to.
fn load_for<A: Algorithm>(_a: &A, bytes: Option<&[u8]>) -> A::State {
    load::<A>(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_of_another_algorithm_starts_fresh() {
        let window = FixedWindow::new(2, 60 * crate::time::NANOS_PER_SEC).unwrap();
        let bucket = TokenBucket::new(2, 60 * crate::time::NANOS_PER_SEC, 2).unwrap();
        let now = Timestamp::from_secs(1_000);
        let (_, bytes) = Limiter::TokenBucket(bucket).acquire(None, now, 2);
        // The window cannot read the bucket's bytes, so it sees a fresh key.
        let outcome = Limiter::FixedWindow(window).peek(Some(&bytes), now);
        assert_eq!(outcome.remaining, 2);
    }
}
