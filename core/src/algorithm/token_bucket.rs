//! Token bucket: `burst` tokens of capacity, refilled at `rate` tokens per `period`.
//!
//! The state keeps the bucket's *deficit* (how far below full it is) rather than its level, so
//! the all-zero default state is a full bucket and a key never seen needs no initialisation.
//! One token is `period` units and the bucket refills `rate` units per nanosecond: integer
//! arithmetic with no rounding at all, so no runtime can drift from another.

use super::codec::{tag, Reader, Writer};
use super::divisor::Divisor;
use super::gcra::{Gcra, GcraNanos};
use super::{Algorithm, Outcome, ParamError, StateError};
use crate::time::{saturate_u64, Timestamp, NANOS_PER_SEC};

/// Token bucket parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    rate: Divisor,
    period: Divisor,
    burst: u64,
    /// `burst × period`: a full bucket in units, fixed at construction.
    capacity: u128,
}

/// Token bucket state: the deficit in units (`tokens × period`) at `last`.
// `packed(8)`: 24 bytes rather than 32 (a `u128` would align the struct to 16), so a keyed
// store holds a key and its state in 32 bytes instead of 48. Fields are only used by value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed(8))]
pub struct TokenBucketState {
    /// Units missing from a full bucket.
    pub deficit: u128,
    /// When `deficit` was last brought up to date.
    pub last: Timestamp,
}

impl TokenBucket {
    /// `rate` tokens per `period_nanos`, holding at most `burst` tokens.
    pub fn new(rate: u64, period_nanos: u64, burst: u64) -> Result<Self, ParamError> {
        if rate == 0 || burst == 0 {
            return Err(ParamError::Zero);
        }
        if period_nanos == 0 {
            return Err(ParamError::ZeroWindow);
        }
        Ok(Self {
            rate: Divisor::new(rate),
            period: Divisor::new(period_nanos),
            burst,
            capacity: u128::from(burst) * u128::from(period_nanos),
        })
    }

    /// The same bucket kept as the time it will be full again, in `u64` nanoseconds, when that
    /// is exact: one token refills in a whole number of ns and a full bucket's refill time is at
    /// most [`MAX_NANOS_TOLERANCE`](super::MAX_NANOS_TOLERANCE). `TokenBucketNanos` says how its
    /// answers relate to this form's.
    pub fn in_nanos(&self) -> Option<TokenBucketNanos> {
        let meter = Gcra::new(self.rate.get(), self.period.get(), self.burst).ok()?;
        Some(TokenBucketNanos(meter.in_nanos()?))
    }

    /// The refill period in whole seconds (at least 1), for `RateLimit-Policy`.
    pub fn window_secs(&self) -> u64 {
        self.period.get().div_ceil(NANOS_PER_SEC).max(1)
    }

    fn units(&self, tokens: u64) -> u128 {
        u128::from(tokens) * u128::from(self.period.get())
    }

    /// The state brought forward to `now`; a clock that stepped back refills nothing.
    fn refill(&self, state: &TokenBucketState, now: Timestamp) -> TokenBucketState {
        if now <= state.last {
            return *state;
        }
        let elapsed = u128::from(now.nanos_since(state.last));
        let refilled = elapsed.saturating_mul(u128::from(self.rate.get()));
        TokenBucketState {
            deficit: state.deficit.saturating_sub(refilled),
            last: now,
        }
    }

    /// Nanoseconds for `units` to refill.
    fn time_for(&self, units: u128) -> u64 {
        saturate_u64(self.rate.div_ceil(units))
    }
}

impl Algorithm for TokenBucket {
    type State = TokenBucketState;

    #[inline]
    fn acquire(&self, state: &Self::State, now: Timestamp, cost: u64) -> (Outcome, Self::State) {
        let current = self.refill(state, now);
        let need = self.units(cost);
        let capacity = self.capacity;
        let after = current.deficit.saturating_add(need);
        let allowed = after <= capacity;
        let next = if allowed {
            TokenBucketState {
                deficit: after,
                ..current
            }
        } else {
            current
        };
        let remaining_units = capacity.saturating_sub(next.deficit);
        let outcome = Outcome {
            allowed,
            limit: self.burst,
            remaining: saturate_u64(self.period.div(remaining_units)),
            reset_after: self.time_for(next.deficit),
            // A cost above the burst can never fit: the wait until full is the honest answer.
            retry_after: if allowed {
                0
            } else {
                self.time_for(after.saturating_sub(capacity))
            },
        };
        (outcome, next)
    }

    fn refund(&self, state: &Self::State, now: Timestamp, cost: u64) -> Self::State {
        let current = self.refill(state, now);
        TokenBucketState {
            deficit: current.deficit.saturating_sub(self.units(cost)),
            ..current
        }
    }

    fn charge(&self, state: &Self::State, now: Timestamp, cost: u64) -> Self::State {
        // The deficit may exceed capacity: a debt the caller pays off before the next request.
        let current = self.refill(state, now);
        TokenBucketState {
            deficit: current.deficit.saturating_add(self.units(cost)),
            ..current
        }
    }

    fn encode(state: &Self::State, out: &mut Vec<u8>) {
        Writer::new(out, tag::TOKEN_BUCKET)
            .u128(state.deficit)
            .u64(state.last.as_nanos());
    }

