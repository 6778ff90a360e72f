//! Concurrency limit: at most `limit` requests in flight; each acquisition is a lease that the
//! runtime releases when the response ends.
//!
//! A runtime can die between acquire and release (a worker restart, a dropped stream), and a
//! plain counter would then leak slots forever. So leases also expire: they are counted in a
//! ring of 16 buckets of `max_hold / 15` each, and a bucket older than 15 buckets is dropped.
//! A lease therefore lives between `max_hold` and `16 × ⌈max_hold / 15⌉` unless released — the
//! bounded error we accept for state of a fixed 137 bytes whatever the limit.

use super::codec::{tag, Reader, Writer};
use super::divisor::Divisor;
use super::{Algorithm, Outcome, ParamError, StateError};
use crate::time::{Timestamp, NANOS_PER_SEC};

const BUCKETS: usize = 16;

/// Concurrency parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Concurrency {
    limit: u64,
    granularity: Divisor,
}

/// Concurrency state: leases counted per time bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConcurrencyState {
    /// The newest bucket's slot number (`now / granularity`).
    pub head: u64,
    /// Leases per bucket, indexed by `slot % 16`.
    pub leases: [u64; BUCKETS],
}

impl Concurrency {
    /// At most `limit` in flight; an unreleased lease expires after `max_hold_nanos`.
    pub fn new(limit: u64, max_hold_nanos: u64) -> Result<Self, ParamError> {
        if limit == 0 {
            return Err(ParamError::Zero);
        }
        if max_hold_nanos == 0 {
            return Err(ParamError::ZeroWindow);
        }
        let granularity = max_hold_nanos.div_ceil(BUCKETS as u64 - 1);
        Ok(Self {
            limit,
            granularity: Divisor::new(granularity),
        })
    }

    /// Advances the ring to `now`, dropping buckets that have aged out.
    fn current(&self, state: &ConcurrencyState, now: Timestamp) -> ConcurrencyState {
        let slot = self.granularity.div_u64(now.as_nanos());
        if slot <= state.head {
            return *state;
        }
        let mut next = *state;
        let steps = (slot - state.head).min(BUCKETS as u64);
        for k in 1..=steps {
            next.leases[Self::index(state.head + k)] = 0;
        }
        next.head = slot;
        next
    }

    fn index(slot: u64) -> usize {
        (slot % BUCKETS as u64) as usize
    }

    fn in_flight(state: &ConcurrencyState) -> u64 {
        state.leases.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }

    fn add(state: &mut ConcurrencyState, cost: u64) {
        let i = Self::index(state.head);
        state.leases[i] = state.leases[i].saturating_add(cost);
    }
}

impl Algorithm for Concurrency {
    type State = ConcurrencyState;

    #[inline]
    fn acquire(&self, state: &Self::State, now: Timestamp, cost: u64) -> (Outcome, Self::State) {
        let mut next = self.current(state, now);
        let after = Self::in_flight(&next).saturating_add(cost);
        let allowed = after <= self.limit;
        if allowed {
            Self::add(&mut next, cost);
        }
        let outcome = Outcome {
            allowed,
            limit: self.limit,
            remaining: self.limit.saturating_sub(Self::in_flight(&next)),
            reset_after: 0,
            // No time frees a slot for sure; one second is the conventional hint.
            retry_after: if allowed { 0 } else { NANOS_PER_SEC },
        };
        (outcome, next)
    }

    fn refund(&self, state: &Self::State, now: Timestamp, cost: u64) -> Self::State {
        // Release the oldest leases first: if a lease already expired, its slot is gone anyway.
        let mut next = self.current(state, now);
        let mut left = cost;
        for k in (0..BUCKETS as u64).rev() {
            let Some(slot) = next.head.checked_sub(k) else {
                continue;
            };
            let i = Self::index(slot);
            let take = left.min(next.leases[i]);
            next.leases[i] -= take;
            left -= take;
            if left == 0 {
                break;
            }
        }
        next
    }

    fn charge(&self, state: &Self::State, now: Timestamp, cost: u64) -> Self::State {
        let mut next = self.current(state, now);
        Self::add(&mut next, cost);
        next
    }

    fn encode(state: &Self::State, out: &mut Vec<u8>) {
        let mut w = Writer::new(out, tag::CONCURRENCY);
        w.u64(state.head);
        for n in state.leases {
            w.u64(n);
        }
    }

    fn decode(bytes: &[u8]) -> Result<Self::State, StateError> {
        let mut r = Reader::exact(bytes, tag::CONCURRENCY, 8 * (BUCKETS + 1))?;
        let mut state = ConcurrencyState {
            head: r.u64()?,
            ..Default::default()
        };
        for n in &mut state.leases {
            *n = r.u64()?;
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = NANOS_PER_SEC;

    #[test]
    fn release_frees_a_slot() {
        let c = Concurrency::new(2, 60 * SEC).unwrap();
        let t = Timestamp::from_secs(10);
        let (_, s) = c.acquire(&ConcurrencyState::default(), t, 1);
        let (_, s) = c.acquire(&s, t, 1);
        assert!(!c.acquire(&s, t, 1).0.allowed);
        let s = c.refund(&s, t.plus_nanos(SEC), 1);
        assert!(c.acquire(&s, t.plus_nanos(SEC), 1).0.allowed);
    }

    #[test]
    fn leaked_leases_expire_after_max_hold() {
        let c = Concurrency::new(1, 60 * SEC).unwrap();
        let t = Timestamp::from_secs(1_000);
        let (_, s) = c.acquire(&ConcurrencyState::default(), t, 1);
        assert!(!c.acquire(&s, t.plus_nanos(59 * SEC), 1).0.allowed);
        assert!(c.acquire(&s, t.plus_nanos(65 * SEC), 1).0.allowed);
    }

    #[test]
    fn round_trips() {
        let mut s = ConcurrencyState {
            head: 77,
            ..Default::default()
        };
        s.leases[3] = 9;
        let mut out = Vec::new();
        Concurrency::encode(&s, &mut out);
        assert_eq!(out.len(), 137);
        assert_eq!(Concurrency::decode(&out).unwrap(), s);
    }
}
