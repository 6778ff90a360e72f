//! GCRA, the generic cell rate algorithm: the leaky bucket as a meter.
//!
//! The state is one number, the theoretical arrival time (TAT). Time is kept in units of
//! `1/rate` nanoseconds so the emission interval `period / rate` is the exact integer `period`,
//! with no rounding: `rate` requests per `period`, with up to `burst` at once.

use super::codec::{tag, Reader, Writer};
use super::divisor::Divisor;
use super::{Algorithm, Outcome, ParamError, StateError};
use crate::time::{saturate_u64, Timestamp, NANOS_PER_SEC};

/// GCRA parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gcra {
    /// Time units per nanosecond: `rate` (the exact form) or 1 (the nanosecond form).
    scale: Divisor,
    /// The emission interval in time units: `period` (exact form) or `period / rate` ns.
    interval: Divisor,
    burst: u64,
    /// `burst × interval`: how far the TAT may run ahead of now (τ + T), fixed at construction
    /// so a decision does not multiply it out again.
    tolerance: u128,
    period_nanos: u64,
}

/// GCRA state: the theoretical arrival time, in units of `1/rate` ns since the epoch.
// `packed(8)`: a `u128` is 16-byte aligned, which pads a `(u64 key, state)` map entry to 32
// bytes; at 8-byte alignment it is 24, a quarter less cache per key in keyed stores. The field
// is only ever read and written by value, so the packing costs no unaligned references.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed(8))]
pub struct GcraState {
    /// Theoretical arrival time (scaled by `rate`).
    pub tat: u128,
}

impl Gcra {
    /// `rate` requests per `period_nanos`, tolerating bursts of `burst`.
    pub fn new(rate: u64, period_nanos: u64, burst: u64) -> Result<Self, ParamError> {
        if rate == 0 || burst == 0 {
            return Err(ParamError::Zero);
        }
        if period_nanos == 0 {
            return Err(ParamError::ZeroWindow);
        }
        Ok(Self {
            scale: Divisor::new(rate),
            interval: Divisor::new(period_nanos),
            burst,
            tolerance: u128::from(burst) * u128::from(period_nanos),
            period_nanos,
        })
    }

    /// The same meter on a `u64` TAT in whole nanoseconds, when that is exact: the emission
    /// interval `period / rate` is a whole number of ns and `burst` intervals span at most
    /// [`MAX_NANOS_TOLERANCE`]. Its decisions and outcomes equal this form's (`GcraNanos` says
    /// how far).
    pub fn in_nanos(&self) -> Option<GcraNanos> {
        let rate = self.scale.get();
        if self.period_nanos % rate != 0 {
            return None;
        }
        let interval = self.period_nanos / rate;
        let tolerance = self
            .burst
            .checked_mul(interval)
            .filter(|t| *t <= MAX_NANOS_TOLERANCE)?;
        Some(GcraNanos {
            meter: Self {
                scale: Divisor::new(1),
                interval: Divisor::new(interval),
                burst: self.burst,
                tolerance: u128::from(tolerance),
                period_nanos: self.period_nanos,
            },
            interval,
            tolerance,
        })
    }

    /// The period in whole seconds (at least 1), for `RateLimit-Policy`.
    pub fn window_secs(&self) -> u64 {
        self.period_nanos.div_ceil(NANOS_PER_SEC).max(1)
    }

    fn scaled(&self, now: Timestamp) -> u128 {
        u128::from(now.as_nanos()) * u128::from(self.scale.get())
    }

    fn cost_units(&self, cost: u64) -> u128 {
        u128::from(cost) * u128::from(self.interval.get())
    }

    fn to_nanos(&self, units: u128) -> u64 {
        saturate_u64(self.scale.div_ceil(units))
    }

    /// One decision on a TAT, everything in time units. Both forms run exactly this.
    #[inline(always)]
    fn step(&self, tat: u128, now: u128, cost: u64) -> (Outcome, u128) {
        let tat = tat.max(now);
        let new_tat = tat.saturating_add(self.cost_units(cost));
        let allowed = new_tat - now <= self.tolerance;
        let next = if allowed { new_tat } else { tat };
        let used = next - now;
        let outcome = Outcome {
            allowed,
            limit: self.burst,
            remaining: saturate_u64(self.interval.div(self.tolerance.saturating_sub(used))),
            reset_after: self.to_nanos(used),
            retry_after: if allowed {
                0
            } else {
                self.to_nanos(new_tat - now - self.tolerance)
            },
        };
        (outcome, next)
    }

    fn refund_units(&self, tat: u128, cost: u64) -> u128 {
        tat.saturating_sub(self.cost_units(cost))
    }

    fn charge_units(&self, tat: u128, now: u128, cost: u64) -> u128 {
        tat.max(now).saturating_add(self.cost_units(cost))
    }
}

