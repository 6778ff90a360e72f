//! The policy document as users write it (JSON or YAML through serde). Every struct refuses
//! unknown fields, so a typo is an error at load rather than a limit that silently never applies.
//! `docs/policy.md` documents each field; `Policy::try_from` validates and compiles it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::algorithm::CalendarPeriod;

/// The whole policy: plans, tiers of rules, keys, overrides, bypass credentials and options.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// Schema version; only 1 exists.
    pub version: u32,
    /// Plans by name, merged over the built-in ones (a plan given here replaces the built-in
    /// plan of the same name).
    #[serde(default)]
    pub plans: BTreeMap<String, PlanSpec>,
    /// Plan for identified callers whose key or claims name none. Default `free`.
    #[serde(default)]
    pub default_plan: Option<String>,
    /// Plan for callers known only by address, or not at all. Default `anonymous`.
    #[serde(default)]
    pub anonymous_plan: Option<String>,
    /// Rules that apply whatever the plan: the global, org, user and endpoint tiers.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    /// API keys, stored as hashes only.
    #[serde(default)]
    pub keys: Vec<KeySpec>,
    /// Per-user or per-org exceptions with an expiry.
    #[serde(default)]
    pub overrides: Vec<OverrideSpec>,
    /// Credentials that skip limiting entirely, stored as hashes only.
    #[serde(default)]
    pub bypass: Vec<BypassSpec>,
    /// Route templates reported in usage events (endpoint rule paths are added automatically).
    #[serde(default)]
    pub routes: Vec<String>,
    /// Which response header families to send.
    #[serde(default)]
    pub headers: HeaderOptions,
    /// How callers are identified.
    #[serde(default)]
    pub identity: IdentityOptions,
    /// What to do when counter state cannot be read or written.
    #[serde(default)]
    pub failure_mode: FailureMode,
}

/// A plan: its limits, or none at all.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    /// No limits from the plan (global rules still apply).
    #[serde(default)]
    pub unlimited: bool,
    /// The plan's rules; each is named `<plan>.<rule>` once compiled.
    #[serde(default)]
    pub limits: Vec<RuleSpec>,
}

/// Which counter a rule keeps: one for everyone, one per org, or one per user / API key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One counter shared by all callers.
    Global,
    /// One counter per org (callers without an org count as their own org).
    Org,
    /// One counter per user or API key (or per client address for anonymous callers).
    #[default]
    User,
}

/// The algorithm a rule uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlgorithmKind {
    /// `limit` per `window` refill rate, `burst` capacity.
    TokenBucket,
    /// GCRA: `limit` per `window`, bursts up to `burst`.
    Gcra,
    /// `limit` per epoch-aligned `window`.
    FixedWindow,
    /// `limit` per rolling `window` (two-window weighted estimate).
    SlidingWindow,
    /// Exactly `limit` per rolling `window` (small limits only).
    SlidingLog,
    /// `limit` requests in flight.
    Concurrency,
    /// `limit` per calendar `period`.
    CalendarQuota,
}

/// Enforce the rule, or only report what it would have done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Deny requests over the limit.
    #[default]
    Enforce,
    /// Decide and report, never deny.
    Shadow,
}

/// A duration as a number of seconds or a humantime string (`"1h"`, `"30s"`, `"1day"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DurationSpec {
    /// Whole seconds.
    Seconds(u64),
    /// Text such as `1h 30m`.
    Text(String),
}

/// One method or several.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Methods {
    /// A single method, e.g. `POST`.
    One(String),
    /// Any of these methods.
    Many(Vec<String>),
}

/// The requests an endpoint rule applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// Method(s); any when absent.
    #[serde(default)]
    pub method: Option<Methods>,
    /// Path pattern: literals, `{param}`, `*`, and a final `**`.
    pub path: String,
}

