//! Report queries over the rollups: counters summed and grouped in SQL, latency sketches merged
//! in Rust (a sketch is a blob SQL cannot add).
//!
//! A report's time range is a list of [`Segment`]s, each read from the coarsest rollup whose
//! buckets tile it (hours at the ragged ends, days in the middle), so a 30-day report reads ~30
//! day buckets and a few dozen hour buckets per group rather than 43,200 minutes.

use std::collections::HashMap;

use hdrhistogram::Histogram;
use sqlx::Row;

use super::{DbError, PgStore, Storage};
use crate::rollup::{
    decode_sketch, decode_users, merge_sketch, new_sketch, Cube, Granularity, UsersSketch,
};

/// A rollup column (or an expression over one) a report groups by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Column {
    /// The org.
    Org,
    /// Bucket start, seconds since the epoch.
    Bucket,
    /// The user ('' when none).
    User,
    /// The route template.
    Route,
    /// The method.
    Method,
    /// 1..5 for 1xx..5xx.
    StatusClass,
    /// `allowed`, `limited`, `shadow_limited`.
    Decision,
    /// Hour of the UTC day, 0..23 (meaningful on minute and hour buckets).
    HourOfDay,
    /// Day of the week, 0 = Monday .. 6 = Sunday (UTC).
    Weekday,
    /// Start of the UTC day, seconds since the epoch.
    Day,
    /// The rule that limited (or shadow-limited) the requests; '' when none.
    Rule,
    /// The value of the custom dimension [`Aggregate::dimension`] names.
    Dimension,
}

impl Column {
    /// The SQL expression; integers are cast to BIGINT so both engines decode them as i64.
    fn sql(self) -> &'static str {
        match self {
            Column::Org => "org",
            Column::Bucket => "CAST(bucket AS BIGINT)",
            Column::User => "user_id",
            Column::Route => "route",
            Column::Method => "method",
            Column::StatusClass => "CAST(status_class AS BIGINT)",
            Column::Decision => "decision",
            Column::HourOfDay => "CAST((bucket % 86400) / 3600 AS BIGINT)",
            // 1970-01-01 was a Thursday (3 when Monday is 0).
            Column::Weekday => "CAST(((bucket / 86400) + 3) % 7 AS BIGINT)",
            Column::Day => "CAST((bucket / 86400) * 86400 AS BIGINT)",
            Column::Rule => "rule",
            Column::Dimension => "dimension_value",
        }
    }

    /// The stored column its expression reads.
    fn stored(self) -> &'static str {
        match self {
            Column::Org => "org",
            Column::Bucket | Column::HourOfDay | Column::Weekday | Column::Day => "bucket",
            Column::User => "user_id",
            Column::Route => "route",
            Column::Method => "method",
            Column::StatusClass => "status_class",
            Column::Decision => "decision",
            Column::Rule => "rule",
            Column::Dimension => "dimension_value",
        }
    }

    fn is_text(self) -> bool {
        matches!(
            self,
            Column::Org
                | Column::User
                | Column::Route
                | Column::Method
                | Column::Decision
                | Column::Rule
                | Column::Dimension
        )
    }
}

/// One group's value of one column.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    /// A text column.
    Text(String),
    /// An integer column.
    Int(i64),
}

impl Value {
    /// The text, or the integer written out.
    pub fn text(&self) -> String {
        match self {
            Value::Text(s) => s.clone(),
            Value::Int(i) => i.to_string(),
        }
    }

    /// The integer (0 for text).
    pub fn int(&self) -> i64 {
        match self {
            Value::Int(i) => *i,
            Value::Text(_) => 0,
        }
    }
}

/// `[from, to)` of one granularity's buckets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Which rollup.
    pub granularity: Granularity,
    /// First bucket start (inclusive), seconds.
    pub from: i64,
    /// End (exclusive), seconds.
    pub to: i64,
}

