//! Rollups: per-minute, -hour, -day and -week aggregates of events by org, user, route,
//! method, status class, decision and rule, each with a mergeable latency sketch.
//!
//! The sketch is an HdrHistogram with 2 significant digits: any recorded latency is reported
//! within 1% of its value, and merging two sketches is exact (bucket counts add), so a report
//! over many buckets gives the same percentiles as one sketch of all the events would.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use tollgate_core::event::UsageEvent;
use tollgate_core::Verdict;
use xxhash_rust::xxh3::Xxh3;

/// Significant digits kept by the latency sketch: values are exact to within 1%.
pub const SKETCH_SIGFIG: u8 = 2;
/// The sketch's relative error bound on a reported percentile value.
pub const SKETCH_RELATIVE_ERROR: f64 = 0.01;

/// A rollup's bucket width.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// One minute.
    Minute,
    /// One hour.
    Hour,
    /// One UTC day.
    Day,
    /// One ISO week, Monday 00:00 UTC to the next: what long report ranges are read from, so
    /// a 30-day report reads 4 weeks and a few days per group rather than 30 days.
    Week,
}

impl Granularity {
    /// All of them: every event updates one bucket of each.
    pub const ALL: [Granularity; 4] = [
        Granularity::Minute,
        Granularity::Hour,
        Granularity::Day,
        Granularity::Week,
    ];

    /// Bucket width in seconds.
    pub fn seconds(self) -> i64 {
        match self {
            Granularity::Minute => 60,
            Granularity::Hour => 3_600,
            Granularity::Day => 86_400,
            Granularity::Week => WEEK,
        }
    }

    /// As stored.
    pub fn code(self) -> i16 {
        match self {
            Granularity::Minute => 0,
            Granularity::Hour => 1,
            Granularity::Day => 2,
            Granularity::Week => 3,
        }
    }

    /// The granularity stored as `code`.
    pub fn from_code(code: i64) -> Option<Granularity> {
        Granularity::ALL
            .into_iter()
            .find(|g| i64::from(g.code()) == code)
    }

    /// Start of the bucket holding `ts`.
    pub fn bucket(self, ts: DateTime<Utc>) -> i64 {
        self.bucket_of(ts.timestamp())
    }

    /// Start of the bucket holding `secs` (seconds since the epoch).
    pub fn bucket_of(self, secs: i64) -> i64 {
        // Weeks start on Mondays; the epoch was a Thursday.
        let offset = if self == Granularity::Week { MONDAY } else { 0 };
        let width = self.seconds();
        (secs - offset).div_euclid(width) * width + offset
    }

    /// [`Granularity::bucket_of`] of the integer column `column` in SQL, the same on both
    /// engines: their `%` truncates toward zero, so the remainder is taken twice to floor it.
    pub fn bucket_sql(self, column: &str) -> String {
        let offset = if self == Granularity::Week { MONDAY } else { 0 };
        let width = self.seconds();
        format!("{column} - ((({column} - {offset}) % {width}) + {width}) % {width}")
    }
}

/// A week, in seconds.
pub const WEEK: i64 = 7 * 86_400;
/// 1970-01-05T00:00:00Z, the first Monday after the epoch: where week buckets are aligned.
pub const MONDAY: i64 = 4 * 86_400;

/// The stored name of a verdict.
pub fn decision_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Allowed => "allowed",
        Verdict::Limited => "limited",
        Verdict::ShadowLimited => "shadow_limited",
    }
}

/// Whether a status counts as an error: a 5xx, what the API failed to serve. (4xx are the
/// caller's; they are still visible by status class.)
pub fn is_error(status: u16) -> bool {
    status >= 500
}

/// Which projection of an event a rollup row aggregates. Every event is folded into each cube;
/// a cube keeps some dimensions and leaves the others empty ('' or 0), so its rows are few and a
/// report reads the narrowest cube that holds what it groups and filters by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cube {
    /// Every dimension: org, user, route, method, status class, decision, rule.
    Full,
    /// By endpoint: org, route, method, status class, decision, rule.
    Endpoint,
    /// By caller: org, user, decision, rule.
    User,
    /// By org: org, status class, decision.
    Org,
    /// By route: org, route, method — with the latency sketch, for endpoint percentiles, and
    /// the users sketch, for distinct users per route.
    Route,
    /// By caller alone: org, user — what top users and distinct-user counts read. The user cube
    /// splits a caller's rows by decision and rule (~4.5 rows per caller per bucket at 10M
    /// events); this one has one.
    Caller,
    /// By one custom dimension the policy declares: org, dimension name and value. Not a
    /// projection of the key: an event has a row here per declared dimension it carries.
    Custom,
}

impl Cube {
    /// The projections of the key: each event folds into all of them (and into
    /// [`Cube::Custom`] once per declared dimension it carries).
    pub const ALL: [Cube; 6] = [
        Cube::Full,
        Cube::Endpoint,
        Cube::User,
        Cube::Org,
        Cube::Route,
        Cube::Caller,
    ];

    /// As stored.
    pub fn code(self) -> i16 {
        match self {
            Cube::Full => 0,
            Cube::Endpoint => 1,
            Cube::User => 2,
            Cube::Org => 3,
            Cube::Route => 4,
            Cube::Custom => 5,
            // 6 was the route-and-user cube, replaced by the route rows' users sketch.
            Cube::Caller => 7,
        }
    }

    /// Whether its rows keep a latency sketch (the others store none: nothing reads it, and
    /// merging sketches is most of a fold's work).
    pub fn keeps_sketch(self) -> bool {
        matches!(self, Cube::Full | Cube::Org | Cube::Route)
    }

    /// Whether its rows keep a users sketch (distinct users of the row's events): only the
    /// route cube, whose rows would otherwise need a row per user to count them.
    pub fn keeps_users(self) -> bool {
        self == Cube::Route
    }

    /// Whether its rows keep either sketch: what a fold reads back and merges.
    pub fn keeps_any_sketch(self) -> bool {
        self.keeps_sketch() || self.keeps_users()
    }

