//! Compiling a [`PolicyDocument`] into a [`Policy`]: parse durations, patterns, hashes and
//! timestamps once, check every cross-reference, and name the field of the first error.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::document::{
    AlgorithmKind, BypassSpec, DurationSpec, EndpointSpec, FailureMode, HeaderOptions,
    IdentityOptions, KeySpec, Methods, Mode, OverrideSpec, PlanSpec, PolicyDocument, RuleSpec,
    Scope,
};
use super::pattern::{EndpointMatcher, PathPattern};
use super::plans;
use crate::algorithm::{
    CalendarPeriod, CalendarQuota, Concurrency, FixedWindow, Gcra, Limiter, SlidingLog,
    SlidingWindow, TokenBucket,
};
use crate::hash;
use crate::record::rule_id;
use crate::time::{Timestamp, NANOS_PER_SEC};

/// A policy that cannot be used, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid policy at `{field}`: {message}")]
pub struct PolicyError {
    /// Path to the offending field, e.g. `plans.free.limits[1].window`.
    pub field: String,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl PolicyError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A rule ready to run.
#[derive(Clone, Debug, PartialEq)]
pub struct CompiledRule {
    /// Unique name (`free.hourly` for plan rules).
    pub name: Arc<str>,
    /// Counter partitioning.
    pub scope: Scope,
    /// Algorithm and parameters.
    pub limiter: Limiter,
    /// Endpoint the rule is limited to, if any.
    pub endpoint: Option<EndpointMatcher>,
    /// Higher runs first and wins ties for the headers.
    pub priority: i32,
    /// Enforce or shadow.
    pub mode: Mode,
    /// Share of callers the rule is enforced for (0–100).
    pub rollout_percent: u8,
    /// A sentence for the 429 body: "100 requests per 1h per user".
    pub description: String,
    /// The rule's id in a subject record (`crate::record`), worked out once here rather than
    /// hashed from the name for every tier of every request.
    pub(crate) record_id: u32,
    spec: RuleSpec,
}

#[derive(Clone, Debug)]
struct CompiledPlan {
    rules: Vec<Arc<CompiledRule>>,
}

/// Who an override or a counter belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Subject {
    User(String),
    Org(String),
}

#[derive(Clone, Debug)]
pub(crate) struct CompiledOverride {
    pub subject: Subject,
    /// Rule it applies to; all when `None`.
    pub rule: Option<Arc<str>>,
    /// `None` lifts the rule; otherwise the rule with the new limit.
    pub replacement: Option<Arc<CompiledRule>>,
    pub expires: Timestamp,
}

#[derive(Clone, Debug)]
struct Bypass {
    hash: [u8; 32],
    expires: Option<Timestamp>,
}

/// The key entry a hashed API key resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KeyEntry {
    pub id: String,
    pub org: Option<String>,
    pub plan: String,
}

/// A validated, compiled policy: what the engine decides with.
#[derive(Clone, Debug)]
pub struct Policy {
    global_rules: Vec<Arc<CompiledRule>>,
    plans: HashMap<String, CompiledPlan>,
    pub(crate) default_plan: String,
    pub(crate) anonymous_plan: String,
    pub(crate) keys: HashMap<[u8; 32], KeyEntry>,
    overrides: Vec<CompiledOverride>,
    bypass: Vec<Bypass>,
    routes: Vec<PathPattern>,
    /// Header families to emit.
    pub headers: HeaderOptions,
    /// How callers are identified.
    pub identity: IdentityOptions,
    /// What to do when the counter store fails.
    pub failure_mode: FailureMode,
    version: String,
}

