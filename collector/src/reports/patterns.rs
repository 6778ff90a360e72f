//! `patterns` (when traffic comes: hours of the day, days of the week, the trend) and
//! `realtime` (the last minutes).

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::params::to_time;
use super::{Cell, ReportCtx, ReportError, ReportQuery, Table, Tabular};
use crate::db::reports::{Aggregate, Column, Segment};
use crate::rollup::Granularity;

/// Calls and cost in one slot (an hour of the day, a weekday, a day).
#[derive(
    Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct Slot {
    /// The hour (0–23), the weekday (0 = Monday) or the day's start (seconds since the epoch).
    pub slot: i64,
    /// Requests.
    pub calls: i64,
    /// Cost units.
    pub cost: i64,
}

/// How daily calls move over the range.
#[derive(
    Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct Trend {
    /// Least-squares slope of calls per day, in calls per day per day.
    pub slope_per_day: f64,
    /// Calls in the second half of the days against the first, in percent (none when the first
    /// half had no calls).
    pub change_percent: Option<f64>,
}

/// `patterns`: traffic by hour of the day and day of the week (UTC), the peaks, calls per day
/// and their trend.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Patterns {
    /// The org, or none for every org.
    pub org: Option<String>,
    /// Start (whole hour).
    pub from: DateTime<Utc>,
    /// End, exclusive (whole hour).
    pub to: DateTime<Utc>,
    /// 24 slots, hour 0 first.
    pub by_hour: Vec<Slot>,
    /// 7 slots, Monday first.
    pub by_weekday: Vec<Slot>,
    /// The busiest hour of the day (none without traffic).
    pub peak_hour: Option<i64>,
    /// The busiest weekday, 0 = Monday (none without traffic).
    pub peak_weekday: Option<i64>,
    /// One slot per UTC day the range touches, zeros included.
    pub daily: Vec<Slot>,
    /// The daily trend.
    pub trend: Trend,
}

impl Tabular for Patterns {
    fn table(&self) -> Table {
        let mut t = Table::new(["kind", "slot", "calls", "cost"]);
        for (kind, slots) in [
            ("hour", &self.by_hour),
            ("weekday", &self.by_weekday),
            ("day", &self.daily),
        ] {
            for s in slots {
                t.rows.push(vec![
                    Cell::Text(kind.into()),
                    if kind == "day" {
                        Cell::Time(to_time(s.slot))
                    } else {
                        Cell::Int(s.slot)
                    },
                    Cell::Int(s.calls),
                    Cell::Int(s.cost),
                ]);
            }
        }
        t
    }
}

fn peak(slots: &[Slot]) -> Option<i64> {
    slots
        .iter()
        .filter(|s| s.calls > 0)
        // Earliest slot wins a tie.
        .max_by(|a, b| a.calls.cmp(&b.calls).then(b.slot.cmp(&a.slot)))
        .map(|s| s.slot)
}

/// Least-squares slope of `ys` against 0, 1, 2… and the second half against the first.
fn trend(ys: &[i64]) -> Trend {
    let n = ys.len() as f64;
    let slope_per_day = if ys.len() < 2 {
        0.0
    } else {
        let mean_x = (n - 1.0) / 2.0;
        let mean_y = ys.iter().sum::<i64>() as f64 / n;
        let (num, den) = ys
            .iter()
            .enumerate()
            .fold((0.0, 0.0), |(num, den), (x, y)| {
                let dx = x as f64 - mean_x;
                (num + dx * (*y as f64 - mean_y), den + dx * dx)
            });
        num / den
    };
    let half = ys.len() / 2;
    let first: i64 = ys[..half].iter().sum();
    let second: i64 = ys[ys.len() - half..].iter().sum();
    Trend {
        slope_per_day,
        change_percent: (first > 0).then(|| (second - first) as f64 * 100.0 / first as f64),
    }
}

/// Calls and cost per value of `column`.
async fn slots(
    ctx: ReportCtx<'_>,
    segments: &[Segment],
    column: Column,
) -> Result<HashMap<i64, Slot>, ReportError> {
    let rows = ctx
        .storage
        .aggregate(&Aggregate {
            org: ctx.org,
            segments,
            group: &[column],
            ..Aggregate::default()
        })
        .await?;
    Ok(rows
        .iter()
        .map(|t| {
            let slot = t.key[0].int();
            (
                slot,
                Slot {
                    slot,
                    calls: t.calls,
                    cost: t.cost,
                },
            )
        })
        .collect())
}

