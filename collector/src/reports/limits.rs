//! `limits`: how often each rule limited whom, shadow hits included — what a team reads before
//! turning a shadow rule on, or when a customer asks why they got 429s.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::{Cell, ReportCtx, ReportError, ReportQuery, Table, Tabular};
use crate::db::reports::{Aggregate, Column, Measure};

/// One rule's totals.
#[derive(
    Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct RuleHits {
    /// The rule (`free.hourly`…).
    pub rule: String,
    /// Requests it denied.
    pub limited: i64,
    /// Requests it would have denied in shadow mode (served).
    pub shadow_limited: i64,
    /// Distinct users it denied or would have.
    pub users: i64,
}

/// One rule and one caller.
#[derive(
    Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct LimitedCaller {
    /// The rule.
    pub rule: String,
    /// The caller's org.
    pub org: String,
    /// The caller ('' when the requests had no user).
    pub user: String,
    /// Requests denied.
    pub limited: i64,
    /// Requests shadow-limited.
    pub shadow_limited: i64,
}

/// `limits`: per rule, requests limited and shadow-limited and how many users; and the callers
/// each rule hit most.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Limits {
    /// The org, or none for every org.
    pub org: Option<String>,
    /// Start (whole hour).
    pub from: DateTime<Utc>,
    /// End, exclusive (whole hour).
    pub to: DateTime<Utc>,
    /// Every rule that limited anyone, most hits first.
    pub rules: Vec<RuleHits>,
    /// The most-hit (rule, caller) pairs, at most `limit` (default 100).
    pub callers: Vec<LimitedCaller>,
}

impl Tabular for Limits {
    fn table(&self) -> Table {
        let mut t = Table::new(["rule", "org", "user", "limited", "shadow_limited"]);
        for c in &self.callers {
            t.rows.push(vec![
                Cell::Text(c.rule.clone()),
                Cell::Text(c.org.clone()),
                Cell::Text(c.user.clone()),
                Cell::Int(c.limited),
                Cell::Int(c.shadow_limited),
            ]);
        }
        t
    }
}

/// The `limits` report.
pub async fn limits(ctx: ReportCtx<'_>, q: &ReportQuery) -> Result<Limits, ReportError> {
    q.only(&["from", "to", "days", "limit", "format"])?;
    let range = q.range(ctx.now)?;
    let limit = q.limit(100)?;
    let segments = ctx.tile(range.from, range.to).await?;
    let agg = |group| Aggregate {
        org: ctx.org,
        segments: &segments,
        group,
        not_allowed: true,
        ..Aggregate::default()
    };
    let by_decision = ctx
        .storage
        .aggregate(&agg(&[Column::Rule, Column::Decision]))
        .await?;
    let users = ctx
        .storage
        .aggregate(&Aggregate {
            count_users: true,
            ..agg(&[Column::Rule])
        })
        .await?;
    let mut rules: BTreeMap<String, RuleHits> = BTreeMap::new();
    for t in &by_decision {
        let rule = t.key[0].text();
        let hits = rules.entry(rule.clone()).or_insert_with(|| RuleHits {
            rule,
            ..RuleHits::default()
        });
        match t.key[1].text().as_str() {
            "limited" => hits.limited += t.calls,
            _ => hits.shadow_limited += t.calls,
        }
    }
    for t in &users {
        if let Some(hits) = rules.get_mut(&t.key[0].text()) {
            hits.users = t.users;
        }
    }
    let mut rules: Vec<RuleHits> = rules.into_values().collect();
    rules.sort_by(|a, b| {
        (b.limited + b.shadow_limited)
            .cmp(&(a.limited + a.shadow_limited))
            .then_with(|| a.rule.cmp(&b.rule))
    });
    // The busiest (rule, caller, decision) groups; a pair's two decisions are merged after.
    let top = ctx
        .storage
        .aggregate(&Aggregate {
            top: Some((Measure::Calls, limit.saturating_mul(2))),
            ..agg(&[Column::Rule, Column::Org, Column::User, Column::Decision])
        })
        .await?;
    let mut callers: BTreeMap<(String, String, String), LimitedCaller> = BTreeMap::new();
    for t in &top {
        let key = (t.key[0].text(), t.key[1].text(), t.key[2].text());
        let c = callers.entry(key.clone()).or_insert_with(|| LimitedCaller {
            rule: key.0,
            org: key.1,
            user: key.2,
            ..LimitedCaller::default()
        });
        match t.key[3].text().as_str() {
            "limited" => c.limited += t.calls,
            _ => c.shadow_limited += t.calls,
        }
    }
    let mut callers: Vec<LimitedCaller> = callers.into_values().collect();
    callers.sort_by(|a, b| {
        (b.limited + b.shadow_limited)
            .cmp(&(a.limited + a.shadow_limited))
            .then_with(|| (&a.rule, &a.org, &a.user).cmp(&(&b.rule, &b.org, &b.user)))
    });
    callers.truncate(limit as usize);
    Ok(Limits {
        org: ctx.org.map(str::to_owned),
        from: range.from_time(),
        to: range.to_time(),
        rules,
        callers,
    })
}
