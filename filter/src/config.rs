//! The plugin `configuration` JSON and its one-step compilation into a [`Runtime`] config.
//!
//! The document is validated whole and rejected whole: any error names the field
//! (`collector.timeout_ms`, `policy.rules[0].window`) and `on_configure` returns false, so Envoy
//! refuses the filter at load instead of running half of a configuration.

use std::time::Duration;

use serde::Deserialize;
use tollgate_core::gate::GateOptions;
use tollgate_core::Policy;

/// Upper bound on `slots`: 16 Mi slots is ~4 GiB of shared data, past any sane deployment.
pub const MAX_SLOTS: u32 = 1 << 24;

/// The plugin configuration as written in Envoy's `configuration` field.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// The core's policy document (see `docs/policy.md`): plans, rules, keys, identity
    /// sources, header families, failure mode.
    pub policy: serde_json::Value,
    /// Status path and paths never limited nor reported.
    #[serde(default)]
    pub gate: GateOptions,
    /// Where usage events go; no events are sent when absent.
    #[serde(default)]
    pub collector: Option<CollectorConfig>,
    /// A batch is sent at least this often when events are waiting.
    #[serde(default = "defaults::flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// A batch is sent as soon as this many events are waiting, and holds at most this many.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// At most this many events wait for the collector; past it the oldest are dropped (and
    /// counted in `tollgate.events_dropped`).
    #[serde(default = "defaults::buffer_cap")]
    pub buffer_cap: usize,
    /// First retry delay after a failed send; doubles per failure, with jitter.
    #[serde(default = "defaults::retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Longest retry delay.
    #[serde(default = "defaults::retry_max_ms")]
    pub retry_max_ms: u64,
    /// A response header whose integer value is the request's real cost (e.g. `x-usage-tokens`):
    /// charged after the response, so the next request pays.
    #[serde(default)]
    pub cost_header: Option<String>,
    /// The node name in usage events; default Envoy's `node.id`, else `envoy`.
    #[serde(default)]
    pub node: Option<String>,
    /// Where verified JWT claims are found in dynamic metadata.
    #[serde(default)]
    pub claims: ClaimsConfig,
    /// An HTTP URL polled for a new policy (ETag / If-None-Match); needs `config_cluster`.
    #[serde(default)]
    pub config_url: Option<String>,
    /// The Envoy cluster that serves `config_url`.
    #[serde(default)]
    pub config_cluster: Option<String>,
    /// How often `config_url` is polled.
    #[serde(default = "defaults::config_poll_ms")]
    pub config_poll_ms: u64,
    /// Slots in shared data, one per subject (a caller, an org, the global scope): memory is
    /// flat at `slots` entries whatever the number of callers; size it above the number of
    /// subjects live in one window so evictions stay rare.
    #[serde(default = "defaults::slots")]
    pub slots: u32,
    /// Test-only knobs; see [`TestOnly`].
    #[serde(default)]
    pub test_only: Option<TestOnly>,
}

/// The collector endpoint.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// Envoy cluster of the collector (with health checks and circuit breakers).
    pub cluster: String,
    /// Path events are POSTed to.
    #[serde(default = "defaults::collector_path")]
    pub path: String,
    /// `:authority` of the calls.
    #[serde(default = "defaults::collector_authority")]
    pub authority: String,
    /// Bearer token for the collector, if it wants one.
    #[serde(default)]
    pub token: Option<String>,
    /// Call timeout: short, so a stuck collector costs a retry, not a stuck queue.
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
}

/// Where Envoy's `jwt_authn` filter put the verified payload (`payload_in_metadata`), and which
/// claims mean what. Only metadata is read: a JWT in a header is never trusted here.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ClaimsConfig {
    /// Dynamic-metadata namespace.
    pub namespace: String,
    /// `payload_in_metadata` of the provider.
    pub payload_key: String,
    /// Claim naming the user.
    pub sub: String,
    /// Claim naming the org.
    pub org: String,
    /// Claim naming the plan (tier).
    pub plan: String,
}

