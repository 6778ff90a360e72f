//! The built-in plans, from what API products commonly sell. Any of them can be replaced by a
//! plan of the same name in the policy document.

use std::collections::BTreeMap;

use super::document::{AlgorithmKind, DurationSpec, PlanSpec, RuleSpec, Scope};
use crate::algorithm::CalendarPeriod;

/// The plan every identified caller gets unless its key or claims say otherwise.
pub const DEFAULT_PLAN: &str = "free";
/// The plan of callers known only by address, or not at all.
pub const ANONYMOUS_PLAN: &str = "anonymous";

fn hourly(limit: u64) -> RuleSpec {
    RuleSpec {
        name: "hourly".into(),
        scope: Scope::User,
        algorithm: AlgorithmKind::SlidingWindow,
        limit,
        window: Some(DurationSpec::Text("1h".into())),
        burst: None,
        period: None,
        anchor: None,
        max_hold: None,
        endpoint: None,
        priority: 0,
        mode: Default::default(),
        rollout_percent: None,
    }
}

fn monthly(limit: u64) -> RuleSpec {
    RuleSpec {
        name: "monthly".into(),
        // Quotas are what an org pays for, so all of an org's keys share one.
        scope: Scope::Org,
        algorithm: AlgorithmKind::CalendarQuota,
        limit,
        window: None,
        period: Some(CalendarPeriod::Month),
        ..hourly(limit)
    }
}

fn limited(hour: u64, month: u64) -> PlanSpec {
    PlanSpec {
        unlimited: false,
        limits: vec![hourly(hour), monthly(month)],
    }
}

/// free 100/h and 1,000/month; starter 500/h and 10,000/month; pro 2,000/h and 100,000/month;
/// enterprise unlimited; anonymous 60/h per client address.
pub fn builtin() -> BTreeMap<String, PlanSpec> {
    BTreeMap::from([
        ("free".to_string(), limited(100, 1_000)),
        ("starter".to_string(), limited(500, 10_000)),
        ("pro".to_string(), limited(2_000, 100_000)),
        (
            "enterprise".to_string(),
            PlanSpec {
                unlimited: true,
                limits: vec![],
            },
        ),
        (
            ANONYMOUS_PLAN.to_string(),
            PlanSpec {
                unlimited: false,
                limits: vec![hourly(60)],
            },
        ),
    ])
}