impl Segment {
    /// `[from, to)` tiled with the coarsest buckets that fit: hours up to the first midnight,
    /// days up to the first Monday, weeks to the last Monday, days to the last midnight, hours
    /// after. Week buckets are used only from `weeks_since` on (before it they may be
    /// incomplete: see the `rollup_epochs` table). `from` and `to` must be whole hours.
    pub fn tile(from: i64, to: i64, weeks_since: i64) -> Vec<Segment> {
        const DAY: i64 = 86_400;
        let ceil = |t: i64, g: Granularity| {
            let b = g.bucket_of(t);
            if b == t {
                t
            } else {
                b + g.seconds()
            }
        };
        let first_midnight = ceil(from, Granularity::Day);
        let last_midnight = to.div_euclid(DAY) * DAY;
        let candidates = if first_midnight <= last_midnight {
            let first_monday = ceil(first_midnight.max(weeks_since), Granularity::Week);
            let last_monday = Granularity::Week.bucket_of(last_midnight);
            let mut c = vec![(Granularity::Hour, from, first_midnight)];
            if first_monday < last_monday {
                c.extend([
                    (Granularity::Day, first_midnight, first_monday),
                    (Granularity::Week, first_monday, last_monday),
                    (Granularity::Day, last_monday, last_midnight),
                ]);
            } else {
                c.push((Granularity::Day, first_midnight, last_midnight));
            }
            c.push((Granularity::Hour, last_midnight, to));
            c
        } else {
            vec![(Granularity::Hour, from, to)]
        };
        candidates
            .into_iter()
            .filter(|(_, a, b)| a < b)
            .map(|(granularity, from, to)| Segment {
                granularity,
                from,
                to,
            })
            .collect()
    }

    /// One granularity over `[from, to)`, for time series whose buckets are the rows.
    pub fn single(granularity: Granularity, from: i64, to: i64) -> Vec<Segment> {
        vec![Segment {
            granularity,
            from,
            to,
        }]
    }
}

/// What to read: whose rows, which time, grouped how, ordered how.
#[derive(Clone, Debug, Default)]
pub struct Aggregate<'a> {
    /// One org, or every org (admin reports).
    pub org: Option<&'a str>,
    /// The time range.
    pub segments: &'a [Segment],
    /// Group columns (none: one row of totals).
    pub group: &'a [Column],
    /// Only rows with a decision other than `allowed` (the limits report).
    pub not_allowed: bool,
    /// Only rows of requests with a user.
    pub with_user: bool,
    /// Only requests that were served (allowed or shadow-limited): what quotas and bills
    /// count.
    pub served_only: bool,
    /// Sort groups by this measure, largest first, and keep the first `limit`.
    pub top: Option<(Measure, u32)>,
    /// Count distinct users per group ([`Totals::users`]; 0 otherwise). It needs the user
    /// dimension, so it can make the query read a larger cube.
    pub count_users: bool,
    /// A custom dimension the policy declares: the query reads its rows of the custom cube,
    /// and [`Column::Dimension`] groups by its value. The only other column it can group by is
    /// the org (and time).
    pub dimension: Option<&'a str>,
}

/// What a query reads of the rollup rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reads {
    /// The counters (and the user, to count distinct users exactly).
    Counters,
    /// The latency sketch.
    Latency,
    /// The users sketch.
    Users,
}

/// A summed counter a report can sort by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Measure {
    /// Requests.
    #[default]
    Calls,
    /// Cost units.
    Cost,
}

/// One group's sums.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Group values, in the order of [`Aggregate::group`].
    pub key: Vec<Value>,
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
    /// Distinct non-empty users, when counted: exact, except by route or method, where it is
    /// the users sketches' estimate ([`Aggregate::users_estimated`]).
    pub users: i64,
}

