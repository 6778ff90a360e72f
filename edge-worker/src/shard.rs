//! What a counter shard (one Durable Object) does, free of the Workers runtime so it runs and is
//! tested natively: the messages the Worker sends it, the counter store it keeps, and the calls
//! into `tollgate-core` it makes.
//!
//! The Worker sends the whole gate request ([`GateInput`]: method, path, the headers the policy
//! reads, client address, verified claims, cost, `now`) to the caller's shard, and the shard
//! runs [`Policy::gate`] over its [`ShardStore`] in one synchronous call. A Durable Object runs
//! one event at a time and the gate never awaits, so every decision sees the previous one's
//! counters: enforcement is exact, with no CAS conflicts. The store then hands back the counters
//! it changed ([`ShardStore::take_dirty`]) for the object to write to its storage.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tollgate_core::decision::Lease;
use tollgate_core::engine::{CounterStore, Stored};
use tollgate_core::gate::{split_query, GateAction, GateOptions, HttpRequest};
use tollgate_core::policy::Claims;
use tollgate_core::{CounterKey, Policy, Request, Timestamp, Verdict};

/// Prefix of counter keys in Durable Object storage.
pub const STORAGE_PREFIX: &str = "c:";

/// Verified JWT claims, owned (to travel to the shard).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedClaims {
    /// Subject (user).
    pub sub: Option<String>,
    /// Org.
    pub org: Option<String>,
    /// Plan.
    pub plan: Option<String>,
}

impl OwnedClaims {
    /// Borrowed, as the core takes them.
    pub fn as_claims(&self) -> Claims<'_> {
        Claims {
            sub: self.sub.as_deref(),
            org: self.org.as_deref(),
            plan: self.plan.as_deref(),
        }
    }
}

/// A request as the gate sees it, owned: what the Worker sends its shard.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateInput {
    /// Fingerprint of the config document the Worker decided with (see
    /// [`crate::config::WorkerConfig::version`]).
    pub config_version: u64,
    /// HTTP method.
    pub method: String,
    /// Path with query.
    pub path: String,
    /// Only the headers the policy reads (API key headers, bypass header), lower-case names.
    pub headers: Vec<(String, String)>,
    /// The client address (`CF-Connecting-IP`).
    pub client_ip: Option<String>,
    /// Verified claims, when a JWT was verified.
    pub claims: Option<OwnedClaims>,
    /// Units the request costs up front.
    pub cost: u64,
    /// `now`, ns since the epoch.
    pub now_ns: u64,
}

impl GateInput {
    /// Keeps only the headers `policy` reads, with lower-case names.
    pub fn new(
        policy: &Policy,
        header: &dyn Fn(&str) -> Option<String>,
        method: &str,
        path: &str,
    ) -> Self {
        let ident = &policy.identity;
        let headers = ident
            .api_key_headers
            .iter()
            .chain(std::iter::once(&ident.bypass_header))
            // Lower-cased when the policy compiled.
            .filter_map(|name| header(name).map(|value| (name.clone(), value)))
            .collect();
        Self {
            method: method.to_string(),
            path: path.to_string(),
            headers,
            cost: 1,
            ..Self::default()
        }
    }

    /// The header lookup the core wants.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    /// Runs `f` with this input as the core's [`HttpRequest`].
    pub fn with_request<T>(&self, f: impl FnOnce(&HttpRequest<'_>) -> T) -> T {
        let lookup = |name: &str| self.header(name);
        let req = HttpRequest {
            method: &self.method,
            path: &self.path,
            header: &lookup,
            client_ip: self.client_ip.as_deref(),
            claims: self.claims.as_ref().map(OwnedClaims::as_claims),
            cost: self.cost,
        };
        f(&req)
    }
}

/// A concurrency lease, owned (to travel back to the shard for release).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseWire {
    /// Rule name.
    pub rule: String,
    /// Counter key.
    pub key: String,
    /// Units held.
    pub cost: u64,
}

impl From<&Lease> for LeaseWire {
    fn from(lease: &Lease) -> Self {
        Self {
            rule: lease.rule.to_string(),
            key: lease.key.as_str().to_string(),
            cost: lease.cost,
        }
    }
}

impl LeaseWire {
    /// The core's lease.
    pub fn to_lease(&self) -> Lease {
        Lease {
            rule: Arc::from(self.rule.as_str()),
            key: CounterKey::from(self.key.as_str()),
            cost: self.cost,
        }
    }
}

/// What the Worker asks its shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ShardCall {
    /// Decide (or answer the status path).
    Gate(GateInput),
    /// Release concurrency leases at the end of a request.
    Release {
        /// Config version.
        config_version: u64,
        /// The leases.
        leases: Vec<LeaseWire>,
        /// `now`, ns.
        now_ns: u64,
    },
    /// Charge post-response cost (the input's `cost` is the extra units).
    Charge(GateInput),
}

