//! The decision protocol against stores that misbehave: CAS conflicts, failures, and the
//! multi-tier refund, plus concurrency leases, post-response charging and rollout.

use std::sync::Arc;

use tollgate_core::engine::{CounterStore, MAX_CAS_ATTEMPTS};
use tollgate_core::policy::{Identity, IdentityKind};
use tollgate_core::{CounterKey, MemoryStore, Policy, Request, Stored, Timestamp, Verdict};

const NOW: Timestamp = Timestamp::from_secs(1_800_000_000);

fn user(name: &str, plan: &str) -> Identity {
    Identity {
        kind: IdentityKind::ApiKey,
        user: Some(Arc::from(name)),
        org: Some(Arc::from("org1")),
        plan: Arc::from(plan),
    }
}

fn get<'a>(identity: &'a Identity, path: &'a str) -> Request<'a> {
    Request {
        identity,
        method: "GET",
        path,
        cost: 1,
    }
}

/// Wraps a store: the next `conflicts` writes report a conflict, and with `broken` every call
/// fails. It counts its calls, and groups by subject when its inner store does.
#[derive(Default)]
struct FlakyStore {
    inner: MemoryStore,
    conflicts: u32,
    broken: bool,
    loads: u32,
    stores: u32,
}

impl CounterStore for FlakyStore {
    type Error = String;

    fn load(&mut self, key: &CounterKey) -> Result<Stored, String> {
        self.loads += 1;
        if self.broken {
            return Err("store down".into());
        }
        Ok(self.inner.load(key).unwrap_or_default())
    }

    fn store(&mut self, key: &CounterKey, bytes: &[u8], version: u64) -> Result<bool, String> {
        self.stores += 1;
        if self.broken {
            return Err("store down".into());
        }
        if self.conflicts > 0 {
            self.conflicts -= 1;
            return Ok(false);
        }
        Ok(self.inner.store(key, bytes, version).unwrap_or(false))
    }

    fn groups_by_subject(&self) -> bool {
        self.inner.groups_by_subject()
    }
}

fn grouped() -> FlakyStore {
    FlakyStore {
        inner: MemoryStore::grouped(),
        ..Default::default()
    }
}

fn policy(json: &str) -> Policy {
    Policy::from_json(json).unwrap()
}

#[test]
fn a_denial_refunds_every_tier_already_charged() {
    let p = policy(
        r#"{"version":1,"rules":[
            {"name":"wide","scope":"global","algorithm":"fixed_window","limit":100,"window":"1m","priority":5},
            {"name":"narrow","algorithm":"fixed_window","limit":1,"window":"1m"}]}"#,
    );
    let id = user("u", "enterprise");
    let mut store = MemoryStore::new();
    assert!(p.decide(&get(&id, "/"), NOW, &mut store).allowed());
    for _ in 0..5 {
        let d = p.decide(&get(&id, "/"), NOW, &mut store);
        assert_eq!(
            (d.verdict, d.rule.as_deref()),
            (Verdict::Limited, Some("narrow"))
        );
    }
    let status = p.status(&get(&id, "/"), NOW, &mut store);
    let wide = status.iter().find(|s| &*s.rule.name == "wide").unwrap();
    assert_eq!(
        wide.outcome.remaining, 99,
        "denied requests must not be charged to the wide tier"
    );
}

