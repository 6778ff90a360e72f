//! The Worker's configuration document: what the config URL serves, what the Cron Trigger
//! writes to KV, and what every isolate and Durable Object compiles.
//!
//! The document is validated whole and refused whole ([`WorkerConfig::parse`]): the cron only
//! writes a document that parses, so a bad policy never replaces the last good one.

use serde::Deserialize;
use tollgate_core::gate::GateOptions;
use tollgate_core::policy::document::Scope;
use tollgate_core::Policy;

/// The KV key holding the current configuration document.
pub const CONFIG_KEY: &str = "config";

/// The configuration document, as served by the config URL and stored in KV.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// The core's policy document (see `docs/policy.md`).
    pub policy: serde_json::Value,
    /// Status path and paths never limited nor reported.
    #[serde(default)]
    pub gate: GateOptions,
    /// A response header whose integer value is the request's real cost (e.g.
    /// `x-usage-tokens`): charged after the response, so the next request pays.
    #[serde(default)]
    pub cost_header: Option<String>,
    /// How many Durable Objects share the counters of a policy without global rules. Callers
    /// are spread over the objects by their org (or user); a policy with a `global` scope rule
    /// always uses one object, since all of its counters must sit together to stay exact.
    #[serde(default = "default_shards")]
    pub shards: u32,
    /// JWT verification; callers are identified by verified claims only where this is set.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Usage-event batching.
    #[serde(default)]
    pub events: EventSettings,
    /// Test-only knobs; see [`TestOnly`].
    #[serde(default)]
    pub test_only: Option<TestOnly>,
}

fn default_shards() -> u32 {
    64
}

/// HS256 JWT verification (the signing secret is a Worker secret, never in this document).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Request header carrying `Bearer <token>`.
    #[serde(default = "default_jwt_header")]
    pub header: String,
    /// Required `iss`, if any.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Claim naming the user.
    #[serde(default = "default_sub")]
    pub sub: String,
    /// Claim naming the org.
    #[serde(default = "default_org")]
    pub org: String,
    /// Claim naming the plan.
    #[serde(default = "default_plan")]
    pub plan: String,
}

fn default_jwt_header() -> String {
    "authorization".into()
}
fn default_sub() -> String {
    "sub".into()
}
fn default_org() -> String {
    "org".into()
}
fn default_plan() -> String {
    "plan".into()
}

/// Usage-event batching (see [`crate::events`]).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EventSettings {
    /// A batch holds at most this many events.
    pub batch_size: usize,
    /// At most this many events wait per isolate; past it the oldest are dropped and counted.
    pub buffer_cap: usize,
    /// How long a flusher waits for more events before sending.
    pub flush_delay_ms: u64,
    /// First retry delay; doubles per failure up to `retry_max_ms`.
    pub retry_initial_ms: u64,
    /// Longest retry delay.
    pub retry_max_ms: u64,
    /// Attempts per batch within one flusher (bounded by `ctx.wait_until`'s 30 s); a batch
    /// that still fails goes back to the buffer for the next flusher.
    pub max_attempts: u32,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            batch_size: 100,
            buffer_cap: 10_000,
            flush_delay_ms: 1_000,
            retry_initial_ms: 200,
            retry_max_ms: 5_000,
            max_attempts: 6,
        }
    }
}

/// Knobs that exist only for the end-to-end tests. With `clock_header`, a request's `now` is
/// read from that header (Unix milliseconds) instead of the clock, so the conformance vectors,
/// whose steps carry fixed timestamps, replay exactly. It hands clients control over limiting,
/// so it must be switched on with `enabled: true` spelled out. Never ship it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TestOnly {
    /// Must be `true`: a guard against a copied config turning this on by accident.
    pub enabled: bool,
    /// Request header holding `now` in Unix milliseconds.
    #[serde(default)]
    pub clock_header: Option<String>,
}

/// Why a configuration document was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON, or a field the document does not know.
    #[error("config document: {0}")]
    Document(#[from] serde_json::Error),
    /// The policy does not compile.
    #[error("config document: policy: {0}")]
    Policy(#[from] tollgate_core::PolicyError),
    /// A value out of range.
    #[error("config document: {field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: &'static str,
    },
}

/// A compiled configuration, ready for requests.
#[derive(Debug)]
pub struct WorkerConfig {
    /// The compiled policy.
    pub policy: Policy,
    /// The document it came from.
    pub document: Document,
    /// A stable fingerprint of the document's text: the Durable Objects compare it with their
    /// own copy and reload from KV when it differs.
    pub version: u64,
    /// Whether the policy has a `global` scope rule (then all counters live in one object).
    pub has_global_rule: bool,
}

