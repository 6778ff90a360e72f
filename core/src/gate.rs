//! The request flow every edge runs, from request parts to an answer: skip paths, the status
//! path, identity, bypass credentials, the decision, and the response to send. The Envoy filter
//! and the Worker only translate their host's request and response types to and from this.

use serde::{Deserialize, Serialize};

use crate::decision::{Decision, StatusReport};
use crate::engine::{CounterStore, Request};
use crate::policy::{api_key_from_header, Claims, Credentials, Identity, Policy};
use crate::time::Timestamp;

/// Edge options that are not policy: where the status path is and which paths are not limited.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateOptions {
    /// Path answered by the edge itself with the caller's limits, consuming nothing; `None`
    /// disables it.
    pub status_path: Option<String>,
    /// Exact paths never limited nor reported (health checks).
    pub skip_paths: Vec<String>,
}

impl Default for GateOptions {
    fn default() -> Self {
        Self {
            status_path: Some("/.well-known/ratelimit".into()),
            skip_paths: vec!["/healthz".into(), "/readyz".into()],
        }
    }
}

/// A request as the edge sees it.
pub struct HttpRequest<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Path, possibly with a query string.
    pub path: &'a str,
    /// Looks up a request header by lower-case name.
    pub header: &'a dyn Fn(&str) -> Option<String>,
    /// The client address, when the edge knows it.
    pub client_ip: Option<&'a str>,
    /// Claims verified upstream, if any.
    pub claims: Option<Claims<'a>>,
    /// Units the request costs up front.
    pub cost: u64,
}

/// What the edge should do.
#[derive(Debug)]
pub enum GateAction {
    /// Not limited and not reported (a skip path).
    Skip,
    /// Answer 200 with this JSON (the status path).
    Status {
        /// The caller.
        identity: Identity,
        /// The JSON report.
        body: String,
    },
    /// Forward the request; add `headers` to the response.
    Proceed {
        /// The caller.
        identity: Identity,
        /// The decision (allowed or shadow-limited).
        decision: Decision,
        /// Headers for the upstream's response.
        headers: Vec<(&'static str, String)>,
    },
    /// Answer without forwarding.
    Reject {
        /// The caller.
        identity: Identity,
        /// The decision (limited).
        decision: Decision,
        /// 429, or 503 when the limiter failed closed.
        status: u16,
        /// Headers, `content-type` included.
        headers: Vec<(&'static str, String)>,
        /// The JSON body.
        body: String,
    },
}

/// Splits `path?query`.
pub fn split_query(path: &str) -> (&str, Option<&str>) {
    match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    }
}

impl Policy {
    /// Extracts the caller's credentials from the request per the identity options.
    pub fn credentials<'a>(
        &self,
        req: &HttpRequest<'a>,
        key_holder: &'a mut Option<String>,
    ) -> Credentials<'a> {
        // A policy with no keys can match none, and an unmatched key identifies no one: the
        // headers are not read then (each read is a host call at the edges).
        *key_holder = self
            .identifies_by_api_key()
            .then(|| {
                self.identity.api_key_headers.iter().find_map(|name| {
                    let value = (req.header)(name)?; // lower-cased when the policy compiled
                    api_key_from_header(name, &value).map(str::to_string)
                })
            })
            .flatten();
        Credentials {
            api_key: key_holder.as_deref(),
            claims: req.claims.clone(),
            client_ip: req.client_ip,
        }
    }

    /// Runs the whole edge flow for one request.
    pub fn gate<S: CounterStore>(
        &self,
        options: &GateOptions,
        req: &HttpRequest<'_>,
        now: Timestamp,
        store: &mut S,
    ) -> GateAction {
        let (path, _) = split_query(req.path);
        if options.skip_paths.iter().any(|p| p == path) {
            return GateAction::Skip;
        }
        let mut key = None;
        let identity = self.identify(&self.credentials(req, &mut key));
        let engine_req = Request {
            identity: &identity,
            method: req.method,
            path,
            cost: req.cost,
        };
        if options.status_path.as_deref() == Some(path) {
            let statuses = self.status(&engine_req, now, store);
            let body = StatusReport::new(&identity, &statuses).to_json();
            return GateAction::Status { identity, body };
        }
        let bypass = self.has_bypass()
            && (req.header)(&self.identity.bypass_header)
                .is_some_and(|credential| self.is_bypass(credential.trim(), now));
        let decision = if bypass {
            Decision::bypass()
        } else {
            self.decide(&engine_req, now, store)
        };
        let mut headers = decision.headers(&self.headers);
        if decision.allowed() {
            GateAction::Proceed {
                identity,
                decision,
                headers,
            }
        } else {
            headers.push(("content-type", "application/json".to_string()));
            let body = decision.body();
            GateAction::Reject {
                identity,
                status: decision.status_code(),
                decision,
                headers,
                body,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::MemoryStore;

    /// The header names `gate` read for one request under `policy`.
    fn headers_read(policy: &str) -> Vec<String> {
        let policy = Policy::from_json(policy).unwrap();
        let read = RefCell::new(Vec::new());
        let lookup = |name: &str| {
            read.borrow_mut().push(name.to_string());
            None
        };
        let req = HttpRequest {
            method: "GET",
            path: "/v1/items",
            header: &lookup,
            client_ip: Some("10.0.0.1"),
            claims: None,
            cost: 1,
        };
        let mut store = MemoryStore::default();
        let now = Timestamp::from_secs(1_800_000_000);
        policy.gate(&GateOptions::default(), &req, now, &mut store);
        read.into_inner()
    }

    #[test]
    fn api_key_headers_are_read_only_when_a_key_could_match() {
        let with_key = format!(
            r#"{{"version":1,"keys":[{{"id":"k1","hash":"{}","plan":"pro"}}]}}"#,
            crate::hash::sha256_tagged("sk_1")
        );
        assert_eq!(headers_read(&with_key), ["x-api-key", "authorization"]);
        assert!(headers_read(r#"{"version":1}"#).is_empty());
        let ip_only = with_key.replace(
            r#""version":1,"#,
            r#""version":1,"identity":{"sources":["client_ip"]},"#,
        );
        assert!(headers_read(&ip_only).is_empty());
    }
}
