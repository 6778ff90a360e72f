//! The decision protocol: which counters a request touches, and how they are updated in a
//! store that offers only read and compare-and-swap.
//!
//! **Multi-tier consumption uses refunds, not two-phase commit.** Each applicable rule is
//! decided and committed on its own counter with a CAS loop, in priority order; if a later
//! enforcing rule denies, the units already taken from earlier rules are given back. Two-phase
//! commit would need a lock or a multi-key transaction, which proxy-wasm shared data does not
//! have, and a Durable Object does not need. The cost of refunds: between the take and the
//! refund another request can see a counter that is briefly `cost` lower than it will settle —
//! at most one request's cost per concurrent in-flight denial, and only on the conservative
//! side (it can cause an extra denial, never an extra grant).
//!
//! Shadow rules are decided and charged like enforcing ones (so their counts are real) but a
//! shadow denial lets the request through and is reported; shadow rules never appear in
//! client-facing headers.

use std::sync::Arc;

use crate::algorithm::{LimitKind, Outcome};
use crate::decision::{Decision, Lease, RuleStatus, Verdict};
use crate::hash;
use crate::policy::document::{FailureMode, Mode, Scope};
use crate::policy::CompiledRule;
use crate::policy::{Identity, Policy};
use crate::time::Timestamp;

/// How many times a counter update is retried on CAS conflicts before the failure mode applies.
pub const MAX_CAS_ATTEMPTS: u32 = 8;

/// The name of one counter: `<rule>|<subject>`. Rule names cannot contain `|`, so keys of
/// different rules never collide whatever the subject holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey(String);

impl CounterKey {
    fn new(rule: &str, scope: Scope, identity: &Identity) -> Self {
        // One allocation, no formatting machinery: this runs for every tier of every request.
        let (tag, name) = match (scope, &identity.org, &identity.user) {
            (Scope::Global, _, _) => ("g", ""),
            (Scope::Org, Some(org), _) => ("o:", &org[..]),
            // Without an org the caller is its own org.
            (Scope::Org | Scope::User, _, Some(user)) => ("u:", &user[..]),
            (Scope::Org | Scope::User, _, None) => ("anon", ""),
        };
        let mut key = String::with_capacity(rule.len() + 1 + tag.len() + name.len());
        key.push_str(rule);
        key.push('|');
        key.push_str(tag);
        key.push_str(name);
        Self(key)
    }

    /// The key as text (Durable Object storage keys, shared-data keys, logs).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A stable 64-bit fingerprint (fixed-slot tables).
    pub fn fingerprint(&self) -> u64 {
        hash::fingerprint(self.0.as_bytes())
    }

    /// The rule part of the key.
    pub fn rule(&self) -> &str {
        self.0.split_once('|').map_or(&self.0, |(rule, _)| rule)
    }
}

impl From<&str> for CounterKey {
    fn from(text: &str) -> Self {
        Self(text.to_string())
    }
}

/// One stored counter: its bytes (absent for a key never written) and an opaque version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stored {
    /// Encoded algorithm state.
    pub bytes: Option<Vec<u8>>,
    /// Version to pass back to `store` (the proxy-wasm CAS token, a DO sequence number).
    pub version: u64,
}

/// Counter storage with compare-and-swap: what each runtime provides.
pub trait CounterStore {
    /// A failure of the store itself (not a conflict).
    type Error: core::fmt::Display;

    /// Reads a counter.
    fn load(&mut self, key: &CounterKey) -> Result<Stored, Self::Error>;

    /// Writes `bytes` if the counter is still at `version`; `Ok(false)` on a conflict.
    fn store(&mut self, key: &CounterKey, bytes: &[u8], version: u64) -> Result<bool, Self::Error>;
}

/// What a request is, for the engine.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The caller.
    pub identity: &'a Identity,
    /// HTTP method.
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    /// Units this request costs up front (1 per request unless weighted).
    pub cost: u64,
}

/// One rule as it applies to one request: the (possibly overridden) rule, its counter, and
/// whether it is enforced for this caller.
#[derive(Clone, Debug)]
struct Check {
    rule: Arc<CompiledRule>,
    key: CounterKey,
    enforced: bool,
}

/// Why a counter update failed; runtimes log store errors where they see them (in their
/// `CounterStore`), so only the kind travels here.
#[derive(Debug)]
enum UpdateError {
    Store,
    Conflicts,
}

