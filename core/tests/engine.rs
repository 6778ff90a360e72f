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

/// Wraps a store: the next `conflicts` writes report a conflict, and with `broken` every call fails.
#[derive(Default)]
struct FlakyStore {
    inner: MemoryStore,
    conflicts: u32,
    broken: bool,
}

impl CounterStore for FlakyStore {
    type Error = String;

    fn load(&mut self, key: &CounterKey) -> Result<Stored, String> {
        if self.broken {
            return Err("store down".into());
        }
        Ok(self.inner.load(key).unwrap_or_default())
    }

    fn store(&mut self, key: &CounterKey, bytes: &[u8], version: u64) -> Result<bool, String> {
        if self.broken {
            return Err("store down".into());
        }
        if self.conflicts > 0 {
            self.conflicts -= 1;
            return Ok(false);
        }
        Ok(self.inner.store(key, bytes, version).unwrap_or(false))
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