impl ShardCall {
    /// The config version the Worker used.
    pub fn config_version(&self) -> u64 {
        match self {
            Self::Gate(input) | Self::Charge(input) => input.config_version,
            Self::Release { config_version, .. } => *config_version,
        }
    }
}

/// The shard's answer, which the Worker turns into a response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum GateReply {
    /// Not limited nor reported: forward.
    Skip,
    /// The status path: answer 200 with `body` (JSON).
    Status {
        /// The status report.
        body: String,
    },
    /// Allowed: forward, adding `headers` to the origin's response.
    Proceed {
        /// Limiter headers.
        headers: Vec<(String, String)>,
        /// Verdict (for the usage event).
        verdict: Verdict,
        /// Deciding rule.
        rule: Option<String>,
        /// Concurrency leases to release when the response is done.
        leases: Vec<LeaseWire>,
    },
    /// Refused: answer `status` with `headers` and `body`.
    Reject {
        /// 429 or 503.
        status: u16,
        /// Limiter headers plus `content-type`.
        headers: Vec<(String, String)>,
        /// JSON body.
        body: String,
        /// Verdict.
        verdict: Verdict,
        /// Deciding rule.
        rule: Option<String>,
    },
    /// Acknowledges a release or charge.
    Done,
}

fn owned_headers(headers: Vec<(&'static str, String)>) -> Vec<(String, String)> {
    headers
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// Runs one call against the shard's counters.
pub fn handle(
    policy: &Policy,
    options: &GateOptions,
    call: &ShardCall,
    store: &mut ShardStore,
) -> GateReply {
    match call {
        ShardCall::Gate(input) => {
            let now = Timestamp::from_nanos(input.now_ns);
            let action = input.with_request(|req| policy.gate(options, req, now, store));
            match action {
                GateAction::Skip => GateReply::Skip,
                GateAction::Status { body, .. } => GateReply::Status { body },
                GateAction::Proceed {
                    decision, headers, ..
                } => GateReply::Proceed {
                    headers: owned_headers(headers),
                    verdict: decision.verdict,
                    rule: decision.rule.as_deref().map(str::to_string),
                    leases: decision.leases.iter().map(LeaseWire::from).collect(),
                },
                GateAction::Reject {
                    decision,
                    status,
                    headers,
                    body,
                    ..
                } => GateReply::Reject {
                    status,
                    headers: owned_headers(headers),
                    body,
                    verdict: decision.verdict,
                    rule: decision.rule.as_deref().map(str::to_string),
                },
            }
        }
        ShardCall::Release { leases, now_ns, .. } => {
            for lease in leases {
                policy.release(&lease.to_lease(), Timestamp::from_nanos(*now_ns), store);
            }
            GateReply::Done
        }
        ShardCall::Charge(input) => {
            input.with_request(|req| {
                let mut key = None;
                let identity = policy.identify(&policy.credentials(req, &mut key));
                let (path, _) = split_query(req.path);
                let engine_req = Request {
                    identity: &identity,
                    method: req.method,
                    path,
                    cost: 0,
                };
                policy.charge(
                    &engine_req,
                    Timestamp::from_nanos(input.now_ns),
                    input.cost,
                    store,
                );
            });
            GateReply::Done
        }
    }
}

/// A shard's counters: in memory (the object is single-threaded), loaded whole from Durable
/// Object storage when the object starts, with the keys changed since the last write remembered
/// so only they are written back.
#[derive(Debug, Default)]
pub struct ShardStore {
    counters: HashMap<String, (Vec<u8>, u64)>,
    dirty: BTreeSet<String>,
}

impl ShardStore {
    /// A store holding `counters` (key → encoded state), as read from storage.
    pub fn from_stored(counters: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        Self {
            counters: counters.into_iter().map(|(k, v)| (k, (v, 1))).collect(),
            dirty: BTreeSet::new(),
        }
    }

    /// Counters held.
    pub fn len(&self) -> usize {
        self.counters.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }

    /// The counters changed since the last call, as (storage key, hex state).
    pub fn take_dirty(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.dirty)
            .into_iter()
            .filter_map(|key| {
                let (bytes, _) = self.counters.get(&key)?;
                Some((format!("{STORAGE_PREFIX}{key}"), to_hex(bytes)))
            })
            .collect()
    }
}

impl CounterStore for ShardStore {
    type Error = core::convert::Infallible;

    fn load(&mut self, key: &CounterKey) -> Result<Stored, Self::Error> {
        Ok(match self.counters.get(key.as_str()) {
            Some((bytes, version)) => Stored {
                bytes: Some(bytes.clone()),
                version: *version,
            },
            None => Stored::default(),
        })
    }

    fn store(&mut self, key: &CounterKey, bytes: &[u8], version: u64) -> Result<bool, Self::Error> {
        let entry = self
            .counters
            .entry(key.as_str().to_string())
            .or_insert_with(|| (Vec::new(), 0));
        if entry.1 != version {
            return Ok(false);
        }
        *entry = (bytes.to_vec(), version + 1);
        self.dirty.insert(key.as_str().to_string());
        Ok(true)
    }
}

/// Lower-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses [`to_hex`] output; `None` for anything else.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::MemoryStore;

    const POLICY: &str = r#"{"version":1,
        "keys":[{"id":"alice","hash":"sha256:f2b3608ea94a96fb7ae8550d5d04fe5b4a9986e07e83d55d5d5f5073db2c5672","org":"acme"}],
        "rules":[{"name":"api","algorithm":"fixed_window","limit":2,"window":"1m"}]}"#;

    fn input(now_ms: u64) -> GateInput {
        GateInput {
            method: "GET".into(),
            path: "/v1/items?x=1".into(),
            headers: vec![("x-api-key".into(), "sk_alice".into())],
            cost: 1,
            now_ns: now_ms * 1_000_000,
            ..GateInput::default()
        }
    }

    #[test]
    fn the_shard_answers_exactly_as_the_core_with_a_memory_store() {
        let policy = Policy::from_json(POLICY).unwrap();
        let options = GateOptions::default();
        let mut shard = ShardStore::default();
        let mut reference = MemoryStore::new();
        for step in 0..4 {
            let input = input(1_800_000_000_000 + step);
            let got = handle(
                &policy,
                &options,
                &ShardCall::Gate(input.clone()),
                &mut shard,
            );
            let want = input.with_request(|req| {
                policy.gate(
                    &options,
                    req,
                    Timestamp::from_nanos(input.now_ns),
                    &mut reference,
                )
            });
            match (got, want) {
                (GateReply::Proceed { headers, .. }, GateAction::Proceed { headers: h, .. }) => {
                    assert_eq!(headers, owned_headers(h));
                }
                (
                    GateReply::Reject {
                        status,
                        headers,
                        body,
                        ..
                    },
                    GateAction::Reject {
                        status: s,
                        headers: h,
                        body: b,
                        ..
                    },
                ) => {
                    assert_eq!((status, headers, body), (s, owned_headers(h), b));
                }
                (got, want) => panic!("step {step}: {got:?} vs {want:?}"),
            }
        }
    }

    #[test]
    fn changed_counters_are_handed_back_once_and_reload_to_the_same_answers() {
        let policy = Policy::from_json(POLICY).unwrap();
        let options = GateOptions::default();
        let mut shard = ShardStore::default();
        handle(
            &policy,
            &options,
            &ShardCall::Gate(input(1_800_000_000_000)),
            &mut shard,
        );
        let dirty = shard.take_dirty();
        // `api`, plus the built-in `free` plan's rules the caller falls under.
        assert!(dirty.iter().all(|(k, _)| k.starts_with(STORAGE_PREFIX)));
        assert!(
            dirty.iter().any(|(k, _)| k.starts_with("c:api|")),
            "{dirty:?}"
        );
        assert!(shard.take_dirty().is_empty());

        // A restarted object loads its storage and continues where it was.
        let mut reloaded = ShardStore::from_stored(dirty.iter().map(|(k, v)| {
            (
                k.strip_prefix(STORAGE_PREFIX).unwrap().to_string(),
                from_hex(v).unwrap(),
            )
        }));
        let second = handle(
            &policy,
            &options,
            &ShardCall::Gate(input(1_800_000_000_001)),
            &mut reloaded,
        );
        assert!(matches!(second, GateReply::Proceed { .. }));
        let third = handle(
            &policy,
            &options,
            &ShardCall::Gate(input(1_800_000_000_002)),
            &mut reloaded,
        );
        assert!(
            matches!(third, GateReply::Reject { status: 429, .. }),
            "{third:?}"
        );
    }

    #[test]
    fn only_the_headers_the_policy_reads_travel() {
        let policy = Policy::from_json(POLICY).unwrap();
        let lookup = |name: &str| match name {
            "x-api-key" => Some("sk_alice".to_string()),
            "cookie" => Some("secret".to_string()),
            _ => None,
        };
        let input = GateInput::new(&policy, &lookup, "GET", "/");
        assert_eq!(
            input.headers,
            vec![("x-api-key".to_string(), "sk_alice".to_string())]
        );
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(
            from_hex(&to_hex(&[0, 1, 254, 255])).unwrap(),
            vec![0, 1, 254, 255]
        );
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }
}
