//! Traffic reports: `overview`, `timeseries`, `top`.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};

use super::params::{series_range, to_time};
use super::{
    dimensions, label, users_countable, Cell, ReportCtx, ReportError, ReportQuery, Table, Tabular,
    Usage,
};
use crate::db::reports::{Aggregate, Column, Measure, Segment, Value};
use crate::rollup::Cube;

/// Counters of one group.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct UsageRow {
    /// The group's value of each `group_by` dimension.
    pub dimensions: BTreeMap<String, String>,
    /// Its counters.
    #[serde(flatten)]
    pub usage: Usage,
}

/// `overview`: totals over the range, and the same counters per group (per route unless
/// `group_by` says otherwise), busiest first.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Overview {
    /// The org, or none for every org.
    pub org: Option<String>,
    /// Start (whole hour).
    pub from: DateTime<Utc>,
    /// End, exclusive (whole hour).
    pub to: DateTime<Utc>,
    /// Totals over the range.
    #[serde(flatten)]
    pub totals: Usage,
    /// The dimensions rows are grouped by.
    pub group_by: Vec<String>,
    /// Per group, by calls, at most `limit` (default 100).
    pub rows: Vec<UsageRow>,
}

fn usage_table(group_by: &[String], rows: &[UsageRow]) -> Table {
    let mut t = Table::new(
        group_by
            .iter()
            .cloned()
            .chain(Usage::COLUMNS.map(String::from)),
    );
    for r in rows {
        let mut cells: Vec<Cell> = group_by
            .iter()
            .map(|g| Cell::Text(r.dimensions.get(g).cloned().unwrap_or_default()))
            .collect();
        cells.extend(r.usage.cells());
        t.rows.push(cells);
    }
    t
}

impl Tabular for Overview {
    fn table(&self) -> Table {
        usage_table(&self.group_by, &self.rows)
    }
}

/// The `overview` report.
pub async fn overview(ctx: ReportCtx<'_>, q: &ReportQuery) -> Result<Overview, ReportError> {
    q.only(&["from", "to", "days", "limit", "group_by", "format"])?;
    let range = q.range(ctx.now)?;
    let limit = q.limit(100)?;
    let (mut group, custom) = q.group_by_declared(ctx.declared_dimensions())?;
    if group.is_empty() {
        group.push(Column::Route);
    }
    let segments = ctx.tile(range.from, range.to).await?;
    let totals = ctx
        .storage
        .aggregate(&Aggregate {
            org: ctx.org,
            segments: &segments,
            group: &[],
            count_users: true,
            ..Aggregate::default()
        })
        .await?;
    let count_users = users_countable(&group);
    let rows = ctx
        .storage
        .aggregate(&Aggregate {
            org: ctx.org,
            segments: &segments,
            group: &group,
            top: Some((Measure::Calls, limit)),
            count_users,
            dimension: custom.as_deref(),
            ..Aggregate::default()
        })
        .await?;
    Ok(Overview {
        org: ctx.org.map(str::to_owned),
        from: range.from_time(),
        to: range.to_time(),
        totals: totals
            .first()
            .map(|t| Usage::of(t, true))
            .unwrap_or_default(),
        group_by: group
            .iter()
            .map(|c| label(*c, custom.as_deref()).to_owned())
            .collect(),
        rows: rows
            .iter()
            .map(|t| UsageRow {
                dimensions: dimensions(&group, &t.key, custom.as_deref()),
                usage: Usage::of(t, count_users),
            })
            .collect(),
    })
}

/// One bucket of one series.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TimeseriesRow {
    /// Bucket start.
    pub bucket: DateTime<Utc>,
    /// The series' value of each `group_by` dimension.
    pub dimensions: BTreeMap<String, String>,
    /// Its counters (without unique users: per bucket they would mean a row per user and
    /// bucket; the `overview` of a range has them).
    #[serde(flatten)]
    pub usage: Usage,
}

/// `timeseries`: counters per bucket, optionally one series per group (the `limit` busiest
/// groups over the range, default 10). Buckets without traffic are absent.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Timeseries {
    /// The org, or none for every org.
    pub org: Option<String>,
    /// Bucket width: `minute`, `hour` or `day`.
    pub interval: crate::rollup::Granularity,
    /// Start (a bucket start).
    pub from: DateTime<Utc>,
    /// End, exclusive.
    pub to: DateTime<Utc>,
    /// The dimensions series are split by.
    pub group_by: Vec<String>,
    /// Rows by bucket, then group.
    pub rows: Vec<TimeseriesRow>,
}

impl Tabular for Timeseries {
    fn table(&self) -> Table {
        let mut t = Table::new(
            ["bucket".to_owned()]
                .into_iter()
                .chain(self.group_by.iter().cloned())
                .chain(Usage::COLUMNS.map(String::from)),
        );
        for r in &self.rows {
            let mut cells = vec![Cell::Time(r.bucket)];
            cells.extend(
                self.group_by
                    .iter()
                    .map(|g| Cell::Text(r.dimensions.get(g).cloned().unwrap_or_default())),
            );
            cells.extend(r.usage.cells());
            t.rows.push(cells);
        }
        t
    }
}