    /// Whether it has rows of granularity `g`.
    ///
    /// The endpoint and route cubes have no minute rows: a minute holds about one row per event
    /// per cube, so minute rows are most of a fold's writes, and what reads minutes (the
    /// realtime report, minute series) groups by org, user, status or decision. A minute query
    /// by route reads the full cube; one by caller, the user cube.
    ///
    /// The full cube has no day or week rows. It has the most keys of any cube (~5,000 per
    /// bucket in the ingest bench, where its days and weeks were ~10k of a 50,000-event fold's
    /// ~24k rows), and it is read only for groupings no narrower cube holds, so its days and
    /// weeks are summed from its hours when read ([`Cube::stored_for`]) rather than written on
    /// every fold.
    pub fn has(self, g: Granularity) -> bool {
        match g {
            Granularity::Minute => !matches!(
                self,
                Cube::Endpoint | Cube::Route | Cube::Custom | Cube::Caller
            ),
            Granularity::Hour => true,
            Granularity::Day | Granularity::Week => self != Cube::Full,
        }
    }

    /// The granularity whose rows answer for `g`'s buckets: `g` when the cube has it, else its
    /// hours (they tile UTC days and Monday-aligned weeks exactly); none for a minute it lacks.
    pub fn stored_for(self, g: Granularity) -> Option<Granularity> {
        if self.has(g) {
            Some(g)
        } else if g != Granularity::Minute && self.has(Granularity::Hour) {
            Some(Granularity::Hour)
        } else {
            None
        }
    }

    /// The full key projected onto this cube: the dimensions it drops emptied.
    fn project<S: Copy + Default>(self, mut key: KeyRef<S>) -> KeyRef<S> {
        let (user, endpoint, status, decision_rule) = match self {
            Cube::Full => (true, true, true, true),
            Cube::Endpoint => (false, true, true, true),
            Cube::User => (true, false, false, true),
            Cube::Org => (false, false, true, false),
            Cube::Route => (false, true, false, false),
            Cube::Custom => (false, false, false, false),
            Cube::Caller => (true, false, false, false),
        };
        if !user {
            key.user = S::default();
        }
        if !endpoint {
            key.route = S::default();
            key.method = S::default();
        }
        if !status {
            key.status_class = 0;
        }
        if !decision_rule {
            // The org cube keeps the decision (served versus denied) but not the rule.
            if self != Cube::Org {
                key.decision = S::default();
            }
            key.rule = S::default();
        }
        key.cube = self;
        key
    }
}

/// A rollup key whose text is `S`: borrowed from the samples (`&str`), or numbered within one
/// fold by an [`Interner`] (`u32`, 0 for ''). A fold makes ~20 of them per event and most
/// repeat within the batch, so only the distinct ones become owned [`RollupKey`]s.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct KeyRef<S> {
    granularity: Granularity,
    bucket: i64,
    org: S,
    user: S,
    route: S,
    method: S,
    status_class: i16,
    decision: S,
    rule: S,
    dimension: S,
    dimension_value: S,
    cube: Cube,
}

impl<S: Copy> KeyRef<S> {
    /// The same key with each text mapped by `f`.
    fn map<T>(self, mut f: impl FnMut(S) -> T) -> KeyRef<T> {
        KeyRef {
            granularity: self.granularity,
            bucket: self.bucket,
            org: f(self.org),
            user: f(self.user),
            route: f(self.route),
            method: f(self.method),
            status_class: self.status_class,
            decision: f(self.decision),
            rule: f(self.rule),
            dimension: f(self.dimension),
            dimension_value: f(self.dimension_value),
            cube: self.cube,
        }
    }
}

/// The distinct texts of one fold, numbered from 1 ('' is 0).
///
/// Why: comparing keys of borrowed text was most of a fold's CPU. The samples' strings lie
/// scattered over the heap, so each of the ~3.5 key comparisons per event read several cold
/// cache lines (50,000 bench events: ~175k comparisons, 130–185 ms for the whole
/// [`aggregate`]). Numbered keys are compared and hashed in place: 35–45 ms.
struct Interner<'a> {
    ids: HashMap<&'a str, u32, FoldHasher>,
    texts: Vec<&'a str>,
}

impl<'a> Interner<'a> {
    fn new() -> Self {
        Self {
            ids: HashMap::default(),
            texts: vec![""],
        }
    }

    /// `text`'s number, given on first sight.
    fn id(&mut self, text: &'a str) -> u32 {
        if text.is_empty() {
            return 0;
        }
        let next = self.texts.len() as u32;
        let id = *self.ids.entry(text).or_insert(next);
        if id == next {
            self.texts.push(text);
        }
        id
    }

    /// The text numbered `id`.
    fn text(&self, id: u32) -> &'a str {
        self.texts.get(id as usize).copied().unwrap_or_default()
    }
}

impl<'a> KeyRef<&'a str> {
    /// A sample's full key (every dimension, no custom one) in its bucket of `g`.
    fn full(e: &'a Sample, g: Granularity) -> Self {
        KeyRef {
            granularity: g,
            bucket: g.bucket_of(e.ts),
            org: &e.org,
            user: &e.user,
            route: &e.route,
            method: &e.method,
            status_class: (e.status / 100) as i16,
            decision: &e.decision,
            rule: &e.rule,
            dimension: "",
            dimension_value: "",
            cube: Cube::Full,
        }
    }

    /// [`RollupKey::hash`] of this key, without owning its text.
    fn stored_hash(&self) -> i64 {
        let mut h = Xxh3::new();
        h.update(&self.granularity.code().to_le_bytes());
        h.update(&self.bucket.to_le_bytes());
        for part in [self.org, self.user, self.route, self.method, self.decision] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update(&self.status_class.to_le_bytes());
        if !self.rule.is_empty() {
            h.update(&(self.rule.len() as u64).to_le_bytes());
            h.update(self.rule.as_bytes());
        }
        // Likewise the cube: full rows hash as they did before there were cubes.
        if self.cube != Cube::Full {
            h.update(b"cube");
            h.update(&self.cube.code().to_le_bytes());
        }
        // And the custom dimension, set only in its own cube.
        if !self.dimension.is_empty() {
            for part in [self.dimension, self.dimension_value] {
                h.update(&(part.len() as u64).to_le_bytes());
                h.update(part.as_bytes());
            }
        }
        h.digest() as i64
    }