impl Aggregate<'_> {
    /// The narrowest cube holding every dimension this query groups or filters by (with a
    /// latency sketch, when `sketch`). Distinct users come from a cube that keeps the user, or
    /// from the route cube's users sketches.
    fn cube(&self, sketch: bool) -> Cube {
        if self.dimension.is_some() {
            return Cube::Custom;
        }
        let mut need: Vec<Column> = self.group.to_vec();
        if self.with_user {
            need.push(Column::User);
        }
        if self.not_allowed || self.served_only {
            need.push(Column::Decision);
        }
        let fits = |keeps: &[Column]| {
            need.iter().all(|c| {
                matches!(
                    c,
                    Column::Org
                        | Column::Bucket
                        | Column::HourOfDay
                        | Column::Weekday
                        | Column::Day
                ) || keeps.contains(c)
            })
        };
        // Sketch queries never count users. Users are counted exactly where a cube keeps the
        // user; only what none of those holds (routes, methods) is estimated from sketches.
        let exact = |keeps: &[Column]| sketch || !self.count_users || keeps.contains(&Column::User);
        let candidates: [(Cube, &[Column]); 5] = [
            (Cube::Org, &[Column::StatusClass, Column::Decision]),
            (Cube::Route, &[Column::Route, Column::Method]),
            (
                Cube::Endpoint,
                &[
                    Column::Route,
                    Column::Method,
                    Column::StatusClass,
                    Column::Decision,
                    Column::Rule,
                ],
            ),
            (Cube::Caller, &[Column::User]),
            (Cube::User, &[Column::User, Column::Decision, Column::Rule]),
        ];
        let usable = |cube: Cube, keeps: &[Column]| {
            (!sketch || cube.keeps_sketch())
                && self.segments.iter().all(|s| cube.has(s.granularity))
                && fits(keeps)
        };
        candidates
            .iter()
            .find(|(cube, keeps)| usable(*cube, keeps) && exact(keeps))
            .or_else(|| {
                candidates
                    .iter()
                    .find(|(cube, keeps)| cube.keeps_users() && usable(*cube, keeps))
            })
            .map_or(Cube::Full, |(cube, _)| *cube)
    }

    /// Whether distinct users are estimated from users sketches (the route cube) rather than
    /// counted exactly in SQL.
    pub fn users_estimated(&self) -> bool {
        self.count_users && self.cube(false).keeps_users()
    }

    /// The rows to aggregate — `FROM (…) AS r` — and the values to bind, in order.
    ///
    /// One `UNION ALL` branch per segment, each a single range of an index: the ORed ranges of
    /// one `WHERE` made SQLite scan the whole cube instead.
    fn source(&self, reads: Reads) -> (String, Vec<i64>) {
        // The cube code is one of ours, not input: it goes into the text.
        let cube = self.cube(reads == Reads::Latency);
        let mut common = format!("cube = {}", cube.code());
        let mut n = 0;
        if self.org.is_some() {
            n += 1;
            common.push_str(&format!(" AND org = ${n}"));
        }
        if self.dimension.is_some() {
            n += 1;
            common.push_str(&format!(" AND dimension = ${n}"));
        }
        if self.not_allowed {
            common.push_str(" AND decision <> 'allowed'");
        }
        if self.with_user {
            common.push_str(" AND user_id <> ''");
        }
        if self.served_only {
            common.push_str(" AND decision <> 'limited'");
        }
        // Only the columns the outer query uses, so an index holding them (`rollups_callers`)
        // answers without reading the table.
        let mut columns: Vec<&str> = self.group.iter().map(|c| c.stored()).collect();
        if reads == Reads::Counters && self.count_users && !self.users_estimated() {
            columns.push("user_id");
        }
        columns.sort_unstable();
        columns.dedup();
        match reads {
            Reads::Latency => columns.push("latency_sketch"),
            Reads::Users => columns.push("users_sketch"),
            Reads::Counters => {
                columns.extend(["calls", "errors", "cost", "request_bytes", "response_bytes"])
            }
        }
        let mut binds = Vec::new();
        let mut branches: Vec<String> = self
            .segments
            .iter()
            .map(|s| {
                // A granularity the cube lacks (the full cube's days and weeks) is read from
                // the rows that tile it, each labelled with the bucket it falls in.
                let stored = cube.stored_for(s.granularity).unwrap_or(s.granularity);
                let columns = columns
                    .iter()
                    .map(|&c| {
                        if c == "bucket" && stored != s.granularity {
                            format!("{} AS bucket", s.granularity.bucket_sql("bucket"))
                        } else {
                            c.to_owned()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                binds.extend([i64::from(stored.code()), s.from, s.to]);
                let branch = format!(
                    "SELECT {columns} FROM rollups WHERE {common} AND granularity = ${} \
                     AND bucket >= ${} AND bucket < ${}",
                    n + 1,
                    n + 2,
                    n + 3
                );
                n += 3;
                branch
            })
            .collect();
        if branches.is_empty() {
            branches.push(format!(
                "SELECT {} FROM rollups WHERE 1 = 0",
                columns.join(", ")
            ));
        }
        (
            format!(" FROM ({}) AS r", branches.join(" UNION ALL ")),
            binds,
        )
    }

    fn group_sql(&self) -> String {
        self.group
            .iter()
            .map(|c| c.sql())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The group columns as the start of a select list (empty, or ending in a comma).
    fn select_group(&self) -> String {
        let group = self.group_sql();
        if group.is_empty() {
            group
        } else {
            format!("{group}, ")
        }
    }
}

/// Binds the org (when any) and the segment bounds, then fetches; the same for both engines.
macro_rules! fetch {
    ($pool:expr, $sql:expr, $agg:expr, $binds:expr) => {{
        let mut q = sqlx::query($sql);
        if let Some(org) = $agg.org {
            q = q.bind(org);
        }
        if let Some(dimension) = $agg.dimension {
            q = q.bind(dimension);
        }
        for b in $binds {
            q = q.bind(b);
        }
        q.fetch_all($pool).await?
    }};
}

/// Reads group values from the first `group.len()` columns of a row.
macro_rules! read_key {
    ($row:expr, $group:expr) => {{
        let mut key = Vec::with_capacity($group.len());
        for (i, c) in $group.iter().enumerate() {
            key.push(if c.is_text() {
                Value::Text($row.try_get::<String, _>(i)?)
            } else {
                Value::Int($row.try_get::<i64, _>(i)?)
            });
        }
        key
    }};
}

impl Storage {
    /// Summed counters per group, largest first when `top` is set.
    pub async fn aggregate(&self, agg: &Aggregate<'_>) -> Result<Vec<Totals>, DbError> {
        let (source, binds) = agg.source(Reads::Counters);
        let group = agg.group_sql();
        let select_group = agg.select_group();
        let estimated = agg.users_estimated();
        let users = if agg.count_users && !estimated {
            "COUNT(DISTINCT NULLIF(user_id, ''))"
        } else {
            "0"
        };
        let mut sql = format!(
            "SELECT {select_group}CAST(COALESCE(SUM(calls), 0) AS BIGINT), \
             CAST(COALESCE(SUM(errors), 0) AS BIGINT), CAST(COALESCE(SUM(cost), 0) AS BIGINT), \
             CAST(COALESCE(SUM(request_bytes), 0) AS BIGINT), \
             CAST(COALESCE(SUM(response_bytes), 0) AS BIGINT), \
             CAST({users} AS BIGINT){source}"
        );
        if !group.is_empty() {
            sql.push_str(&format!(" GROUP BY {group}"));
        }
        let k = agg.group.len();
        match agg.top {
            Some((measure, limit)) => {
                let col = k + match measure {
                    Measure::Calls => 1,
                    Measure::Cost => 3,
                };
                // Ties broken by the group values so a page is stable.
                let tie: Vec<String> = (1..=k).map(|i| i.to_string()).collect();
                let tie = if tie.is_empty() {
                    String::new()
                } else {
                    format!(", {}", tie.join(", "))
                };
                sql.push_str(&format!(" ORDER BY {col} DESC{tie} LIMIT {limit}"));
            }
            None if k > 0 => {
                let cols: Vec<String> = (1..=k).map(|i| i.to_string()).collect();
                sql.push_str(&format!(" ORDER BY {}", cols.join(", ")));
            }
            None => {}
        }
        let mut out = Vec::new();
        match self {
            Storage::Sqlite(pool) => {
                for row in fetch!(pool, &sql, agg, binds) {
                    out.push(totals(read_key!(row, agg.group), |i| row.try_get(k + i))?);
                }
            }
            Storage::Postgres(PgStore { pool, .. }) => {
                for row in fetch!(pool, &sql, agg, binds) {
                    out.push(totals(read_key!(row, agg.group), |i| row.try_get(k + i))?);
                }
            }
        }
        if estimated && !out.is_empty() {
            let mut sketches: HashMap<Vec<Value>, UsersSketch> = HashMap::new();
            self.blobs(agg, Reads::Users, |key, blob| {
                sketches
                    .entry(key)
                    .or_default()
                    .merge(&decode_users(blob.as_deref()));
            })
            .await?;
            for t in &mut out {
                t.users = sketches
                    .get(&t.key)
                    .map_or(0, |s| s.estimate().try_into().unwrap_or(i64::MAX));
            }
        }
        Ok(out)
    }

    /// Latency sketches merged per group (every matching rollup row is read: keep `group` and
    /// the range as narrow as the report allows).
    pub async fn sketches(
        &self,
        agg: &Aggregate<'_>,
    ) -> Result<HashMap<Vec<Value>, Histogram<u64>>, DbError> {
        let mut out: HashMap<Vec<Value>, Histogram<u64>> = HashMap::new();
        self.blobs(agg, Reads::Latency, |key, blob| {
            let sketch = decode_sketch(blob.as_deref());
            merge_sketch(out.entry(key).or_insert_with(new_sketch), &sketch);
        })
        .await?;
        Ok(out)
    }

    /// Every matching row's group values and its sketch of kind `reads`, handed to `add`.
    async fn blobs(
        &self,
        agg: &Aggregate<'_>,
        reads: Reads,
        mut add: impl FnMut(Vec<Value>, Option<Vec<u8>>),
    ) -> Result<(), DbError> {
        let (source, binds) = agg.source(reads);
        let column = match reads {
            Reads::Users => "users_sketch",
            Reads::Latency | Reads::Counters => "latency_sketch",
        };
        let sql = format!("SELECT {}{column}{source}", agg.select_group());
        let k = agg.group.len();
        match self {
            Storage::Sqlite(pool) => {
                for row in fetch!(pool, &sql, agg, binds) {
                    add(read_key!(row, agg.group), row.try_get(k)?);
                }
            }
            Storage::Postgres(PgStore { pool, .. }) => {
                for row in fetch!(pool, &sql, agg, binds) {
                    add(read_key!(row, agg.group), row.try_get(k)?);
                }
            }
        }
        Ok(())
    }
}

fn totals(
    key: Vec<Value>,
    get: impl Fn(usize) -> Result<i64, sqlx::Error>,
) -> Result<Totals, DbError> {
    Ok(Totals {
        key,
        calls: get(0)?,
        errors: get(1)?,
        cost: get(2)?,
        request_bytes: get(3)?,
        response_bytes: get(4)?,
        users: get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600;
    const D: i64 = 86_400;

    #[test]
    fn tiles_with_days_in_the_middle_and_hours_at_the_ends() {
        let from = 10 * D + 5 * H;
        let to = 13 * D + 2 * H;
        assert_eq!(
            Segment::tile(from, to, i64::MIN / 4),
            vec![
                Segment {
                    granularity: Granularity::Hour,
                    from,
                    to: 11 * D
                },
                Segment {
                    granularity: Granularity::Day,
                    from: 11 * D,
                    to: 13 * D
                },
                Segment {
                    granularity: Granularity::Hour,
                    from: 13 * D,
                    to
                },
            ]
        );
    }

    #[test]
    fn reads_the_narrowest_cube_that_holds_the_query() {
        let q = |group: &'static [Column]| Aggregate {
            group,
            ..Aggregate::default()
        };
        assert_eq!(q(&[]).cube(false), Cube::Org);
        assert_eq!(
            q(&[Column::Bucket, Column::StatusClass]).cube(false),
            Cube::Org
        );
        assert_eq!(q(&[Column::Method, Column::Route]).cube(true), Cube::Route);
        assert_eq!(
            q(&[Column::Rule, Column::Decision]).cube(false),
            Cube::Endpoint
        );
        assert_eq!(q(&[Column::Org, Column::User]).cube(false), Cube::Caller);
        assert_eq!(q(&[Column::User, Column::Decision]).cube(false), Cube::User);
        assert_eq!(q(&[Column::User, Column::Route]).cube(false), Cube::Full);
        assert_eq!(
            q(&[Column::User, Column::StatusClass]).cube(false),
            Cube::Full
        );
        // Counting users needs the user; filtering served requests needs the decision.
        let users = Aggregate {
            count_users: true,
            ..q(&[])
        };
        assert_eq!(users.cube(false), Cube::Caller);
        assert!(!users.users_estimated());
        assert_eq!(
            users.cube(true),
            Cube::Org,
            "sketch queries never count users"
        );
        // Users by route are estimated from the route cube's users sketches.
        let users_by_route = Aggregate {
            count_users: true,
            ..q(&[Column::Route])
        };
        assert_eq!(users_by_route.cube(false), Cube::Route);
        assert!(users_by_route.users_estimated());
        let served_routes = Aggregate {
            served_only: true,
            ..q(&[Column::Route])
        };
        assert_eq!(served_routes.cube(false), Cube::Endpoint);
        // Sketches only where they are kept.
        assert_eq!(q(&[Column::Rule]).cube(true), Cube::Full);
        // Minutes by route are in the full cube only.
        let minutes = Segment::single(Granularity::Minute, 0, 3_600);
        let by_route_per_minute = Aggregate {
            segments: &minutes,
            ..q(&[Column::Route])
        };
        assert_eq!(by_route_per_minute.cube(false), Cube::Full);
        assert_eq!(by_route_per_minute.cube(true), Cube::Full);
    }

    #[test]
    fn tiles_whole_weeks_from_monday_to_monday_where_week_rows_are_complete() {
        // Day 0 (1970-01-01) was a Thursday: days 4, 11, 18 and 25 are Mondays.
        let seg = |granularity, from, to| Segment {
            granularity,
            from,
            to,
        };
        let (from, to) = (2 * D + 5 * H, 26 * D + 2 * H);
        assert_eq!(
            Segment::tile(from, to, i64::MIN / 4),
            vec![
                seg(Granularity::Hour, from, 3 * D),
                seg(Granularity::Day, 3 * D, 4 * D),
                seg(Granularity::Week, 4 * D, 25 * D),
                seg(Granularity::Day, 25 * D, 26 * D),
                seg(Granularity::Hour, 26 * D, to),
            ]
        );
        // Week rows complete only from day 11 on: days before it.
        assert_eq!(
            Segment::tile(from, to, 11 * D),
            vec![
                seg(Granularity::Hour, from, 3 * D),
                seg(Granularity::Day, 3 * D, 11 * D),
                seg(Granularity::Week, 11 * D, 25 * D),
                seg(Granularity::Day, 25 * D, 26 * D),
                seg(Granularity::Hour, 26 * D, to),
            ]
        );
        // Tiles always cover the range exactly, end to end.
        for (from, to) in [(0, 40 * D), (7 * H, 33 * D + 5 * H), (4 * D, 11 * D)] {
            let s = Segment::tile(from, to, 0);
            assert_eq!(s.first().map(|s| s.from), Some(from));
            assert_eq!(s.last().map(|s| s.to), Some(to));
            assert!(s.windows(2).all(|w| w[0].to == w[1].from), "{s:?}");
        }
    }

    #[test]
    fn tiles_within_one_day_with_hours_only() {
        let s = Segment::tile(10 * D + H, 10 * D + 5 * H, 0);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].granularity, Granularity::Hour);
        // Whole days only: one day segment.
        let s = Segment::tile(10 * D, 12 * D, 0);
        assert_eq!(
            s,
            vec![Segment {
                granularity: Granularity::Day,
                from: 10 * D,
                to: 12 * D
            }]
        );
    }
}

/// What `export` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportSource {
    /// Raw events (kept for the retention period).
    Events,
    /// Rollup rows of one granularity (counters; the sketches stay in the database).
    Rollups(Granularity),
}

/// One exported raw event; times in RFC 3339 with microseconds.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EventRecord {
    /// Event id (UUIDv7).
    pub id: String,
    /// When the request happened.
    pub timestamp: String,
    /// Org.
    pub org: String,
    /// User or key, if any.
    pub user: Option<String>,
    /// Method.
    pub method: String,
    /// Route template.
    pub route: String,
    /// Response status.
    pub status: i64,
    /// Latency, µs.
    pub latency_us: i64,
    /// Request body bytes.
    pub request_bytes: i64,
    /// Response body bytes.
    pub response_bytes: i64,
    /// Cost units.
    pub cost: i64,
    /// `allowed`, `limited`, `shadow_limited`.
    pub decision: String,
    /// The deciding rule, if any.
    pub rule: Option<String>,
    /// `envoy` or `worker`.
    pub edge: String,
    /// The edge node.
    pub node: String,
    /// Custom dimensions, as a JSON object (text).
    pub dimensions: Option<String>,
}

