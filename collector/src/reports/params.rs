//! Report parameters: parsed and checked here, so every bad one gets a 400 naming it, whether
//! it came from a query string or the CLI.

use chrono::{DateTime, Utc};

use super::ReportError;
use crate::db::reports::Column;
use crate::rollup::Granularity;

/// Longest range a report may span with `from`/`to`.
pub const MAX_RANGE_DAYS: i64 = 366;
/// Most rows (or series) a report returns.
pub const MAX_LIMIT: u32 = 1_000;
/// Most buckets a time series may have.
pub const MAX_BUCKETS: i64 = 10_000;

/// The query string of every report. Values stay text until [`ReportQuery`]'s accessors parse
/// them, so a bad one is reported with its name and what is expected rather than as a generic
/// deserialisation error; unknown parameters are refused the same way.
#[derive(Clone, Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReportQuery {
    /// The org (admins: any, or none for every org; readers: their own, or omitted).
    pub org: Option<String>,
    /// Start, RFC 3339, rounded down to the hour. Exclusive with `days`.
    pub from: Option<String>,
    /// End (exclusive), RFC 3339, rounded up to the hour; default now.
    pub to: Option<String>,
    /// 1–90 whole UTC days ending with the day that holds `to` (default 7 when neither `from`
    /// nor `days` is given).
    pub days: Option<String>,
    /// Rows (or series) to return, 1–1000.
    pub limit: Option<String>,
    /// Comma-separated: `org`, `user`, `route`, `method`, `status_class`, `decision`.
    pub group_by: Option<String>,
    /// `json` (default) or `csv` (tabular reports); `ndjson` for `export`.
    pub format: Option<String>,
    /// Time-series bucket: `minute`, `hour` (default) or `day`.
    pub interval: Option<String>,
    /// `top`: `users` (default), `orgs`, `endpoints` or `routes`.
    pub dimension: Option<String>,
    /// `top`: rank by `calls` (default) or `cost`.
    pub by: Option<String>,
    /// `export`: `events` (raw, default) or `rollups`.
    pub source: Option<String>,
    /// `billing`: the month, `YYYY-MM` (default the current one).
    pub month: Option<String>,
}

/// A resolved time range: whole hours, `from < to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// Start, seconds since the epoch (inclusive).
    pub from: i64,
    /// End, seconds since the epoch (exclusive).
    pub to: i64,
}

impl Range {
    /// Start as a time.
    pub fn from_time(&self) -> DateTime<Utc> {
        to_time(self.from)
    }

    /// End as a time.
    pub fn to_time(&self) -> DateTime<Utc> {
        to_time(self.to)
    }
}

/// Seconds since the epoch as a time (the epoch itself if out of range, which no bucket is).
pub fn to_time(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or_default()
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A JSON document.
    Json,
    /// CSV with a header row.
    Csv,
    /// One JSON object per line (`export`).
    Ndjson,
}

fn bad(param: &'static str, message: impl Into<String>) -> ReportError {
    ReportError::BadParam {
        param,
        message: message.into(),
    }
}

fn rfc3339(param: &'static str, text: &str) -> Result<DateTime<Utc>, ReportError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| bad(param, format!("'{text}' is not an RFC 3339 time")))
}

fn floor(t: i64, width: i64) -> i64 {
    t.div_euclid(width) * width
}

fn ceil(t: i64, width: i64) -> i64 {
    floor(t + width - 1, width)
}

impl ReportQuery {
    /// The time range, in whole hours. `days` means whole UTC days: the `days` days ending
    /// with the one that holds `to` (today, by default), so the range ends at that day's end.
    /// Such a range is read from day and week rollups only, which is what keeps a 30-day report
    /// fast; `from`/`to` give any whole hours.
    pub fn range(&self, now: DateTime<Utc>) -> Result<Range, ReportError> {
        const HOUR: i64 = 3_600;
        const DAY: i64 = 86_400;
        let to = match &self.to {
            Some(t) => rfc3339("to", t)?,
            None => now,
        };
        let to = ceil(to.timestamp(), HOUR);
        let days = |d: &String| -> Result<i64, ReportError> {
            d.parse()
                .ok()
                .filter(|d| (1..=90).contains(d))
                .ok_or_else(|| bad("days", format!("'{d}': a whole number from 1 to 90")))
        };
        let whole_days = |days: i64| {
            let end = ceil(to, DAY);
            (end - days * DAY, end)
        };
        let (from, to) = match (&self.days, &self.from) {
            (Some(_), Some(_)) => {
                return Err(bad("days", "give either `days` or `from`, not both"))
            }
            (Some(d), None) => whole_days(days(d)?),
            (None, Some(f)) => (floor(rfc3339("from", f)?.timestamp(), HOUR), to),
            (None, None) => whole_days(7),
        };
        if from >= to {
            return Err(bad("from", "must be before `to`"));
        }
        if to - from > MAX_RANGE_DAYS * 86_400 {
            return Err(bad(
                "from",
                format!("the range may span at most {MAX_RANGE_DAYS} days"),
            ));
        }
        Ok(Range { from, to })
    }