impl Default for ClaimsConfig {
    fn default() -> Self {
        Self {
            namespace: "envoy.filters.http.jwt_authn".into(),
            payload_key: "jwt_payload".into(),
            sub: "sub".into(),
            org: "org".into(),
            plan: "plan".into(),
        }
    }
}

/// Knobs that exist only for the end-to-end tests. With `clock_header`, a request's `now` is
/// read from that header (Unix milliseconds) instead of the host clock, so the conformance
/// vectors, whose steps carry fixed timestamps, replay exactly through Envoy. With
/// `fail_store`, counter reads fail, so the failure mode can be observed. Both hand clients or
/// the config control over limiting, so they must be switched on with `enabled: true` spelled
/// out, and the filter logs a warning at every configure. Never ship them.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestOnly {
    /// Must be `true`: a guard against a copied config turning this on by accident.
    pub enabled: bool,
    /// Request header holding `now` in Unix milliseconds.
    #[serde(default)]
    pub clock_header: Option<String>,
    /// Make every counter read fail, to exercise the policy's failure mode (the shared-data
    /// host cannot be made to fail on demand).
    #[serde(default)]
    pub fail_store: bool,
}

mod defaults {
    pub fn flush_interval_ms() -> u64 {
        1_000
    }
    pub fn batch_size() -> usize {
        100
    }
    pub fn buffer_cap() -> usize {
        10_000
    }
    pub fn retry_initial_ms() -> u64 {
        200
    }
    pub fn retry_max_ms() -> u64 {
        10_000
    }
    pub fn config_poll_ms() -> u64 {
        10_000
    }
    pub fn slots() -> u32 {
        65_536
    }
    pub fn collector_path() -> String {
        "/v1/events".into()
    }
    pub fn collector_authority() -> String {
        "collector".into()
    }
    pub fn timeout_ms() -> u64 {
        1_000
    }
}

/// A configuration that cannot be used, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration at {field}: {message}")]
pub struct ConfigError {
    /// Path to the field, e.g. `collector.timeout_ms` or `policy.rules[0].limit`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Collector settings, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Collector {
    /// Envoy cluster.
    pub cluster: String,
    /// POST path.
    pub path: String,
    /// `:authority`.
    pub authority: String,
    /// `authorization` header value, if any.
    pub authorization: Option<String>,
    /// Call timeout.
    pub timeout: Duration,
}

/// Event batching settings, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batching {
    /// Longest wait before a partial batch goes.
    pub flush_interval: Duration,
    /// Events per batch.
    pub batch_size: usize,
    /// Events held at most.
    pub buffer_cap: usize,
    /// First retry delay.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

/// The policy source polled for updates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySource {
    /// Envoy cluster.
    pub cluster: String,
    /// `:authority`.
    pub authority: String,
    /// `:path`.
    pub path: String,
    /// Poll period.
    pub every: Duration,
}

/// Everything but the policy, checked: what the root context keeps across policy swaps.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Status and skip paths.
    pub gate: GateOptions,
    /// Events go here.
    pub collector: Option<Collector>,
    /// Batching and retries.
    pub batching: Batching,
    /// Weighted-cost header (lower case).
    pub cost_header: Option<String>,
    /// Node name override.
    pub node: Option<String>,
    /// Claims lookup.
    pub claims: ClaimsConfig,
    /// Policy polling.
    pub policy_source: Option<PolicySource>,
    /// Slots of the counter table, one per subject.
    pub slots: u32,
    /// Test-only clock header (lower case).
    pub clock_header: Option<String>,
    /// Test-only: every counter read fails.
    pub fail_store: bool,
}

/// A compiled configuration: the policy and the settings.
#[derive(Debug)]
pub struct Compiled {
    /// The policy the engine runs.
    pub policy: Policy,
    /// The rest.
    pub settings: Settings,
}

impl Compiled {
    /// Parses and compiles the plugin configuration, naming the first bad field.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let config: FilterConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." {
                "(document)".to_string()
            } else {
                field
            };
            ConfigError::new(field, e.into_inner().to_string())
        })?;
        Self::try_from(config)
    }
}