impl Algorithm for Gcra {
    type State = GcraState;

    #[inline]
    fn acquire(&self, state: &Self::State, now: Timestamp, cost: u64) -> (Outcome, Self::State) {
        let (outcome, tat) = self.step(state.tat, self.scaled(now), cost);
        (outcome, GcraState { tat })
    }

    fn refund(&self, state: &Self::State, _now: Timestamp, cost: u64) -> Self::State {
        GcraState {
            tat: self.refund_units(state.tat, cost),
        }
    }

    fn charge(&self, state: &Self::State, now: Timestamp, cost: u64) -> Self::State {
        GcraState {
            tat: self.charge_units(state.tat, self.scaled(now), cost),
        }
    }

    fn encode(state: &Self::State, out: &mut Vec<u8>) {
        Writer::new(out, tag::GCRA).u128(state.tat);
    }

    fn decode(bytes: &[u8]) -> Result<Self::State, StateError> {
        let mut r = Reader::exact(bytes, tag::GCRA, 16)?;
        Ok(GcraState { tat: r.u128()? })
    }
}

/// The longest a nanosecond-form bucket may take to refill from empty (`burst × interval`):
/// 2^62 ns, about 146 years. Beyond any real limit, and it keeps saturation safe: a TAT pushed
/// past `u64::MAX` (a debt into the year 2554) stays there, and until the clock reads the year
/// 2438 such a TAT is more than a full bucket ahead of now, so every request is denied — as
/// the exact form, which never saturates, denies them.
pub const MAX_NANOS_TOLERANCE: u64 = 1 << 62;

/// GCRA on a `u64` TAT in nanoseconds: half the state of [`Gcra`], for rules whose emission
/// interval is a whole number of nanoseconds (the policy compiler picks it when it applies).
///
/// Every TAT the exact form ever holds for such a rule is a multiple of `rate` (it starts at 0
/// and moves by `now × rate` and `cost × period`, both multiples), so dividing every quantity by
/// `rate` loses nothing: decisions and outcomes are the exact form's while the TAT stays below
/// `u64::MAX` ns (the year 2554). A debt charged past that saturates there, and refunds do not
/// shrink it (see [`MAX_NANOS_TOLERANCE`]): the exact form would carry it for centuries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcraNanos {
    /// The meter with a scale of 1: its time unit is the nanosecond.
    meter: Gcra,
    /// The emission interval, ns.
    interval: u64,
    /// `burst × interval`, ns.
    tolerance: u64,
}

/// [`GcraNanos`] state: the theoretical arrival time in nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcraNanosState {
    /// Theoretical arrival time.
    pub tat: u64,
}

impl GcraNanos {
    /// `rate` requests per `period_nanos` with bursts of `burst`, if exact in nanoseconds.
    pub fn new(rate: u64, period_nanos: u64, burst: u64) -> Result<Option<Self>, ParamError> {
        Ok(Gcra::new(rate, period_nanos, burst)?.in_nanos())
    }

    /// The period in whole seconds (at least 1), for `RateLimit-Policy`.
    pub fn window_secs(&self) -> u64 {
        self.meter.window_secs()
    }

    /// The meter both nanosecond forms (this and `TokenBucketNanos`) run on. `#[inline]` so
    /// callers in other crates get it inlined and drop the header numbers they do not read.
    #[inline]
    pub(crate) fn acquire_tat(&self, tat: u64, now: Timestamp, cost: u64) -> (Outcome, u64) {
        let now = now.as_nanos();
        let tat = tat.max(now);
        // `Gcra::step` with every quantity in u64 and a time unit of 1 ns (so converting to
        // nanoseconds is the identity). The same answers (the property tests compare them), but
        // running `step` on widened values decided at half this speed on one key and 23 % below
        // it on 10,000 keys (paired limiters bench, 2026-11-24): u128 compares, adds and
        // narrowing checks on the hot path. A cost whose intervals pass u64 takes `step` itself.
        let Some(new_tat) = cost
            .checked_mul(self.interval)
            .and_then(|units| tat.checked_add(units))
        else {
            let (outcome, next) = self.meter.step(u128::from(tat), u128::from(now), cost);
            return (outcome, saturate_u64(next));
        };
        let allowed = new_tat - now <= self.tolerance;
        let next = if allowed { new_tat } else { tat };
        let used = next - now;
        let outcome = Outcome {
            allowed,
            limit: self.meter.burst,
            remaining: self
                .meter
                .interval
                .div_u64(self.tolerance.saturating_sub(used)),
            reset_after: used,
            retry_after: if allowed {
                0
            } else {
                new_tat - now - self.tolerance
            },
        };
        (outcome, next)
    }