    fn to_owned(self) -> RollupKey {
        RollupKey {
            granularity: self.granularity,
            bucket: self.bucket,
            org: self.org.to_owned(),
            user: self.user.to_owned(),
            route: self.route.to_owned(),
            method: self.method.to_owned(),
            status_class: self.status_class,
            decision: self.decision.to_owned(),
            rule: self.rule.to_owned(),
            dimension: self.dimension.to_owned(),
            dimension_value: self.dimension_value.to_owned(),
            cube: self.cube,
        }
    }
}

/// One rollup row's key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RollupKey {
    /// Bucket width.
    pub granularity: Granularity,
    /// Bucket start, seconds since the epoch.
    pub bucket: i64,
    /// Org.
    pub org: String,
    /// User ('' when none).
    pub user: String,
    /// Route template.
    pub route: String,
    /// Method.
    pub method: String,
    /// 1..5.
    pub status_class: i16,
    /// `allowed`, `limited`, `shadow_limited`.
    pub decision: String,
    /// The rule that decided the events ('' when none): what the limits report groups by.
    pub rule: String,
    /// The custom dimension's name ('' outside [`Cube::Custom`]).
    pub dimension: String,
    /// Its value ('' outside [`Cube::Custom`]).
    pub dimension_value: String,
    /// The projection this row aggregates.
    pub cube: Cube,
}

impl RollupKey {
    /// A stable 64-bit hash of the whole key: the row's lookup key beside the org.
    ///
    /// The rule is hashed only when it is not '', after everything else: a key without a rule
    /// hashes as it did before rollups had a rule, so rows stored then are still found.
    /// Every part is length-prefixed or fixed-width, so the hashed bytes still determine the
    /// key and rows differing only by rule are different rows.
    pub fn hash(&self) -> i64 {
        KeyRef {
            granularity: self.granularity,
            bucket: self.bucket,
            org: self.org.as_str(),
            user: self.user.as_str(),
            route: self.route.as_str(),
            method: self.method.as_str(),
            status_class: self.status_class,
            decision: self.decision.as_str(),
            rule: self.rule.as_str(),
            dimension: self.dimension.as_str(),
            dimension_value: self.dimension_value.as_str(),
            cube: self.cube,
        }
        .stored_hash()
    }
}

/// Aggregates of one key.
#[derive(Clone, Debug)]
pub struct RollupValues {
    /// Requests.
    pub calls: i64,
    /// 5xx responses.
    pub errors: i64,
    /// Cost units.
    pub cost: i64,
    /// Request body bytes.
    pub request_bytes: i64,
    /// Response body bytes.
    pub response_bytes: i64,
    /// Latency sketch (µs).
    pub sketch: Histogram<u64>,
}

impl Default for RollupValues {
    fn default() -> Self {
        Self {
            calls: 0,
            errors: 0,
            cost: 0,
            request_bytes: 0,
            response_bytes: 0,
            sketch: new_sketch(),
        }
    }
}

impl RollupValues {
    /// Adds another aggregate.
    pub fn merge(&mut self, other: &RollupValues) {
        self.calls += other.calls;
        self.errors += other.errors;
        self.cost = self.cost.saturating_add(other.cost);
        self.request_bytes = self.request_bytes.saturating_add(other.request_bytes);
        self.response_bytes = self.response_bytes.saturating_add(other.response_bytes);
        merge_sketch(&mut self.sketch, &other.sketch);
    }
}

/// An empty latency sketch.
pub fn new_sketch() -> Histogram<u64> {
    // 2 significant digits always constructs.
    let mut h = Histogram::new(SKETCH_SIGFIG).unwrap_or_else(|_| unreachable!());
    h.auto(true);
    h
}

/// Adds `other`'s counts into `into`.
pub fn merge_sketch(into: &mut Histogram<u64>, other: &Histogram<u64>) {
    // With auto-resize on, `add` only fails on a precision mismatch, which cannot happen here.
    let _ = into.add(other);
}

/// The sketch's stored form (HdrHistogram V2, uncompressed).
pub fn encode_sketch(h: &Histogram<u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    // Writing into a Vec cannot fail.
    let _ = V2Serializer::new().serialize(h, &mut out);
    out
}

/// Reads a stored sketch; `None` or an unreadable one reads as empty (and is logged).
pub fn decode_sketch(bytes: Option<&[u8]>) -> Histogram<u64> {
    let Some(mut bytes) = bytes else {
        return new_sketch();
    };
    match Deserializer::new().deserialize::<u64, _>(&mut bytes) {
        Ok(mut h) => {
            h.auto(true);
            h
        }
        Err(e) => {
            tracing::error!(error = ?e, "unreadable latency sketch in a rollup row");
            new_sketch()
        }
    }
}

/// Percentile `q` (0–1) of a sketch, in µs; 0 when empty.
pub fn percentile(h: &Histogram<u64>, q: f64) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_quantile(q)
    }
}

/// What a rollup needs of one event (a row of the rollup queue).
// Decoded by name from the queue on both engines (`user_id`; integers are stored as BIGINT).
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    /// Event time, seconds since the epoch.
    pub ts: i64,
    /// Org.
    pub org: String,
    /// User ('' when none).
    #[sqlx(rename = "user_id")]
    pub user: String,
    /// Route template.
    pub route: String,
    /// Method.
    pub method: String,
    /// Status.
    #[sqlx(try_from = "i64")]
    pub status: u16,
    /// Decision name.
    pub decision: String,
    /// The rule that decided the event ('' when none).
    pub rule: String,
    /// Latency, µs.
    #[sqlx(try_from = "i64")]
    pub latency_us: u64,
    /// Request bytes.
    #[sqlx(try_from = "i64")]
    pub request_bytes: u64,
    /// Response bytes.
    #[sqlx(try_from = "i64")]
    pub response_bytes: u64,
    /// Cost units.
    #[sqlx(try_from = "i64")]
    pub cost: u64,
    /// The declared custom dimensions the event carries, as a JSON object (none: `None`).
    pub dimensions: Option<String>,
}

