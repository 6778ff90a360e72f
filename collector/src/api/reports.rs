//! Reports, answered from the rollups only (never from raw events).

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::Json;
use chrono::{DateTime, Datelike, NaiveDate, Utc};

use super::{ApiError, AppState, ErrorBody};
use crate::auth::{Caller, Role};
use crate::rollup::{percentile, Granularity, RollupValues};

/// Most buckets one report may span.
const MAX_BUCKETS: i64 = 50_000;

/// `GET /v1/usage` parameters.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct UsageQuery {
    /// The org (required for admin keys; a reader key's own org otherwise).
    pub org: Option<String>,
    /// `minute`, `hour` (default) or `day`.
    pub granularity: Option<Granularity>,
    /// Start (RFC 3339), rounded down to the bucket; default `to` minus 24 hours.
    pub from: Option<DateTime<Utc>>,
    /// End (RFC 3339, exclusive), rounded up to the bucket; default now.
    pub to: Option<DateTime<Utc>>,
    /// Comma-separated: any of `bucket`, `user`, `route`, `method`, `status_class`, `decision`.
    /// Empty: one row for the whole range.
    pub group_by: Option<String>,
}

/// One row of a usage report.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct UsageRow {
    /// Bucket start, when grouped by bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<DateTime<Utc>>,
    /// User, when grouped by user ('' for events without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Route, when grouped by route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Method, when grouped by method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Status class (2 for 2xx…), when grouped by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_class: Option<i64>,
    /// Decision, when grouped by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// Requests.
    pub calls: i64,
    /// 5xx responses.
    pub errors: i64,
    /// Cost units.
    pub cost: i64,
    /// Request body bytes.
    pub request_bytes: i64,
    /// Response body bytes.
    pub response_bytes: i64,
    /// Median latency, µs (within 1%).
    pub p50_us: u64,
    /// 95th percentile latency, µs (within 1%).
    pub p95_us: u64,
    /// 99th percentile latency, µs (within 1%).
    pub p99_us: u64,
}

/// A usage report.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct UsageReport {
    /// The org.
    pub org: String,
    /// Bucket width used.
    pub granularity: Granularity,
    /// Start, rounded down to the bucket.
    pub from: DateTime<Utc>,
    /// End (exclusive), rounded up to the bucket.
    pub to: DateTime<Utc>,
    /// Rows, ordered by their group values.
    pub rows: Vec<UsageRow>,
}

/// A report row's identity: its bucket (when grouped by it) and its other group values.
type GroupKey = (Option<i64>, Vec<String>);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dim {
    Bucket,
    User,
    Route,
    Method,
    StatusClass,
    Decision,
}

fn parse_group_by(text: Option<&str>) -> Result<Vec<Dim>, ApiError> {
    let mut dims = Vec::new();
    for part in text
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let dim = match part {
            "bucket" => Dim::Bucket,
            "user" => Dim::User,
            "route" => Dim::Route,
            "method" => Dim::Method,
            "status_class" => Dim::StatusClass,
            "decision" => Dim::Decision,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "`group_by`: unknown dimension '{other}' (bucket, user, route, method, \
                     status_class, decision)"
                )))
            }
        };
        if !dims.contains(&dim) {
            dims.push(dim);
        }
    }
    Ok(dims)
}

fn to_time(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or_default()
}