#[test]
fn cas_conflicts_are_retried_then_fail_open_or_closed() {
    let open = policy(
        r#"{"version":1,"rules":[{"name":"r","algorithm":"fixed_window","limit":5,"window":"1m"}]}"#,
    );
    let id = user("u", "enterprise");
    let mut store = FlakyStore {
        conflicts: 3,
        ..Default::default()
    };
    let d = open.decide(&get(&id, "/"), NOW, &mut store);
    assert!(d.allowed());
    assert_eq!((d.stats.cas_retries, d.stats.failures), (3, 0));
    assert_eq!(d.statuses[0].outcome.remaining, 4);

    let mut store = FlakyStore {
        conflicts: MAX_CAS_ATTEMPTS,
        ..Default::default()
    };
    let d = open.decide(&get(&id, "/"), NOW, &mut store);
    assert!(d.allowed(), "fail open by default");
    assert_eq!(d.stats.failures, 1);

    let closed = policy(
        r#"{"version":1,"failure_mode":"closed","rules":[{"name":"r","algorithm":"fixed_window","limit":5,"window":"1m"}]}"#,
    );
    let mut store = FlakyStore {
        broken: true,
        ..Default::default()
    };
    let d = closed.decide(&get(&id, "/"), NOW, &mut store);
    assert!(!d.allowed());
    assert!(d.failed_closed);
    assert_eq!(d.status_code(), 503);
    assert!(d.body().contains("unavailable"));
}

#[test]
fn fail_open_skips_only_the_failing_counter() {
    // Conflicts exhaust the first counter's retries; the second tier still limits.
    let p = policy(
        r#"{"version":1,"rules":[
            {"name":"first","algorithm":"fixed_window","limit":100,"window":"1m","priority":1},
            {"name":"second","algorithm":"fixed_window","limit":1,"window":"1m"}]}"#,
    );
    let id = user("u", "enterprise");
    let mut store = FlakyStore::default();
    assert!(p.decide(&get(&id, "/"), NOW, &mut store).allowed());
    store.conflicts = MAX_CAS_ATTEMPTS;
    let d = p.decide(&get(&id, "/"), NOW, &mut store);
    assert_eq!(
        (d.verdict, d.rule.as_deref()),
        (Verdict::Limited, Some("second"))
    );
}

#[test]
fn concurrency_leases_are_released() {
    let p = policy(
        r#"{"version":1,"rules":[{"name":"inflight","algorithm":"concurrency","limit":2}]}"#,
    );
    let id = user("u", "enterprise");
    let mut store = MemoryStore::new();
    let a = p.decide(&get(&id, "/"), NOW, &mut store);
    let b = p.decide(&get(&id, "/"), NOW, &mut store);
    assert_eq!((a.leases.len(), b.leases.len()), (1, 1));
    let c = p.decide(&get(&id, "/"), NOW, &mut store);
    assert_eq!(c.verdict, Verdict::Limited);
    assert!(c.leases.is_empty());
    p.release(&a.leases[0], NOW, &mut store);
    assert!(p.decide(&get(&id, "/"), NOW, &mut store).allowed());
}

#[test]
fn post_response_charge_limits_the_next_request() {
    let p = policy(
        r#"{"version":1,"rules":[{"name":"tokens","algorithm":"token_bucket","limit":1000,"window":"1m"}]}"#,
    );
    let id = user("u", "enterprise");
    let mut store = MemoryStore::new();
    assert!(p.decide(&get(&id, "/"), NOW, &mut store).allowed());
    p.charge(&get(&id, "/"), NOW, 5_000, &mut store);
    let d = p.decide(&get(&id, "/"), NOW, &mut store);
    assert_eq!(d.verdict, Verdict::Limited);
    // The debt of 4001 tokens refills at 1000/min: a little over four minutes.
    assert_eq!(d.retry_after_secs(), 241);
}

#[test]
fn rollout_enforces_a_stable_share_of_callers() {
    let p = policy(
        r#"{"version":1,"rules":[{"name":"new","algorithm":"fixed_window","limit":1,"window":"1m","rollout_percent":30}]}"#,
    );
    let mut store = MemoryStore::new();
    let mut enforced = 0;
    for i in 0..1000 {
        let id = user(&format!("user{i}"), "enterprise");
        let first = p.decide(&get(&id, "/"), NOW, &mut store);
        let second = p.decide(&get(&id, "/"), NOW, &mut store);
        assert!(first.allowed());
        match second.verdict {
            Verdict::Limited => enforced += 1,
            Verdict::ShadowLimited => {}
            Verdict::Allowed => panic!("the second request exceeds the limit either way"),
        }
        // Stable: the same caller lands on the same side every time.
        assert_eq!(
            p.decide(&get(&id, "/"), NOW, &mut store).verdict,
            second.verdict
        );
    }
    assert!(
        (250..=350).contains(&enforced),
        "{enforced} of 1000 enforced at 30%"
    );
}

