//! Calendar quota: at most `limit` units per day or per month, resetting at midnight UTC or at a
//! billing anchor (a customer who signed up on the 31st at 10:30 resets on the last day of short
//! months at 10:30). Period bounds are kept in the state, so the calendar is consulted only when
//! a period rolls over, not on every request.

use chrono::{DateTime, Datelike, Months, NaiveDate, NaiveDateTime, NaiveTime, Timelike, Utc};

use super::codec::{tag, Reader, Writer};
use super::{Algorithm, Outcome, ParamError, StateError};
use crate::time::{Timestamp, NANOS_PER_SEC};

const DAY: u64 = 86_400 * NANOS_PER_SEC;

/// How long a quota period lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CalendarPeriod {
    /// Resets every day at the anchor's time of day.
    Day,
    /// Resets every month on the anchor's day of month (clamped to the month's end).
    Month,
}

/// Calendar quota parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CalendarQuota {
    limit: u64,
    period: CalendarPeriod,
    /// Day of month (1–31) the period starts on; 1 for UTC months.
    anchor_day: u32,
    /// Nanoseconds after midnight UTC the period starts at.
    anchor_time: u64,
}

/// Calendar quota state: the current period's bounds and the units used in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CalendarQuotaState {
    /// Start of the period `used` belongs to.
    pub start: Timestamp,
    /// End (exclusive) of that period.
    pub end: Timestamp,
    /// Units used in it.
    pub used: u64,
}

impl CalendarQuota {
    /// `limit` units per `period`, periods starting at `anchor` (None: midnight UTC, the 1st).
    pub fn new(
        limit: u64,
        period: CalendarPeriod,
        anchor: Option<Timestamp>,
    ) -> Result<Self, ParamError> {
        if limit == 0 {
            return Err(ParamError::Zero);
        }
        let (anchor_day, anchor_time) = match anchor.and_then(to_datetime) {
            Some(at) => {
                let time = at.time();
                let nanos = u64::from(time.num_seconds_from_midnight()) * NANOS_PER_SEC
                    + u64::from(time.nanosecond() % 1_000_000_000);
                (at.day(), nanos)
            }
            None => (1, 0),
        };
        Ok(Self {
            limit,
            period,
            anchor_day,
            anchor_time,
        })
    }

    /// The length in seconds of the period containing `now` (months differ), for headers.
    pub fn period_secs(&self, now: Timestamp) -> u64 {
        let (start, end) = self.bounds(now);
        end.nanos_since(start) / NANOS_PER_SEC
    }

    /// The period containing `now`.
    pub fn bounds(&self, now: Timestamp) -> (Timestamp, Timestamp) {
        match self.period {
            CalendarPeriod::Day => {
                let n = now.as_nanos();
                if n < self.anchor_time {
                    // Before the first boundary after the epoch: that period, cut at the epoch.
                    return (
                        Timestamp::from_nanos(0),
                        Timestamp::from_nanos(self.anchor_time),
                    );
                }
                let start = (n - self.anchor_time) / DAY * DAY + self.anchor_time;
                (
                    Timestamp::from_nanos(start),
                    Timestamp::from_nanos(start.saturating_add(DAY)),
                )
            }
            CalendarPeriod::Month => self.month_bounds(now),
        }
    }

    fn month_bounds(&self, now: Timestamp) -> (Timestamp, Timestamp) {
        let Some(at) = to_datetime(now) else {
            return (now, Timestamp::from_nanos(u64::MAX));
        };
        let this_month = NaiveDate::from_ymd_opt(at.year(), at.month(), 1);
        let boundary = |months_from_now: i32| {
            let first = this_month?;
            let first = if months_from_now >= 0 {
                first.checked_add_months(Months::new(months_from_now.unsigned_abs()))?
            } else {
                first.checked_sub_months(Months::new(months_from_now.unsigned_abs()))?
            };
            self.boundary_in(first)
        };
        let (Some(this), Some(next)) = (boundary(0), boundary(1)) else {
            return (now, Timestamp::from_nanos(u64::MAX));
        };
        if now < this {
            // Only the month before January 1970 has no boundary: cut that period at the epoch.
            (boundary(-1).unwrap_or_default(), this)
        } else {
            (this, next)
        }
    }

