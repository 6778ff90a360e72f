//! Fixed window counter: at most `limit` units per window, windows aligned to the epoch (an
//! hourly window resets on the hour, UTC) so every node and runtime agrees on the boundaries.

use super::codec::{tag, Reader, Writer};
use super::divisor::Divisor;
use super::{Algorithm, Outcome, ParamError, StateError};
use crate::time::{Timestamp, NANOS_PER_SEC};

/// Fixed window parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixedWindow {
    limit: u64,
    window: Divisor,
}

/// Fixed window state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FixedWindowState {
    /// Index of the window `count` belongs to (`now / window`).
    pub window: u64,
    /// Units used in that window.
    pub count: u64,
}

impl FixedWindow {
    /// `limit` units per `window_nanos`.
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

    /// The state as of `now`: a later window starts from zero; an earlier one (the clock stepped
    /// back) keeps the stored window, so going back in time never frees units.
    fn current(&self, state: &FixedWindowState, now: Timestamp) -> FixedWindowState {
        let index = self.window.div_u64(now.as_nanos());
        if index > state.window {
            FixedWindowState {
                window: index,
                count: 0,
            }
        } else {
            *state
        }
    }

    fn reset_after(&self, state: &FixedWindowState, now: Timestamp) -> u64 {
        let end = state
            .window
            .saturating_add(1)
            .saturating_mul(self.window.get());
        end.saturating_sub(now.as_nanos())
    }
}

impl Algorithm for FixedWindow {
    type State = FixedWindowState;

    #[inline]
    fn acquire(&self, state: &Self::State, now: Timestamp, cost: u64) -> (Outcome, Self::State) {
        let current = self.current(state, now);
        let after = current.count.saturating_add(cost);
        let allowed = after <= self.limit;
        let next = if allowed {
            FixedWindowState {
                count: after,
                ..current
            }
        } else {
            current
        };
        let reset_after = self.reset_after(&next, now);
        let outcome = Outcome {
            allowed,
            limit: self.limit,
            remaining: self.limit.saturating_sub(next.count),
            reset_after,
            // A cost above the limit never fits; the window end is the nearest honest answer.
            retry_after: if allowed { 0 } else { reset_after },
        };
        (outcome, next)
    }

    fn refund(&self, state: &Self::State, now: Timestamp, cost: u64) -> Self::State {
        let current = self.current(state, now);
        if current.window == state.window {
            FixedWindowState {
                count: current.count.saturating_sub(cost),
                ..current
            }
        } else {
            current // the units were charged to a window that has already closed
        }
    }

    fn charge(&self, state: &Self::State, now: Timestamp, cost: u64) -> Self::State {
        let current = self.current(state, now);
        FixedWindowState {
            count: current.count.saturating_add(cost),
            ..current
        }
    }

    fn encode(state: &Self::State, out: &mut Vec<u8>) {
        Writer::new(out, tag::FIXED_WINDOW)
            .u64(state.window)
            .u64(state.count);
    }

    fn decode(bytes: &[u8]) -> Result<Self::State, StateError> {
        let mut r = Reader::exact(bytes, tag::FIXED_WINDOW, 16)?;
        Ok(FixedWindowState {
            window: r.u64()?,
            count: r.u64()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = NANOS_PER_SEC;

    #[test]
    fn counts_per_aligned_window() {
        let fw = FixedWindow::new(2, 60 * SEC).unwrap();
        let t = Timestamp::from_secs(120 + 50); // 10 s before the window ends
        let (a, s) = fw.acquire(&FixedWindowState::default(), t, 1);
        let (b, s) = fw.acquire(&s, t, 1);
        let (c, _) = fw.acquire(&s, t, 1);
        assert!(a.allowed && b.allowed && !c.allowed);
        assert_eq!(c.retry_after, 10 * SEC);
        assert_eq!(b.reset_after, 10 * SEC);
        assert!(fw.acquire(&s, Timestamp::from_secs(180), 1).0.allowed);
    }

    #[test]
    fn clock_stepping_back_frees_nothing() {
        let fw = FixedWindow::new(1, 60 * SEC).unwrap();
        let (_, s) = fw.acquire(&FixedWindowState::default(), Timestamp::from_secs(130), 1);
        assert!(!fw.acquire(&s, Timestamp::from_secs(30), 1).0.allowed);
    }

    #[test]
    fn refund_only_into_the_same_window() {
        let fw = FixedWindow::new(1, 60 * SEC).unwrap();
        let (_, s) = fw.acquire(&FixedWindowState::default(), Timestamp::from_secs(10), 1);
        assert_eq!(fw.refund(&s, Timestamp::from_secs(20), 1).count, 0);
        let later = fw.refund(&s, Timestamp::from_secs(70), 1);
        assert_eq!((later.window, later.count), (1, 0));
    }
}
