//! The core's conformance vectors (`core/tests/conformance/vectors.json`) as the end-to-end
//! tests replay them over HTTP: the file's shape, the request each step sends, and the
//! comparison of a response with what the step expects. Each runtime's test only starts its
//! runtime per case and sends; the same steps must produce the same answers everywhere.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::{workspace_root, Response};

/// The vectors file.
#[derive(Deserialize)]
pub struct Vectors {
    /// One policy and its request sequence per case.
    pub cases: Vec<Case>,
}

/// One policy and the requests replayed against it.
#[derive(Deserialize)]
pub struct Case {
    /// Shown in failures.
    pub name: String,
    /// The policy document.
    pub policy: Value,
    /// The requests, in order.
    pub steps: Vec<Step>,
}

/// One request and its expected answer.
#[derive(Deserialize)]
pub struct Step {
    /// The request's time, Unix milliseconds (sent in the runtime's test clock header).
    pub at_ms: u64,
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Request headers.
    pub headers: BTreeMap<String, String>,
    /// The client address, sent in the header the runtime reads it from.
    #[serde(default)]
    pub client_ip: Option<String>,
    /// Why the step is there.
    #[serde(default)]
    pub note: Option<String>,
    /// The answer.
    pub expect: Expect,
}

/// A status, the exact set of limiter headers, and (when given) the body.
#[derive(Deserialize, Debug, PartialEq)]
pub struct Expect {
    /// HTTP status.
    pub status: u16,
    /// Limiter headers (and `content-type` on rejections).
    pub headers: BTreeMap<String, String>,
    /// The body, compared byte for byte when present.
    #[serde(default)]
    pub body: Option<String>,
}

/// Reads the vectors from the core's test folder.
pub fn load() -> Result<Vectors> {
    let path = workspace_root().join("core/tests/conformance/vectors.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    Ok(serde_json::from_str(&text)?)
}

impl Step {
    /// The step's request headers plus the test clock (`clock_header: at`) and the client
    /// address under `ip_header`.
    pub fn request_headers<'a>(
        &'a self,
        clock_header: &'a str,
        at: &'a str,
        ip_header: &'a str,
    ) -> Vec<(&'a str, &'a str)> {
        let mut headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        headers.push((clock_header, at));
        if let Some(ip) = &self.client_ip {
            headers.push((ip_header, ip));
        }
        headers
    }

    /// `None` when `response` is what the step expects, else what differs.
    pub fn check(&self, case: &str, index: usize, response: &Response) -> Option<String> {
        let mut want_headers = self.expect.headers.clone();
        let want_type = want_headers.remove("content-type");
        let mut got = Expect {
            status: response.status,
            headers: response.limiter_headers(),
            body: self.expect.body.as_ref().map(|_| response.body.clone()),
        };
        if let Some(t) = want_type {
            if response.header("content-type") != Some(t.as_str()) {
                got.headers.insert(
                    "content-type".into(),
                    format!("{:?}", response.header("content-type")),
                );
            }
        }
        let want = Expect {
            status: self.expect.status,
            headers: want_headers,
            body: self.expect.body.clone(),
        };
        (got != want).then(|| {
            format!(
                "{case} step {index} ({} {}; {}):\n  expected {want:?}\n  got      {got:?}",
                self.method,
                self.path,
                self.note.as_deref().unwrap_or("")
            )
        })
    }
}
