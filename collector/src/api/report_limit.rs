//! The report API's own rate limit, per API key, decided by tollgate-core — the same engine,
//! headers and 429 body the edges use — over an in-process counter store.
//!
//! In-process means per replica: N collector replicas allow N times the rate. That is the
//! accepted trade for a protective limit on an internal API (no shared store to reach on every
//! report); the edges in front of a public deployment are where exact global limits live.

use std::sync::Mutex;

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tollgate_core::engine::{MemoryStore, Request};
use tollgate_core::policy::{Identity, IdentityKind, Policy};
use tollgate_core::Timestamp;

use crate::auth::Caller;

/// The plan every report caller is on (a plan the policy below defines, so no built-in plan's
/// limits apply).
const PLAN: &str = "reports";

/// Requests per minute per key, with a burst, for `/v1/reports/*`.
#[derive(Debug)]
pub struct ReportLimiter {
    policy: Policy,
    store: Mutex<MemoryStore>,
}

/// The limiter's verdict: headers to add to the report, or the 429 to send instead (boxed: a
/// response is large and the common case is the headers).
pub type Checked = Result<Vec<(&'static str, String)>, Box<Response>>;

impl ReportLimiter {
    /// `per_minute` requests per minute per key, up to `burst` at once.
    pub fn new(per_minute: u64, burst: u64) -> Result<Self, tollgate_core::policy::PolicyError> {
        let policy = Policy::from_json(
            &serde_json::json!({
                "version": 1,
                "default_plan": PLAN,
                "plans": { PLAN: { "limits": [{
                    "name": "reports",
                    "algorithm": "token_bucket",
                    "limit": per_minute,
                    "window": "1m",
                    "burst": burst,
                }]}},
            })
            .to_string(),
        )?;
        Ok(Self {
            policy,
            store: Mutex::new(MemoryStore::new()),
        })
    }

    /// Decides one report request of `caller` (path is for the engine's endpoint matching).
    pub fn check(&self, caller: &Caller, path: &str) -> Checked {
        let identity = Identity {
            kind: IdentityKind::ApiKey,
            user: Some(caller.key_id.as_str().into()),
            org: Some(caller.org.as_str().into()),
            plan: PLAN.into(),
        };
        let now = Timestamp::from_millis(
            u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or_default(),
        );
        let request = Request {
            identity: &identity,
            method: "GET",
            path,
            cost: 1,
        };
        let decision = {
            // A poisoned lock only means another request panicked mid-decision; the counters
            // are still usable.
            let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
            self.policy.decide(&request, now, &mut *store)
        };
        let headers = decision.headers(&self.policy.headers);
        if decision.allowed() {
            return Ok(headers);
        }
        let status =
            StatusCode::from_u16(decision.status_code()).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
        let mut response = (status, decision.body()).into_response();
        apply(&mut response, &headers);
        response.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Err(Box::new(response))
    }
}

/// Adds the limiter's headers to a response.
pub fn apply(response: &mut Response, headers: &[(&'static str, String)]) {
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    fn caller(id: &str) -> Caller {
        Caller {
            key_id: id.into(),
            org: "acme".into(),
            role: Role::Reader,
        }
    }

    #[test]
    fn limits_each_key_separately_with_the_edges_headers() {
        let limiter = ReportLimiter::new(60, 2).unwrap();
        let a = caller("a");
        let first = limiter.check(&a, "/v1/reports/overview").unwrap();
        assert!(
            first.contains(&("x-ratelimit-limit", "2".into())),
            "{first:?}"
        );
        assert!(
            first.contains(&("x-ratelimit-remaining", "1".into())),
            "{first:?}"
        );
        limiter.check(&a, "/v1/reports/overview").unwrap();
        let denied = limiter.check(&a, "/v1/reports/overview").unwrap_err();
        assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(denied.headers().contains_key("retry-after"));
        // Another key has its own bucket.
        limiter.check(&caller("b"), "/v1/reports/top").unwrap();
    }
}
