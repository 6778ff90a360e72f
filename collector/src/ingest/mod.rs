//! `POST /v1/events`: decode, validate every event, hand the valid ones to the group-commit
//! [`writer`], and answer with what was accepted, what was a duplicate, and what was rejected
//! and why.

pub mod decode;
pub mod writer;

use std::time::Instant;

use axum::body::Bytes;
use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use tollgate_core::event::UsageEvent;

use crate::api::{ApiError, AppState};
use crate::auth::Caller;
use crate::config::{Limits, MAX_BYTES, MAX_COST, MAX_LATENCY_US};
use decode::{DecodeError, Format};

/// One refused event.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Rejected {
    /// Position in the batch (0-based; NDJSON: the n-th non-blank line).
    pub index: usize,
    /// Why.
    pub reason: String,
}

/// What became of a batch. Every event is in exactly one of the three.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct IngestResponse {
    /// Newly stored and counted.
    pub accepted: usize,
    /// Already stored (a retry): not counted again.
    pub duplicates: usize,
    /// Refused, by index.
    pub rejected: Vec<Rejected>,
}

/// Checks one event against the schema and this collector's bounds.
pub fn check_event(
    e: &UsageEvent,
    caller: &Caller,
    limits: &Limits,
    now: DateTime<Utc>,
) -> Result<(), String> {
    e.validate().map_err(|err| err.to_string())?;
    e.validate_time(
        now,
        limits.max_ahead.as_secs() as i64,
        limits.retention.as_secs() as i64,
    )
    .map_err(|err| err.to_string())?;
    if e.latency_us > MAX_LATENCY_US {
        return Err(format!("`latency_us` {} is over a day", e.latency_us));
    }
    if e.request_bytes > MAX_BYTES || e.response_bytes > MAX_BYTES {
        return Err("`request_bytes`/`response_bytes` over 1 TiB".into());
    }
    if e.cost > MAX_COST {
        return Err(format!("`cost` {} is over {MAX_COST}", e.cost));
    }
    if !caller.may_ingest_for(&e.org) {
        return Err(format!(
            "`org` '{}' is not this key's org ('{}')",
            e.org, caller.org
        ));
    }
    Ok(())
}

/// The whole ingest of one request.
pub async fn ingest(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<IngestResponse, ApiError> {
    let started = Instant::now();
    let limits = &state.limits;
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let format = Format::from_content_type(content_type).map_err(decode_error)?;
    let encoding = headers
        .get(axum::http::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .trim()
        .to_ascii_lowercase();
    let inflated;
    let raw: &[u8] = match encoding.as_str() {
        "identity" | "" => &body,
        "gzip" | "x-gzip" => {
            inflated =
                decode::gunzip(&body, limits.max_decompressed_bytes).map_err(decode_error)?;
            &inflated
        }
        other => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "content encoding '{other}' is not accepted: send gzip or none"
            )))
        }
    };
    let parsed = decode::parse(format, raw, limits.max_events_per_batch).map_err(decode_error)?;

    let now = Utc::now();
    let mut rejected = Vec::new();
    let mut valid = Vec::with_capacity(parsed.len());
    for (index, item) in parsed.into_iter().enumerate() {
        match item.and_then(|e| check_event(&e, caller, limits, now).map(|()| e)) {
            Ok(e) => valid.push(e),
            Err(reason) => rejected.push(Rejected { index, reason }),
        }
    }
    let (accepted, duplicates) = if valid.is_empty() {
        (0, 0)
    } else {
        let acks = state.writer.write(valid).await?;
        let accepted = acks.iter().filter(|a| **a).count();
        (accepted, acks.len() - accepted)
    };
    state
        .metrics
        .observe_batch(started.elapsed(), accepted, duplicates, rejected.len());
    Ok(IngestResponse {
        accepted,
        duplicates,
        rejected,
    })
}

fn decode_error(e: DecodeError) -> ApiError {
    match e {
        DecodeError::Malformed(m) => ApiError::BadRequest(m),
        DecodeError::TooLarge(m) => ApiError::PayloadTooLarge(m),
        DecodeError::Unsupported(m) => ApiError::UnsupportedMediaType(m),
    }
}