#[test]
fn unlimited_override_lifts_all_rules_until_it_expires() {
    let p = policy(
        r#"{"version":1,"overrides":[{"subject":"org:org1","unlimited":true,"expires_at":"2027-06-01T00:00:00Z"}]}"#,
    );
    let id = user("u", "free");
    let mut store = MemoryStore::new();
    for _ in 0..150 {
        assert!(p.decide(&get(&id, "/"), NOW, &mut store).allowed());
    }
    let after = Timestamp::from_secs(1_830_000_000); // past the expiry
    let d = p.decide(&get(&id, "/"), after, &mut store);
    assert_eq!(d.statuses.len(), 2, "the free plan's rules apply again");
}

/// Global, org and two user tiers (one per endpoint): what the Envoy bench's policy has.
const FOUR_TIERS: &str = r#"{"version":1,"rules":[
    {"name":"global","scope":"global","algorithm":"gcra","limit":50,"window":"1s","burst":50},
    {"name":"org","scope":"org","algorithm":"sliding_window","limit":9,"window":"1m"},
    {"name":"user","scope":"user","algorithm":"token_bucket","limit":5,"window":"1m"},
    {"name":"items","scope":"user","algorithm":"fixed_window","limit":3,"window":"1m","endpoint":{"method":"GET","path":"/items"}}]}"#;

#[test]
fn grouped_stores_read_and_write_each_subject_once() {
    let p = policy(FOUR_TIERS);
    let id = user("u", "enterprise");
    let mut per_counter = FlakyStore::default();
    let mut by_subject = grouped();
    let a = p.decide(&get(&id, "/items"), NOW, &mut per_counter);
    let b = p.decide(&get(&id, "/items"), NOW, &mut by_subject);
    assert_eq!((per_counter.loads, per_counter.stores), (4, 4));
    // global; the org `org1`; the user's two tiers together.
    assert_eq!((by_subject.loads, by_subject.stores), (3, 3));
    assert_eq!(a.headers(&p.headers), b.headers(&p.headers));
    assert_eq!(by_subject.inner.len(), 3);
}

#[test]
fn grouped_cas_conflicts_retry_the_whole_subject_then_fail_open() {
    let p = policy(FOUR_TIERS);
    let id = user("u", "enterprise");
    let mut store = grouped();
    store.conflicts = 2;
    let d = p.decide(&get(&id, "/items"), NOW, &mut store);
    assert!(d.allowed());
    assert_eq!((d.stats.cas_retries, d.stats.failures), (2, 0));
    // Each tier noted once, however many attempts its subject took.
    let remaining: Vec<u64> = d.statuses.iter().map(|s| s.outcome.remaining).collect();
    assert_eq!(remaining, [49, 8, 4, 2]);

    // Every write of the first subject (global) loses: its one tier fails open, the rest count.
    store.conflicts = MAX_CAS_ATTEMPTS;
    let d = p.decide(&get(&id, "/items"), NOW, &mut store);
    assert!(d.allowed());
    assert_eq!(d.stats.failures, 1);
    let names: Vec<&str> = d.statuses.iter().map(|s| &*s.rule.name).collect();
    assert_eq!(names, ["org", "user", "items"]);
    assert_eq!(d.statuses[2].outcome.remaining, 1);
}