/// The `timeseries` report.
pub async fn timeseries(ctx: ReportCtx<'_>, q: &ReportQuery) -> Result<Timeseries, ReportError> {
    q.only(&[
        "from", "to", "days", "limit", "group_by", "format", "interval",
    ])?;
    let interval = q.interval()?;
    let range = series_range(q.range(ctx.now)?, interval)?;
    let (group, custom) = q.group_by_declared(ctx.declared_dimensions())?;
    if let Some(name) = &custom {
        if !Cube::Custom.has(interval) {
            return Err(ReportError::BadParam {
                param: "interval",
                message: format!(
                    "a series by the custom dimension '{name}' is kept by hour, day and week, \
                     not by minute"
                ),
            });
        }
    }
    let limit = q.limit(10)?;
    let segments = Segment::single(interval, range.from, range.to);
    // The busiest `limit` groups over the whole range choose the series.
    let keep: Option<HashSet<Vec<Value>>> = if group.is_empty() {
        None
    } else {
        let top = ctx
            .storage
            .aggregate(&Aggregate {
                org: ctx.org,
                // Series ranges are whole hours at least.
                segments: &ctx.tile(range.from, range.to).await?,
                group: &group,
                top: Some((Measure::Calls, limit)),
                dimension: custom.as_deref(),
                ..Aggregate::default()
            })
            .await?;
        Some(top.into_iter().map(|t| t.key).collect())
    };
    let columns: Vec<Column> = [Column::Bucket]
        .into_iter()
        .chain(group.iter().copied())
        .collect();
    let rows = ctx
        .storage
        .aggregate(&Aggregate {
            org: ctx.org,
            segments: &segments,
            group: &columns,
            dimension: custom.as_deref(),
            ..Aggregate::default()
        })
        .await?;
    Ok(Timeseries {
        org: ctx.org.map(str::to_owned),
        interval,
        from: to_time(range.from),
        to: to_time(range.to),
        group_by: group
            .iter()
            .map(|c| label(*c, custom.as_deref()).to_owned())
            .collect(),
        rows: rows
            .iter()
            .filter(|t| keep.as_ref().is_none_or(|k| k.contains(&t.key[1..])))
            .map(|t| TimeseriesRow {
                bucket: to_time(t.key[0].int()),
                dimensions: dimensions(&group, &t.key[1..], custom.as_deref()),
                usage: Usage::of(t, false),
            })
            .collect(),
    })
}

/// One ranked entry.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TopRow {
    /// Position, from 1.
    pub rank: usize,
    /// What is ranked: `org`, `user` (with its `org`), `method` and `route`.
    pub dimensions: BTreeMap<String, String>,
    /// Its counters.
    #[serde(flatten)]
    pub usage: Usage,
}

/// `top`: users, orgs, endpoints or routes ranked by calls or cost.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Top {
    /// The org, or none for every org.
    pub org: Option<String>,
    /// Start (whole hour).
    pub from: DateTime<Utc>,
    /// End, exclusive (whole hour).
    pub to: DateTime<Utc>,
    /// `users`, `orgs`, `endpoints` or `routes`.
    pub dimension: String,
    /// `calls` or `cost`.
    pub by: String,
    /// Ranked, at most `limit` (default 10).
    pub rows: Vec<TopRow>,
}

impl Tabular for Top {
    fn table(&self) -> Table {
        let dims: Vec<String> = self
            .rows
            .first()
            .map(|r| r.dimensions.keys().cloned().collect())
            .unwrap_or_default();
        let mut t = Table::new(
            ["rank".to_owned()]
                .into_iter()
                .chain(dims.iter().cloned())
                .chain(Usage::COLUMNS.map(String::from)),
        );
        for r in &self.rows {
            let mut cells = vec![Cell::Int(r.rank as i64)];
            cells.extend(
                dims.iter()
                    .map(|d| Cell::Text(r.dimensions.get(d).cloned().unwrap_or_default())),
            );
            cells.extend(r.usage.cells());
            t.rows.push(cells);
        }
        t
    }
}

/// The `top` report.
pub async fn top(ctx: ReportCtx<'_>, q: &ReportQuery) -> Result<Top, ReportError> {
    q.only(&["from", "to", "days", "limit", "format", "dimension", "by"])?;
    let range = q.range(ctx.now)?;
    let limit = q.limit(10)?;
    let dimension = q.dimension.as_deref().unwrap_or("users");
    let group: &[Column] = match dimension {
        "users" => &[Column::Org, Column::User],
        "orgs" => &[Column::Org],
        "endpoints" => &[Column::Method, Column::Route],
        "routes" => &[Column::Route],
        other => {
            return Err(ReportError::BadParam {
                param: "dimension",
                message: format!("'{other}': one of users, orgs, endpoints, routes"),
            })
        }
    };
    let by = q.by.as_deref().unwrap_or("calls");
    let measure = match by {
        "calls" => Measure::Calls,
        "cost" => Measure::Cost,
        other => {
            return Err(ReportError::BadParam {
                param: "by",
                message: format!("'{other}': one of calls, cost"),
            })
        }
    };
    let segments = ctx.tile(range.from, range.to).await?;
    let rows = ctx
        .storage
        .aggregate(&Aggregate {
            org: ctx.org,
            segments: &segments,
            group,
            // Requests without a user are not a user.
            with_user: dimension == "users",
            top: Some((measure, limit)),
            count_users: dimension == "orgs",
            ..Aggregate::default()
        })
        .await?;
    Ok(Top {
        org: ctx.org.map(str::to_owned),
        from: range.from_time(),
        to: range.to_time(),
        dimension: dimension.to_owned(),
        by: by.to_owned(),
        rows: rows
            .iter()
            .enumerate()
            .map(|(i, t)| TopRow {
                rank: i + 1,
                dimensions: dimensions(group, &t.key, None),
                usage: Usage::of(t, dimension == "orgs"),
            })
            .collect(),
    })
}
