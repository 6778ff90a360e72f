//! `POST /v1/events`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;

use super::{ApiError, AppState, ErrorBody};
use crate::auth::{Caller, Role};
use crate::ingest::{self, IngestResponse};

/// Ingests a batch of usage events.
///
/// Bodies: the core's batch (`application/json`, `{"version":1,"events":[…]}`), NDJSON
/// (`application/x-ndjson`) or a CloudEvents batch (`application/cloudevents-batch+json`);
/// `Content-Encoding: gzip` accepted. A 200 means every accepted event is committed; a retried
/// event (same id and timestamp) is reported as a duplicate and not counted again.
#[utoipa::path(
    post,
    path = "/v1/events",
    tag = "ingest",
    request_body(content = String, description = "A batch in one of the accepted formats",
        content_type = "application/json"),
    responses(
        (status = 200, description = "Committed", body = IngestResponse),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "No valid key", body = ErrorBody),
        (status = 403, description = "Key may not ingest", body = ErrorBody),
        (status = 413, description = "Body, inflated body or event count too large", body = ErrorBody),
        (status = 415, description = "Unsupported content type or encoding", body = ErrorBody),
        (status = 503, description = "Overloaded or storage unavailable; see Retry-After", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn post_events(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<IngestResponse>, ApiError> {
    caller.require(&[Role::Ingest, Role::Admin])?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!(
                "body over {} bytes; send smaller batches",
                state.limits.max_body_bytes
            ))
        } else {
            ApiError::BadRequest(format!("cannot read body: {rejection}"))
        }
    })?;
    match ingest::ingest(&state, &caller, &headers, body).await {
        Err(ApiError::Overloaded) => {
            state.metrics.overloaded();
            Err(ApiError::Overloaded)
        }
        other => other.map(Json),
    }
}