    /// The period boundary in the month starting on `first`.
    fn boundary_in(&self, first: NaiveDate) -> Option<Timestamp> {
        let next_first = first.checked_add_months(Months::new(1))?;
        let days_in_month = next_first.signed_duration_since(first).num_days();
        let day = self.anchor_day.min(u32::try_from(days_in_month).ok()?);
        let date = first.with_day(day)?;
        let secs = u32::try_from(self.anchor_time / NANOS_PER_SEC).ok()?;
        let nanos = u32::try_from(self.anchor_time % NANOS_PER_SEC).ok()?;
        let time = NaiveTime::from_num_seconds_from_midnight_opt(secs, nanos)?;
        let at = NaiveDateTime::new(date, time).and_utc();
        u64::try_from(at.timestamp_nanos_opt()?)
            .ok()
            .map(Timestamp::from_nanos)
    }

    fn current(&self, state: &CalendarQuotaState, now: Timestamp) -> CalendarQuotaState {
        if now < state.end {
            *state // this period, or the clock stepped back: keep what was used
        } else {
            let (start, end) = self.bounds(now);
            CalendarQuotaState {
                start,
                end,
                used: 0,
            }
        }
    }
}

fn to_datetime(t: Timestamp) -> Option<DateTime<Utc>> {
    let secs = i64::try_from(t.as_nanos() / NANOS_PER_SEC).ok()?;
    let nanos = u32::try_from(t.as_nanos() % NANOS_PER_SEC).ok()?;
    DateTime::from_timestamp(secs, nanos)
}

impl Algorithm for CalendarQuota {
    type State = CalendarQuotaState;

    #[inline]
    fn acquire(&self, state: &Self::State, now: Timestamp, cost: u64) -> (Outcome, Self::State) {
        let current = self.current(state, now);
        let after = current.used.saturating_add(cost);
        let allowed = after <= self.limit;
        let next = if allowed {
            CalendarQuotaState {
                used: after,
                ..current
            }
        } else {
            current
        };
        let reset_after = next.end.nanos_since(now);
        let outcome = Outcome {
            allowed,
            limit: self.limit,
            remaining: self.limit.saturating_sub(next.used),
            reset_after,
            retry_after: if allowed { 0 } else { reset_after },
        };
        (outcome, next)
    }

    fn refund(&self, state: &Self::State, now: Timestamp, cost: u64) -> Self::State {
        let current = self.current(state, now);
        if current.start == state.start {
            CalendarQuotaState {
                used: current.used.saturating_sub(cost),
                ..current
            }
        } else {
            current
        }
    }

    fn charge(&self, state: &Self::State, now: Timestamp, cost: u64) -> Self::State {
        let current = self.current(state, now);
        CalendarQuotaState {
            used: current.used.saturating_add(cost),
            ..current
        }
    }

    fn encode(state: &Self::State, out: &mut Vec<u8>) {
        Writer::new(out, tag::CALENDAR_QUOTA)
            .u64(state.start.as_nanos())
            .u64(state.end.as_nanos())
            .u64(state.used);
    }

