//! Sliding window counter: the two-window weighted estimate (as Cloudflare and most API
//! gateways use). The estimate is `previous × (unelapsed share of the current window) +
//! current`; the weighted part is rounded *up* so the estimate never under-counts.
//!
//! What it promises: within any aligned window at most `limit` units are allowed (the current
//! count never exceeds the estimate), and over any span of one window length at most
//! `2 × limit`. It assumes the previous window's traffic was spread evenly; use a sliding log
//! where an exact rolling limit matters.

use super::codec::{tag, Reader, Writer};
use super::divisor::Divisor;
use super::{Algorithm, Outcome, ParamError, StateError};
use crate::time::{saturate_u64, Timestamp, NANOS_PER_SEC};

/// Sliding window parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlidingWindow {
    limit: u64,
    window: Divisor,
}

/// Sliding window state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlidingWindowState {
    /// Index of the current window (`now / window`).
    pub window: u64,
    /// Units in the current window.
    pub current: u64,
    /// Units in the window before it.
    pub previous: u64,
}

impl SlidingWindow {
    /// `limit` units per rolling `window_nanos`.
    pub fn new(limit: u64, window_nanos: u64) -> Result<Self, ParamError> {
        if limit == 0 {
            return Err(ParamError::Zero);
        }
        if window_nanos == 0 {
            return Err(ParamError::ZeroWindow);
        }
        Ok(Self {
            limit,
            window: Divisor::new(window_nanos),
        })
    }

    /// The window in whole seconds (at least 1).
    pub fn window_secs(&self) -> u64 {
        self.window.get().div_ceil(NANOS_PER_SEC).max(1)
    }

    fn current(&self, state: &SlidingWindowState, now: Timestamp) -> SlidingWindowState {
        let index = self.window.div_u64(now.as_nanos());
        if index <= state.window {
            *state // same window, or the clock stepped back: keep what we counted
        } else if index == state.window + 1 {
            SlidingWindowState {
                window: index,
                current: 0,
                previous: state.current,
            }
        } else {
            SlidingWindowState {
                window: index,
                current: 0,
                previous: 0,
            }
        }
    }

    /// Nanoseconds of the current window not yet elapsed at `now` (0 if `now` is past it).
    fn unelapsed(&self, state: &SlidingWindowState, now: Timestamp) -> u64 {
        let end = state
            .window
            .saturating_add(1)
            .saturating_mul(self.window.get());
        end.saturating_sub(now.as_nanos()).min(self.window.get())
    }

    fn estimate(&self, state: &SlidingWindowState, now: Timestamp) -> u64 {
        let unelapsed = u128::from(self.unelapsed(state, now));
        let weighted = self.window.div_ceil(u128::from(state.previous) * unelapsed);
        saturate_u64(weighted).saturating_add(state.current)
    }

    /// Nanoseconds until `cost` more units fit, assuming no other traffic.
    fn wait_for(&self, state: &SlidingWindowState, now: Timestamp, cost: u64) -> u64 {
        let unelapsed = self.unelapsed(state, now);
        // Within this window the previous window's weight decays linearly to zero.
        if let Some(room) = self.limit.checked_sub(state.current.saturating_add(cost)) {
            if state.previous == 0 {
                return 0;
            }
            // Need ceil(previous × u / window) <= room, i.e. u <= room × window / previous.
            let max_u =
                u128::from(room) * u128::from(self.window.get()) / u128::from(state.previous);
            return unelapsed.saturating_sub(saturate_u64(max_u));
        }
        // Otherwise wait into the next window, where this window's count becomes the weight.
        let Some(room) = self.limit.checked_sub(cost) else {
            return unelapsed.saturating_add(self.window.get()); // never fits: a full cycle
        };
        let max_u = if state.current == 0 {
            u128::from(self.window.get())
        } else {
            u128::from(room) * u128::from(self.window.get()) / u128::from(state.current)
        };
        unelapsed.saturating_add(self.window.get().saturating_sub(saturate_u64(max_u)))
    }
}

impl Algorithm for SlidingWindow {
    type State = SlidingWindowState;