    /// `limit`, 1–1000, or `default`.
    pub fn limit(&self, default: u32) -> Result<u32, ReportError> {
        match &self.limit {
            None => Ok(default),
            Some(l) => l
                .parse()
                .ok()
                .filter(|l| (1..=MAX_LIMIT).contains(l))
                .ok_or_else(|| {
                    bad(
                        "limit",
                        format!("'{l}': a whole number from 1 to {MAX_LIMIT}"),
                    )
                }),
        }
    }

    /// `format`; `ndjson` only where `allow_ndjson`.
    pub fn format(&self, allow_ndjson: bool) -> Result<Format, ReportError> {
        match self.format.as_deref() {
            None | Some("json") => Ok(Format::Json),
            Some("csv") => Ok(Format::Csv),
            Some("ndjson") if allow_ndjson => Ok(Format::Ndjson),
            Some(other) => Err(bad(
                "format",
                format!(
                    "'{other}': one of json, csv{}",
                    if allow_ndjson { ", ndjson" } else { "" }
                ),
            )),
        }
    }

    /// `interval`, default hour.
    pub fn interval(&self) -> Result<Granularity, ReportError> {
        match self.interval.as_deref() {
            None | Some("hour") => Ok(Granularity::Hour),
            Some("minute") => Ok(Granularity::Minute),
            Some("day") => Ok(Granularity::Day),
            Some(other) => Err(bad(
                "interval",
                format!("'{other}': one of minute, hour, day"),
            )),
        }
    }

    /// `group_by`, each dimension once, in the order given.
    pub fn group_by(&self) -> Result<Vec<Column>, ReportError> {
        Ok(self.group_by_declared(&[])?.0)
    }