impl Policy {
    /// Parses and compiles a JSON policy document.
    pub fn from_json(text: &str) -> Result<Self, PolicyError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let document: PolicyDocument = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            PolicyError::new(
                if field == "." {
                    "(document)".into()
                } else {
                    field
                },
                e.into_inner().to_string(),
            )
        })?;
        Self::try_from(document)
    }

    /// A stable identifier of this policy's content (for ETags and reports).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The rules that apply to a caller on `plan` sending `method path`, before overrides;
    /// with `every_endpoint`, endpoint rules are included whatever they match.
    pub fn applicable_rules<'a>(
        &'a self,
        plan: &str,
        method: &'a str,
        path: &'a str,
        every_endpoint: bool,
    ) -> impl Iterator<Item = &'a Arc<CompiledRule>> + 'a {
        let plan_rules = self
            .plans
            .get(plan)
            .map(|p| p.rules.as_slice())
            .unwrap_or_default();
        self.global_rules.iter().chain(plan_rules).filter(move |r| {
            every_endpoint || r.endpoint.as_ref().is_none_or(|e| e.matches(method, path))
        })
    }

    /// The active override for `rule` and this user or org, if any (user overrides win).
    pub(crate) fn override_for(
        &self,
        rule: &str,
        user: Option<&str>,
        org: Option<&str>,
        now: Timestamp,
    ) -> Option<&CompiledOverride> {
        // Runs for every rule of every request: compares in place, allocates nothing.
        let applies = |o: &&CompiledOverride, user: bool, who: &str| {
            let subject = match (&o.subject, user) {
                (Subject::User(u), true) => u,
                (Subject::Org(g), false) => g,
                _ => return false,
            };
            o.expires > now && subject == who && o.rule.as_deref().is_none_or(|r| r == rule)
        };
        let find = |user: bool, who: Option<&str>| {
            let who = who?;
            self.overrides.iter().find(|o| applies(o, user, who))
        };
        find(true, user).or_else(|| find(false, org))
    }

    /// Whether the policy lists any bypass credential (if not, nobody needs to look for one).
    pub fn has_bypass(&self) -> bool {
        !self.bypass.is_empty()
    }

    /// Whether `credential` is a live bypass credential.
    pub fn is_bypass(&self, credential: &str, now: Timestamp) -> bool {
        if self.bypass.is_empty() {
            return false;
        }
        let presented = hash::sha256(credential.as_bytes());
        self.bypass
            .iter()
            .any(|b| b.hash == presented && b.expires.is_none_or(|e| now < e))
    }

    /// The route template for a path: the first configured route or endpoint pattern that
    /// matches, else `*` (raw paths never leave the edge: they can carry ids and secrets).
    pub fn route_for(&self, path: &str) -> &str {
        self.routes
            .iter()
            .find(|r| r.matches(path))
            .map_or("*", PathPattern::as_str)
    }

    /// Names of all plans.
    pub fn plan_names(&self) -> impl Iterator<Item = &str> {
        self.plans.keys().map(String::as_str)
    }

    /// The rule called `name`, in any tier or plan.
    pub fn rule_named(&self, name: &str) -> Option<&Arc<CompiledRule>> {
        self.global_rules
            .iter()
            .chain(self.plans.values().flat_map(|p| p.rules.iter()))
            .find(|r| &*r.name == name)
    }

    /// Whether any rule, in any tier or plan, keeps counters of `scope` (a runtime that shards
    /// counters by caller must route everyone to one place when a global counter exists).
    pub fn has_scope(&self, scope: Scope) -> bool {
        self.global_rules
            .iter()
            .chain(self.plans.values().flat_map(|p| p.rules.iter()))
            .any(|r| r.scope == scope)
    }

    /// The plan of callers whose key or claims name none.
    pub fn default_plan(&self) -> &str {
        &self.default_plan
    }

    /// Whether `plan` exists.
    pub fn has_plan(&self, plan: &str) -> bool {
        self.plans.contains_key(plan)
    }
}

impl TryFrom<PolicyDocument> for Policy {
    type Error = PolicyError;

