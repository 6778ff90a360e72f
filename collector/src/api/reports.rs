//! Reports, answered from the rollups only (never from raw events): `/v1/usage`, `/v1/bill` and
//! the `/v1/reports/*` family (computed in [`crate::reports`], shared with the CLI).

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Datelike, NaiveDate, Utc};

use super::report_limit::apply;
use super::{ApiError, AppState, ErrorBody};
use crate::auth::{Caller, Role};
use crate::db::reports::{Aggregate, Segment};
use crate::reports::{Format, ReportCtx, ReportQuery, Tabular};
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
    // Rounded up to a bucket start (weeks start on Mondays, not at the epoch).
    let to_b = granularity.bucket_of(to.timestamp() + width - 1);
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
    // The month's day rows of the org cube: one or a few per day, where the full cube has
    // one per key and hour.
    let totals = state
        .storage
        .aggregate(&Aggregate {
            org: Some(&org),
            segments: &Segment::single(Granularity::Day, secs(start), secs(end)),
            ..Aggregate::default()
        })
        .await?;
    let calls: i64 = totals.iter().map(|t| t.calls).sum();
    let units: i64 = totals.iter().map(|t| t.cost).sum();
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

/// Authorises a report request, applies the per-key limit and parses the query: the caller's
/// scope, the parsed query and the headers for the response; or the response to send instead.
async fn admit(
    state: &AppState,
    caller: &Caller,
    uri: &Uri,
    query: Result<Query<ReportQuery>, QueryRejection>,
) -> Result<(Option<String>, ReportQuery, Vec<(&'static str, String)>), Response> {
    caller
        .require(&[Role::Admin, Role::Reader])
        .map_err(IntoResponse::into_response)?;
    let headers = state
        .report_limiter
        .check(caller, uri.path())
        .map_err(|r| *r)?;
    let with_headers = |e: ApiError| {
        let mut r = e.into_response();
        apply(&mut r, &headers);
        r
    };
    let Query(q) = query.map_err(|e| with_headers(ApiError::BadRequest(e.body_text())))?;
    let org = caller
        .report_scope(q.org.as_deref())
        .map_err(&with_headers)?;
    Ok((org, q, headers))
}

/// A report as JSON or CSV, with the limiter's headers.
fn render<R: serde::Serialize + Tabular>(
    report: &R,
    format: Format,
    headers: &[(&'static str, String)],
) -> Response {
    let mut response = match format {
        Format::Csv => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/csv; charset=utf-8"),
            )],
            report.table().to_csv(),
        )
            .into_response(),
        Format::Json | Format::Ndjson => Json(report).into_response(),
    };
    apply(&mut response, headers);
    response
}

