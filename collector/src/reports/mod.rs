//! The reports our users query, computed from the rollups: one function per report, shared by
//! the HTTP API (`/v1/reports/<name>`) and the CLI (`tollgate-collector report <name>`).
//!
//! Each report takes a [`ReportCtx`] (storage, policy, the org it is scoped to, the clock) and
//! the parsed [`ReportQuery`], and returns a serialisable value that can also render itself as a
//! [`Table`] for CSV and the terminal.

pub mod export;
mod latency;
mod limits;
pub mod params;
mod patterns;
mod plans;
pub mod table;
mod traffic;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::db::reports::{Column, Segment, Totals, Value};
use crate::db::{DbError, Storage};
use crate::pricing::PolicyFile;
use crate::rollup::Granularity;

pub use latency::{
    endpoints, performance, EndpointRow, Endpoints, Latency, Performance, PerformanceRow,
};
pub use limits::{limits, LimitedCaller, Limits, RuleHits};
pub use params::{Format, Range, ReportQuery};
pub use patterns::{patterns, realtime, Patterns, Realtime, Slot, Trend, Window};
pub use plans::{billing, quotas, Billing, BillingLine, OrgBill, QuotaRow, Quotas};
pub use table::{Cell, Table};
pub use traffic::{
    overview, timeseries, top, Overview, Timeseries, TimeseriesRow, Top, TopRow, UsageRow,
};

/// Why a report could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A parameter is malformed or out of range; the message says what is expected.
    #[error("`{param}`: {message}")]
    BadParam {
        /// The parameter's name.
        param: &'static str,
        /// What is wrong and what would be right.
        message: String,
    },
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// What every report runs against.
#[derive(Clone, Copy, Debug)]
pub struct ReportCtx<'a> {
    /// The database.
    pub storage: &'a Storage,
    /// Plans, quotas and prices, when the collector was given a policy file.
    pub policy: Option<&'a PolicyFile>,
    /// The org the report is about; `None` for every org (admins only).
    pub org: Option<&'a str>,
    /// Now.
    pub now: DateTime<Utc>,
}

impl ReportCtx<'_> {
    /// The custom dimensions the policy declares for the rollups (none without a policy).
    pub fn declared_dimensions(&self) -> &[String] {
        self.policy.map_or(&[], |p| p.dimensions.as_slice())
    }

    /// `[from, to)` (whole hours) as the segments of rollup buckets a report reads: the
    /// coarsest whose rows are complete there.
    pub async fn tile(&self, from: i64, to: i64) -> Result<Vec<Segment>, ReportError> {
        let weeks_since = self.storage.complete_since(Granularity::Week).await?;
        Ok(Segment::tile(from, to, weeks_since))
    }
}

/// A report that can be rendered as rows and columns.
pub trait Tabular {
    /// The report's rows as a table (CSV, terminal).
    fn table(&self) -> Table;
}

/// Counters every traffic report shows for a group, with the ratios derived from them.
#[derive(
    Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct Usage {
    /// Requests.
    pub calls: i64,
    /// 5xx responses.
    pub errors: i64,
    /// `errors / calls` (0 when there were no calls).
    pub error_rate: f64,
    /// Cost units.
    pub cost: i64,
    /// `cost / calls` (0 when there were no calls).
    pub cost_per_call: f64,
    /// Distinct users: exact in totals and for groups of org, user, decision; for groups of
    /// route or method, the estimate of the route rows' users sketches (exact while a group has
    /// at most 128 users, 1.6 % standard error beyond); absent for groups by status class, whose
    /// count would mean reading a row per event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_users: Option<i64>,
}

impl Usage {
    /// The counters of `t`; its user count when `users_counted` (see [`Aggregate::count_users`]).
    ///
    /// [`Aggregate::count_users`]: crate::db::reports::Aggregate::count_users
    pub fn of(t: &Totals, users_counted: bool) -> Self {
        let ratio = |n: i64| {
            if t.calls == 0 {
                0.0
            } else {
                n as f64 / t.calls as f64
            }
        };
        Self {
            calls: t.calls,
            errors: t.errors,
            error_rate: ratio(t.errors),
            cost: t.cost,
            cost_per_call: ratio(t.cost),
            unique_users: users_counted.then_some(t.users),
        }
    }

    /// The columns [`Usage::cells`] fills.
    pub const COLUMNS: [&'static str; 6] = [
        "calls",
        "errors",
        "error_rate",
        "cost",
        "cost_per_call",
        "unique_users",
    ];