    fn try_from(doc: PolicyDocument) -> Result<Self, PolicyError> {
        if doc.version != 1 {
            return Err(PolicyError::new(
                "version",
                "only version 1 exists; write `\"version\": 1`",
            ));
        }
        let mut names = HashMap::new();
        let mut routes = Vec::new();
        let mut global_rules = Vec::new();
        for (i, spec) in doc.rules.iter().enumerate() {
            let rule = compile_rule(spec, &spec.name, &format!("rules[{i}]"))?;
            unique(&mut names, &rule.name, &format!("rules[{i}].name"))?;
            if let Some(e) = &rule.endpoint {
                routes.push(e.path().clone());
            }
            global_rules.push(Arc::new(rule));
        }

        let mut plan_specs: BTreeMap<String, PlanSpec> = plans::builtin();
        plan_specs.extend(doc.plans.clone());
        let mut plans = HashMap::new();
        for (plan_name, spec) in &plan_specs {
            check_name(plan_name, &format!("plans.{plan_name}"))?;
            if spec.unlimited && !spec.limits.is_empty() {
                return Err(PolicyError::new(
                    format!("plans.{plan_name}.unlimited"),
                    "an unlimited plan cannot also have limits; remove one",
                ));
            }
            let mut rules = Vec::new();
            for (i, r) in spec.limits.iter().enumerate() {
                let field = format!("plans.{plan_name}.limits[{i}]");
                let rule = compile_rule(r, &format!("{plan_name}.{}", r.name), &field)?;
                unique(&mut names, &rule.name, &format!("{field}.name"))?;
                if let Some(e) = &rule.endpoint {
                    routes.push(e.path().clone());
                }
                rules.push(Arc::new(rule));
            }
            plans.insert(plan_name.clone(), CompiledPlan { rules });
        }

        let default_plan = doc
            .default_plan
            .clone()
            .unwrap_or_else(|| plans::DEFAULT_PLAN.into());
        known_plan(&plans, &default_plan, "default_plan")?;
        let anonymous_plan = doc
            .anonymous_plan
            .clone()
            .unwrap_or_else(|| plans::ANONYMOUS_PLAN.into());
        known_plan(&plans, &anonymous_plan, "anonymous_plan")?;

        let keys = compile_keys(&doc.keys, &plans, &default_plan)?;
        let all_rules: HashMap<&str, &Arc<CompiledRule>> = global_rules
            .iter()
            .chain(plans.values().flat_map(|p| p.rules.iter()))
            .map(|r| (&*r.name, r))
            .collect();
        let overrides = doc
            .overrides
            .iter()
            .enumerate()
            .map(|(i, o)| compile_override(o, &all_rules, &format!("overrides[{i}]")))
            .collect::<Result<_, _>>()?;
        let bypass = doc
            .bypass
            .iter()
            .enumerate()
            .map(|(i, b)| compile_bypass(b, &format!("bypass[{i}]")))
            .collect::<Result<_, _>>()?;

        let mut declared = Vec::new();
        for (i, r) in doc.routes.iter().enumerate() {
            declared.push(pattern(r, &format!("routes[{i}]"))?);
        }
        // Declared routes first: they are the templates the operator chose to report.
        declared.extend(routes);

        if doc.identity.sources.is_empty() {
            return Err(PolicyError::new(
                "identity.sources",
                "list at least one of api_key, jwt, client_ip",
            ));
        }
        if doc.identity.bypass_header.trim().is_empty() {
            return Err(PolicyError::new(
                "identity.bypass_header",
                "must name a header",
            ));
        }

        // Header names are matched lower-case (HTTP/2 and proxy-wasm hand them over so): lower
        // them once here, not on every request.
        let mut identity = doc.identity.clone();
        identity
            .api_key_headers
            .iter_mut()
            .for_each(|h| h.make_ascii_lowercase());
        identity.bypass_header.make_ascii_lowercase();

        let canonical = serde_json::to_vec(&doc).unwrap_or_default();
        Ok(Policy {
            global_rules: sorted(global_rules),
            plans: plans
                .into_iter()
                .map(|(k, p)| {
                    (
                        k,
                        CompiledPlan {
                            rules: sorted(p.rules),
                        },
                    )
                })
                .collect(),
            default_plan,
            anonymous_plan,
            keys,
            overrides,
            bypass,
            routes: declared,
            headers: doc.headers,
            identity,
            failure_mode: doc.failure_mode,
            version: format!("{:016x}", hash::fingerprint(&canonical)),
        })
    }
}

/// Higher priority first; stable so document order breaks ties.
fn sorted(mut rules: Vec<Arc<CompiledRule>>) -> Vec<Arc<CompiledRule>> {
    rules.sort_by_key(|r| std::cmp::Reverse(r.priority));
    rules
}

fn check_name(name: &str, field: &str) -> Result<(), PolicyError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(PolicyError::new(
            field,
            format!("'{name}' must be 1–64 of a-z 0-9 _ . -"),
        ))
    }
}