/// One rule of one tier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique name (`[a-z0-9_.-]`), shown in headers, 429 bodies and reports.
    pub name: String,
    /// Counter partitioning.
    #[serde(default)]
    pub scope: Scope,
    /// The algorithm.
    pub algorithm: AlgorithmKind,
    /// Units per window, per period, or in flight.
    pub limit: u64,
    /// Window or refill period (all but concurrency and calendar quotas).
    #[serde(default)]
    pub window: Option<DurationSpec>,
    /// Bucket capacity for token bucket and GCRA; default `limit`.
    #[serde(default)]
    pub burst: Option<u64>,
    /// Calendar period for calendar quotas.
    #[serde(default)]
    pub period: Option<CalendarPeriod>,
    /// Billing anchor for calendar quotas (RFC 3339); default midnight UTC on the 1st.
    #[serde(default)]
    pub anchor: Option<String>,
    /// How long an unreleased concurrency lease lives; default 5 minutes.
    #[serde(default)]
    pub max_hold: Option<DurationSpec>,
    /// Only requests to this endpoint (the endpoint tier); all requests when absent.
    #[serde(default)]
    pub endpoint: Option<EndpointSpec>,
    /// Evaluation order and header precedence among equally restrictive rules; higher first.
    #[serde(default)]
    pub priority: i32,
    /// Enforce or shadow.
    #[serde(default)]
    pub mode: Mode,
    /// Share of callers (0–100, chosen by a stable hash of the caller) for whom an enforcing
    /// rule is enforced; the rest see it in shadow mode. Default 100.
    #[serde(default)]
    pub rollout_percent: Option<u8>,
}

/// An API key, known by the SHA-256 of its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// The key's public id (reported as the user; never the secret).
    pub id: String,
    /// `sha256:<64 hex>` of the secret.
    pub hash: String,
    /// The org the key belongs to.
    #[serde(default)]
    pub org: Option<String>,
    /// The key's plan; default `default_plan`.
    #[serde(default)]
    pub plan: Option<String>,
}

/// A support engineer's exception: a different limit, or none, for a user or an org, until it
/// expires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideSpec {
    /// `user:<id>` or `org:<id>`.
    pub subject: String,
    /// The compiled rule name it changes (`free.hourly`); all rules when absent (then only
    /// `unlimited` makes sense).
    #[serde(default)]
    pub rule: Option<String>,
    /// The new limit (burst scales with it).
    #[serde(default)]
    pub limit: Option<u64>,
    /// Lift the rule(s) entirely.
    #[serde(default)]
    pub unlimited: bool,
    /// When it ends (RFC 3339). Required: exceptions that never end are how limits rot.
    pub expires_at: String,
    /// Why (a ticket, a name): kept for the audit trail.
    #[serde(default)]
    pub reason: Option<String>,
}

/// A credential that skips limiting, known by the SHA-256 of its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BypassSpec {
    /// Who holds it (an internal service, a load test).
    pub name: String,
    /// `sha256:<64 hex>` of the secret.
    pub hash: String,
    /// When it stops working (RFC 3339); never when absent.
    #[serde(default)]
    pub expires_at: Option<String>,
}

/// Which header families a response carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderOptions {
    /// `X-RateLimit-Limit/Remaining/Reset`.
    pub x_ratelimit: bool,
    /// `X-Quota-Limit/Remaining/Reset`.
    pub x_quota: bool,
    /// The IETF `RateLimit-Policy` and `RateLimit` fields.
    pub ietf: bool,
    /// `Retry-After` on 429.
    pub retry_after: bool,
}

impl Default for HeaderOptions {
    fn default() -> Self {
        Self {
            x_ratelimit: true,
            x_quota: true,
            ietf: true,
            retry_after: true,
        }
    }
}

/// A way of identifying the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// An API key header, looked up by hash.
    ApiKey,
    /// Claims a JWT verifier upstream of us already checked (never an unverified token).
    Jwt,
    /// The client's address.
    ClientIp,
}

/// How callers are identified; sources are tried in order, then the caller is anonymous.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityOptions {
    /// Sources in the order tried.
    pub sources: Vec<IdentitySource>,
    /// Headers that may carry an API key; `authorization` is read as `Bearer <key>`.
    pub api_key_headers: Vec<String>,
    /// The header that carries a bypass credential.
    pub bypass_header: String,
}

impl Default for IdentityOptions {
    fn default() -> Self {
        Self {
            sources: vec![
                IdentitySource::ApiKey,
                IdentitySource::Jwt,
                IdentitySource::ClientIp,
            ],
            api_key_headers: vec!["x-api-key".into(), "authorization".into()],
            bypass_header: "x-tollgate-bypass".into(),
        }
    }
}

/// What happens when counter state cannot be read or written (store down, conflicts persist).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Let the request through and count the failure: the limiter must not take the API down.
    #[default]
    Open,
    /// Deny the request: for limits that protect something that must not be overrun.
    Closed,
}
