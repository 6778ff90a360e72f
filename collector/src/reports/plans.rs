//! Reports against the policy file's plans: `quotas` (used against each calendar quota) and
//! `billing` (fee plus overage, by route and user, with a month-end projection).

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use tollgate_core::algorithm::CalendarQuota;
use tollgate_core::policy::document::Scope;
use tollgate_core::{Algorithm, Limiter, Timestamp};

use super::params::to_time;
use super::{Cell, ReportCtx, ReportError, ReportQuery, Table, Tabular};
use crate::db::reports::{Aggregate, Column, Totals};
use crate::db::OrgRecord;
use crate::pricing::PolicyFile;

fn no_policy() -> ReportError {
    ReportError::BadParam {
        param: "policy",
        message: "this report needs the collector's policy file (start it with --policy FILE)"
            .into(),
    }
}

/// The orgs a plan report covers, with their plans (the policy's default plan when the org
/// has none).
async fn orgs(ctx: ReportCtx<'_>, policy: &PolicyFile) -> Result<Vec<OrgRecord>, ReportError> {
    let all = ctx.storage.list_orgs().await?;
    let default = policy.policy.default_plan().to_owned();
    Ok(match ctx.org {
        Some(org) => vec![all
            .into_iter()
            .find(|o| o.id == org)
            .unwrap_or_else(|| OrgRecord {
                id: org.to_owned(),
                name: org.to_owned(),
                plan: None,
                created_at: 0,
            })],
        None => all,
    }
    .into_iter()
    .map(|mut o| {
        o.plan.get_or_insert_with(|| default.clone());
        o
    })
    .collect())
}

/// Hour-aligned `[from, to)` in seconds for a period `[start, end)` up to `now`: the start
/// rounded down to the hour (rollups have no finer buckets beyond the minute retention), the
/// end at the current hour's end or the period's end, whichever is first.
fn period_range(start: i64, end: i64, now: DateTime<Utc>) -> (i64, i64) {
    let hour = |t: i64| t.div_euclid(3_600) * 3_600;
    let now_end = hour(now.timestamp()) + 3_600;
    let to = now_end.min(end.div_euclid(3_600) * 3_600 + if end % 3_600 == 0 { 0 } else { 3_600 });
    (hour(start), to)
}

/// One quota of one org or user.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct QuotaRow {
    /// The org.
    pub org: String,
    /// The user, for per-user quotas.
    pub user: Option<String>,
    /// The org's plan.
    pub plan: String,
    /// The quota rule (`free.monthly`…).
    pub rule: String,
    /// Who the quota counts: `org`, `user` or `global`.
    pub tier: String,
    /// Units allowed per period.
    pub limit: u64,
    /// Units used in the current period.
    pub used: u64,
    /// `limit - used` (0 when over).
    pub remaining: u64,
    /// `used / limit`, in percent.
    pub percent: f64,
    /// Start of the current period.
    pub period_start: DateTime<Utc>,
    /// When the quota resets.
    pub resets_at: DateTime<Utc>,
}

/// `quotas`: every calendar quota of the plans in use, used against limit in the current
/// period, per org (org quotas) and per user with traffic (user quotas), fullest first.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Quotas {
    /// The org, or none for every org.
    pub org: Option<String>,
    /// When the usage was read.
    pub at: DateTime<Utc>,
    /// Quotas, fullest first.
    pub rows: Vec<QuotaRow>,
}

impl Tabular for Quotas {
    fn table(&self) -> Table {
        let mut t = Table::new([
            "org",
            "user",
            "plan",
            "rule",
            "tier",
            "limit",
            "used",
            "remaining",
            "percent",
            "resets_at",
        ]);
        for r in &self.rows {
            t.rows.push(vec![
                Cell::Text(r.org.clone()),
                r.user.clone().map_or(Cell::Empty, Cell::Text),
                Cell::Text(r.plan.clone()),
                Cell::Text(r.rule.clone()),
                Cell::Text(r.tier.clone()),
                Cell::Int(r.limit as i64),
                Cell::Int(r.used as i64),
                Cell::Int(r.remaining as i64),
                Cell::Float(r.percent),
                Cell::Time(r.resets_at),
            ]);
        }
        t
    }
}

/// A quota rule and its parameters.
struct QuotaRule<'a> {
    name: &'a str,
    scope: Scope,
    quota: &'a CalendarQuota,
    endpoint: Option<&'a tollgate_core::policy::pattern::EndpointMatcher>,
}