/// Rule names are unique, and so are their ids in a subject record (`crate::record`): two
/// names sharing an id would share a counter in a store that groups by subject.
fn unique(names: &mut HashMap<u32, String>, name: &str, field: &str) -> Result<(), PolicyError> {
    match names.entry(rule_id(name)) {
        Entry::Vacant(v) => {
            v.insert(name.to_string());
            Ok(())
        }
        Entry::Occupied(o) if o.get() == name => Err(PolicyError::new(
            field,
            format!("rule name '{name}' is used twice"),
        )),
        Entry::Occupied(o) => Err(PolicyError::new(
            field,
            format!(
                "rule names '{}' and '{name}' hash to the same counter id; rename one",
                o.get()
            ),
        )),
    }
}

fn known_plan(
    plans: &HashMap<String, CompiledPlan>,
    plan: &str,
    field: &str,
) -> Result<(), PolicyError> {
    if plans.contains_key(plan) {
        Ok(())
    } else {
        let mut known: Vec<&str> = plans.keys().map(String::as_str).collect();
        known.sort_unstable();
        Err(PolicyError::new(
            field,
            format!("unknown plan '{plan}'; known: {}", known.join(", ")),
        ))
    }
}

fn duration(spec: &DurationSpec, field: &str) -> Result<u64, PolicyError> {
    let nanos = match spec {
        DurationSpec::Seconds(s) => u128::from(*s) * u128::from(NANOS_PER_SEC),
        DurationSpec::Text(t) => humantime::parse_duration(t)
            .map_err(|e| {
                PolicyError::new(
                    field,
                    format!("'{t}' is not a duration ({e}); write e.g. \"1h\" or 3600"),
                )
            })?
            .as_nanos(),
    };
    match u64::try_from(nanos) {
        Ok(0) => Err(PolicyError::new(field, "must be longer than 0")),
        Ok(n) => Ok(n),
        Err(_) => Err(PolicyError::new(field, "is too long")),
    }
}

fn timestamp(text: &str, field: &str) -> Result<Timestamp, PolicyError> {
    let parsed = chrono::DateTime::parse_from_rfc3339(text).map_err(|e| {
        PolicyError::new(
            field,
            format!("'{text}' is not an RFC 3339 time ({e}); write e.g. 2026-12-31T23:59:59Z"),
        )
    })?;
    parsed
        .timestamp_nanos_opt()
        .and_then(|n| u64::try_from(n).ok())
        .map(Timestamp::from_nanos)
        .ok_or_else(|| PolicyError::new(field, format!("'{text}' is outside 1970–2262")))
}

fn pattern(text: &str, field: &str) -> Result<PathPattern, PolicyError> {
    PathPattern::parse(text).map_err(|e| PolicyError::new(field, format!("'{text}': {e}")))
}

fn endpoint(spec: &EndpointSpec, field: &str) -> Result<EndpointMatcher, PolicyError> {
    let methods = match &spec.method {
        None => vec![],
        Some(Methods::One(m)) => vec![m.clone()],
        Some(Methods::Many(ms)) => ms.clone(),
    };
    if let Some(bad) = methods
        .iter()
        .find(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()))
    {
        return Err(PolicyError::new(
            format!("{field}.method"),
            format!("'{bad}' is not an HTTP method"),
        ));
    }
    Ok(EndpointMatcher::new(
        &methods,
        pattern(&spec.path, &format!("{field}.path"))?,
    ))
}

