//! The decision protocol: which counters a request touches, and how they are updated in a
//! store that offers only read and compare-and-swap.
//!
//! **Multi-tier consumption uses refunds, not two-phase commit.** Each applicable rule is
//! decided and committed on its own counter with a CAS loop, in priority order; if a later
//! enforcing rule denies, the units already taken from earlier rules are given back. A store
//! that groups by subject ([`CounterStore::groups_by_subject`]) keeps one record per subject,
//! and consecutive rules of one subject share one read and one CAS write: a unit of the
//! protocol is then a subject's run of rules rather than one rule, with the same answers. Within
//! a unit the rules are all-or-nothing: when one denies, the rules before it in the same unit are
//! given back in that unit's one write, so the window described next exists only across units. Two-phase
//! commit would need a lock or a multi-key transaction, which proxy-wasm shared data does not
//! have, and a Durable Object does not need. The cost of refunds: between the take and the
//! refund another request can see a counter that is briefly `cost` lower than it will settle —
//! at most one request's cost per concurrent in-flight denial, and only on the conservative
//! side (it can cause an extra denial, never an extra grant).
//!
//! Shadow rules are decided and charged like enforcing ones (so their counts are real) but a
//! shadow denial lets the request through and is reported; shadow rules never appear in
//! client-facing headers.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use crate::algorithm::{LimitKind, Outcome};
use crate::decision::{Decision, Lease, RuleStatus, Verdict};
use crate::hash;
use crate::policy::document::{FailureMode, Mode, Scope};
use crate::policy::CompiledRule;
use crate::policy::{Identity, Policy};
use crate::record::Record;
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

    /// The subject part of the key (`g`, `o:<org>`, `u:<user>`, `anon`).
    pub fn subject(&self) -> &str {
        self.0.split_once('|').map_or("", |(_, subject)| subject)
    }

    /// The key of the record holding every counter of this key's subject, for stores that
    /// group by subject: `|<subject>`, which no counter key can be (rule names are not empty).
    pub fn subject_record(&self) -> Self {
        let subject = self.subject();
        let mut key = String::with_capacity(1 + subject.len());
        key.push('|');
        key.push_str(subject);
        Self(key)
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

    /// Whether the engine should keep each subject's counters together, in one record under
    /// [`CounterKey::subject_record`], rather than one entry per counter. Then a request's
    /// consecutive tiers of one subject cost one `load` and one `store` between them. Worth it
    /// where each call is a host call or a round trip (proxy-wasm shared data); a store that
    /// says so must say so every time, since the two layouts cannot read each other.
    fn groups_by_subject(&self) -> bool {
        false
    }
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

/// One store entry a request reads and writes: a single counter, or (for a store that groups
/// by subject) the record of consecutive checks' common subject.
struct Unit<'c> {
    /// The store key: the counter's (borrowed from its check), or the subject record's.
    key: Cow<'c, CounterKey>,
    /// The checks it holds, as indices into the request's checks.
    checks: Range<usize>,
}

/// The request's store entries, in check order.
fn units(checks: &[Check], grouped: bool) -> Vec<Unit<'_>> {
    let mut units: Vec<Unit> = Vec::with_capacity(checks.len());
    let mut last_subject = None;
    for (i, check) in checks.iter().enumerate() {
        if !grouped {
            units.push(Unit {
                key: Cow::Borrowed(&check.key),
                checks: i..i + 1,
            });
            continue;
        }
        let subject = check.key.subject();
        match units.last_mut() {
            Some(last) if last_subject == Some(subject) => last.checks.end = i + 1,
            _ => units.push(Unit {
                key: Cow::Owned(check.key.subject_record()),
                checks: i..i + 1,
            }),
        }
        last_subject = Some(subject);
    }
    units
}

/// The states held in one store entry: a single counter's, or a subject record.
enum Held {
    Single(Option<Vec<u8>>),
    Record(Record),
}

impl Held {
    fn new(bytes: Option<Vec<u8>>, grouped: bool) -> Self {
        if grouped {
            Self::Record(Record::decode(bytes))
        } else {
            Self::Single(bytes)
        }
    }

    /// The state of `rule`'s counter (the entry's own state when it holds one counter).
    fn get(&self, rule: &CompiledRule) -> Option<&[u8]> {
        match self {
            Self::Single(state) => state.as_deref(),
            Self::Record(record) => record.get(rule.record_id),
        }
    }

    fn set(&mut self, rule: &CompiledRule, state: Vec<u8>) {
        match self {
            Self::Single(held) => *held = Some(state),
            Self::Record(record) => record.set(rule.record_id, state),
        }
    }

    fn encode(self) -> Vec<u8> {
        match self {
            Self::Single(state) => state.unwrap_or_default(),
            Self::Record(record) => record.encode(),
        }
    }
}

