//! The HTTP API: [`app`] builds the router the binary serves and the tests drive; [`ApiError`]
//! is the one error type handlers return.

pub(crate) mod admin;
pub(crate) mod events;
pub(crate) mod ops;
pub mod report_limit;
pub(crate) mod reports;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};

use crate::config::Limits;
use crate::db::{DbError, Storage};
use crate::ingest::writer::{WriteError, Writer};
use crate::metrics::Metrics;
use crate::pricing::PolicyFile;

pub use admin::{create_key_record, CreateKey, CreatedKey};
pub use reports::{BillResponse, UsageReport, UsageRow};

/// What every handler can reach.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The database.
    pub storage: Storage,
    /// The group-commit queue.
    pub writer: Writer,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Input and queue bounds.
    pub limits: Arc<Limits>,
    /// The policy file with prices, when one was given.
    pub policy: Option<Arc<PolicyFile>>,
    /// The report API's per-key rate limit.
    pub report_limiter: Arc<report_limit::ReportLimiter>,
}

/// The router: every route, with the body limit on ingest.
pub fn app(state: AppState) -> Router {
    let body_limit = state.limits.max_body_bytes;
    Router::new()
        .route(
            "/v1/events",
            post(events::post_events).layer(DefaultBodyLimit::max(body_limit)),
        )
        .route("/v1/usage", get(reports::usage))
        .route("/v1/bill", get(reports::bill))
        .route("/v1/reports/overview", get(reports::overview))
        .route("/v1/reports/timeseries", get(reports::timeseries))
        .route("/v1/reports/top", get(reports::top))
        .route("/v1/reports/endpoints", get(reports::endpoints))
        .route("/v1/reports/performance", get(reports::performance))
        .route("/v1/reports/patterns", get(reports::patterns))
        .route("/v1/reports/realtime", get(reports::realtime))
        .route("/v1/reports/limits", get(reports::limits))
        .route("/v1/reports/quotas", get(reports::quotas))
        .route("/v1/reports/billing", get(reports::billing))
        .route("/v1/reports/export", get(reports::export))
        .route("/v1/orgs", get(admin::list_orgs).post(admin::create_org))
        .route("/v1/keys", get(admin::list_keys).post(admin::create_key))
        .route("/v1/keys/{id}", delete(admin::revoke_key))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .with_state(state)
}

/// Every way a request fails. Clients get a status and a message written for them; internal
/// detail (database errors) is logged, never sent.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No key, or an unknown or revoked one.
    #[error("missing, unknown or revoked API key")]
    Unauthorized,
    /// The key's role or org does not allow this.
    #[error("this key's role or org does not allow this request")]
    Forbidden,
    /// No such thing.
    #[error("not found")]
    NotFound,
    /// The request is malformed; the message says how.
    #[error("{0}")]
    BadRequest(String),
    /// This endpoint exists but is not built yet.
    #[error("{0}")]
    NotImplemented(String),
    /// The body (or what it inflates to, or its event count) is too large.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A content type or encoding we do not read.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// It already exists.
    #[error("{0}")]
    Conflict(String),
    /// Too much queued work: retry after the `Retry-After` delay.
    #[error("overloaded: retry later")]
    Overloaded,
    /// The database is unavailable or the write failed: nothing was stored; retry.
    #[error("storage unavailable: retry later")]
    Unavailable,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Overloaded | ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::NotFound => "not_found",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::NotImplemented(_) => "not_implemented",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Conflict(_) => "conflict",
            ApiError::Overloaded => "overloaded",
            ApiError::Unavailable => "unavailable",
        }
    }
}

/// The JSON body of every error.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A stable code: `bad_request`, `unauthorized`, `overloaded`…
    pub error: String,
    /// What is wrong, for a person.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = ErrorBody {
            error: self.code().into(),
            message: self.to_string(),
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        if e.is_unique_violation() {
            return ApiError::Conflict("already exists".into());
        }
        tracing::error!(error = %e, "database error");
        ApiError::Unavailable
    }
}

impl From<crate::reports::ReportError> for ApiError {
    fn from(e: crate::reports::ReportError) -> Self {
        match e {
            crate::reports::ReportError::BadParam { .. } => ApiError::BadRequest(e.to_string()),
            crate::reports::ReportError::Db(db) => db.into(),
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Overloaded => ApiError::Overloaded,
            WriteError::ShuttingDown | WriteError::Database(_) => ApiError::Unavailable,
        }
    }
}