/// The units each (org, user) used in `[from, to)` on the endpoints `rule` covers.
async fn used(
    ctx: ReportCtx<'_>,
    org: &str,
    rule: &QuotaRule<'_>,
    from: i64,
    to: i64,
) -> Result<BTreeMap<Option<String>, u64>, ReportError> {
    let per_user = rule.scope == Scope::User;
    let group: Vec<Column> = per_user
        .then_some(Column::User)
        .into_iter()
        .chain(
            rule.endpoint
                .is_some()
                .then_some([Column::Method, Column::Route])
                .into_iter()
                .flatten(),
        )
        .collect();
    let segments = ctx.tile(from, to).await?;
    // Denied requests are not charged to a quota.
    let rows: Vec<Totals> = ctx
        .storage
        .aggregate(&Aggregate {
            org: (rule.scope != Scope::Global).then_some(org),
            segments: &segments,
            group: &group,
            served_only: true,
            ..Aggregate::default()
        })
        .await?;
    let mut out: BTreeMap<Option<String>, u64> = BTreeMap::new();
    for t in rows {
        let mut key = t.key.iter();
        let user = per_user.then(|| key.next().map(|v| v.text()).unwrap_or_default());
        if let Some(endpoint) = rule.endpoint {
            let method = key.next().map(|v| v.text()).unwrap_or_default();
            let route = key.next().map(|v| v.text()).unwrap_or_default();
            if !endpoint.matches(&method, &route) {
                continue;
            }
        }
        *out.entry(user).or_default() += u64::try_from(t.cost).unwrap_or(0);
    }
    Ok(out)
}

/// The `quotas` report.
pub async fn quotas(ctx: ReportCtx<'_>, q: &ReportQuery) -> Result<Quotas, ReportError> {
    q.only(&["format", "limit"])?;
    let limit = q.limit(1_000)?;
    let policy = ctx.policy.ok_or_else(no_policy)?;
    let now = Timestamp::from_millis(u64::try_from(ctx.now.timestamp_millis()).unwrap_or(0));
    let mut rows = Vec::new();
    for org in orgs(ctx, policy).await? {
        let plan = org.plan.clone().unwrap_or_default();
        for rule in policy.policy.applicable_rules(&plan, "", "", true) {
            let Limiter::CalendarQuota(quota) = &rule.limiter else {
                continue;
            };
            // A global quota's usage is every org's: not for a reader's eyes.
            if rule.scope == Scope::Global && ctx.org.is_some() {
                continue;
            }
            let spec = QuotaRule {
                name: &rule.name,
                scope: rule.scope,
                quota,
                endpoint: rule.endpoint.as_ref(),
            };
            let (start, end) = spec.quota.bounds(now);
            let (start_s, end_s) = (
                (start.as_nanos() / 1_000_000_000) as i64,
                (end.as_nanos() / 1_000_000_000) as i64,
            );
            let (from, to) = period_range(start_s, end_s, ctx.now);
            let allowed = spec.quota.peek(&Default::default(), now).limit;
            for (user, used) in used(ctx, &org.id, &spec, from, to).await? {
                rows.push(QuotaRow {
                    org: org.id.clone(),
                    user,
                    plan: plan.clone(),
                    rule: spec.name.to_owned(),
                    tier: match spec.scope {
                        Scope::Global => "global",
                        Scope::Org => "org",
                        Scope::User => "user",
                    }
                    .into(),
                    limit: allowed,
                    used,
                    remaining: allowed.saturating_sub(used),
                    percent: used as f64 * 100.0 / allowed.max(1) as f64,
                    period_start: to_time(start_s),
                    resets_at: to_time(end_s),
                });
            }
        }
    }
    rows.sort_by(|a, b| {
        b.percent
            .total_cmp(&a.percent)
            .then_with(|| (&a.org, &a.user, &a.rule).cmp(&(&b.org, &b.user, &b.rule)))
    });
    rows.truncate(limit as usize);
    Ok(Quotas {
        org: ctx.org.map(str::to_owned),
        at: ctx.now,
        rows,
    })
}

/// Units and the share of the overage of one route or user.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct BillingLine {
    /// The route or user.
    pub name: String,
    /// Units it used.
    pub units: i64,
    /// Its share of the overage charge (pro rata to units), minor units.
    pub overage: f64,
}

/// One org's month.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct OrgBill {
    /// The org.
    pub org: String,
    /// Its plan.
    pub plan: String,
    /// Currency of the amounts (none when the plan has no price).
    pub currency: Option<String>,
    /// Units used so far this month (allowed requests only).
    pub units: i64,
    /// Units the fee includes.
    pub included_units: u64,
    /// Units beyond them.
    pub overage_units: u64,
    /// The plan's monthly fee, minor units.
    pub fee: u64,
    /// `overage_units × price / 1000`, rounded up, minor units.
    pub overage: u64,
    /// `fee + overage`.
    pub total: u64,
    /// Units at month end if the month goes on at its pace so far (the month so far, scaled).
    pub projected_units: i64,
    /// The charge those units would make.
    pub projected_total: u64,
    /// Units and overage share by route, largest first.
    pub by_route: Vec<BillingLine>,
    /// Units and overage share by user, largest first.
    pub by_user: Vec<BillingLine>,
}