/// A decision in progress.
#[derive(Default)]
struct Deciding {
    stats: StoreStats,
    statuses: Vec<RuleStatus>,
    /// Checks charged so far, as indices.
    committed: Vec<usize>,
    /// Charged checks already given back in their unit's own write (a later check of the same
    /// entry denied), as indices.
    refunded: Vec<usize>,
    denied_by: Option<Arc<str>>,
    shadow_denied_by: Option<Arc<str>>,
    failed_closed: bool,
}

/// Where a [`Deciding`] stood before a unit's attempt, to undo a lost CAS.
struct Mark {
    statuses: usize,
    committed: usize,
    refunded: usize,
    denied_by: Option<Arc<str>>,
    shadow_denied_by: Option<Arc<str>>,
    failed_closed: bool,
}

impl Deciding {
    fn denied(&self) -> bool {
        self.denied_by.is_some() || self.failed_closed
    }

    fn mark(&self) -> Mark {
        Mark {
            statuses: self.statuses.len(),
            committed: self.committed.len(),
            refunded: self.refunded.len(),
            denied_by: self.denied_by.clone(),
            shadow_denied_by: self.shadow_denied_by.clone(),
            failed_closed: self.failed_closed,
        }
    }

    fn undo(&mut self, mark: Mark) {
        self.statuses.truncate(mark.statuses);
        self.committed.truncate(mark.committed);
        self.refunded.truncate(mark.refunded);
        self.denied_by = mark.denied_by;
        self.shadow_denied_by = mark.shadow_denied_by;
        self.failed_closed = mark.failed_closed;
    }

    /// One check's outcome.
    fn note(&mut self, i: usize, check: &Check, outcome: Outcome, cost: u64, now: Timestamp) {
        if !self.denied() {
            if outcome.allowed {
                if cost > 0 {
                    self.committed.push(i);
                }
            } else if check.enforced {
                self.denied_by = Some(check.rule.name.clone());
            } else if self.shadow_denied_by.is_none() {
                self.shadow_denied_by = Some(check.rule.name.clone());
            }
        }
        self.statuses
            .push(RuleStatus::new(&check.rule, check.enforced, outcome, now));
    }

    /// The checks' counters could not be read or written: open skips them (the other tiers
    /// still limit), closed denies when one of them is enforced.
    fn failed(&mut self, checks: &[Check], mode: FailureMode) {
        for check in checks {
            self.stats.failures += 1;
            if mode == FailureMode::Closed && check.enforced {
                self.failed_closed = true;
            }
        }
    }
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
        let grouped = store.groups_by_subject();
        let units = units(&checks, grouped);
        let mut d = Deciding {
            statuses: Vec::with_capacity(checks.len()),
            ..Deciding::default()
        };
        for unit in &units {
            self.decide_unit(&checks, unit, now, req.cost, store, &mut d);
        }