/// The stored form of one ingest transaction's samples (a `rollup_batches` row): postcard.
pub fn encode_samples(samples: &[Sample]) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(samples)
}

/// How many of the queued batches `heads` (oldest first: `(seq, events)`) a fold that already
/// holds `taken` events takes: whole batches while they fit in `max`, and at least one.
pub fn batches_that_fit(heads: &[(i64, i64)], taken: usize, max: usize) -> usize {
    let mut taking = taken;
    let mut count = 0;
    for &(_, events) in heads {
        let events = usize::try_from(events).unwrap_or(0);
        if count > 0 && taking + events > max {
            break;
        }
        taking += events;
        count += 1;
    }
    count
}

/// Samples stored by [`encode_samples`].
pub fn decode_samples(bytes: &[u8]) -> Result<Vec<Sample>, postcard::Error> {
    postcard::from_bytes(bytes)
}

/// The declared custom dimensions of an event as the rollup queue stores them: a JSON object of
/// those it carries, `None` when it carries none of them.
pub fn rolled_dimensions(e: &UsageEvent, declared: &[String]) -> Option<String> {
    let kept: std::collections::BTreeMap<&str, &str> = e
        .dimensions
        .iter()
        .filter(|(k, _)| declared.iter().any(|d| d == *k))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if kept.is_empty() {
        None
    } else {
        serde_json::to_string(&kept).ok()
    }
}

impl Sample {
    /// The rollup-relevant part of an event, keeping the `declared` custom dimensions.
    pub fn of(e: &UsageEvent, declared: &[String]) -> Self {
        Self {
            ts: e.timestamp.timestamp(),
            org: e.org.clone(),
            user: e.user.clone().unwrap_or_default(),
            route: e.route.clone(),
            method: e.method.clone(),
            status: e.status,
            decision: decision_name(e.decision).to_owned(),
            rule: e.rule.clone().unwrap_or_default(),
            latency_us: e.latency_us,
            request_bytes: e.request_bytes,
            response_bytes: e.response_bytes,
            cost: e.cost,
            dimensions: rolled_dimensions(e, declared),
        }
    }
}

/// Custom dimensions as the queue stores them ([`rolled_dimensions`]), (name, value) pairs; an
/// unreadable object reads as none (the queue is written by the collector itself, so that would
/// be a bug, and is logged).
fn custom_dimensions(text: &str) -> Vec<(String, String)> {
    match serde_json::from_str::<std::collections::BTreeMap<String, String>>(text) {
        Ok(map) => map.into_iter().collect(),
        Err(e) => {
            tracing::error!(error = %e, "unreadable custom dimensions in the rollup queue");
            Vec::new()
        }
    }
}

/// What one fold adds to one rollup row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Requests.
    pub calls: i64,
    /// 5xx responses.
    pub errors: i64,
    /// Cost units.
    pub cost: i64,
    /// Request body bytes.
    pub request_bytes: i64,
    /// Response body bytes.
    pub response_bytes: i64,
    /// The events' latencies (µs), only for rows of a cube that keeps a sketch. A raw list
    /// rather than a histogram: most rows of a fold get one or two events, and an empty
    /// histogram is kilobytes to allocate and zero.
    pub latencies: Vec<u64>,
    /// Hashes of the events' users, only for rows of a cube that keeps a users sketch (a user
    /// may be listed once for several of its events).
    pub users: Vec<u64>,
}

impl Delta {
    /// Counts one sample of a group: every latency is kept (a group feeds cubes with sketches).
    fn record(&mut self, e: &Sample) {
        self.calls += 1;
        self.errors += i64::from(is_error(e.status));
        self.cost = self.cost.saturating_add(e.cost as i64);
        self.request_bytes = self.request_bytes.saturating_add(e.request_bytes as i64);
        self.response_bytes = self.response_bytes.saturating_add(e.response_bytes as i64);
        self.latencies.push(e.latency_us);
    }

    /// Adds a group of samples of one `user` to a row of `cube`.
    fn add(&mut self, group: &Delta, cube: Cube, user: &str) {
        self.calls += group.calls;
        self.errors += group.errors;
        self.cost = self.cost.saturating_add(group.cost);
        self.request_bytes = self.request_bytes.saturating_add(group.request_bytes);
        self.response_bytes = self.response_bytes.saturating_add(group.response_bytes);
        if cube.keeps_sketch() {
            self.latencies.extend_from_slice(&group.latencies);
        }
        // Once per group: a users sketch counts each user once however often it is fed.
        if cube.keeps_users() && !user.is_empty() {
            self.users.push(user_hash(user));
        }
    }

    /// The stored sketch after this delta: `stored` (none for a new row) with the latencies
    /// added.
    pub fn sketch_onto(&self, stored: Option<&[u8]>) -> Vec<u8> {
        let mut sketch = decode_sketch(stored);
        for &v in &self.latencies {
            // Auto-resizing: `record` grows the range (`saturating_record` would clamp to it).
            let _ = sketch.record(v);
        }
        encode_sketch(&sketch)
    }

    /// The stored users sketch after this delta: `stored` (none for a new row) with the users
    /// added.
    pub fn users_onto(&self, stored: Option<&[u8]>) -> Vec<u8> {
        let mut sketch = decode_users(stored);
        for &h in &self.users {
            sketch.insert_hash(h);
        }
        encode_users(&sketch)
    }
}

/// A row's stored latency and users sketches (`None` where it has none).
pub type Sketches = (Option<Vec<u8>>, Option<Vec<u8>>);

/// Distinct users, estimated: Cloudflare's HyperLogLog++ with 2^12 registers of 6 bits. While a
/// sketch (or a merge of them) holds at most 128 users it keeps their encoded hashes, so such
/// counts are exact unless two users share a 25-bit hash prefix (about 1 in 33 million per
/// pair); beyond, the standard error is 1.04 / √4096 ≈ 1.6 %. Two sketches merge into the sketch
/// of the union, so counts over many buckets stay within that error.
pub type UsersSketch = cardinality_estimator::CardinalityEstimator<str>;