    /// The counters as table cells.
    pub fn cells(&self) -> Vec<Cell> {
        vec![
            Cell::Int(self.calls),
            Cell::Int(self.errors),
            Cell::Float(self.error_rate),
            Cell::Int(self.cost),
            Cell::Float(self.cost_per_call),
            self.unique_users.map_or(Cell::Empty, Cell::Int),
        ]
    }
}

/// The built-in dimensions `group_by` accepts, by [`column_name`].
pub const GROUP_BY: [Column; 6] = [
    Column::Org,
    Column::User,
    Column::Route,
    Column::Method,
    Column::StatusClass,
    Column::Decision,
];

/// Whether a policy's custom dimension may not take `name`: what `group_by` accepts, and the
/// other names reports label their columns with.
pub fn is_reserved(name: &str) -> bool {
    GROUP_BY
        .iter()
        .chain(&[Column::Rule, Column::Bucket])
        .any(|c| column_name(*c) == name)
}

/// The name a group column has in reports (and in `group_by`).
pub fn column_name(c: Column) -> &'static str {
    match c {
        Column::Org => "org",
        Column::Bucket => "bucket",
        Column::User => "user",
        Column::Route => "route",
        Column::Method => "method",
        Column::StatusClass => "status_class",
        Column::Decision => "decision",
        Column::HourOfDay => "hour",
        Column::Weekday => "weekday",
        Column::Day => "day",
        Column::Rule => "rule",
        Column::Dimension => "dimension",
    }
}

/// A group column's name in a report: the custom dimension's own name for
/// [`Column::Dimension`].
pub fn label(c: Column, custom: Option<&str>) -> &str {
    match (c, custom) {
        (Column::Dimension, Some(name)) => name,
        _ => column_name(c),
    }
}

/// A group's values by dimension name, as reports show them.
pub fn dimensions(
    columns: &[Column],
    key: &[Value],
    custom: Option<&str>,
) -> BTreeMap<String, String> {
    columns
        .iter()
        .zip(key)
        .map(|(c, v)| (label(*c, custom).to_owned(), v.text()))
        .collect()
}

/// Every report's name, as in `/v1/reports/<name>` and `tollgate-collector report <name>`.
pub const NAMES: [&str; 10] = [
    "overview",
    "timeseries",
    "top",
    "endpoints",
    "performance",
    "patterns",
    "realtime",
    "limits",
    "quotas",
    "billing",
];

/// A report produced by name: its JSON document and its table.
#[derive(Debug)]
pub struct Rendered {
    /// The report as the HTTP API returns it.
    pub json: serde_json::Value,
    /// The report's rows.
    pub table: Table,
}

fn rendered<R: serde::Serialize + Tabular>(report: R) -> Rendered {
    Rendered {
        // Reports are plain data (strings, numbers, maps with string keys): serialising them
        // cannot fail.
        json: serde_json::to_value(&report).unwrap_or_default(),
        table: report.table(),
    }
}

/// Runs the report called `name` (one of [`NAMES`]); `None` for an unknown name.
pub async fn run_named(
    name: &str,
    ctx: ReportCtx<'_>,
    q: &ReportQuery,
) -> Option<Result<Rendered, ReportError>> {
    Some(match name {
        "overview" => overview(ctx, q).await.map(rendered),
        "timeseries" => timeseries(ctx, q).await.map(rendered),
        "top" => top(ctx, q).await.map(rendered),
        "endpoints" => endpoints(ctx, q).await.map(rendered),
        "performance" => performance(ctx, q).await.map(rendered),
        "patterns" => patterns(ctx, q).await.map(rendered),
        "realtime" => realtime(ctx, q).await.map(rendered),
        "limits" => limits(ctx, q).await.map(rendered),
        "quotas" => quotas(ctx, q).await.map(rendered),
        "billing" => billing(ctx, q).await.map(rendered),
        _ => return None,
    })
}

/// Whether distinct users are counted for groups of `columns`: exactly when a cube that keeps
/// the user (org, user, decision, rule) holds every one of them, so counting reads about one row
/// per user and bucket; estimated from the route rows' users sketches when the groups are
/// routes or methods.
pub fn users_countable(columns: &[Column]) -> bool {
    let within = |keeps: &[Column]| {
        columns.iter().all(|c| {
            matches!(
                c,
                Column::Org | Column::Bucket | Column::Day | Column::HourOfDay | Column::Weekday
            ) || keeps.contains(c)
        })
    };
    // The cubes that keep the user, and the route cube's users sketches; anything else would
    // read the full one.
    within(&[Column::User, Column::Decision, Column::Rule])
        || within(&[Column::Route, Column::Method])
}