impl WorkerConfig {
    /// Parses and compiles a document; refuses it whole.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let document: Document = serde_json::from_str(text)?;
        let policy = Policy::from_json(&document.policy.to_string())?;
        if document.shards == 0 || document.shards > 1_000_000 {
            return Err(ConfigError::Invalid {
                field: "shards",
                message: "must be between 1 and 1000000",
            });
        }
        let e = &document.events;
        if e.batch_size == 0 || e.buffer_cap < e.batch_size || e.max_attempts == 0 {
            return Err(ConfigError::Invalid {
                field: "events",
                message: "batch_size and max_attempts must be positive, buffer_cap >= batch_size",
            });
        }
        if document.test_only.as_ref().is_some_and(|t| !t.enabled) {
            return Err(ConfigError::Invalid {
                field: "test_only.enabled",
                message: "remove `test_only`, or set `enabled: true` in a test deployment",
            });
        }
        let has_global_rule = policy.has_scope(Scope::Global);
        Ok(Self {
            policy,
            version: tollgate_core::hash::fingerprint(text.as_bytes()),
            has_global_rule,
            document,
        })
    }

    /// The test clock header, when the test-only switch is on.
    pub fn clock_header(&self) -> Option<&str> {
        self.document
            .test_only
            .as_ref()
            .filter(|t| t.enabled)
            .and_then(|t| t.clock_header.as_deref())
    }

    /// The Durable Object (by name) holding every counter this caller's decision touches.
    ///
    /// A decision charges user-, org- and global-scope counters together, and only one object
    /// can change them atomically, so: with a global rule, one object for everyone; otherwise
    /// one per shard of orgs (a caller without an org is its own org, as in the core's counter
    /// keys). An object serves about 1,000 requests/s, which bounds one org (or, with a global
    /// rule, the whole deployment) to that rate through the limiter.
    pub fn shard_for(&self, identity: &tollgate_core::Identity) -> String {
        if self.has_global_rule {
            return "global".into();
        }
        let subject = match (&identity.org, &identity.user) {
            (Some(org), _) => format!("o:{org}"),
            (None, Some(user)) => format!("u:{user}"),
            (None, None) => "anon".into(),
        };
        let shard =
            tollgate_core::hash::fingerprint(subject.as_bytes()) % u64::from(self.document.shards);
        format!("shard-{shard}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"{"version":1,"rules":[{"name":"api","algorithm":"fixed_window","limit":2,"window":"1m"}]}"#;

    #[test]
    fn a_good_document_compiles_and_a_bad_one_is_refused_whole() {
        let good = format!(r#"{{"policy":{POLICY}}}"#);
        let config = WorkerConfig::parse(&good).unwrap();
        assert!(!config.has_global_rule);
        assert_eq!(config.document.shards, 64);
        assert_eq!(config.clock_header(), None);

        for (bad, needle) in [
            ("{", "config document"),
            (
                r#"{"policy":{"version":1,"rules":[{"name":"x"}]}}"#,
                "policy",
            ),
            (&format!(r#"{{"policy":{POLICY},"shards":0}}"#), "shards"),
            (&format!(r#"{{"policy":{POLICY},"nope":1}}"#), "nope"),
            (
                &format!(r#"{{"policy":{POLICY},"test_only":{{"enabled":false}}}}"#),
                "test_only.enabled",
            ),
        ] {
            let error = WorkerConfig::parse(bad).unwrap_err().to_string();
            assert!(error.contains(needle), "{bad}: {error}");
        }
    }

    #[test]
    fn a_global_rule_puts_every_caller_in_one_object() {
        let doc = r#"{"policy":{"version":1,"rules":[{"name":"g","scope":"global","algorithm":"fixed_window","limit":2,"window":"1m"}]},
                      "test_only":{"enabled":true,"clock_header":"x-test-now-ms"}}"#;
        let config = WorkerConfig::parse(doc).unwrap();
        assert!(config.has_global_rule);
        assert_eq!(config.clock_header(), Some("x-test-now-ms"));
        let anyone = config.policy.identify(&Default::default());
        assert_eq!(config.shard_for(&anyone), "global");
    }

    #[test]
    fn callers_of_one_org_share_a_shard() {
        let config = WorkerConfig::parse(&format!(r#"{{"policy":{POLICY},"shards":8}}"#)).unwrap();
        let mut a = config.policy.identify(&Default::default());
        a.org = Some("acme".into());
        a.user = Some("alice".into());
        let mut b = a.clone();
        b.user = Some("bob".into());
        assert_eq!(config.shard_for(&a), config.shard_for(&b));
        assert!(config.shard_for(&a).starts_with("shard-"));
    }
}