/// Counts kept while deciding, for the runtime's metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// CAS conflicts that were retried.
    pub cas_retries: u32,
    /// Counters that could not be read or written (errors, or conflicts past the retry limit).
    pub failures: u32,
}

impl Policy {
    /// The checks for a request: applicable rules after overrides, highest priority first.
    /// With `every_endpoint`, endpoint rules apply whatever the request's endpoint (the status
    /// path shows the caller's limits everywhere).
    fn checks(&self, req: &Request<'_>, now: Timestamp, every_endpoint: bool) -> Vec<Check> {
        let id = req.identity;
        let caller = id.user.as_deref().or(id.org.as_deref()).unwrap_or("anon");
        self.applicable_rules(&id.plan, req.method, req.path, every_endpoint)
            .filter_map(|rule| {
                let rule =
                    match self.override_for(&rule.name, id.user.as_deref(), id.org.as_deref(), now)
                    {
                        Some(o) => o.replacement.clone()?, // `None` replacement: lifted
                        None => rule.clone(),
                    };
                let enforced = rule.mode == Mode::Enforce && in_rollout(&rule, caller);
                let key = CounterKey::new(&rule.name, rule.scope, id);
                Some(Check {
                    rule,
                    key,
                    enforced,
                })
            })
            .collect()
    }

    /// Decides a request, charging the counters in `store` when it is allowed.
    pub fn decide<S: CounterStore>(
        &self,
        req: &Request<'_>,
        now: Timestamp,
        store: &mut S,
    ) -> Decision {
        let checks = self.checks(req, now, false);
        let mut stats = StoreStats::default();
        let mut statuses = Vec::with_capacity(checks.len());
        let mut committed: Vec<&Check> = Vec::new();
        let mut denied_by: Option<Arc<str>> = None;
        let mut shadow_denied_by: Option<Arc<str>> = None;
        let mut failed_closed = false;

        for check in &checks {
            let result = if denied_by.is_some() || failed_closed {
                // Already denied: read the rest only so headers can show the tightest limit.
                peek(check, store, now)
            } else {
                acquire(check, store, now, req.cost, &mut stats)
            };
            let outcome = match result {
                Ok(outcome) => outcome,
                Err(_) => {
                    stats.failures += 1;
                    if self.failure_mode == FailureMode::Closed && check.enforced {
                        failed_closed = true;
                    }
                    continue; // open: this counter is skipped, the other tiers still limit
                }
            };
            if denied_by.is_none() && !failed_closed {
                if outcome.allowed {
                    if req.cost > 0 {
                        committed.push(check);
                    }
                } else if check.enforced {
                    denied_by = Some(check.rule.name.clone());
                } else if shadow_denied_by.is_none() {
                    shadow_denied_by = Some(check.rule.name.clone());
                }
            }
            statuses.push(RuleStatus::new(&check.rule, check.enforced, outcome, now));
        }

        let verdict = if denied_by.is_some() || failed_closed {
            for check in &committed {
                let refunded = update(store, &check.key, &mut stats, |bytes| {
                    check.rule.limiter.refund(bytes, now, req.cost)
                });
                if refunded.is_err() {
                    stats.failures += 1;
                    continue;
                }
                // Headers must show what the caller has left after the refund.
                if let Some(s) = statuses.iter_mut().find(|s| s.rule.name == check.rule.name) {
                    s.outcome.remaining = s
                        .outcome
                        .remaining
                        .saturating_add(req.cost)
                        .min(s.outcome.limit);
                }
            }
            Verdict::Limited
        } else if shadow_denied_by.is_some() {
            Verdict::ShadowLimited
        } else {
            Verdict::Allowed
        };
        let leases = if verdict == Verdict::Limited {
            Vec::new()
        } else {
            committed
                .iter()
                .filter(|c| c.rule.limiter.kind() == LimitKind::Concurrency)
                .map(|c| Lease {
                    rule: c.rule.name.clone(),
                    key: c.key.clone(),
                    cost: req.cost,
                })
                .collect()
        };
        Decision {
            verdict,
            rule: denied_by.or(shadow_denied_by),
            failed_closed,
            statuses,
            leases,
            stats,
            bypassed: false,
        }
    }

    /// Every applicable rule's standing for this caller, consuming nothing (the status path).
    pub fn status<S: CounterStore>(
        &self,
        req: &Request<'_>,
        now: Timestamp,
        store: &mut S,
    ) -> Vec<RuleStatus> {
        self.checks(req, now, true)
            .iter()
            .filter_map(|check| {
                let outcome = peek(check, store, now).ok()?;
                Some(RuleStatus::new(&check.rule, check.enforced, outcome, now))
            })
            .collect()
    }