/// Splits `http://authority/path` into its authority and path.
fn split_http_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    (!authority.is_empty()).then(|| (authority.to_string(), path.to_string()))
}

fn positive(field: &str, value: u64) -> Result<Duration, ConfigError> {
    if value == 0 {
        return Err(ConfigError::new(field, "must be greater than 0"));
    }
    Ok(Duration::from_millis(value))
}

fn header_name(field: &str, name: &str) -> Result<String, ConfigError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
    if !ok {
        return Err(ConfigError::new(
            field,
            format!("'{name}' is not an HTTP header name"),
        ));
    }
    Ok(name.to_ascii_lowercase())
}

fn non_empty(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::new(field, "must not be empty"));
    }
    Ok(())
}

fn path_like(field: &str, value: &str) -> Result<(), ConfigError> {
    if !value.starts_with('/') {
        return Err(ConfigError::new(
            field,
            format!("'{value}' must start with '/'"),
        ));
    }
    Ok(())
}

impl TryFrom<FilterConfig> for Compiled {
    type Error = ConfigError;

    fn try_from(c: FilterConfig) -> Result<Self, ConfigError> {
        let policy = Policy::from_json(&c.policy.to_string()).map_err(|e| {
            let field = if e.field.starts_with('[') {
                format!("policy{}", e.field)
            } else {
                format!("policy.{}", e.field)
            };
            ConfigError::new(field, e.message)
        })?;

        if let Some(status) = &c.gate.status_path {
            path_like("gate.status_path", status)?;
        }
        for (i, p) in c.gate.skip_paths.iter().enumerate() {
            path_like(&format!("gate.skip_paths[{i}]"), p)?;
        }

        let collector = match c.collector {
            None => None,
            Some(col) => {
                non_empty("collector.cluster", &col.cluster)?;
                path_like("collector.path", &col.path)?;
                non_empty("collector.authority", &col.authority)?;
                let timeout = positive("collector.timeout_ms", col.timeout_ms)?;
                if let Some(token) = &col.token {
                    non_empty("collector.token", token)?;
                }
                Some(Collector {
                    cluster: col.cluster,
                    path: col.path,
                    authority: col.authority,
                    authorization: col.token.map(|t| format!("Bearer {t}")),
                    timeout,
                })
            }
        };

        let flush_interval = positive("flush_interval_ms", c.flush_interval_ms)?;
        if c.batch_size == 0 || c.batch_size > 10_000 {
            return Err(ConfigError::new("batch_size", "must be 1 to 10000"));
        }
        if c.buffer_cap < c.batch_size {
            return Err(ConfigError::new(
                "buffer_cap",
                format!("must be at least batch_size ({})", c.batch_size),
            ));
        }
        let retry_initial = positive("retry_initial_ms", c.retry_initial_ms)?;
        let retry_max = positive("retry_max_ms", c.retry_max_ms)?;
        if retry_max < retry_initial {
            return Err(ConfigError::new(
                "retry_max_ms",
                "must be at least retry_initial_ms",
            ));
        }

        let cost_header = c
            .cost_header
            .as_deref()
            .map(|h| header_name("cost_header", h))
            .transpose()?;
        if let Some(node) = &c.node {
            non_empty("node", node)?;
        }
        non_empty("claims.namespace", &c.claims.namespace)?;
        non_empty("claims.payload_key", &c.claims.payload_key)?;
        non_empty("claims.sub", &c.claims.sub)?;

        let policy_source = match (c.config_url, c.config_cluster) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "config_cluster",
                    "is required with config_url (the Envoy cluster that serves it)",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "config_url",
                    "is required with config_cluster",
                ))
            }
            (Some(url), Some(cluster)) => {
                let (authority, path) = split_http_url(&url).ok_or_else(|| {
                    ConfigError::new("config_url", format!("'{url}' is not an http:// URL"))
                })?;
                non_empty("config_cluster", &cluster)?;
                Some(PolicySource {
                    cluster,
                    authority,
                    path,
                    every: positive("config_poll_ms", c.config_poll_ms)?,
                })
            }
        };

        if c.slots == 0 || c.slots > MAX_SLOTS {
            return Err(ConfigError::new(
                "slots",
                format!("must be 1 to {MAX_SLOTS}"),
            ));
        }

        let (clock_header, fail_store) = match c.test_only {
            None => (None, false),
            Some(t) => {
                if !t.enabled {
                    return Err(ConfigError::new(
                        "test_only.enabled",
                        "must be true when test_only is present (or remove test_only)",
                    ));
                }
                let clock = t
                    .clock_header
                    .as_deref()
                    .map(|h| header_name("test_only.clock_header", h))
                    .transpose()?;
                (clock, t.fail_store)
            }
        };

        Ok(Self {
            policy,
            settings: Settings {
                gate: c.gate,
                collector,
                batching: Batching {
                    flush_interval,
                    batch_size: c.batch_size,
                    buffer_cap: c.buffer_cap,
                    retry_initial,
                    retry_max,
                },
                cost_header,
                node: c.node,
                claims: c.claims,
                policy_source,
                slots: c.slots,
                clock_header,
                fail_store,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(json: &str) -> String {
        match Compiled::from_json(json.as_bytes()) {
            Ok(_) => "ok".into(),
            Err(e) => e.field,
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"policy":{"version":1}}"#, "ok"),
            (r#"{}"#, "(document)"),
            (r#"{"policy":{"version":2}}"#, "policy.version"),
            (
                r#"{"policy":{"version":1,"rules":[{"name":"a","algorithm":"gcra","limit":1}]}}"#,
                "policy.rules[0].window",
            ),
            (r#"{"policy":{"version":1},"bogus":1}"#, "bogus"),
            (
                r#"{"policy":{"version":1},"collector":{"cluster":"c","timeout_ms":0}}"#,
                "collector.timeout_ms",
            ),
            (
                r#"{"policy":{"version":1},"collector":{"cluster":"c","path":"x"}}"#,
                "collector.path",
            ),
            (
                r#"{"policy":{"version":1},"batch_size":10,"buffer_cap":5}"#,
                "buffer_cap",
            ),
            (r#"{"policy":{"version":1},"slots":0}"#, "slots"),
            (
                r#"{"policy":{"version":1},"cost_header":"x usage"}"#,
                "cost_header",
            ),
            (
                r#"{"policy":{"version":1},"config_url":"http://cfg/p"}"#,
                "config_cluster",
            ),
            (
                r#"{"policy":{"version":1},"config_url":"https://cfg/p","config_cluster":"c"}"#,
                "config_url",
            ),
            (
                r#"{"policy":{"version":1},"test_only":{"enabled":false,"clock_header":"x-now"}}"#,
                "test_only.enabled",
            ),
            (
                r#"{"policy":{"version":1},"gate":{"skip_paths":["healthz"]}}"#,
                "gate.skip_paths[0]",
            ),
        ];
        for (json, want) in cases {
            assert_eq!(field_of(json), want, "{json}");
        }
    }

    #[test]
    fn unknown_nested_fields_are_named() {
        let e =
            Compiled::from_json(br#"{"policy":{"version":1},"collector":{"cluster":"c","x":1}}"#)
                .unwrap_err();
        assert_eq!(e.field, "collector.x");
        assert!(e.message.contains("unknown field `x`"), "{}", e.message);
    }

    #[test]
    fn defaults_and_urls() {
        let c = Compiled::from_json(
            br#"{"policy":{"version":1},"config_url":"http://cfg:8080/policy.json","config_cluster":"cfg","cost_header":"X-Usage-Tokens"}"#,
        )
        .unwrap();
        let s = c.settings;
        assert_eq!(s.slots, 65_536);
        assert_eq!(s.batching.batch_size, 100);
        assert_eq!(s.cost_header.as_deref(), Some("x-usage-tokens"));
        let src = s.policy_source.unwrap();
        assert_eq!(
            (src.authority.as_str(), src.path.as_str()),
            ("cfg:8080", "/policy.json")
        );
        assert_eq!(
            s.gate.status_path.as_deref(),
            Some("/.well-known/ratelimit")
        );
    }
}