    #[inline]
    fn acquire(&self, state: &Self::State, now: Timestamp, cost: u64) -> (Outcome, Self::State) {
        let current = self.current(state, now);
        let estimate = self.estimate(&current, now);
        let allowed = estimate.saturating_add(cost) <= self.limit;
        let next = if allowed {
            SlidingWindowState {
                current: current.current.saturating_add(cost),
                ..current
            }
        } else {
            current
        };
        let used = if allowed {
            estimate.saturating_add(cost)
        } else {
            estimate
        };
        let unelapsed = self.unelapsed(&next, now);
        let outcome = Outcome {
            allowed,
            limit: self.limit,
            remaining: self.limit.saturating_sub(used),
            // Everything counted now has left the estimate once the next window has passed.
            reset_after: if next.current == 0 {
                unelapsed
            } else {
                unelapsed.saturating_add(self.window.get())
            },
            retry_after: if allowed {
                0
            } else {
                self.wait_for(&current, now, cost).max(1)
            },
        };
        (outcome, next)
    }

    fn refund(&self, state: &Self::State, now: Timestamp, cost: u64) -> Self::State {
        let current = self.current(state, now);
        if current.window == state.window {
            SlidingWindowState {
                current: current.current.saturating_sub(cost),
                ..current
            }
        } else if current.window == state.window + 1 {
            SlidingWindowState {
                previous: current.previous.saturating_sub(cost),
                ..current
            }
        } else {
            current
        }
    }

    fn charge(&self, state: &Self::State, now: Timestamp, cost: u64) -> Self::State {
        let current = self.current(state, now);
        SlidingWindowState {
            current: current.current.saturating_add(cost),
            ..current
        }
    }

    fn encode(state: &Self::State, out: &mut Vec<u8>) {
        Writer::new(out, tag::SLIDING_WINDOW)
            .u64(state.window)
            .u64(state.current)
            .u64(state.previous);
    }

    fn decode(bytes: &[u8]) -> Result<Self::State, StateError> {
        let mut r = Reader::exact(bytes, tag::SLIDING_WINDOW, 24)?;
        Ok(SlidingWindowState {
            window: r.u64()?,
            current: r.u64()?,
            previous: r.u64()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = NANOS_PER_SEC;

    #[test]
    fn previous_window_weighs_in_linearly() {
        let sw = SlidingWindow::new(10, 60 * SEC).unwrap();
        let mut s = SlidingWindowState::default();
        for _ in 0..10 {
            s = sw.acquire(&s, Timestamp::from_secs(30), 1).1;
        }
        // 15 s into the next window, 3/4 of the previous 10 still count: 8 (rounded up) used.
        let t = Timestamp::from_secs(75);
        let o = sw.peek(&s, t);
        assert_eq!(o.remaining, 2);
        let (a, s2) = sw.acquire(&s, t, 2);
        assert!(a.allowed);
        let (d, _) = sw.acquire(&s2, t, 1);
        assert!(!d.allowed);
        // Weight must fall to 7: previous×u/window <= 7 ⇒ u <= 42 s, i.e. at 78 s, 3 s away.
        assert_eq!(d.retry_after, 3 * SEC);
        assert!(sw.acquire(&s2, Timestamp::from_secs(78), 1).0.allowed);
        assert!(
            !sw.acquire(&s2, Timestamp::from_nanos(78 * SEC - 1), 1)
                .0
                .allowed
        );
    }

    #[test]
    fn retry_after_crossing_into_the_next_window() {
        let sw = SlidingWindow::new(4, 10 * SEC).unwrap();
        let mut s = SlidingWindowState::default();
        for _ in 0..4 {
            s = sw.acquire(&s, Timestamp::from_secs(5), 1).1;
        }
        let (d, _) = sw.acquire(&s, Timestamp::from_secs(5), 1);
        assert!(!d.allowed);
        // Next window starts at 10 s with weight 4·u/10; room 3 needs u <= 7.5 s ⇒ at 12.5 s.
        assert_eq!(d.retry_after, 7 * SEC + SEC / 2);
        let at = Timestamp::from_secs(5).plus_nanos(d.retry_after);
        assert!(sw.acquire(&s, at, 1).0.allowed);
        assert!(
            !sw.acquire(&s, Timestamp::from_nanos(at.as_nanos() - 1), 1)
                .0
                .allowed
        );
    }
}