/// Builds the limiter of `spec`; `limit` replaces the spec's (overrides), scaling the burst.
fn limiter(spec: &RuleSpec, limit: u64, field: &str) -> Result<Limiter, PolicyError> {
    let require_window = || -> Result<u64, PolicyError> {
        let w = spec.window.as_ref().ok_or_else(|| {
            PolicyError::new(
                format!("{field}.window"),
                "is required for this algorithm; write e.g. \"1m\"",
            )
        })?;
        duration(w, &format!("{field}.window"))
    };
    let forbid = |present: bool, name: &str| -> Result<(), PolicyError> {
        if present {
            Err(PolicyError::new(
                format!("{field}.{name}"),
                format!("does not apply to {:?}; remove it", spec.algorithm),
            ))
        } else {
            Ok(())
        }
    };
    let burst = scaled_burst(spec, limit).unwrap_or(limit);
    let param =
        |e: crate::algorithm::ParamError| PolicyError::new(format!("{field}.limit"), e.to_string());
    let calendar = matches!(spec.algorithm, AlgorithmKind::CalendarQuota);
    let concurrency = matches!(spec.algorithm, AlgorithmKind::Concurrency);
    let bucket = matches!(
        spec.algorithm,
        AlgorithmKind::TokenBucket | AlgorithmKind::Gcra
    );
    forbid(!bucket && spec.burst.is_some(), "burst")?;
    forbid(!calendar && spec.period.is_some(), "period")?;
    forbid(!calendar && spec.anchor.is_some(), "anchor")?;
    forbid(!concurrency && spec.max_hold.is_some(), "max_hold")?;
    forbid((calendar || concurrency) && spec.window.is_some(), "window")?;
    Ok(match spec.algorithm {
        // The nanosecond forms keep half the state and answer the same; they apply when one
        // token's (one request's) interval is a whole number of nanoseconds.
        AlgorithmKind::TokenBucket => {
            let bucket = TokenBucket::new(limit, require_window()?, burst).map_err(param)?;
            match bucket.in_nanos() {
                Some(nanos) => Limiter::TokenBucketNanos(nanos),
                None => Limiter::TokenBucket(bucket),
            }
        }
        AlgorithmKind::Gcra => {
            let gcra = Gcra::new(limit, require_window()?, burst).map_err(param)?;
            match gcra.in_nanos() {
                Some(nanos) => Limiter::GcraNanos(nanos),
                None => Limiter::Gcra(gcra),
            }
        }
        AlgorithmKind::FixedWindow => {
            Limiter::FixedWindow(FixedWindow::new(limit, require_window()?).map_err(param)?)
        }
        AlgorithmKind::SlidingWindow => {
            Limiter::SlidingWindow(SlidingWindow::new(limit, require_window()?).map_err(param)?)
        }
        AlgorithmKind::SlidingLog => {
            Limiter::SlidingLog(SlidingLog::new(limit, require_window()?).map_err(param)?)
        }
        AlgorithmKind::Concurrency => {
            let hold = match &spec.max_hold {
                Some(h) => duration(h, &format!("{field}.max_hold"))?,
                None => 300 * NANOS_PER_SEC,
            };
            Limiter::Concurrency(Concurrency::new(limit, hold).map_err(param)?)
        }
        AlgorithmKind::CalendarQuota => {
            let period = spec.period.ok_or_else(|| {
                PolicyError::new(
                    format!("{field}.period"),
                    "is required for calendar_quota: day or month",
                )
            })?;
            let anchor = spec
                .anchor
                .as_deref()
                .map(|a| timestamp(a, &format!("{field}.anchor")))
                .transpose()?;
            Limiter::CalendarQuota(CalendarQuota::new(limit, period, anchor).map_err(param)?)
        }
    })
}

fn describe(spec: &RuleSpec, limit: u64, burst: Option<u64>) -> String {
    let who = match spec.scope {
        Scope::Global => "across all callers",
        Scope::Org => "per org",
        Scope::User => "per user",
    };
    let span = match (spec.algorithm, &spec.window, spec.period) {
        (AlgorithmKind::Concurrency, _, _) => "in flight".to_string(),
        (_, _, Some(CalendarPeriod::Day)) => "per day".to_string(),
        (_, _, Some(CalendarPeriod::Month)) => "per month".to_string(),
        (_, Some(DurationSpec::Text(t)), _) => format!("per {t}"),
        (_, Some(DurationSpec::Seconds(s)), _) => format!("per {s}s"),
        (_, None, _) => String::new(),
    };
    let target = spec
        .endpoint
        .as_ref()
        .map(|e| format!(" on {}", e.path))
        .unwrap_or_default();
    let unit = if limit == 1 { "request" } else { "requests" };
    let bursts = match burst {
        Some(b) if b != limit => format!(", bursts up to {b}"),
        _ => String::new(),
    };
    format!("{limit} {unit} {span} {who}{target}{bursts}")
}

/// The burst for `limit`: an overridden limit scales the burst, keeping the operator's ratio.
fn scaled_burst(spec: &RuleSpec, limit: u64) -> Option<u64> {
    let b = spec.burst?;
    if spec.limit == 0 || spec.limit == limit {
        return Some(b);
    }
    let scaled = u128::from(b) * u128::from(limit) / u128::from(spec.limit);
    Some(u64::try_from(scaled).unwrap_or(u64::MAX).max(1))
}