    pub(crate) fn refund_tat(&self, tat: u64, cost: u64) -> u64 {
        if tat == u64::MAX {
            // A saturated debt has lost how far past u64::MAX it went: a refund must not
            // bring it back within reach of now.
            return tat;
        }
        saturate_u64(self.meter.refund_units(u128::from(tat), cost))
    }

    pub(crate) fn charge_tat(&self, tat: u64, now: Timestamp, cost: u64) -> u64 {
        let now = u128::from(now.as_nanos());
        saturate_u64(self.meter.charge_units(u128::from(tat), now, cost))
    }
}

impl Algorithm for GcraNanos {
    type State = GcraNanosState;

    #[inline]
    fn acquire(&self, state: &Self::State, now: Timestamp, cost: u64) -> (Outcome, Self::State) {
        let (outcome, tat) = self.acquire_tat(state.tat, now, cost);
        (outcome, GcraNanosState { tat })
    }

    fn refund(&self, state: &Self::State, _now: Timestamp, cost: u64) -> Self::State {
        GcraNanosState {
            tat: self.refund_tat(state.tat, cost),
        }
    }

    fn charge(&self, state: &Self::State, now: Timestamp, cost: u64) -> Self::State {
        GcraNanosState {
            tat: self.charge_tat(state.tat, now, cost),
        }
    }

    fn encode(state: &Self::State, out: &mut Vec<u8>) {
        Writer::new(out, tag::GCRA_NANOS).u64(state.tat);
    }

    fn decode(bytes: &[u8]) -> Result<Self::State, StateError> {
        let mut r = Reader::exact(bytes, tag::GCRA_NANOS, 8)?;
        Ok(GcraNanosState { tat: r.u64()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = NANOS_PER_SEC;

    #[test]
    fn spaces_requests_after_the_burst() {
        let g = Gcra::new(10, SEC, 2).unwrap(); // one per 100 ms, burst 2
        let t0 = Timestamp::from_secs(50);
        let (o1, s) = g.acquire(&GcraState::default(), t0, 1);
        let (o2, s) = g.acquire(&s, t0, 1);
        let (o3, _) = g.acquire(&s, t0, 1);
        assert!(o1.allowed && o2.allowed && !o3.allowed);
        assert_eq!((o1.remaining, o2.remaining), (1, 0));
        assert_eq!(o3.retry_after, SEC / 10);
        assert!(g.acquire(&s, t0.plus_nanos(SEC / 10), 1).0.allowed);
        assert!(!g.acquire(&s, t0.plus_nanos(SEC / 10 - 1), 1).0.allowed);
    }

    #[test]
    fn rate_that_does_not_divide_the_period_is_exact() {
        let g = Gcra::new(7, 3600 * SEC, 1).unwrap();
        let t0 = Timestamp::from_secs(0);
        let (_, s) = g.acquire(&GcraState::default(), t0, 1);
        // 3600/7 s = 514.285714285…s: denied one nanosecond early, allowed right on it.
        let interval = (3600 * SEC).div_ceil(7);
        assert!(!g.acquire(&s, t0.plus_nanos(interval - 1), 1).0.allowed);
        assert!(g.acquire(&s, t0.plus_nanos(interval), 1).0.allowed);
    }

    #[test]
    fn the_nanosecond_form_applies_only_up_to_its_tolerance() {
        let longest = Gcra::new(1, SEC, 1 << 33).unwrap(); // 2^33 s: fits u64 ns, past 2^62
        assert!(longest.in_nanos().is_none());
        assert!(Gcra::new(1, 1 << 30, 1 << 32).unwrap().in_nanos().is_some()); // 2^62 ns
    }

    #[test]
    fn a_saturated_debt_denies_and_refunds_do_not_shrink_it() {
        let g = GcraNanos::new(1, 1, MAX_NANOS_TOLERANCE).unwrap().unwrap(); // 1 per ns
        let t = Timestamp::from_secs(4_000_000_000); // the year 2096
        let s = g.charge(&GcraNanosState::default(), t, u64::MAX);
        assert_eq!(s.tat, u64::MAX, "saturated");
        let s = (0..1000).fold(s, |s, _| g.refund(&s, t, MAX_NANOS_TOLERANCE));
        assert_eq!(s.tat, u64::MAX);
        assert!(!g.acquire(&s, t, 0).0.allowed);
        assert!(
            !g.acquire(&s, t.plus_nanos(SEC * 86_400 * 365 * 100), 1)
                .0
                .allowed
        );
    }

    #[test]
    fn round_trips() {
        let s = GcraState {
            tat: u128::from(u64::MAX) * 3,
        };
        let mut out = Vec::new();
        Gcra::encode(&s, &mut out);
        assert_eq!(Gcra::decode(&out).unwrap(), s);
    }
}