/// Usage of one org over a time range, grouped as asked, with latency percentiles.
#[utoipa::path(get, path = "/v1/usage", tag = "reports", params(UsageQuery),
    responses((status = 200, body = UsageReport), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn usage(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<UsageReport>, ApiError> {
    caller.require(&[Role::Admin, Role::Reader])?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let org = caller.report_org(q.org.as_deref())?;
    let granularity = q.granularity.unwrap_or(Granularity::Hour);
    let dims = parse_group_by(q.group_by.as_deref())?;
    let to = q.to.unwrap_or_else(Utc::now);
    let from = q.from.unwrap_or(to - chrono::Duration::hours(24));
    if from > to {
        return Err(ApiError::BadRequest("`from` is after `to`".into()));
    }
    let width = granularity.seconds();
    let from_b = granularity.bucket(from);
    let to_b = (to.timestamp() + width - 1).div_euclid(width) * width;
    if (to_b - from_b) / width > MAX_BUCKETS {
        return Err(ApiError::BadRequest(format!(
            "range spans more than {MAX_BUCKETS} buckets: use a coarser granularity"
        )));
    }
    let stored = state
        .storage
        .rollup_rows(&org, granularity, from_b, to_b)
        .await?;
    let mut groups: BTreeMap<GroupKey, (Vec<Option<String>>, RollupValues)> = BTreeMap::new();
    for row in stored {
        let bucket = dims.contains(&Dim::Bucket).then_some(row.bucket);
        let values: Vec<Option<String>> = [
            (Dim::User, row.user),
            (Dim::Route, row.route),
            (Dim::Method, row.method),
            (Dim::StatusClass, row.status_class.to_string()),
            (Dim::Decision, row.decision),
        ]
        .into_iter()
        .map(|(d, v)| dims.contains(&d).then_some(v))
        .collect();
        let key = (
            bucket,
            values
                .iter()
                .map(|v| v.clone().unwrap_or_default())
                .collect(),
        );
        groups
            .entry(key)
            .or_insert_with(|| (values, RollupValues::default()))
            .1
            .merge(&row.values);
    }
    let rows = groups
        .into_iter()
        .map(|((bucket, _), (values, v))| {
            let mut values = values.into_iter();
            let mut next = || values.next().flatten();
            UsageRow {
                bucket: bucket.map(to_time),
                user: next(),
                route: next(),
                method: next(),
                status_class: next().and_then(|s| s.parse().ok()),
                decision: next(),
                calls: v.calls,
                errors: v.errors,
                cost: v.cost,
                request_bytes: v.request_bytes,
                response_bytes: v.response_bytes,
                p50_us: percentile(&v.sketch, 0.50),
                p95_us: percentile(&v.sketch, 0.95),
                p99_us: percentile(&v.sketch, 0.99),
            }
        })
        .collect();
    Ok(Json(UsageReport {
        org,
        granularity,
        from: to_time(from_b),
        to: to_time(to_b),
        rows,
    }))
}

/// `GET /v1/bill` parameters.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct BillQuery {
    /// The org (required for admin keys).
    pub org: Option<String>,
    /// `YYYY-MM` (UTC); default the current month.
    pub month: Option<String>,
}

/// One org's month: units used and, when the policy prices its plan, the charge.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct BillResponse {
    /// The org.
    pub org: String,
    /// `YYYY-MM`.
    pub month: String,
    /// The org's plan, if it has one.
    pub plan: Option<String>,
    /// Requests in the month.
    pub calls: i64,
    /// Cost units in the month.
    pub units: i64,
    /// Currency of `charge`.
    pub currency: Option<String>,
    /// Monthly fee plus overage, in minor units; absent when the plan has no price.
    pub charge: Option<u64>,
}

/// One org's bill for a month, from the day rollups and the policy file's prices.
#[utoipa::path(get, path = "/v1/bill", tag = "reports", params(BillQuery),
    responses((status = 200, body = BillResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn bill(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<BillQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<BillResponse>, ApiError> {
    caller.require(&[Role::Admin, Role::Reader])?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let org = caller.report_org(q.org.as_deref())?;
    let now = Utc::now();
    let month = q
        .month
        .unwrap_or_else(|| format!("{:04}-{:02}", now.year(), now.month()));
    let start = NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d")
        .map_err(|_| ApiError::BadRequest("`month` must be YYYY-MM".into()))?;
    let end = start
        .checked_add_months(chrono::Months::new(1))
        .ok_or_else(|| ApiError::BadRequest("`month` out of range".into()))?;
    let secs = |d: NaiveDate| d.and_time(chrono::NaiveTime::MIN).and_utc().timestamp();
    let rows = state
        .storage
        .rollup_rows(&org, Granularity::Day, secs(start), secs(end))
        .await?;
    let calls = rows.iter().map(|r| r.values.calls).sum();
    let units: i64 = rows.iter().map(|r| r.values.cost).sum();
    let plan = state.storage.get_org(&org).await?.and_then(|o| o.plan);
    let price = plan.as_deref().and_then(|p| {
        state
            .policy
            .as_ref()
            .and_then(|f| f.pricing.get(p).map(|pr| (f, p, pr)))
    });
    Ok(Json(BillResponse {
        org,
        month,
        calls,
        units,
        currency: price.map(|(_, _, pr)| pr.currency.clone()),
        charge: price.and_then(|(f, p, _)| f.monthly_charge(p, units.max(0) as u64)),
        plan,
    }))
}
