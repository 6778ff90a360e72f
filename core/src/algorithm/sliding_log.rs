//! Sliding log: remembers when each unit was spent and allows at most `limit` units in any span
//! of one window — exact, at the cost of state that grows with the limit. Meant for small exact
//! limits (say 5 password resets per hour), so the limit is capped at [`SlidingLog::MAX_LIMIT`].
//!
//! The state also keeps the latest time it has seen, and every operation runs at
//! `max(now, seen)`: a clock that steps back then changes nothing. Without it, an entry logged
//! while the clock was behind would leave the window early and let more than `limit` through.

use super::codec::{tag, Reader, Writer};
use super::{Algorithm, Outcome, ParamError, StateError};
use crate::time::{Timestamp, NANOS_PER_SEC};

/// Sliding log parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlidingLog {
    limit: u64,
    window: u64,
}

/// One logged acquisition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// When the units were spent.
    pub at: Timestamp,
    /// How many units.
    pub cost: u32,
}

/// Sliding log state: entries oldest first, none older than one window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlidingLogState {
    /// The latest time any operation ran at (a high-water mark against clocks stepping back).
    pub seen: Timestamp,
    /// Acquisitions still inside the window.
    pub entries: Vec<LogEntry>,
}

impl SlidingLog {
    /// The largest limit a log is kept for: 256 entries of 12 bytes stay a small KV value.
    pub const MAX_LIMIT: u64 = 256;

    /// At most `limit` units in any span of `window_nanos`.
    pub fn new(limit: u64, window_nanos: u64) -> Result<Self, ParamError> {
        if limit == 0 {
            return Err(ParamError::Zero);
        }
        if limit > Self::MAX_LIMIT {
            return Err(ParamError::TooLarge {
                max: Self::MAX_LIMIT,
            });
        }
        if window_nanos == 0 {
            return Err(ParamError::ZeroWindow);
        }
        Ok(Self {
            limit,
            window: window_nanos,
        })
    }

    /// The window in whole seconds (at least 1).
    pub fn window_secs(&self) -> u64 {
        self.window.div_ceil(NANOS_PER_SEC).max(1)
    }

    /// The state at `max(now, seen)`, without the entries that have left the window by then.
    fn live(&self, state: &SlidingLogState, now: Timestamp) -> (SlidingLogState, Timestamp) {
        let now = now.max(state.seen);
        let entries = state
            .entries
            .iter()
            .filter(|e| e.at.as_nanos().saturating_add(self.window) > now.as_nanos())
            .copied()
            .collect();
        (SlidingLogState { seen: now, entries }, now)
    }

    fn used(state: &SlidingLogState) -> u64 {
        state.entries.iter().map(|e| u64::from(e.cost)).sum()
    }

    fn expiry(&self, entry: &LogEntry, now: Timestamp) -> u64 {
        entry
            .at
            .as_nanos()
            .saturating_add(self.window)
            .saturating_sub(now.as_nanos())
    }

    /// Appends `cost` units at `now` (never earlier than any entry: `now` is past `seen`).
    fn push(state: &mut SlidingLogState, now: Timestamp, cost: u64) {
        let cost = u32::try_from(cost).unwrap_or(u32::MAX);
        match state.entries.last_mut() {
            Some(last) if last.at == now => last.cost = last.cost.saturating_add(cost),
            _ => state.entries.push(LogEntry { at: now, cost }),
        }
    }
}

impl Algorithm for SlidingLog {
    type State = SlidingLogState;

    #[inline]
    fn acquire(&self, state: &Self::State, now: Timestamp, cost: u64) -> (Outcome, Self::State) {
        let (mut next, now) = self.live(state, now);
        let used = Self::used(&next);
        let allowed = used.saturating_add(cost) <= self.limit;
        let mut retry_after = 0;
        if allowed {
            if cost > 0 {
                Self::push(&mut next, now, cost);
            }
        } else {
            // Wait until enough of the oldest entries expire for `cost` to fit.
            let mut freed = 0u64;
            retry_after = self.window; // a cost above the limit never fits
            for entry in &next.entries {
                freed += u64::from(entry.cost);
                // Saturating: `cost` may be anything up to u64::MAX (it then never fits).
                if (used - freed).saturating_add(cost) <= self.limit {
                    retry_after = self.expiry(entry, now).max(1);
                    break;
                }
            }
        }
        let outcome = Outcome {
            allowed,
            limit: self.limit,
            remaining: self.limit.saturating_sub(Self::used(&next)),
            reset_after: next.entries.last().map_or(0, |e| self.expiry(e, now)),
            retry_after,
        };
        (outcome, next)
    }