fn compile_rule(spec: &RuleSpec, name: &str, field: &str) -> Result<CompiledRule, PolicyError> {
    check_name(&spec.name, &format!("{field}.name"))?;
    let rollout_percent = spec.rollout_percent.unwrap_or(100);
    if rollout_percent > 100 {
        return Err(PolicyError::new(
            format!("{field}.rollout_percent"),
            "must be 0–100",
        ));
    }
    Ok(CompiledRule {
        name: Arc::from(name),
        scope: spec.scope,
        limiter: limiter(spec, spec.limit, field)?,
        endpoint: spec
            .endpoint
            .as_ref()
            .map(|e| endpoint(e, &format!("{field}.endpoint")))
            .transpose()?,
        priority: spec.priority,
        mode: spec.mode,
        rollout_percent,
        description: describe(spec, spec.limit, spec.burst),
        record_id: rule_id(name),
        spec: spec.clone(),
    })
}

fn compile_keys(
    specs: &[KeySpec],
    plans: &HashMap<String, CompiledPlan>,
    default_plan: &str,
) -> Result<HashMap<[u8; 32], KeyEntry>, PolicyError> {
    let mut keys = HashMap::with_capacity(specs.len());
    let mut ids = HashSet::new();
    for (i, k) in specs.iter().enumerate() {
        let field = format!("keys[{i}]");
        let hash = hash::parse_sha256_tagged(&k.hash).ok_or_else(|| {
            PolicyError::new(
                format!("{field}.hash"),
                "must be sha256:<64 hex digits> of the key; never the key itself",
            )
        })?;
        if k.id.is_empty() || !ids.insert(k.id.clone()) {
            return Err(PolicyError::new(
                format!("{field}.id"),
                format!("'{}' is empty or used twice", k.id),
            ));
        }
        let plan = k.plan.clone().unwrap_or_else(|| default_plan.to_string());
        known_plan(plans, &plan, &format!("{field}.plan"))?;
        let entry = KeyEntry {
            id: k.id.clone(),
            org: k.org.clone(),
            plan,
        };
        if keys.insert(hash, entry).is_some() {
            return Err(PolicyError::new(
                format!("{field}.hash"),
                "the same key hash is listed twice",
            ));
        }
    }
    Ok(keys)
}

fn compile_override(
    spec: &OverrideSpec,
    rules: &HashMap<&str, &Arc<CompiledRule>>,
    field: &str,
) -> Result<CompiledOverride, PolicyError> {
    let subject = match spec.subject.split_once(':') {
        Some(("user", id)) if !id.is_empty() => Subject::User(id.to_string()),
        Some(("org", id)) if !id.is_empty() => Subject::Org(id.to_string()),
        _ => {
            return Err(PolicyError::new(
                format!("{field}.subject"),
                "must be user:<id> or org:<id>",
            ))
        }
    };
    let expires = timestamp(&spec.expires_at, &format!("{field}.expires_at"))?;
    let rule = match &spec.rule {
        Some(name) => Some(*rules.get(name.as_str()).ok_or_else(|| {
            PolicyError::new(
                format!("{field}.rule"),
                format!("no rule named '{name}' (plan rules are named <plan>.<rule>)"),
            )
        })?),
        None => None,
    };
    let replacement = match (spec.unlimited, spec.limit, rule) {
        (true, None, _) => None,
        (false, Some(limit), Some(rule)) => {
            let mut compiled = (**rule).clone();
            compiled.limiter = limiter(&rule.spec, limit, &format!("{field}.limit"))?;
            compiled.description = describe(&rule.spec, limit, scaled_burst(&rule.spec, limit));
            Some(Arc::new(compiled))
        }
        (false, Some(_), None) => {
            return Err(PolicyError::new(
                format!("{field}.rule"),
                "a new limit needs the rule it applies to",
            ))
        }
        _ => {
            return Err(PolicyError::new(
                format!("{field}.limit"),
                "give exactly one of limit or unlimited: true",
            ))
        }
    };
    Ok(CompiledOverride {
        subject,
        rule: rule.map(|r| r.name.clone()),
        replacement,
        expires,
    })
}