    fn decode(bytes: &[u8]) -> Result<Self::State, StateError> {
        let mut r = Reader::exact(bytes, tag::TOKEN_BUCKET, 24)?;
        Ok(TokenBucketState {
            deficit: r.u128()?,
            last: Timestamp::from_nanos(r.u64()?),
        })
    }
}

/// A token bucket on one `u64`: the time in nanoseconds at which it will be full again, for
/// buckets whose token refills in a whole number of ns (the policy compiler picks it when it
/// applies). Half the state of [`TokenBucket`], which keeps a `u128` deficit and its time.
///
/// A bucket's deficit at `now` is `(full_at − now) × rate` units, so this is GCRA's meter (the
/// TAT *is* the time the bucket is full; the two algorithms are one, seen from either end) and
/// it runs on [`GcraNanos`]. While time moves forward its decisions and outcomes are
/// [`TokenBucket`]'s exactly. When the clock steps back the exact form refills nothing and
/// keeps its deficit, while this one counts the step as time not yet passed: a deficit larger
/// by `step × rate`. Both are safe readings (neither grants extra); this one is the stricter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucketNanos(GcraNanos);

/// [`TokenBucketNanos`] state: when the bucket is full again, in ns since the epoch (0 = full).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenBucketNanosState {
    /// The instant the bucket refills to `burst`.
    pub full_at: u64,
}

impl TokenBucketNanos {
    /// `rate` tokens per `period_nanos` holding at most `burst`, if exact in nanoseconds.
    pub fn new(rate: u64, period_nanos: u64, burst: u64) -> Result<Option<Self>, ParamError> {
        Ok(TokenBucket::new(rate, period_nanos, burst)?.in_nanos())
    }

    /// The refill period in whole seconds (at least 1), for `RateLimit-Policy`.
    pub fn window_secs(&self) -> u64 {
        self.0.window_secs()
    }
}

impl Algorithm for TokenBucketNanos {
    type State = TokenBucketNanosState;

    #[inline]
    fn acquire(&self, state: &Self::State, now: Timestamp, cost: u64) -> (Outcome, Self::State) {
        let (outcome, full_at) = self.0.acquire_tat(state.full_at, now, cost);
        (outcome, TokenBucketNanosState { full_at })
    }

    fn refund(&self, state: &Self::State, _now: Timestamp, cost: u64) -> Self::State {
        TokenBucketNanosState {
            full_at: self.0.refund_tat(state.full_at, cost),
        }
    }

    fn charge(&self, state: &Self::State, now: Timestamp, cost: u64) -> Self::State {
        TokenBucketNanosState {
            full_at: self.0.charge_tat(state.full_at, now, cost),
        }
    }

    fn encode(state: &Self::State, out: &mut Vec<u8>) {
        Writer::new(out, tag::TOKEN_BUCKET_NANOS).u64(state.full_at);
    }

    fn decode(bytes: &[u8]) -> Result<Self::State, StateError> {
        let mut r = Reader::exact(bytes, tag::TOKEN_BUCKET_NANOS, 8)?;
        Ok(TokenBucketNanosState { full_at: r.u64()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = NANOS_PER_SEC;

    #[test]
    fn burst_then_refill_at_rate() {
        let tb = TokenBucket::new(1, SEC, 3).unwrap(); // 1 token/s, burst 3
        let t0 = Timestamp::from_secs(100);
        let mut s = TokenBucketState::default();
        for expected_remaining in [2, 1, 0] {
            let (o, n) = tb.acquire(&s, t0, 1);
            assert!(o.allowed);
            assert_eq!(o.remaining, expected_remaining);
            s = n;
        }
        let (o, _) = tb.acquire(&s, t0, 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, SEC);
        assert_eq!(o.reset_after, 3 * SEC);
        let (o, _) = tb.acquire(&s, t0.plus_nanos(SEC), 1);
        assert!(o.allowed);
    }

    #[test]
    fn cost_above_burst_is_denied_not_panicking() {
        let tb = TokenBucket::new(10, SEC, 5).unwrap();
        let (o, _) = tb.acquire(&TokenBucketState::default(), Timestamp::from_secs(1), 6);
        assert!(!o.allowed);
        assert!(o.retry_after > 0);
    }

    #[test]
    fn refund_and_charge() {
        let tb = TokenBucket::new(1, SEC, 2).unwrap();
        let t = Timestamp::from_secs(5);
        let (_, s) = tb.acquire(&TokenBucketState::default(), t, 2);
        let s = tb.refund(&s, t, 1);
        assert_eq!(tb.peek(&s, t).remaining, 1);
        let s = tb.charge(&s, t, 5);
        assert_eq!(tb.peek(&s, t).remaining, 0);
        assert!(!tb.acquire(&s, t.plus_nanos(3 * SEC), 1).0.allowed);
    }

    #[test]
    fn round_trips() {
        let s = TokenBucketState {
            deficit: 123_456_789_012_345,
            last: Timestamp::from_nanos(42),
        };
        let mut out = Vec::new();
        TokenBucket::encode(&s, &mut out);
        assert_eq!(TokenBucket::decode(&out).unwrap(), s);
        assert!(TokenBucket::decode(&out[..10]).is_err());
    }
}