    /// `group_by` where the policy `declared` custom dimensions: the built-in columns, and the
    /// custom dimension named (as [`Column::Dimension`]) if any. A custom dimension groups
    /// alone or with the org: the custom cube keeps nothing else.
    pub fn group_by_declared(
        &self,
        declared: &[String],
    ) -> Result<(Vec<Column>, Option<String>), ReportError> {
        let mut out = Vec::new();
        let mut custom: Option<String> = None;
        for part in self
            .group_by
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let built_in = super::GROUP_BY
                .into_iter()
                .find(|c| super::column_name(*c) == part);
            let c = match (built_in, part) {
                (Some(c), _) => c,
                (None, name) if declared.iter().any(|d| d == name) => {
                    if custom.as_deref().is_some_and(|c| c != name) {
                        return Err(bad(
                            "group_by",
                            "at most one custom dimension per report".to_owned(),
                        ));
                    }
                    custom = Some(name.to_owned());
                    Column::Dimension
                }
                (None, other) => {
                    let declared = if declared.is_empty() {
                        "none".to_owned()
                    } else {
                        declared.join(", ")
                    };
                    return Err(bad(
                        "group_by",
                        format!(
                            "unknown dimension '{other}' ({}; custom ones the policy \
                             declares: {declared})",
                            super::GROUP_BY.map(super::column_name).join(", ")
                        ),
                    ));
                }
            };
            if !out.contains(&c) {
                out.push(c);
            }
        }
        if let Some(name) = &custom {
            if out
                .iter()
                .any(|c| !matches!(c, Column::Org | Column::Dimension))
            {
                return Err(bad(
                    "group_by",
                    format!(
                        "a custom dimension ('{name}') groups alone or with org: the rollups \
                         keep it by org only"
                    ),
                ));
            }
        }
        Ok((out, custom))
    }

    /// Refuses parameters this report does not read, so a typo is not silently ignored.
    pub fn only(&self, allowed: &[&'static str]) -> Result<(), ReportError> {
        let given = [
            ("org", self.org.is_some()),
            ("from", self.from.is_some()),
            ("to", self.to.is_some()),
            ("days", self.days.is_some()),
            ("limit", self.limit.is_some()),
            ("group_by", self.group_by.is_some()),
            ("format", self.format.is_some()),
            ("interval", self.interval.is_some()),
            ("dimension", self.dimension.is_some()),
            ("by", self.by.is_some()),
            ("source", self.source.is_some()),
            ("month", self.month.is_some()),
        ];
        for (name, present) in given {
            if present && name != "org" && !allowed.contains(&name) {
                return Err(bad(
                    name,
                    format!(
                        "not a parameter of this report (it takes: {})",
                        allowed.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Rounds `range` out to whole `interval` buckets and checks the bucket count.
pub fn series_range(range: Range, interval: Granularity) -> Result<Range, ReportError> {
    let width = interval.seconds();
    let out = Range {
        from: floor(range.from, width),
        to: ceil(range.to, width),
    };
    if (out.to - out.from) / width > MAX_BUCKETS {
        return Err(bad(
            "interval",
            format!("the range holds more than {MAX_BUCKETS} buckets of this interval: use a coarser one or a shorter range"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> ReportQuery {
        let text = pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        serde_urlencoded_from(&text)
    }

    fn serde_urlencoded_from(text: &str) -> ReportQuery {
        serde_json::from_value(serde_json::Value::Object(
            text.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap();
                    (k.to_owned(), serde_json::Value::String(v.to_owned()))
                })
                .collect(),
        ))
        .unwrap()
    }

    fn now() -> DateTime<Utc> {
        rfc3339("to", "2026-03-10T12:34:56Z").unwrap()
    }

    #[test]
    fn days_are_whole_utc_days_ending_with_the_day_of_to() {
        let r = q(&[("days", "2")]).range(now()).unwrap();
        assert_eq!(r.to_time().to_rfc3339(), "2026-03-11T00:00:00+00:00");
        assert_eq!(r.from_time().to_rfc3339(), "2026-03-09T00:00:00+00:00");
        // Without `days` or `from`: the last 7 days, today included.
        let r = q(&[]).range(now()).unwrap();
        assert_eq!(r.from_time().to_rfc3339(), "2026-03-04T00:00:00+00:00");
        // `to` at a midnight ends the range there.
        let r = q(&[("days", "1"), ("to", "2026-03-05T00:00:00Z")])
            .range(now())
            .unwrap();
        assert_eq!(r.from_time().to_rfc3339(), "2026-03-04T00:00:00+00:00");
        assert_eq!(r.to_time().to_rfc3339(), "2026-03-05T00:00:00+00:00");
        // `from` gives whole hours.
        let r = q(&[("from", "2026-03-09T07:30:00Z")]).range(now()).unwrap();
        assert_eq!(r.from_time().to_rfc3339(), "2026-03-09T07:00:00+00:00");
        assert_eq!(r.to_time().to_rfc3339(), "2026-03-10T13:00:00+00:00");
    }

    #[test]
    fn bad_parameters_are_named() {
        for (pairs, param) in [
            (&[("days", "0")][..], "days"),
            (&[("days", "91")][..], "days"),
            (&[("days", "x")][..], "days"),
            (
                &[("days", "1"), ("from", "2026-03-01T00:00:00Z")][..],
                "days",
            ),
            (&[("from", "yesterday")][..], "from"),
            (&[("to", "2026-13-01")][..], "to"),
            (&[("from", "2026-03-11T00:00:00Z")][..], "from"),
            (&[("from", "2020-01-01T00:00:00Z")][..], "from"),
        ] {
            match q(pairs).range(now()) {
                Err(ReportError::BadParam { param: p, .. }) => assert_eq!(p, param, "{pairs:?}"),
                other => panic!("{pairs:?}: {other:?}"),
            }
        }
        assert!(matches!(
            q(&[("limit", "0")]).limit(10),
            Err(ReportError::BadParam { param: "limit", .. })
        ));
        assert!(matches!(
            q(&[("limit", "1001")]).limit(10),
            Err(ReportError::BadParam { param: "limit", .. })
        ));
        assert_eq!(q(&[("limit", "1000")]).limit(10).unwrap(), 1000);
        assert!(matches!(
            q(&[("group_by", "route,colour")]).group_by(),
            Err(ReportError::BadParam {
                param: "group_by",
                ..
            })
        ));
        assert!(matches!(
            q(&[("format", "xml")]).format(false),
            Err(ReportError::BadParam {
                param: "format",
                ..
            })
        ));
        assert!(matches!(
            q(&[("format", "ndjson")]).format(false),
            Err(ReportError::BadParam {
                param: "format",
                ..
            })
        ));
        assert!(matches!(
            q(&[("interval", "week")]).interval(),
            Err(ReportError::BadParam {
                param: "interval",
                ..
            })
        ));
        assert!(matches!(
            q(&[("dimension", "users")]).only(&["days"]),
            Err(ReportError::BadParam {
                param: "dimension",
                ..
            })
        ));
    }

    #[test]
    fn unknown_parameters_are_refused() {
        let e = serde_json::from_value::<ReportQuery>(serde_json::json!({"dayz": "3"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("dayz"), "{e}");
    }

    #[test]
    fn series_ranges_are_bounded() {
        let r = q(&[("days", "90")]).range(now()).unwrap();
        assert!(series_range(r, Granularity::Minute).is_err());
        assert!(series_range(r, Granularity::Hour).is_ok());
        let d = series_range(r, Granularity::Day).unwrap();
        assert_eq!(d.from % 86_400, 0);
        assert_eq!(d.to % 86_400, 0);
    }
}