    fn refund(&self, state: &Self::State, now: Timestamp, cost: u64) -> Self::State {
        // Take back from the newest entries: those are the ones the refunded request added.
        let (mut next, _) = self.live(state, now);
        let mut left = cost;
        while left > 0 {
            let Some(last) = next.entries.last_mut() else {
                break;
            };
            let take = left.min(u64::from(last.cost));
            last.cost -= u32::try_from(take).unwrap_or(last.cost);
            left -= take;
            if last.cost == 0 {
                next.entries.pop();
            }
        }
        next
    }

    fn charge(&self, state: &Self::State, now: Timestamp, cost: u64) -> Self::State {
        let (mut next, now) = self.live(state, now);
        if cost > 0 {
            Self::push(&mut next, now, cost);
        }
        next
    }

    fn encode(state: &Self::State, out: &mut Vec<u8>) {
        let mut w = Writer::new(out, tag::SLIDING_LOG);
        w.u64(state.seen.as_nanos());
        for e in &state.entries {
            w.u64(e.at.as_nanos()).u32(e.cost);
        }
    }

    fn decode(bytes: &[u8]) -> Result<Self::State, StateError> {
        let mut r = Reader::tagged(bytes, tag::SLIDING_LOG)?;
        if r.remaining() < 8 || (r.remaining() - 8) % 12 != 0 {
            let whole = r.remaining().saturating_sub(8) / 12 * 12;
            return Err(StateError::WrongLength {
                expected: 9 + whole,
                found: bytes.len(),
            });
        }
        let seen = Timestamp::from_nanos(r.u64()?);
        let mut entries = Vec::with_capacity(r.remaining() / 12);
        while r.remaining() > 0 {
            entries.push(LogEntry {
                at: Timestamp::from_nanos(r.u64()?),
                cost: r.u32()?,
            });
        }
        Ok(SlidingLogState { seen, entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = NANOS_PER_SEC;

    #[test]
    fn exact_over_any_span() {
        let log = SlidingLog::new(2, 10 * SEC).unwrap();
        let (_, s) = log.acquire(&SlidingLogState::default(), Timestamp::from_secs(1), 1);
        let (_, s) = log.acquire(&s, Timestamp::from_secs(9), 1);
        let (d, _) = log.acquire(&s, Timestamp::from_secs(10), 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, SEC); // the entry at 1 s leaves at 11 s
        assert!(log.acquire(&s, Timestamp::from_secs(11), 1).0.allowed);
        assert!(!log.acquire(&s, Timestamp::from_secs(18), 2).0.allowed);
        assert!(log.acquire(&s, Timestamp::from_secs(19), 2).0.allowed);
    }

    #[test]
    fn huge_cost_is_denied_not_overflowing() {
        // Regression: the retry_after search computed `used - freed + cost`, which overflowed
        // (a panic in debug builds) for a cost near u64::MAX against a log of several entries.
        let log = SlidingLog::new(5, 10 * SEC).unwrap();
        let (_, s) = log.acquire(&SlidingLogState::default(), Timestamp::from_secs(1), 1);
        let (_, s) = log.acquire(&s, Timestamp::from_secs(2), 1);
        let (d, _) = log.acquire(&s, Timestamp::from_secs(3), u64::MAX);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, 10 * SEC);
    }

    #[test]
    fn limit_is_capped() {
        assert_eq!(
            SlidingLog::new(257, SEC),
            Err(ParamError::TooLarge {
                max: SlidingLog::MAX_LIMIT
            })
        );
    }

    #[test]
    fn round_trips_and_rejects_torn_bytes() {
        let log = SlidingLog::new(5, SEC).unwrap();
        let (_, s) = log.acquire(&SlidingLogState::default(), Timestamp::from_secs(3), 2);
        let (_, s) = log.acquire(&s, Timestamp::from_nanos(3 * SEC + 7), 1);
        let mut out = Vec::new();
        SlidingLog::encode(&s, &mut out);
        assert_eq!(SlidingLog::decode(&out).unwrap(), s);
        assert!(SlidingLog::decode(&out[..out.len() - 1]).is_err());
    }
}