/// The users sketch's standard error on counts past its exact range.
pub const USERS_SKETCH_STANDARD_ERROR: f64 = 0.016;

/// The hash a users sketch is fed for `user`.
pub fn user_hash(user: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(user.as_bytes())
}

/// The users sketch's stored form (postcard).
pub fn encode_users(s: &UsersSketch) -> Vec<u8> {
    // Serializing into a Vec cannot fail.
    postcard::to_allocvec(s).unwrap_or_default()
}

/// Reads a stored users sketch; `None` or an unreadable one reads as empty (and is logged).
pub fn decode_users(bytes: Option<&[u8]>) -> UsersSketch {
    let Some(bytes) = bytes else {
        return UsersSketch::new();
    };
    postcard::from_bytes(bytes).unwrap_or_else(|e| {
        tracing::error!(error = %e, "unreadable users sketch in a rollup row");
        UsersSketch::new()
    })
}

/// Groups samples into rollup deltas, one per key per granularity per cube, ordered by (org,
/// hash) so that every writer locks rows in the same order.
///
/// Two stages. Every sample is hashed once, into its group: the samples with the same full key
/// (and custom dimensions) in the same minute. Each group then goes into its ~22 rows — every
/// granularity's bucket follows from the minute's, since hours, days and weeks are whole
/// minutes. Projecting each sample into every row instead hashed a key ~22 times per event,
/// which was a quarter of the CPU of a 2-core collector under full ingest. Keys hold numbered
/// text (`Interner`, whose comment says why).
pub fn aggregate<'a>(
    samples: impl IntoIterator<Item = &'a Sample>,
) -> Vec<(RollupKey, i64, Delta)> {
    let mut texts = Interner::new();
    let mut groups: HashMap<(KeyRef<u32>, u32), Delta, FoldHasher> = HashMap::default();
    for e in samples {
        let minute = KeyRef::full(e, Granularity::Minute).map(|t| texts.id(t));
        let dimensions = texts.id(e.dimensions.as_deref().unwrap_or_default());
        groups.entry((minute, dimensions)).or_default().record(e);
    }
    let groups: Vec<_> = groups.into_iter().collect();
    // Parsed once per group; the interner numbers their names and values too.
    let customs: Vec<Vec<(String, String)>> = groups
        .iter()
        .map(|((_, dimensions), _)| match *dimensions {
            0 => Vec::new(),
            id => custom_dimensions(texts.text(id)),
        })
        .collect();
    let groups: Vec<_> = groups
        .iter()
        .zip(&customs)
        .map(|((key, group), custom)| {
            let custom: Vec<(u32, u32)> = custom
                .iter()
                .map(|(name, value)| (texts.id(name), texts.id(value)))
                .collect();
            (key.0, texts.text(key.0.user), custom, group)
        })
        .collect();
    let mut map: HashMap<KeyRef<u32>, Delta, FoldHasher> = HashMap::default();
    for (minute, user, custom, group) in &groups {
        for g in Granularity::ALL {
            let key = KeyRef {
                granularity: g,
                bucket: g.bucket_of(minute.bucket),
                ..*minute
            };
            for cube in Cube::ALL.into_iter().filter(|c| c.has(g)) {
                map.entry(cube.project(key))
                    .or_default()
                    .add(group, cube, user);
            }
            if Cube::Custom.has(g) {
                for &(name, value) in custom {
                    let key = KeyRef {
                        dimension: name,
                        dimension_value: value,
                        ..Cube::Custom.project(key)
                    };
                    map.entry(key).or_default().add(group, Cube::Custom, "");
                }
            }
        }
    }
    let mut out: Vec<_> = map
        .into_iter()
        .map(|(k, v)| {
            let k = k.map(|id| texts.text(id));
            let h = k.stored_hash();
            (k, h, v)
        })
        .collect();
    out.sort_unstable_by(|a, b| (a.0.org, a.1).cmp(&(b.0.org, b.1)));
    out.into_iter()
        .map(|(k, h, v)| (k.to_owned(), h, v))
        .collect()
}

/// The in-memory maps' hasher: fast on short strings. Stored row hashes are
/// [`RollupKey::hash`], not this.
type FoldHasher = foldhash::fast::RandomState;

/// The counters of one caller in one bucket, summed over the user cube's rows (the first fill
/// of the caller cube, for rows folded before it existed).
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct CallerTotals {
    /// Org.
    pub org: String,
    /// Granularity code.
    pub granularity: i64,
    /// Bucket start.
    pub bucket: i64,
    /// User.
    pub user_id: String,
    /// Requests.
    pub calls: i64,
    /// 5xx responses.
    pub errors: i64,
    /// Cost units.
    pub cost: i64,
    /// Request body bytes.
    pub request_bytes: i64,
    /// Response body bytes.
    pub response_bytes: i64,
}

/// One row of the former route-and-user cube (6): a user who called a route in a bucket.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct RouteUser {
    /// Org.
    pub org: String,
    /// Granularity code.
    pub granularity: i64,
    /// Bucket start.
    pub bucket: i64,
    /// Route template.
    pub route: String,
    /// Method.
    pub method: String,
    /// User.
    pub user_id: String,
}