/// `billing`: per org, the plan fee plus overage (units beyond the included ones × unit
/// price) for a month, broken down by route and user, with a month-end projection.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Billing {
    /// The org, or none for every org.
    pub org: Option<String>,
    /// `YYYY-MM`.
    pub month: String,
    /// One bill per org.
    pub orgs: Vec<OrgBill>,
}

impl Tabular for Billing {
    fn table(&self) -> Table {
        let mut t = Table::new([
            "org",
            "plan",
            "currency",
            "units",
            "included_units",
            "overage_units",
            "fee",
            "overage",
            "total",
            "projected_units",
            "projected_total",
        ]);
        for b in &self.orgs {
            t.rows.push(vec![
                Cell::Text(b.org.clone()),
                Cell::Text(b.plan.clone()),
                b.currency.clone().map_or(Cell::Empty, Cell::Text),
                Cell::Int(b.units),
                Cell::Int(b.included_units as i64),
                Cell::Int(b.overage_units as i64),
                Cell::Int(b.fee as i64),
                Cell::Int(b.overage as i64),
                Cell::Int(b.total as i64),
                Cell::Int(b.projected_units),
                Cell::Int(b.projected_total as i64),
            ]);
        }
        t
    }
}

fn lines(rows: &[Totals], total_units: i64, overage: u64) -> Vec<BillingLine> {
    let mut out: Vec<BillingLine> = rows
        .iter()
        .map(|t| BillingLine {
            name: t.key[0].text(),
            units: t.cost,
            overage: if total_units > 0 {
                overage as f64 * t.cost as f64 / total_units as f64
            } else {
                0.0
            },
        })
        .collect();
    out.sort_by(|a, b| b.units.cmp(&a.units).then_with(|| a.name.cmp(&b.name)));
    out
}

/// The `billing` report.
pub async fn billing(ctx: ReportCtx<'_>, q: &ReportQuery) -> Result<Billing, ReportError> {
    q.only(&["format", "month", "limit"])?;
    let limit = q.limit(100)? as usize;
    let policy = ctx.policy.ok_or_else(no_policy)?;
    let month = q
        .month
        .clone()
        .unwrap_or_else(|| format!("{:04}-{:02}", ctx.now.year(), ctx.now.month()));
    let bad_month = || ReportError::BadParam {
        param: "month",
        message: format!("'{month}': a month as YYYY-MM"),
    };
    let start =
        NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d").map_err(|_| bad_month())?;
    let end = start
        .checked_add_months(chrono::Months::new(1))
        .ok_or_else(bad_month)?;
    let secs = |d: NaiveDate| d.and_time(chrono::NaiveTime::MIN).and_utc().timestamp();
    let (start_s, end_s) = (secs(start), secs(end));
    let (from, to) = period_range(start_s, end_s, ctx.now);
    // Share of the month elapsed, for the projection: 1 for a past month.
    let elapsed =
        ((ctx.now.timestamp() - start_s) as f64 / (end_s - start_s) as f64).clamp(0.0, 1.0);
    let mut orgs_out = Vec::new();
    for org in orgs(ctx, policy).await? {
        let plan = org.plan.clone().unwrap_or_default();
        let segments = if from < to {
            ctx.tile(from, to).await?
        } else {
            Vec::new()
        };
        let by = |column: &'static [Column]| Aggregate {
            org: Some(&org.id),
            segments: &segments,
            group: column,
            served_only: true,
            ..Aggregate::default()
        };
        // Billing counts only what was served: denied requests are not charged.
        let by_route = ctx.storage.aggregate(&by(&[Column::Route])).await?;
        let by_user = ctx.storage.aggregate(&by(&[Column::User])).await?;
        let units: i64 = by_route.iter().map(|t| t.cost).sum();
        let price = policy.pricing.get(&plan);
        let used = u64::try_from(units).unwrap_or(0);
        let included = price.map_or(0, |p| p.included_units);
        let overage_units = used.saturating_sub(included);
        let fee = price.map_or(0, |p| p.monthly_fee);
        let total = policy.monthly_charge(&plan, used).unwrap_or(0);
        let overage = total - fee;
        let projected_units = if elapsed > 0.0 {
            (units as f64 / elapsed).round() as i64
        } else {
            0
        };
        let mut route_lines = lines(&by_route, units, overage);
        let mut user_lines = lines(&by_user, units, overage);
        route_lines.truncate(limit);
        user_lines.truncate(limit);
        orgs_out.push(OrgBill {
            org: org.id.clone(),
            currency: price.map(|p| p.currency.clone()),
            units,
            included_units: included,
            overage_units,
            fee,
            overage,
            total,
            projected_units,
            projected_total: policy
                .monthly_charge(&plan, u64::try_from(projected_units).unwrap_or(0))
                .unwrap_or(0),
            by_route: route_lines,
            by_user: user_lines,
            plan,
        });
    }
    Ok(Billing {
        org: ctx.org.map(str::to_owned),
        month,
        orgs: orgs_out,
    })
}