    fn decode(bytes: &[u8]) -> Result<Self::State, StateError> {
        let mut r = Reader::exact(bytes, tag::CALENDAR_QUOTA, 24)?;
        Ok(CalendarQuotaState {
            start: Timestamp::from_nanos(r.u64()?),
            end: Timestamp::from_nanos(r.u64()?),
            used: r.u64()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        let t = DateTime::parse_from_rfc3339(s).unwrap();
        Timestamp::from_nanos(u64::try_from(t.timestamp_nanos_opt().unwrap()).unwrap())
    }

    #[test]
    fn utc_month_bounds() {
        let q = CalendarQuota::new(10, CalendarPeriod::Month, None).unwrap();
        let (s, e) = q.bounds(at("2026-02-14T12:00:00Z"));
        assert_eq!(
            (s, e),
            (at("2026-02-01T00:00:00Z"), at("2026-03-01T00:00:00Z"))
        );
    }

    #[test]
    fn billing_anchor_clamps_to_short_months() {
        let q = CalendarQuota::new(10, CalendarPeriod::Month, Some(at("2025-01-31T10:30:00Z")))
            .unwrap();
        let check = |now, start, end| assert_eq!(q.bounds(at(now)), (at(start), at(end)));
        check(
            "2026-02-15T00:00:00Z",
            "2026-01-31T10:30:00Z",
            "2026-02-28T10:30:00Z",
        );
        check(
            "2026-02-28T10:30:00Z",
            "2026-02-28T10:30:00Z",
            "2026-03-31T10:30:00Z",
        );
        check(
            "2026-03-01T00:00:00Z",
            "2026-02-28T10:30:00Z",
            "2026-03-31T10:30:00Z",
        );
        check(
            "2024-02-29T11:00:00Z",
            "2024-02-29T10:30:00Z",
            "2024-03-31T10:30:00Z",
        );
    }

    #[test]
    fn daily_anchor_and_reset() {
        let q =
            CalendarQuota::new(2, CalendarPeriod::Day, Some(at("2020-05-05T06:00:00Z"))).unwrap();
        let now = at("2026-07-01T05:59:59Z");
        let (_, s) = q.acquire(&CalendarQuotaState::default(), now, 2);
        let (d, _) = q.acquire(&s, now, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, NANOS_PER_SEC);
        assert!(q.acquire(&s, at("2026-07-01T06:00:00Z"), 1).0.allowed);
    }

    #[test]
    fn periods_before_the_first_boundary_after_the_epoch_end_at_it() {
        // Regression: a daily period with an anchor time ended at 1970-01-02T00:00 instead of at
        // the anchor time, so its state outlived the period and `bounds` disagreed with it; a
        // monthly period in January 1970 was `(now, u64::MAX)`, a quota that never reset.
        let q =
            CalendarQuota::new(3, CalendarPeriod::Day, Some(at("2020-05-05T06:00:00Z"))).unwrap();
        let six = at("1970-01-01T06:00:00Z");
        assert_eq!(
            q.bounds(at("1970-01-01T05:00:00Z")),
            (Timestamp::default(), six)
        );
        assert_eq!(q.bounds(six), (six, at("1970-01-02T06:00:00Z")));
        let (_, s) = q.acquire(
            &CalendarQuotaState::default(),
            at("1970-01-01T05:00:00Z"),
            1,
        );
        let (_, s) = q.acquire(&s, at("1970-01-01T07:00:00Z"), 2);
        // 1970-01-02T00:00 is inside the period that started at 06:00 and has used 2 of 3.
        assert!(!q.acquire(&s, at("1970-01-02T00:00:00Z"), 2).0.allowed);

        let m = CalendarQuota::new(3, CalendarPeriod::Month, None).unwrap();
        let feb = at("1970-02-01T00:00:00Z");
        assert_eq!(
            m.bounds(at("1970-01-15T00:00:00Z")),
            (Timestamp::default(), feb)
        );
        let (_, s) = m.acquire(
            &CalendarQuotaState::default(),
            at("1970-01-15T00:00:00Z"),
            3,
        );
        let (d, _) = m.acquire(&s, at("1970-01-20T00:00:00Z"), 1);
        assert_eq!(d.retry_after, feb.nanos_since(at("1970-01-20T00:00:00Z")));
        assert!(m.acquire(&s, feb, 1).0.allowed);
    }

    #[test]
    fn round_trips() {
        let s = CalendarQuotaState {
            start: Timestamp::from_secs(1),
            end: Timestamp::from_secs(2),
            used: 3,
        };
        let mut out = Vec::new();
        CalendarQuota::encode(&s, &mut out);
        assert_eq!(CalendarQuota::decode(&out).unwrap(), s);
    }
}