/// What rows folded before the caller cube and the users sketches existed lack, as deltas: a
/// caller-cube row per [`CallerTotals`] (write them where no caller rows are), and for each
/// route row the users of its [`RouteUser`]s (no counters: the route row has them). Ordered as
/// [`aggregate`] orders.
pub fn backfill_deltas(
    callers: &[CallerTotals],
    route_users: &[RouteUser],
) -> Vec<(RollupKey, i64, Delta)> {
    let mut map: HashMap<RollupKey, Delta> = HashMap::new();
    let key = |cube: Cube, org: &str, g: i64, bucket: i64| {
        Granularity::from_code(g).map(|granularity| RollupKey {
            granularity,
            bucket,
            org: org.to_owned(),
            user: String::new(),
            route: String::new(),
            method: String::new(),
            status_class: 0,
            decision: String::new(),
            rule: String::new(),
            dimension: String::new(),
            dimension_value: String::new(),
            cube,
        })
    };
    for c in callers {
        if let Some(k) = key(Cube::Caller, &c.org, c.granularity, c.bucket) {
            let d = map
                .entry(RollupKey {
                    user: c.user_id.clone(),
                    ..k
                })
                .or_default();
            d.calls += c.calls;
            d.errors += c.errors;
            d.cost = d.cost.saturating_add(c.cost);
            d.request_bytes = d.request_bytes.saturating_add(c.request_bytes);
            d.response_bytes = d.response_bytes.saturating_add(c.response_bytes);
        }
    }
    for r in route_users.iter().filter(|r| !r.user_id.is_empty()) {
        if let Some(k) = key(Cube::Route, &r.org, r.granularity, r.bucket) {
            let k = RollupKey {
                route: r.route.clone(),
                method: r.method.clone(),
                ..k
            };
            map.entry(k).or_default().users.push(user_hash(&r.user_id));
        }
    }
    let mut out: Vec<_> = map
        .into_iter()
        .map(|(k, d)| {
            let h = k.hash();
            (k, h, d)
        })
        .collect();
    out.sort_by(|a, b| (&a.0.org, a.1).cmp(&(&b.0.org, b.1)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fold's rows computed the plain way: every sample projected into every row.
    fn aggregate_sample_by_sample(samples: &[Sample]) -> HashMap<RollupKey, Delta> {
        let mut rows: HashMap<RollupKey, Delta> = HashMap::new();
        let mut add = |key: KeyRef<&str>, e: &Sample| {
            let d = rows.entry(key.to_owned()).or_default();
            d.calls += 1;
            d.errors += i64::from(is_error(e.status));
            d.cost += e.cost as i64;
            d.request_bytes += e.request_bytes as i64;
            d.response_bytes += e.response_bytes as i64;
            if key.cube.keeps_sketch() {
                d.latencies.push(e.latency_us);
            }
            if key.cube.keeps_users() && !e.user.is_empty() {
                d.users.push(user_hash(&e.user));
            }
        };
        for e in samples {
            let custom = e
                .dimensions
                .as_deref()
                .map(custom_dimensions)
                .unwrap_or_default();
            for g in Granularity::ALL {
                let key = KeyRef::full(e, g);
                for cube in Cube::ALL.into_iter().filter(|c| c.has(g)) {
                    add(cube.project(key), e);
                }
                if Cube::Custom.has(g) {
                    for (name, value) in &custom {
                        let key = KeyRef {
                            dimension: name.as_str(),
                            dimension_value: value.as_str(),
                            ..Cube::Custom.project(key)
                        };
                        add(key, e);
                    }
                }
            }
        }
        rows
    }

    fn arb_sample() -> impl proptest::strategy::Strategy<Value = Sample> {
        use proptest::prelude::*;
        let pick = |names: &'static [&'static str]| proptest::sample::select(names);
        (
            // Three weeks around a week boundary, before and after the epoch.
            prop_oneof![-2_000_000i64..2_000_000, 1_790_000_000i64..1_791_800_000],
            (pick(&["acme", "globex"]), pick(&["", "u1", "u2", "u3"])),
            (pick(&["/a", "/b"]), pick(&["GET", "POST"])),
            proptest::sample::select(&[200u16, 201, 404, 429, 500, 503][..]),
            (
                pick(&["allowed", "limited", "shadow_limited"]),
                pick(&["", "per-user"]),
            ),
            (0u64..100_000, 0u64..5, 0u64..3_000, 0u64..3_000),
            proptest::option::of(pick(&[
                r#"{"model":"small"}"#,
                r#"{"model":"big","tier":"x"}"#,
            ])),
        )
            .prop_map(
                |(
                    ts,
                    (org, user),
                    (route, method),
                    status,
                    (decision, rule),
                    (lat, cost, rq, rs),
                    dims,
                )| Sample {
                    ts,
                    org: org.into(),
                    user: user.into(),
                    route: route.into(),
                    method: method.into(),
                    status,
                    decision: decision.into(),
                    rule: rule.into(),
                    latency_us: lat,
                    request_bytes: rq,
                    response_bytes: rs,
                    cost,
                    dimensions: dims.map(str::to_owned),
                },
            )
    }

    proptest::proptest! {
        /// Grouping by minute first changes nothing a row stores: same rows, same counters, the
        /// same latencies, the same set of users (what a users sketch keeps), same hashes.
        #[test]
        fn grouping_by_minute_first_folds_the_same_rows(
            samples in proptest::collection::vec(arb_sample(), 0..300)
        ) {
            let expected = aggregate_sample_by_sample(&samples);
            let got = aggregate(&samples);
            proptest::prop_assert_eq!(got.len(), expected.len());
            for (key, hash, delta) in got {
                proptest::prop_assert_eq!(hash, key.hash());
                let want = expected.get(&key);
                proptest::prop_assert!(want.is_some(), "{:?} not expected", key);
                let want = want.unwrap();
                proptest::prop_assert_eq!(
                    (delta.calls, delta.errors, delta.cost, delta.request_bytes, delta.response_bytes),
                    (want.calls, want.errors, want.cost, want.request_bytes, want.response_bytes),
                    "{:?}", key
                );
                let sorted = |v: &[u64], dedup: bool| {
                    let mut v = v.to_vec();
                    v.sort_unstable();
                    if dedup {
                        v.dedup();
                    }
                    v
                };
                proptest::prop_assert_eq!(sorted(&delta.latencies, false), sorted(&want.latencies, false));
                proptest::prop_assert_eq!(sorted(&delta.users, true), sorted(&want.users, true));
            }
        }
    }

    #[test]
    fn folds_take_whole_batches_while_they_fit_and_at_least_one() {
        let heads = [(1, 400), (2, 500), (3, 300)];
        assert_eq!(batches_that_fit(&heads, 0, 1_000), 2);
        assert_eq!(batches_that_fit(&heads, 0, 1_200), 3);
        assert_eq!(
            batches_that_fit(&heads, 0, 100),
            1,
            "one batch even when it is bigger"
        );
        assert_eq!(
            batches_that_fit(&heads, 700, 1_000),
            1,
            "after the older per-event rows"
        );
        assert_eq!(batches_that_fit(&[], 0, 1_000), 0);
    }

    #[test]
    fn sketch_round_trips_and_merges_exactly() {
        let mut a = new_sketch();
        let mut b = new_sketch();
        for v in 1..=1000u64 {
            a.record(v * 10).unwrap();
            b.record(v * 1000).unwrap();
        }
        let mut merged = decode_sketch(Some(&encode_sketch(&a)));
        merge_sketch(&mut merged, &decode_sketch(Some(&encode_sketch(&b))));
        assert_eq!(merged.len(), 2000);
        let p50 = percentile(&merged, 0.5) as f64;
        assert!(
            (p50 - 10_000.0).abs() <= 10_000.0 * SKETCH_RELATIVE_ERROR,
            "{p50}"
        );
        assert_eq!(percentile(&new_sketch(), 0.99), 0);
    }

    fn key(rule: &str) -> RollupKey {
        RollupKey {
            granularity: Granularity::Hour,
            bucket: 1_790_000_000 - 1_790_000_000 % 3_600,
            org: "acme".into(),
            user: "u1".into(),
            route: "/v1/items/{id}".into(),
            method: "GET".into(),
            status_class: 4,
            decision: "limited".into(),
            rule: rule.into(),
            dimension: String::new(),
            dimension_value: String::new(),
            cube: Cube::Full,
        }
    }

    /// The hash as it was before rollups had a rule: what rows stored then are keyed by.
    fn hash_before_rules(k: &RollupKey) -> i64 {
        let mut h = Xxh3::new();
        h.update(&k.granularity.code().to_le_bytes());
        h.update(&k.bucket.to_le_bytes());
        for part in [&k.org, &k.user, &k.route, &k.method, &k.decision] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update(&k.status_class.to_le_bytes());
        h.digest() as i64
    }

    #[test]
    fn rows_differing_only_by_rule_hash_apart() {
        let hashes: Vec<i64> = ["", "per-user", "per-org", "per-use"]
            .iter()
            .map(|r| key(r).hash())
            .collect();
        for (i, a) in hashes.iter().enumerate() {
            for b in &hashes[i + 1..] {
                assert_ne!(a, b, "{hashes:?}");
            }
        }
        assert_eq!(key("per-user").hash(), key("per-user").hash());
    }

    #[test]
    fn a_key_without_a_rule_hashes_as_before_rules_existed() {
        let k = key("");
        assert_eq!(k.hash(), hash_before_rules(&k));
        assert_ne!(key("per-user").hash(), hash_before_rules(&key("per-user")));
    }

    fn event(decision: Verdict, rule: Option<&str>) -> UsageEvent {
        UsageEvent {
            id: uuid::Uuid::nil(),
            timestamp: DateTime::from_timestamp(1_790_000_123, 0).unwrap(),
            org: "acme".into(),
            user: Some("u1".into()),
            plan: "pro".into(),
            method: "GET".into(),
            route: "/v1/items/{id}".into(),
            status: 429,
            latency_us: 1_000,
            request_bytes: 10,
            response_bytes: 20,
            cost: 2,
            decision,
            rule: rule.map(str::to_owned),
            edge: tollgate_core::event::EdgeKind::Envoy,
            node: "envoy-1".into(),
            dimensions: Default::default(),
            metrics: Default::default(),
            fingerprint: None,
        }
    }

    #[test]
    fn samples_carry_the_rule_and_aggregate_splits_by_it() {
        assert_eq!(Sample::of(&event(Verdict::Allowed, None), &[]).rule, "");
        let samples: Vec<Sample> = [
            event(Verdict::Limited, Some("per-user")),
            event(Verdict::Limited, Some("per-user")),
            event(Verdict::Limited, Some("per-org")),
            event(Verdict::ShadowLimited, Some("per-org")),
            event(Verdict::Allowed, None),
        ]
        .iter()
        .map(|e| Sample::of(e, &[]))
        .collect();
        assert_eq!(samples[0].rule, "per-user");
        let all = aggregate(&samples);
        let deltas: Vec<_> = all.iter().filter(|d| d.0.cube == Cube::Full).collect();
        // Four distinct (decision, rule) pairs, each in a minute and an hour bucket (the full
        // cube keeps no days or weeks).
        let kept: Vec<Granularity> = Granularity::ALL
            .into_iter()
            .filter(|g| Cube::Full.has(*g))
            .collect();
        assert_eq!(kept, [Granularity::Minute, Granularity::Hour]);
        assert_eq!(deltas.len(), 4 * kept.len());
        for g in kept {
            let calls = |decision: &str, rule: &str| -> Vec<i64> {
                deltas
                    .iter()
                    .filter(|(k, _, _)| {
                        k.granularity == g && k.decision == decision && k.rule == rule
                    })
                    .map(|(_, _, v)| v.calls)
                    .collect()
            };
            assert_eq!(calls("limited", "per-user"), [2], "{g:?}");
            assert_eq!(calls("limited", "per-org"), [1], "{g:?}");
            assert_eq!(calls("shadow_limited", "per-org"), [1], "{g:?}");
            assert_eq!(calls("allowed", ""), [1], "{g:?}");
        }
        for (k, h, _) in &all {
            assert_eq!(*h, k.hash());
        }
    }

    #[test]
    fn every_cube_adds_up_to_the_same_events_and_keeps_only_its_dimensions() {
        let samples: Vec<Sample> = [
            event(Verdict::Limited, Some("per-user")),
            event(Verdict::Allowed, None),
            event(Verdict::ShadowLimited, Some("per-org")),
        ]
        .iter()
        .map(|e| Sample::of(e, &[]))
        .collect();
        let deltas = aggregate(&samples);
        for cube in Cube::ALL {
            for g in Granularity::ALL {
                let rows: Vec<_> = deltas
                    .iter()
                    .filter(|(k, _, _)| k.cube == cube && k.granularity == g)
                    .collect();
                let calls: i64 = rows.iter().map(|(_, _, v)| v.calls).sum();
                assert_eq!(calls, if cube.has(g) { 3 } else { 0 }, "{cube:?} {g:?}");
                for (k, _, _) in &rows {
                    let has_user = !k.user.is_empty();
                    let has_route = !k.route.is_empty();
                    let has_rule = rows.iter().any(|(k, _, _)| !k.rule.is_empty());
                    match cube {
                        Cube::Full => assert!(has_user && has_route && has_rule),
                        Cube::Endpoint => assert!(!has_user && has_route && has_rule),
                        Cube::User => assert!(has_user && !has_route && has_rule),
                        Cube::Org => assert!(!has_user && !has_route && !has_rule),
                        Cube::Route => assert!(!has_user && has_route && k.decision.is_empty()),
                        Cube::Caller => {
                            assert!(has_user && !has_route && k.decision.is_empty() && !has_rule)
                        }
                        Cube::Custom => unreachable!("not a projection"),
                    }
                }
            }
        }
        // The cubes are distinct rows, and a full row keeps its pre-cube hash.
        let mut hashes: Vec<i64> = deltas.iter().map(|d| d.1).collect();
        hashes.sort_unstable();
        hashes.dedup();
        assert_eq!(hashes.len(), deltas.len());
        let full = deltas
            .iter()
            .find(|d| d.0.cube == Cube::Full && d.0.rule.is_empty())
            .unwrap();
        assert_eq!(full.1, hash_before_rules(&full.0));
    }

    #[test]
    fn only_declared_dimensions_reach_the_custom_cube() {
        let mut e = event(Verdict::Allowed, None);
        e.dimensions.insert("model".into(), "small".into());
        e.dimensions.insert("session".into(), "s1".into());
        let declared = ["model".to_owned(), "feature".to_owned()];
        assert_eq!(
            rolled_dimensions(&e, &declared).as_deref(),
            Some(r#"{"model":"small"}"#)
        );
        assert_eq!(rolled_dimensions(&e, &[]), None);
        let deltas = aggregate(&[Sample::of(&e, &declared)]);
        let custom: Vec<_> = deltas
            .iter()
            .filter(|(k, _, _)| k.cube == Cube::Custom)
            .collect();
        // Hour, day and week; no minute.
        assert_eq!(custom.len(), 3);
        for (k, h, d) in custom {
            assert_eq!(
                (k.dimension.as_str(), k.dimension_value.as_str()),
                ("model", "small")
            );
            assert!(k.user.is_empty() && k.route.is_empty() && k.decision.is_empty());
            assert_ne!(k.granularity, Granularity::Minute);
            assert_eq!(d.calls, 1);
            assert_eq!(*h, k.hash());
        }
    }

    #[test]
    fn buckets_align_to_the_epoch() {
        let t = DateTime::from_timestamp(1_790_000_123, 5).unwrap();
        assert_eq!(Granularity::Minute.bucket(t), 1_790_000_100);
        assert_eq!(Granularity::Hour.bucket(t), 1_789_999_200);
        assert_eq!(Granularity::Day.bucket(t) % 86_400, 0);
        // 2026-09-22T13:20:00Z is a Tuesday: its week started Monday 2026-09-21.
        let week = Granularity::Week.bucket(t);
        let monday = chrono::NaiveDate::from_ymd_opt(2026, 9, 21).unwrap();
        assert_eq!(
            DateTime::from_timestamp(week, 0).unwrap().date_naive(),
            monday
        );
        assert_eq!(week % 86_400, 0);
        assert_eq!(Granularity::Week.bucket_of(week), week);
        assert_eq!(Granularity::Week.bucket_of(week - 1), week - WEEK);
        assert_eq!(Granularity::Week.bucket_of(MONDAY - 1), MONDAY - WEEK);
    }

    #[test]
    fn a_delta_adds_its_latencies_to_the_stored_sketch_and_only_where_one_is_kept() {
        let samples: Vec<Sample> = [event(Verdict::Allowed, None), event(Verdict::Allowed, None)]
            .iter()
            .map(|e| Sample::of(e, &[]))
            .collect();
        let deltas = aggregate(&samples);
        for (k, _, d) in &deltas {
            assert_eq!(d.calls, 2);
            let expected: &[u64] = if k.cube.keeps_sketch() {
                &[1_000, 1_000]
            } else {
                &[]
            };
            assert_eq!(d.latencies, expected, "{k:?}");
        }
        let (_, _, d) = deltas.iter().find(|(k, _, _)| k.cube == Cube::Org).unwrap();
        let mut stored = new_sketch();
        stored.record(50_000).unwrap();
        let merged = decode_sketch(Some(&d.sketch_onto(Some(&encode_sketch(&stored)))));
        assert_eq!(merged.len(), 3);
        assert!(percentile(&merged, 0.5).abs_diff(1_000) <= 10);
        assert!(percentile(&merged, 1.0) >= 50_000);
        assert_eq!(decode_sketch(Some(&d.sketch_onto(None))).len(), 2);
    }

    #[test]
    fn users_sketches_count_small_sets_exactly_and_merge_as_unions() {
        let delta = |users: std::ops::Range<u32>| Delta {
            users: users.map(|u| user_hash(&format!("user-{u}"))).collect(),
            ..Delta::default()
        };
        let count = |bytes: &[u8]| decode_users(Some(bytes)).estimate() as f64;
        // 0..100 then 50..120 over the same row: 120 distinct, exact at this size.
        let stored = delta(0..100).users_onto(None);
        let merged = delta(50..120).users_onto(Some(&stored));
        assert_eq!(count(&merged), 120.0);
        // Repeating users adds nothing: a union, not a sum.
        assert_eq!(count(&delta(0..120).users_onto(Some(&merged))), 120.0);
        // Past the exact range, within 4 standard errors.
        let big = delta(0..20_000).users_onto(Some(&merged));
        let error = (count(&big) - 20_000.0).abs() / 20_000.0;
        assert!(error < 4.0 * USERS_SKETCH_STANDARD_ERROR, "{error}");
        assert_eq!(decode_users(Some(b"not a sketch")).estimate(), 0);
        assert_eq!(decode_users(None).estimate(), 0);
    }
}