    /// Charges `cost` more units after the response (e.g. tokens reported by the upstream) to
    /// every applicable rate and quota rule, without checking limits: the next request pays.
    pub fn charge<S: CounterStore>(
        &self,
        req: &Request<'_>,
        now: Timestamp,
        cost: u64,
        store: &mut S,
    ) -> StoreStats {
        let mut stats = StoreStats::default();
        if cost == 0 {
            return stats;
        }
        for check in self.checks(req, now, false) {
            if check.rule.limiter.kind() == LimitKind::Concurrency {
                continue;
            }
            if update(store, &check.key, &mut stats, |b| {
                check.rule.limiter.charge(b, now, cost)
            })
            .is_err()
            {
                stats.failures += 1;
            }
        }
        stats
    }

    /// Releases a concurrency lease when its request ends. A lease whose rule is gone (the
    /// policy changed) is dropped: its slot expires on its own.
    pub fn release<S: CounterStore>(
        &self,
        lease: &Lease,
        now: Timestamp,
        store: &mut S,
    ) -> StoreStats {
        let mut stats = StoreStats::default();
        let rule = self.rule_named(&lease.rule);
        if let Some(rule) = rule {
            if update(store, &lease.key, &mut stats, |b| {
                rule.limiter.refund(b, now, lease.cost)
            })
            .is_err()
            {
                stats.failures += 1;
            }
        }
        stats
    }
}

/// Whether `rule` is enforced for `caller`: a stable hash puts each caller in one of 100
/// buckets per rule, and buckets below the rollout percentage are enforced.
fn in_rollout(rule: &CompiledRule, caller: &str) -> bool {
    if rule.rollout_percent >= 100 {
        return true;
    }
    let bucket = hash::fingerprint(format!("{}|{caller}", rule.name).as_bytes()) % 100;
    bucket < u64::from(rule.rollout_percent)
}

fn peek<S: CounterStore>(
    check: &Check,
    store: &mut S,
    now: Timestamp,
) -> Result<Outcome, UpdateError> {
    let stored = store.load(&check.key).map_err(|_| UpdateError::Store)?;
    Ok(check.rule.limiter.peek(stored.bytes.as_deref(), now))
}

fn acquire<S: CounterStore>(
    check: &Check,
    store: &mut S,
    now: Timestamp,
    cost: u64,
    stats: &mut StoreStats,
) -> Result<Outcome, UpdateError> {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let stored = store.load(&check.key).map_err(|_| UpdateError::Store)?;
        let (outcome, bytes) = check
            .rule
            .limiter
            .acquire(stored.bytes.as_deref(), now, cost);
        if !outcome.allowed || cost == 0 {
            return Ok(outcome);
        }
        if store
            .store(&check.key, &bytes, stored.version)
            .map_err(|_| UpdateError::Store)?
        {
            return Ok(outcome);
        }
        stats.cas_retries += 1;
    }
    Err(UpdateError::Conflicts)
}

/// Read-modify-CAS loop for updates that cannot be refused (refund, charge, release).
fn update<S: CounterStore>(
    store: &mut S,
    key: &CounterKey,
    stats: &mut StoreStats,
    modify: impl Fn(Option<&[u8]>) -> Vec<u8>,
) -> Result<(), UpdateError> {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let stored = store.load(key).map_err(|_| UpdateError::Store)?;
        let bytes = modify(stored.bytes.as_deref());
        if store
            .store(key, &bytes, stored.version)
            .map_err(|_| UpdateError::Store)?
        {
            return Ok(());
        }
        stats.cas_retries += 1;
    }
    Err(UpdateError::Conflicts)
}

/// An in-memory [`CounterStore`]: for tests, benchmarks and single-threaded runtimes.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    counters: std::collections::HashMap<CounterKey, (Vec<u8>, u64)>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of counters held.
    pub fn len(&self) -> usize {
        self.counters.len()
    }

    /// Whether no counter is held.
    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }
}

impl CounterStore for MemoryStore {
    type Error = core::convert::Infallible;

    fn load(&mut self, key: &CounterKey) -> Result<Stored, Self::Error> {
        Ok(match self.counters.get(key) {
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
            .entry(key.clone())
            .or_insert_with(|| (Vec::new(), 0));
        if entry.1 != version {
            return Ok(false);
        }
        *entry = (bytes.to_vec(), version + 1);
        Ok(true)
    }
}
