//! The decision and everything a client sees of it: the rate-limit and quota headers, the IETF
//! `RateLimit-Policy` / `RateLimit` fields (draft-ietf-httpapi-ratelimit-headers-10), `Retry-After`,
//! and the 429 JSON body. Built here, once, so the Envoy filter and the Worker answer
//! byte-for-byte alike.

use std::sync::Arc;

use serde::Serialize;

use crate::algorithm::{LimitKind, Outcome};
use crate::engine::{CounterKey, StoreStats};
use crate::policy::document::HeaderOptions;
use crate::policy::{CompiledRule, Identity};
use crate::time::{ceil_secs, Timestamp};

/// The verdict on one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Within every enforced limit.
    Allowed,
    /// Denied.
    Limited,
    /// Allowed, but a shadow rule would have denied it.
    ShadowLimited,
}

/// One rule's standing after a decision.
#[derive(Clone, Debug)]
pub struct RuleStatus {
    /// The rule (after overrides).
    pub rule: Arc<CompiledRule>,
    /// Whether it is enforced for this caller (false: shadow mode or outside the rollout).
    pub enforced: bool,
    /// What the algorithm said.
    pub outcome: Outcome,
    /// Window in seconds for `RateLimit-Policy`.
    pub window_secs: Option<u64>,
}

impl RuleStatus {
    pub(crate) fn new(
        rule: &Arc<CompiledRule>,
        enforced: bool,
        outcome: Outcome,
        now: Timestamp,
    ) -> Self {
        Self {
            rule: rule.clone(),
            enforced,
            outcome,
            window_secs: rule.limiter.window_secs(now),
        }
    }

    fn kind(&self) -> LimitKind {
        self.rule.limiter.kind()
    }
}

/// A concurrency slot to release when the request ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The rule that granted it.
    pub rule: Arc<str>,
    /// Its counter.
    pub key: CounterKey,
    /// Units held.
    pub cost: u64,
}

/// The engine's answer for one request.
#[derive(Clone, Debug)]
pub struct Decision {
    /// Allowed, limited or shadow-limited.
    pub verdict: Verdict,
    /// The rule that denied (or would have, in shadow); `None` when allowed.
    pub rule: Option<Arc<str>>,
    /// Denied because the store failed and the policy fails closed.
    pub failed_closed: bool,
    /// Every applicable rule's standing, highest priority first.
    pub statuses: Vec<RuleStatus>,
    /// Concurrency leases to release at the end of the request.
    pub leases: Vec<Lease>,
    /// Store retries and failures, for metrics.
    pub stats: StoreStats,
    /// Allowed by a bypass credential, without consulting any counter.
    pub bypassed: bool,
}

/// The JSON body of a 429.
#[derive(Serialize)]
struct LimitedBody<'a> {
    status: &'static str,
    message: &'static str,
    error: LimitedDetail<'a>,
}

#[derive(Serialize)]
struct LimitedDetail<'a> {
    detail: &'a str,
    limit: u64,
    current: u64,
    retry_after: u64,
}

impl Decision {
    /// A decision that allows without consulting any counter (bypass credentials, skipped paths).
    pub fn bypass() -> Self {
        Self {
            verdict: Verdict::Allowed,
            rule: None,
            failed_closed: false,
            statuses: Vec::new(),
            leases: Vec::new(),
            stats: StoreStats::default(),
            bypassed: true,
        }
    }

    /// Whether the request may proceed.
    pub fn allowed(&self) -> bool {
        self.verdict != Verdict::Limited
    }

    /// The HTTP status for a denied request: 429, or 503 when the limiter itself failed closed
    /// (the caller did nothing wrong and should not back off as if it had).
    pub fn status_code(&self) -> u16 {
        if self.failed_closed {
            503
        } else {
            429
        }
    }

    fn denier(&self) -> Option<&RuleStatus> {
        let name = self.rule.as_deref()?;
        self.statuses
            .iter()
            .find(|s| s.enforced && &*s.rule.name == name)
    }

    /// The enforced status of `kinds` with the least remaining; the denying rule wins.
    fn driver(&self, kinds: &[LimitKind]) -> Option<&RuleStatus> {
        if let Some(d) = self.denier().filter(|d| kinds.contains(&d.kind())) {
            return Some(d);
        }
        // `min_by_key` keeps the first of equals: statuses are in priority order.
        self.statuses
            .iter()
            .filter(|s| s.enforced && kinds.contains(&s.kind()))
            .min_by_key(|s| s.outcome.remaining)
    }

    /// The response headers, in a fixed order.
    pub fn headers(&self, options: &HeaderOptions) -> Vec<(&'static str, String)> {
        let mut out = Vec::with_capacity(9);
        let number = |n: u64| itoa::Buffer::new().format(n).to_string();
        if options.x_ratelimit {
            if let Some(s) = self.driver(&[LimitKind::Rate, LimitKind::Concurrency]) {
                out.push(("x-ratelimit-limit", number(s.outcome.limit)));
                out.push(("x-ratelimit-remaining", number(s.outcome.remaining)));
                out.push((
                    "x-ratelimit-reset",
                    number(ceil_secs(s.outcome.reset_after)),
                ));
            }
        }
        if options.x_quota {
            if let Some(s) = self.driver(&[LimitKind::Quota]) {
                out.push(("x-quota-limit", number(s.outcome.limit)));
                out.push(("x-quota-remaining", number(s.outcome.remaining)));
                out.push(("x-quota-reset", number(ceil_secs(s.outcome.reset_after))));
            }
        }
        if options.ietf {
            let (policy, current) = ietf_fields(self.statuses.iter().filter(|s| s.enforced));
            if !policy.is_empty() {
                out.push(("ratelimit-policy", policy));
                out.push(("ratelimit", current));
            }
        }
        if options.retry_after && self.verdict == Verdict::Limited {
            out.push(("retry-after", self.retry_after_secs().to_string()));
        }
        out
    }