fn compile_bypass(spec: &BypassSpec, field: &str) -> Result<Bypass, PolicyError> {
    let hash = hash::parse_sha256_tagged(&spec.hash).ok_or_else(|| {
        PolicyError::new(
            format!("{field}.hash"),
            "must be sha256:<64 hex digits> of the credential; never the credential itself",
        )
    })?;
    let expires = spec
        .expires_at
        .as_deref()
        .map(|e| timestamp(e, &format!("{field}.expires_at")))
        .transpose()?;
    Ok(Bypass { hash, expires })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> PolicyError {
        Policy::from_json(json).unwrap_err()
    }

    #[test]
    fn rule_names_whose_counter_ids_collide_are_refused() {
        // Two valid names with the same 32-bit id, found by birthday search (~2^16 names).
        let mut seen = HashMap::new();
        let (a, b) = (0..1_000_000)
            .map(|i| format!("r{i}"))
            .find_map(|name| {
                let id = rule_id(&name);
                seen.insert(id, name.clone()).map(|other| (other, name))
            })
            .unwrap();
        let rule = |n: &str| {
            format!(r#"{{"name":"{n}","algorithm":"fixed_window","limit":1,"window":"1m"}}"#)
        };
        let e = err(&format!(
            r#"{{"version":1,"rules":[{},{}]}}"#,
            rule(&a),
            rule(&b)
        ));
        assert_eq!(e.field, "rules[1].name");
        assert!(e.to_string().contains("same counter id"), "{e}");
        assert!(Policy::from_json(&format!(r#"{{"version":1,"rules":[{}]}}"#, rule(&a))).is_ok());
    }

    #[test]
    fn minimal_policy_has_builtin_plans() {
        let p = Policy::from_json(r#"{"version":1}"#).unwrap();
        let mut plans: Vec<_> = p.plan_names().collect();
        plans.sort_unstable();
        assert_eq!(plans, ["anonymous", "enterprise", "free", "pro", "starter"]);
        let names: Vec<_> = p
            .applicable_rules("free", "GET", "/", false)
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(names, ["free.hourly", "free.monthly"]);
        assert_eq!(
            p.applicable_rules("enterprise", "GET", "/", false).count(),
            0
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"version":2}"#, "version"),
            (r#"{"version":1,"bogus":1}"#, "bogus"),
            (
                r#"{"version":1,"rules":[{"name":"g","algorithm":"token_bucket","limit":5,"window":"1x"}]}"#,
                "rules[0].window",
            ),
            (
                r#"{"version":1,"rules":[{"name":"g","algorithm":"token_bucket","limit":5}]}"#,
                "rules[0].window",
            ),
            (
                r#"{"version":1,"rules":[{"name":"g","algorithm":"fixed_window","limit":0,"window":"1s"}]}"#,
                "rules[0].limit",
            ),
            (
                r#"{"version":1,"rules":[{"name":"g","algorithm":"fixed_window","limit":1,"window":"1s","burst":3}]}"#,
                "rules[0].burst",
            ),
            (
                r#"{"version":1,"rules":[{"name":"G!","algorithm":"fixed_window","limit":1,"window":"1s"}]}"#,
                "rules[0].name",
            ),
            (
                r#"{"version":1,"rules":[{"name":"e","algorithm":"fixed_window","limit":1,"window":"1s","endpoint":{"path":"v1"}}]}"#,
                "rules[0].endpoint.path",
            ),
            (
                r#"{"version":1,"plans":{"free":{"limits":[{"name":"q","algorithm":"calendar_quota","limit":1}]}}}"#,
                "plans.free.limits[0].period",
            ),
            (
                r#"{"version":1,"keys":[{"id":"k","hash":"plaintext"}]}"#,
                "keys[0].hash",
            ),
            (r#"{"version":1,"default_plan":"gold"}"#, "default_plan"),
            (
                r#"{"version":1,"overrides":[{"subject":"user:a","rule":"nope","limit":5,"expires_at":"2030-01-01T00:00:00Z"}]}"#,
                "overrides[0].rule",
            ),
            (
                r#"{"version":1,"overrides":[{"subject":"team:a","unlimited":true,"expires_at":"2030-01-01T00:00:00Z"}]}"#,
                "overrides[0].subject",
            ),
            (
                r#"{"version":1,"overrides":[{"subject":"user:a","unlimited":true,"expires_at":"soon"}]}"#,
                "overrides[0].expires_at",
            ),
            (
                r#"{"version":1,"rules":[{"name":"free.hourly","algorithm":"fixed_window","limit":1,"window":"1s"}]}"#,
                "plans.free.limits[0].name",
            ),
        ];
        for (json, field) in cases {
            assert_eq!(err(json).field, field, "{json}");
        }
    }

    #[test]
    fn overrides_scale_burst_and_expire() {
        let p = Policy::from_json(
            r#"{"version":1,
                "rules":[{"name":"api","algorithm":"token_bucket","limit":10,"burst":20,"window":"1s"}],
                "overrides":[{"subject":"user:alice","rule":"api","limit":100,"expires_at":"2030-01-01T00:00:00Z"}]}"#,
        )
        .unwrap();
        let before = Timestamp::from_secs(1_800_000_000);
        let o = p.override_for("api", Some("alice"), None, before).unwrap();
        let Some(Limiter::TokenBucketNanos(tb)) = o.replacement.as_ref().map(|r| &r.limiter) else {
            panic!()
        };
        let expected = TokenBucket::new(100, NANOS_PER_SEC, 200).unwrap();
        assert_eq!(Some(tb), expected.in_nanos().as_ref());
        assert!(p.override_for("api", Some("bob"), None, before).is_none());
        assert!(p
            .override_for(
                "api",
                Some("alice"),
                None,
                Timestamp::from_secs(1_900_000_000)
            )
            .is_none());
    }

    #[test]
    fn buckets_take_the_nanosecond_form_only_when_it_is_exact() {
        let p = Policy::from_json(
            r#"{"version":1,"rules":[
                {"name":"whole","algorithm":"token_bucket","limit":100,"window":"1h"},
                {"name":"thirds","algorithm":"token_bucket","limit":7,"window":"1h"},
                {"name":"meter","algorithm":"gcra","limit":1000,"burst":50,"window":"1s"},
                {"name":"meter_thirds","algorithm":"gcra","limit":3,"window":"1s"}]}"#,
        )
        .unwrap();
        let limiter = |name: &str| &p.rule_named(name).unwrap().limiter;
        assert!(matches!(limiter("whole"), Limiter::TokenBucketNanos(_)));
        assert!(matches!(limiter("meter"), Limiter::GcraNanos(_)));
        // 3600 s / 7 and 1 s / 3 are not whole nanoseconds: the exact u128 forms.
        assert!(matches!(limiter("thirds"), Limiter::TokenBucket(_)));
        assert!(matches!(limiter("meter_thirds"), Limiter::Gcra(_)));
    }

    #[test]
    fn bypass_matches_hash_only() {
        let json = format!(
            r#"{{"version":1,"bypass":[{{"name":"loadtest","hash":"{}","expires_at":"2030-01-01T00:00:00Z"}}]}}"#,
            hash::sha256_tagged("let-me-in")
        );
        let p = Policy::from_json(&json).unwrap();
        let now = Timestamp::from_secs(1_800_000_000);
        assert!(p.is_bypass("let-me-in", now));
        assert!(!p.is_bypass("let-me-in!", now));
        assert!(!p.is_bypass(&hash::sha256_tagged("let-me-in"), now));
        assert!(!p.is_bypass("let-me-in", Timestamp::from_secs(1_900_000_000)));
    }

    #[test]
    fn scopes_are_found_in_tiers_and_plans() {
        let p = Policy::from_json(r#"{"version":1}"#).unwrap();
        assert!(p.has_scope(Scope::User) && p.has_scope(Scope::Org));
        assert!(!p.has_scope(Scope::Global));
        let g = Policy::from_json(
            r#"{"version":1,"plans":{"free":{"limits":[{"name":"g","scope":"global","algorithm":"gcra","limit":9,"window":"1s"}]}}}"#,
        )
        .unwrap();
        assert!(g.has_scope(Scope::Global));
    }

    #[test]
    fn routes_fall_back_to_star() {
        let p = Policy::from_json(r#"{"version":1,"routes":["/v1/users/{id}"]}"#).unwrap();
        assert_eq!(p.route_for("/v1/users/7"), "/v1/users/{id}");
        assert_eq!(p.route_for("/secret/token123"), "*");
    }
}