/// One `/v1/reports/<name>` handler: admit, run the report from [`crate::reports`], render.
macro_rules! report_route {
    ($(#[$doc:meta])* $name:ident, $path:literal, $body:ty) => {
        $(#[$doc])*
        #[utoipa::path(get, path = $path, tag = "reports", params(ReportQuery),
            responses((status = 200, body = $body, description = "The report (JSON, or CSV with `format=csv`)"),
                (status = 400, body = ErrorBody, description = "A parameter is invalid; the message names it"),
                (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
                (status = 404, body = ErrorBody, description = "A reader asked for another org"),
                (status = 429, description = "This key's report rate is exhausted (the edges' 429 body and headers)")),
            security(("bearer" = [])))]
        pub(super) async fn $name(
            State(state): State<AppState>,
            caller: Caller,
            uri: Uri,
            query: Result<Query<ReportQuery>, QueryRejection>,
        ) -> Response {
            let (org, q, headers) = match admit(&state, &caller, &uri, query).await {
                Ok(admitted) => admitted,
                Err(response) => return response,
            };
            let ctx = ReportCtx {
                storage: &state.storage,
                policy: state.policy.as_deref(),
                org: org.as_deref(),
                now: Utc::now(),
            };
            let result = match q.format(false) {
                Ok(format) => crate::reports::$name(ctx, &q).await.map(|r| render(&r, format, &headers)),
                Err(e) => Err(e),
            };
            result.unwrap_or_else(|e| {
                let mut r = ApiError::from(e).into_response();
                apply(&mut r, &headers);
                r
            })
        }
    };
}

report_route!(
    /// Calls, errors, cost, cost per call and unique users over a range, in total and per route
    /// (or `group_by`). Unique users per route or method are HyperLogLog++ estimates: exact up
    /// to 128 users in a group, 1.6 % standard error beyond.
    overview, "/v1/reports/overview", crate::reports::Overview
);
report_route!(
    /// Counters per minute, hour or day, optionally one series per group.
    timeseries, "/v1/reports/timeseries", crate::reports::Timeseries
);
report_route!(
    /// Users, orgs, endpoints or routes ranked by calls or cost.
    top, "/v1/reports/top", crate::reports::Top
);
report_route!(
    /// Calls, error rate, cost and latency percentiles per endpoint.
    endpoints, "/v1/reports/endpoints", crate::reports::Endpoints
);
report_route!(
    /// Latency percentiles and error rate over the range and per bucket.
    performance, "/v1/reports/performance", crate::reports::Performance
);
report_route!(
    /// Traffic by hour of day and weekday, the peaks, calls per day and their trend.
    patterns, "/v1/reports/patterns", crate::reports::Patterns
);
report_route!(
    /// The last 1, 5 and 15 minutes: requests per minute, active users, error rate, mean latency.
    realtime, "/v1/reports/realtime", crate::reports::Realtime
);
report_route!(
    /// How often each rule limited whom, shadow hits included.
    limits, "/v1/reports/limits", crate::reports::Limits
);
report_route!(
    /// Calendar quotas used against their limits in the current period, by org, user and tier.
    quotas, "/v1/reports/quotas", crate::reports::Quotas
);
report_route!(
    /// Plan fee plus overage for a month, by route and user, with a month-end projection.
    billing, "/v1/reports/billing", crate::reports::Billing
);

/// Raw events or rollup rows of a range, streamed as NDJSON (default) or CSV (`format=csv`,
/// formula-safe). `source=events|rollups`, `interval` for rollups.
#[utoipa::path(get, path = "/v1/reports/export", tag = "reports", params(ReportQuery),
    responses((status = 200, content_type = "application/x-ndjson", body = String,
            description = "One JSON object per line (or CSV with a header row with `format=csv`)"),
        (status = 400, body = ErrorBody, description = "A parameter is invalid; the message names it"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "A reader asked for another org"),
        (status = 429, description = "This key's report rate is exhausted")),
    security(("bearer" = [])))]
pub(super) async fn export(
    State(state): State<AppState>,
    caller: Caller,
    uri: Uri,
    query: Result<Query<ReportQuery>, QueryRejection>,
) -> Response {
    use crate::reports::export::{encode, header, plan};
    use futures_util::StreamExt;
    let (org, q, headers) = match admit(&state, &caller, &uri, query).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let ctx = ReportCtx {
        storage: &state.storage,
        policy: state.policy.as_deref(),
        org: org.as_deref(),
        now: Utc::now(),
    };
    let plan = match plan(ctx, &q) {
        Ok(plan) => plan,
        Err(e) => {
            let mut r = ApiError::from(e).into_response();
            apply(&mut r, &headers);
            return r;
        }
    };
    let rows = state
        .storage
        .export(plan.source, plan.org.clone(), plan.from, plan.to);
    let format = plan.format;
    let first =
        futures_util::stream::once(std::future::ready(Ok::<_, std::io::Error>(header(&plan))));
    // A database failure mid-stream ends the body with an error: the client sees a truncated
    // transfer rather than a silently short export.
    let body = futures_util::stream::unfold(rows, |mut rows| async move {
        let item = rows.recv().await?;
        Some((item, rows))
    })
    .map(move |item| match item {
        Ok(record) => Ok(encode(&record, format)),
        Err(e) => {
            tracing::error!(error = %e, "export failed mid-stream");
            Err(std::io::Error::other("export failed"))
        }
    });
    let content_type = match format {
        Format::Csv => "text/csv; charset=utf-8",
        _ => "application/x-ndjson",
    };
    let mut response = (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        axum::body::Body::from_stream(first.chain(body)),
    )
        .into_response();
    apply(&mut response, &headers);
    response
}
