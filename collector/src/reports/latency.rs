//! Latency reports: `endpoints` (per endpoint) and `performance` (over time). Percentiles come
//! from merging the rollups' HdrHistogram sketches: within 1% of the true value
//! ([`crate::rollup::SKETCH_RELATIVE_ERROR`]), never estimated from means.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;

use super::params::{series_range, to_time};
use super::{Cell, ReportCtx, ReportError, ReportQuery, Table, Tabular, Usage};
use crate::db::reports::{Aggregate, Column, Measure, Segment, Value};
use crate::rollup::{new_sketch, percentile, Granularity};

/// Latency of a set of requests, in microseconds.
#[derive(
    Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct Latency {
    /// Median.
    pub p50_us: u64,
    /// 95th percentile.
    pub p95_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Mean.
    pub mean_us: f64,
}

impl Latency {
    /// The columns [`Latency::cells`] fills.
    pub const COLUMNS: [&'static str; 4] = ["p50_us", "p95_us", "p99_us", "mean_us"];

    /// From a merged sketch (zeros when it is empty).
    pub fn of(h: &Histogram<u64>) -> Self {
        Self {
            p50_us: percentile(h, 0.50),
            p95_us: percentile(h, 0.95),
            p99_us: percentile(h, 0.99),
            mean_us: if h.is_empty() { 0.0 } else { h.mean() },
        }
    }

    /// As table cells.
    pub fn cells(&self) -> Vec<Cell> {
        vec![
            Cell::Int(self.p50_us as i64),
            Cell::Int(self.p95_us as i64),
            Cell::Int(self.p99_us as i64),
            Cell::Float(self.mean_us),
        ]
    }
}

/// One endpoint.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct EndpointRow {
    /// HTTP method.
    pub method: String,
    /// Route template.
    pub route: String,
    /// Its counters.
    #[serde(flatten)]
    pub usage: Usage,
    /// Its latency.
    #[serde(flatten)]
    pub latency: Latency,
}

/// `endpoints`: calls, error rate, cost and latency percentiles per endpoint (method and
/// route), busiest first.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Endpoints {
    /// The org, or none for every org.
    pub org: Option<String>,
    /// Start (whole hour).
    pub from: DateTime<Utc>,
    /// End, exclusive (whole hour).
    pub to: DateTime<Utc>,
    /// At most `limit` (default 100) endpoints.
    pub rows: Vec<EndpointRow>,
}

impl Tabular for Endpoints {
    fn table(&self) -> Table {
        let mut t = Table::new(
            ["method", "route"]
                .into_iter()
                .chain(Usage::COLUMNS)
                .chain(Latency::COLUMNS),
        );
        for r in &self.rows {
            let mut cells = vec![Cell::Text(r.method.clone()), Cell::Text(r.route.clone())];
            cells.extend(r.usage.cells());
            cells.extend(r.latency.cells());
            t.rows.push(cells);
        }
        t
    }
}

/// The `endpoints` report.
pub async fn endpoints(ctx: ReportCtx<'_>, q: &ReportQuery) -> Result<Endpoints, ReportError> {
    q.only(&["from", "to", "days", "limit", "format"])?;
    let range = q.range(ctx.now)?;
    let limit = q.limit(100)?;
    let segments = ctx.tile(range.from, range.to).await?;
    let group = [Column::Method, Column::Route];
    let agg = Aggregate {
        org: ctx.org,
        segments: &segments,
        group: &group,
        top: Some((Measure::Calls, limit)),
        ..Aggregate::default()
    };
    let totals = ctx.storage.aggregate(&agg).await?;
    let sketches = ctx.storage.sketches(&agg).await?;
    let empty = new_sketch();
    Ok(Endpoints {
        org: ctx.org.map(str::to_owned),
        from: range.from_time(),
        to: range.to_time(),
        rows: totals
            .iter()
            .map(|t| EndpointRow {
                method: t.key[0].text(),
                route: t.key[1].text(),
                usage: Usage::of(t, false),
                latency: Latency::of(sketches.get(&t.key).unwrap_or(&empty)),
            })
            .collect(),
    })
}

/// One bucket of the performance series.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct PerformanceRow {
    /// Bucket start.
    pub bucket: DateTime<Utc>,
    /// Requests in the bucket.
    pub calls: i64,
    /// 5xx share.
    pub error_rate: f64,
    /// Latency in the bucket.
    #[serde(flatten)]
    pub latency: Latency,
}

/// `performance`: latency percentiles and error rate over the whole range and per bucket.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Performance {
    /// The org, or none for every org.
    pub org: Option<String>,
    /// Bucket width.
    pub interval: Granularity,
    /// Start (a bucket start).
    pub from: DateTime<Utc>,
    /// End, exclusive.
    pub to: DateTime<Utc>,
    /// Requests over the range.
    pub calls: i64,
    /// 5xx share over the range.
    pub error_rate: f64,
    /// Latency over the range.
    #[serde(flatten)]
    pub latency: Latency,
    /// Buckets with traffic, in order.
    pub rows: Vec<PerformanceRow>,
}

impl Tabular for Performance {
    fn table(&self) -> Table {
        let mut t = Table::new(
            ["bucket", "calls", "error_rate"]
                .into_iter()
                .chain(Latency::COLUMNS),
        );
        for r in &self.rows {
            let mut cells = vec![
                Cell::Time(r.bucket),
                Cell::Int(r.calls),
                Cell::Float(r.error_rate),
            ];
            cells.extend(r.latency.cells());
            t.rows.push(cells);
        }
        t
    }
}

/// The `performance` report.
pub async fn performance(ctx: ReportCtx<'_>, q: &ReportQuery) -> Result<Performance, ReportError> {
    q.only(&["from", "to", "days", "format", "interval"])?;
    let interval = q.interval()?;
    let range = series_range(q.range(ctx.now)?, interval)?;
    let segments = Segment::single(interval, range.from, range.to);
    let group = [Column::Bucket];
    let agg = Aggregate {
        org: ctx.org,
        segments: &segments,
        group: &group,
        ..Aggregate::default()
    };
    let totals = ctx.storage.aggregate(&agg).await?;
    let sketches: HashMap<Vec<Value>, Histogram<u64>> = ctx.storage.sketches(&agg).await?;
    let mut overall = new_sketch();
    for s in sketches.values() {
        crate::rollup::merge_sketch(&mut overall, s);
    }
    let (calls, errors) = totals
        .iter()
        .fold((0, 0), |(c, e), t| (c + t.calls, e + t.errors));
    let empty = new_sketch();
    let rate = |errors: i64, calls: i64| {
        if calls == 0 {
            0.0
        } else {
            errors as f64 / calls as f64
        }
    };
    Ok(Performance {
        org: ctx.org.map(str::to_owned),
        interval,
        from: to_time(range.from),
        to: to_time(range.to),
        calls,
        error_rate: rate(errors, calls),
        latency: Latency::of(&overall),
        rows: totals
            .iter()
            .map(|t| PerformanceRow {
                bucket: to_time(t.key[0].int()),
                calls: t.calls,
                error_rate: rate(t.errors, t.calls),
                latency: Latency::of(sketches.get(&t.key).unwrap_or(&empty)),
            })
            .collect(),
    })
}