/// One exported rollup row.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RollupRecord {
    /// Bucket start, RFC 3339.
    pub bucket: String,
    /// Org.
    pub org: String,
    /// User ('' when none).
    pub user: String,
    /// Route template.
    pub route: String,
    /// Method.
    pub method: String,
    /// 1..5.
    pub status_class: i64,
    /// Decision.
    pub decision: String,
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

/// A row of an export.
#[derive(Clone, Debug, PartialEq)]
pub enum ExportRecord {
    /// A raw event.
    Event(EventRecord),
    /// A rollup row.
    Rollup(RollupRecord),
}

/// Rows sent ahead of the reader before the query waits: bounds the memory of a slow client's
/// export to this many rows.
const EXPORT_BUFFER: usize = 1_024;

fn rfc3339_micros(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

impl Storage {
    /// Streams the rows of `org` (every org when `None`) in `[from, to)` (seconds), oldest
    /// first. The query runs in its own task and stops when the receiver is dropped; a failure
    /// mid-way arrives as the last item.
    pub fn export(
        &self,
        source: ExportSource,
        org: Option<String>,
        from: i64,
        to: i64,
    ) -> tokio::sync::mpsc::Receiver<Result<ExportRecord, DbError>> {
        let (tx, rx) = tokio::sync::mpsc::channel(EXPORT_BUFFER);
        let storage = self.clone();
        tokio::spawn(async move {
            if let Err(e) = storage.export_into(source, org, from, to, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        rx
    }

    async fn export_into(
        &self,
        source: ExportSource,
        org: Option<String>,
        from: i64,
        to: i64,
        tx: &tokio::sync::mpsc::Sender<Result<ExportRecord, DbError>>,
    ) -> Result<(), DbError> {
        use futures_util::TryStreamExt;
        let org_filter = if org.is_some() { "org = $3 AND " } else { "" };
        let sql = match (source, self) {
            (ExportSource::Events, Storage::Sqlite(_)) => format!(
                "SELECT lower(hex(id)), ts, org, user_id, method, route, \
                 CAST(status AS BIGINT), latency_us, request_bytes, response_bytes, cost, \
                 decision, rule, edge, node, dimensions FROM events \
                 WHERE {org_filter}ts >= $1 AND ts < $2 ORDER BY ts, id"
            ),
            (ExportSource::Events, Storage::Postgres(_)) => format!(
                "SELECT CAST(id AS TEXT), CAST(EXTRACT(EPOCH FROM ts) * 1000000 AS BIGINT), \
                 org, user_id, method, route, CAST(status AS BIGINT), latency_us, \
                 request_bytes, response_bytes, cost, decision, rule, edge, node, \
                 CAST(dimensions AS TEXT) FROM events \
                 WHERE {org_filter}ts >= to_timestamp($1 / 1000000.0) \
                 AND ts < to_timestamp($2 / 1000000.0) ORDER BY ts, id"
            ),
            (ExportSource::Rollups(g), _) => format!(
                "SELECT CAST(bucket AS BIGINT), org, user_id, route, method, \
                 CAST(status_class AS BIGINT), decision, calls, errors, cost, request_bytes, \
                 response_bytes FROM rollups WHERE {org_filter}cube = 0 AND granularity = {} \
                 AND bucket >= $1 AND bucket < $2 ORDER BY bucket, org, key_hash",
                g.code()
            ),
        };
        // Events are stored in microseconds, rollup buckets in seconds.
        let (a, b) = match source {
            ExportSource::Events => (from * 1_000_000, to * 1_000_000),
            ExportSource::Rollups(_) => (from, to),
        };
        macro_rules! run {
            ($pool:expr) => {{
                let mut q = sqlx::query(&sql).bind(a).bind(b);
                if let Some(org) = &org {
                    q = q.bind(org.as_str());
                }
                let mut rows = q.fetch($pool);
                while let Some(row) = rows.try_next().await? {
                    let record = match source {
                        ExportSource::Events => {
                            let id: String = row.try_get(0)?;
                            ExportRecord::Event(EventRecord {
                                // SQLite gives the 16 bytes as hex: same text as a UUID's.
                                id: uuid::Uuid::try_parse(&id)
                                    .map(|u| u.to_string())
                                    .unwrap_or(id),
                                timestamp: rfc3339_micros(row.try_get(1)?),
                                org: row.try_get(2)?,
                                user: row.try_get(3)?,
                                method: row.try_get(4)?,
                                route: row.try_get(5)?,
                                status: row.try_get(6)?,
                                latency_us: row.try_get(7)?,
                                request_bytes: row.try_get(8)?,
                                response_bytes: row.try_get(9)?,
                                cost: row.try_get(10)?,
                                decision: row.try_get(11)?,
                                rule: row.try_get(12)?,
                                edge: row.try_get(13)?,
                                node: row.try_get(14)?,
                                dimensions: row.try_get(15)?,
                            })
                        }
                        ExportSource::Rollups(_) => ExportRecord::Rollup(RollupRecord {
                            bucket: rfc3339_micros(row.try_get::<i64, _>(0)? * 1_000_000),
                            org: row.try_get(1)?,
                            user: row.try_get(2)?,
                            route: row.try_get(3)?,
                            method: row.try_get(4)?,
                            status_class: row.try_get(5)?,
                            decision: row.try_get(6)?,
                            calls: row.try_get(7)?,
                            errors: row.try_get(8)?,
                            cost: row.try_get(9)?,
                            request_bytes: row.try_get(10)?,
                            response_bytes: row.try_get(11)?,
                        }),
                    };
                    if tx.send(Ok(record)).await.is_err() {
                        return Ok(()); // the client went away
                    }
                }
            }};
        }
        match self {
            Storage::Sqlite(pool) => run!(pool),
            Storage::Postgres(PgStore { pool, .. }) => run!(pool),
        }
        Ok(())
    }
}