    /// Seconds a denied client should wait (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        self.denier()
            .map_or(1, |d| ceil_secs(d.outcome.retry_after).max(1))
    }

    /// The 429 body: `{"status":"error","message":"Rate limit exceeded","error":{...}}`.
    pub fn body(&self) -> String {
        let fallback = "The rate limiter is unavailable; retry shortly.";
        let (detail, limit, current) = match self.denier() {
            Some(d) => {
                let o = &d.outcome;
                let text = format!("Rule '{}' allows {}.", d.rule.name, d.rule.description);
                (text, o.limit, o.limit.saturating_sub(o.remaining))
            }
            None => (fallback.to_string(), 0, 0),
        };
        let body = LimitedBody {
            status: "error",
            message: "Rate limit exceeded",
            error: LimitedDetail {
                detail: &detail,
                limit,
                current,
                retry_after: self.retry_after_secs(),
            },
        };
        serde_json::to_string(&body).unwrap_or_default()
    }
}

/// `RateLimit-Policy` and `RateLimit` values: one list member per enforced rule, named by the
/// rule, as draft-ietf-httpapi-ratelimit-headers-10 lays them out (`"name";q=..;w=..` and
/// `"name";r=..;t=..`). Rule names are `[a-z0-9_.-]`, so they need no escaping in an sf-string.
fn ietf_fields<'a>(statuses: impl Iterator<Item = &'a RuleStatus> + Clone) -> (String, String) {
    // Appended piece by piece rather than with `write!`: the edges build these on every
    // allowed request, and `core::fmt` was the larger part of that.
    fn member(out: &mut String, name: &str, pairs: [(&str, Option<u64>); 2]) {
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push('"');
        out.push_str(name);
        out.push('"');
        for (param, value) in pairs {
            if let Some(value) = value {
                out.push(';');
                out.push_str(param);
                out.push('=');
                out.push_str(itoa::Buffer::new().format(value));
            }
        }
    }
    // Sized up front (a member is its quoted name and at most two `;x=<u64>` pairs), so the
    // strings are not copied as they grow: a fixed 96 bytes held two or three rules' members.
    let capacity: usize = statuses.clone().map(|s| s.rule.name.len() + 48).sum();
    let (mut policy, mut current) = (
        String::with_capacity(capacity),
        String::with_capacity(capacity),
    );
    for s in statuses {
        let name = &*s.rule.name;
        member(
            &mut policy,
            name,
            [("q", Some(s.outcome.limit)), ("w", s.window_secs)],
        );
        member(
            &mut current,
            name,
            [
                ("r", Some(s.outcome.remaining)),
                ("t", Some(ceil_secs(s.outcome.reset_after))),
            ],
        );
    }
    (policy, current)
}

/// The status path's answer: the caller's limits across every tier, nothing consumed.
#[derive(Serialize)]
pub struct StatusReport<'a> {
    /// How the caller was identified.
    pub identity: IdentityView<'a>,
    /// One entry per applicable rule.
    pub limits: Vec<LimitView<'a>>,
}

/// The caller as shown on the status path.
#[derive(Serialize)]
pub struct IdentityView<'a> {
    /// How the caller was identified.
    pub kind: crate::policy::IdentityKind,
    /// User or key id.
    pub user: Option<&'a str>,
    /// Org.
    pub org: Option<&'a str>,
    /// Plan.
    pub plan: &'a str,
}

/// One limit as shown on the status path.
#[derive(Serialize)]
pub struct LimitView<'a> {
    /// Rule name.
    pub rule: &'a str,
    /// rate, quota or concurrency.
    pub kind: LimitKind,
    /// Whether it is enforced for this caller.
    pub enforced: bool,
    /// The limit.
    pub limit: u64,
    /// Units remaining.
    pub remaining: u64,
    /// Seconds until fully reset.
    pub reset: u64,
    /// Window in seconds, if any.
    pub window: Option<u64>,
    /// What the rule allows, in words.
    pub description: &'a str,
}

impl<'a> StatusReport<'a> {
    /// The report for `identity` from the statuses `Policy::status` returned.
    pub fn new(identity: &'a Identity, statuses: &'a [RuleStatus]) -> Self {
        Self {
            identity: IdentityView {
                kind: identity.kind,
                user: identity.user.as_deref(),
                org: identity.org.as_deref(),
                plan: &identity.plan,
            },
            limits: statuses
                .iter()
                .map(|s| LimitView {
                    rule: &s.rule.name,
                    kind: s.kind(),
                    enforced: s.enforced,
                    limit: s.outcome.limit,
                    remaining: s.outcome.remaining,
                    reset: ceil_secs(s.outcome.reset_after),
                    window: s.window_secs,
                    description: &s.rule.description,
                })
                .collect(),
        }
    }

    /// As JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}