        let verdict = if d.denied() {
            for unit in &units {
                let charged: Vec<usize> = d
                    .committed
                    .iter()
                    .copied()
                    .filter(|i| unit.checks.contains(i))
                    .collect();
                let pending: Vec<&Check> = charged
                    .iter()
                    .filter(|i| !d.refunded.contains(i))
                    .map(|&i| &checks[i])
                    .collect();
                let given_back = pending.is_empty()
                    || update(store, &unit.key, grouped, &mut d.stats, |held| {
                        for check in &pending {
                            let state =
                                check
                                    .rule
                                    .limiter
                                    .refund(held.get(&check.rule), now, req.cost);
                            held.set(&check.rule, state);
                        }
                    })
                    .is_ok();
                if !given_back {
                    d.stats.failures += pending.len() as u32;
                }
                // Headers must show what the caller has left after the refund.
                for &i in &charged {
                    if !given_back && !d.refunded.contains(&i) {
                        continue;
                    }
                    let name = &checks[i].rule.name;
                    if let Some(s) = d.statuses.iter_mut().find(|s| &s.rule.name == name) {
                        s.outcome.remaining = s
                            .outcome
                            .remaining
                            .saturating_add(req.cost)
                            .min(s.outcome.limit);
                    }
                }
            }
            Verdict::Limited
        } else if d.shadow_denied_by.is_some() {
            Verdict::ShadowLimited
        } else {
            Verdict::Allowed
        };
        let leases = if verdict == Verdict::Limited {
            Vec::new()
        } else {
            d.committed
                .iter()
                .map(|&i| &checks[i])
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
            rule: d.denied_by.or(d.shadow_denied_by),
            failed_closed: d.failed_closed,
            statuses: d.statuses,
            leases,
            stats: d.stats,
            bypassed: false,
        }
    }

    /// Decides the checks of one store entry: one read, each check in priority order against
    /// the states read (taking units while nothing has denied, only reading after), then one
    /// CAS write of what was taken. A lost CAS undoes the attempt's notes and decides again
    /// from a fresh read.
    fn decide_unit<S: CounterStore>(
        &self,
        checks: &[Check],
        unit: &Unit,
        now: Timestamp,
        cost: u64,
        store: &mut S,
        d: &mut Deciding,
    ) {
        let grouped = store.groups_by_subject();
        let mine = &checks[unit.checks.clone()];
        for _ in 0..MAX_CAS_ATTEMPTS {
            let Ok(stored) = store.load(&unit.key) else {
                d.failed(mine, self.failure_mode);
                return;
            };
            let mut held = Held::new(stored.bytes, grouped);
            let mark = d.mark();
            let was_denied = d.denied();
            let mut taken = false;
            for (i, check) in unit.checks.clone().zip(mine) {
                let state = held.get(&check.rule);
                let outcome = if d.denied() {
                    // Already denied: read the rest only so headers can show the tightest limit.
                    check.rule.limiter.peek(state, now)
                } else {
                    let (outcome, next) = check.rule.limiter.acquire(state, now, cost);
                    if outcome.allowed && cost > 0 {
                        held.set(&check.rule, next);
                        taken = true;
                    }
                    outcome
                };
                d.note(i, check, outcome, cost, now);
            }
            if !was_denied && d.denied() {
                // A check of this entry denied after others of it were taken: give those back
                // in this same write, so no other request ever sees them taken (units of other
                // entries are refunded after, in `decide`).
                for &i in &d.committed[mark.committed..] {
                    let check = &checks[i];
                    let state = check.rule.limiter.refund(held.get(&check.rule), now, cost);
                    held.set(&check.rule, state);
                    d.refunded.push(i);
                }
            }
            if !taken {
                return;
            }
            match store.store(&unit.key, &held.encode(), stored.version) {
                Ok(true) => return,
                Ok(false) => {
                    d.stats.cas_retries += 1;
                    d.undo(mark);
                }
                Err(_) => {
                    d.undo(mark);
                    d.failed(mine, self.failure_mode);
                    return;
                }
            }
        }
        d.failed(mine, self.failure_mode);
    }

    /// Every applicable rule's standing for this caller, consuming nothing (the status path).
    pub fn status<S: CounterStore>(
        &self,
        req: &Request<'_>,
        now: Timestamp,
        store: &mut S,
    ) -> Vec<RuleStatus> {
        let checks = self.checks(req, now, true);
        let grouped = store.groups_by_subject();
        let mut statuses = Vec::with_capacity(checks.len());
        for unit in units(&checks, grouped) {
            let Ok(stored) = store.load(&unit.key) else {
                continue;
            };
            let held = Held::new(stored.bytes, grouped);
            for check in &checks[unit.checks] {
                let outcome = check.rule.limiter.peek(held.get(&check.rule), now);
                statuses.push(RuleStatus::new(&check.rule, check.enforced, outcome, now));
            }
        }
        statuses
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
        let checks = self.checks(req, now, false);
        let grouped = store.groups_by_subject();
        for unit in units(&checks, grouped) {
            let metered: Vec<&Check> = checks[unit.checks]
                .iter()
                .filter(|c| c.rule.limiter.kind() != LimitKind::Concurrency)
                .collect();
            if metered.is_empty() {
                continue;
            }
            let charged = update(store, &unit.key, grouped, &mut stats, |held| {
                for check in &metered {
                    let state = check.rule.limiter.charge(held.get(&check.rule), now, cost);
                    held.set(&check.rule, state);
                }
            });
            if charged.is_err() {
                stats.failures += metered.len() as u32;
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
            let grouped = store.groups_by_subject();
            let key = if grouped {
                Cow::Owned(lease.key.subject_record())
            } else {
                Cow::Borrowed(&lease.key)
            };
            if update(store, &key, grouped, &mut stats, |held| {
                let state = rule.limiter.refund(held.get(rule), now, lease.cost);
                held.set(rule, state);
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

/// Read-modify-CAS loop for updates that cannot be refused (refund, charge, release).
fn update<S: CounterStore>(
    store: &mut S,
    key: &CounterKey,
    grouped: bool,
    stats: &mut StoreStats,
    modify: impl Fn(&mut Held),
) -> Result<(), UpdateError> {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let stored = store.load(key).map_err(|_| UpdateError::Store)?;
        let mut held = Held::new(stored.bytes, grouped);
        modify(&mut held);
        if store
            .store(key, &held.encode(), stored.version)
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
    grouped: bool,
}

impl MemoryStore {
    /// An empty store, one entry per counter.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store that groups counters by subject (see
    /// [`CounterStore::groups_by_subject`]), as the Envoy filter's does.
    pub fn grouped() -> Self {
        Self {
            grouped: true,
            ..Self::default()
        }
    }

    /// Number of entries held (counters, or subject records when grouped).
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

    fn groups_by_subject(&self) -> bool {
        self.grouped
    }
}