/// The `patterns` report.
pub async fn patterns(ctx: ReportCtx<'_>, q: &ReportQuery) -> Result<Patterns, ReportError> {
    q.only(&["from", "to", "days", "format"])?;
    let range = q.range(ctx.now)?;
    // Hour rollups: hour of day and weekday need hour-sized buckets, days are 24 of them.
    let segments = Segment::single(Granularity::Hour, range.from, range.to);
    let fill = |found: &HashMap<i64, Slot>, keys: &mut dyn Iterator<Item = i64>| -> Vec<Slot> {
        keys.map(|k| {
            found.get(&k).cloned().unwrap_or(Slot {
                slot: k,
                ..Slot::default()
            })
        })
        .collect()
    };
    let hours = slots(ctx, &segments, Column::HourOfDay).await?;
    let weekdays = slots(ctx, &segments, Column::Weekday).await?;
    let days = slots(ctx, &segments, Column::Day).await?;
    let by_hour = fill(&hours, &mut (0..24));
    let by_weekday = fill(&weekdays, &mut (0..7));
    let first_day = range.from.div_euclid(86_400) * 86_400;
    let daily = fill(&days, &mut (first_day..range.to).step_by(86_400));
    let ys: Vec<i64> = daily.iter().map(|s| s.calls).collect();
    Ok(Patterns {
        org: ctx.org.map(str::to_owned),
        from: range.from_time(),
        to: range.to_time(),
        peak_hour: peak(&by_hour),
        peak_weekday: peak(&by_weekday),
        by_hour,
        by_weekday,
        trend: trend(&ys),
        daily,
    })
}

/// One realtime window.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Window {
    /// Its length in minutes (1, 5 or 15), the current minute included.
    pub minutes: i64,
    /// Requests.
    pub calls: i64,
    /// Requests per minute over the window.
    pub requests_per_minute: f64,
    /// Distinct users.
    pub active_users: i64,
    /// 5xx share.
    pub error_rate: f64,
    /// Mean latency, µs.
    pub mean_latency_us: f64,
}

/// `realtime`: the last 1, 5 and 15 minutes, read from the minute rollups (which the folder
/// keeps within a fraction of a second of ingest).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Realtime {
    /// The org, or none for every org.
    pub org: Option<String>,
    /// When it was computed.
    pub at: DateTime<Utc>,
    /// 1, 5 and 15 minutes.
    pub windows: Vec<Window>,
}

impl Tabular for Realtime {
    fn table(&self) -> Table {
        let mut t = Table::new([
            "minutes",
            "calls",
            "requests_per_minute",
            "active_users",
            "error_rate",
            "mean_latency_us",
        ]);
        for w in &self.windows {
            t.rows.push(vec![
                Cell::Int(w.minutes),
                Cell::Int(w.calls),
                Cell::Float(w.requests_per_minute),
                Cell::Int(w.active_users),
                Cell::Float(w.error_rate),
                Cell::Float(w.mean_latency_us),
            ]);
        }
        t
    }
}

/// The `realtime` report.
pub async fn realtime(ctx: ReportCtx<'_>, q: &ReportQuery) -> Result<Realtime, ReportError> {
    q.only(&["format"])?;
    let minute = ctx.now.timestamp().div_euclid(60) * 60;
    let mut windows = Vec::new();
    for minutes in [1, 5, 15] {
        let segments = Segment::single(
            Granularity::Minute,
            minute - (minutes - 1) * 60,
            minute + 60,
        );
        let agg = Aggregate {
            org: ctx.org,
            segments: &segments,
            count_users: true,
            ..Aggregate::default()
        };
        let totals = ctx.storage.aggregate(&agg).await?;
        let t = totals.first().cloned().unwrap_or_default();
        let sketch = ctx.storage.sketches(&agg).await?;
        let mean = sketch
            .values()
            .next()
            .filter(|h| !h.is_empty())
            .map_or(0.0, |h| h.mean());
        windows.push(Window {
            minutes,
            calls: t.calls,
            requests_per_minute: t.calls as f64 / minutes as f64,
            active_users: t.users,
            error_rate: if t.calls == 0 {
                0.0
            } else {
                t.errors as f64 / t.calls as f64
            },
            mean_latency_us: mean,
        });
    }
    Ok(Realtime {
        org: ctx.org.map(str::to_owned),
        at: ctx.now,
        windows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trend_of_a_straight_line_is_its_slope() {
        let t = trend(&[10, 20, 30, 40]);
        assert!((t.slope_per_day - 10.0).abs() < 1e-9);
        assert_eq!(t.change_percent, Some((70.0 - 30.0) * 100.0 / 30.0));
        assert_eq!(trend(&[0, 0, 5]).change_percent, None);
        assert_eq!(trend(&[7]).slope_per_day, 0.0);
    }

    #[test]
    fn peaks_prefer_the_earliest_of_equals() {
        let s = |slot, calls| Slot {
            slot,
            calls,
            cost: 0,
        };
        assert_eq!(peak(&[s(0, 1), s(1, 5), s(2, 5)]), Some(1));
        assert_eq!(peak(&[s(0, 0)]), None);
    }
}