#[test]
fn grouped_denial_refunds_the_tiers_of_the_same_subject() {
    let p = policy(FOUR_TIERS);
    let id = user("u", "enterprise");
    let mut store = grouped();
    for _ in 0..3 {
        assert!(p.decide(&get(&id, "/items"), NOW, &mut store).allowed());
    }
    // `items` denies: `user` (same record) and `global`, `org` are given their unit back.
    (store.loads, store.stores) = (0, 0);
    let d = p.decide(&get(&id, "/items"), NOW, &mut store);
    assert_eq!(
        (d.verdict, d.rule.as_deref()),
        (Verdict::Limited, Some("items"))
    );
    // `user` is given back in the record's one write, so no other request ever sees it taken;
    // `global` and `org`, written before `items` denied, take a read and a write each more.
    assert_eq!((store.loads, store.stores), (5, 5));
    let user = d.statuses.iter().find(|s| &*s.rule.name == "user").unwrap();
    assert_eq!(user.outcome.remaining, 2, "headers show the refund");
    let status = p.status(&get(&id, "/items"), NOW, &mut store);
    let remaining: Vec<(&str, u64)> = status
        .iter()
        .map(|s| (&*s.rule.name, s.outcome.remaining))
        .collect();
    assert_eq!(
        remaining,
        [("global", 47), ("org", 6), ("user", 2), ("items", 0)]
    );
}

#[test]
fn grouped_leases_and_charges_update_their_entry_only() {
    let p = policy(
        r#"{"version":1,"rules":[
            {"name":"inflight","algorithm":"concurrency","limit":1},
            {"name":"tokens","algorithm":"token_bucket","limit":1000,"window":"1m"}]}"#,
    );
    let id = user("u", "enterprise");
    let mut store = MemoryStore::grouped();
    let a = p.decide(&get(&id, "/"), NOW, &mut store);
    assert_eq!(a.leases.len(), 1);
    assert_eq!(
        p.decide(&get(&id, "/"), NOW, &mut store).verdict,
        Verdict::Limited
    );
    p.charge(&get(&id, "/"), NOW, 500, &mut store);
    p.release(&a.leases[0], NOW, &mut store);
    let d = p.decide(&get(&id, "/"), NOW, &mut store);
    assert!(d.allowed(), "the lease was released");
    let tokens = d
        .statuses
        .iter()
        .find(|s| &*s.rule.name == "tokens")
        .unwrap();
    // 1000 − 1 (first) − 500 (charged) − 1 (this one); the denied request was refunded.
    assert_eq!(tokens.outcome.remaining, 498);
}

proptest::proptest! {
    /// Grouping by subject is a layout, not a policy: any sequence of requests from a few
    /// users of a few orgs, with weighted costs, post-response charges and time passing, gets
    /// the same verdicts, headers and standing from a grouped store as from one entry per
    /// counter.
    #[test]
    fn grouped_and_per_counter_stores_answer_alike(
        steps in proptest::collection::vec(
            (0usize..4, 0usize..3, proptest::bool::ANY, 0u64..4, 0u64..20_000, 0u64..3),
            1..120,
        )
    ) {
        let p = policy(FOUR_TIERS);
        let (mut a, mut b) = (MemoryStore::new(), MemoryStore::grouped());
        let mut now = NOW;
        for (who, org, items, cost, gap_ms, extra) in steps {
            now = Timestamp::from_millis(now.as_millis() + gap_ms);
            let mut id = user(&format!("user{who}"), "enterprise");
            id.org = (org > 0).then(|| Arc::from(format!("org{org}")));
            let req = Request { cost, ..get(&id, if items { "/items" } else { "/other" }) };
            let (da, db) = (p.decide(&req, now, &mut a), p.decide(&req, now, &mut b));
            proptest::prop_assert_eq!(da.verdict, db.verdict);
            proptest::prop_assert_eq!(&da.rule, &db.rule);
            proptest::prop_assert_eq!(da.headers(&p.headers), db.headers(&p.headers));
            p.charge(&req, now, extra, &mut a);
            p.charge(&req, now, extra, &mut b);
            let standing = |s: Vec<tollgate_core::decision::RuleStatus>| -> Vec<(u64, u64)> {
                s.iter().map(|s| (s.outcome.remaining, s.outcome.reset_after)).collect()
            };
            proptest::prop_assert_eq!(
                standing(p.status(&req, now, &mut a)),
                standing(p.status(&req, now, &mut b))
            );
        }
    }
}
