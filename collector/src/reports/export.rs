//! `export`: raw events or rollup rows of a range, streamed as CSV or NDJSON. Unlike the other
//! reports it is not a document but a stream, so it has its own shape: [`plan`] validates the
//! request, [`header`] and [`encode`] turn rows into text as they arrive.

use super::params::series_range;
use super::table::csv_lines;
use super::{Cell, Format, ReportCtx, ReportError, ReportQuery};
use crate::db::reports::{ExportRecord, ExportSource};

/// A validated export request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportPlan {
    /// Events or rollups.
    pub source: ExportSource,
    /// One org, or every org.
    pub org: Option<String>,
    /// Start, seconds (inclusive).
    pub from: i64,
    /// End, seconds (exclusive).
    pub to: i64,
    /// CSV or NDJSON.
    pub format: Format,
}

/// Checks an export request: `source=events|rollups`, `interval` for rollups, a range and a
/// format (`ndjson` by default).
pub fn plan(ctx: ReportCtx<'_>, q: &ReportQuery) -> Result<ExportPlan, ReportError> {
    q.only(&["from", "to", "days", "format", "source", "interval"])?;
    let range = q.range(ctx.now)?;
    let source = match q.source.as_deref() {
        None | Some("events") => {
            if q.interval.is_some() {
                return Err(ReportError::BadParam {
                    param: "interval",
                    message: "only for `source=rollups`".into(),
                });
            }
            ExportSource::Events
        }
        Some("rollups") => ExportSource::Rollups(q.interval()?),
        Some(other) => {
            return Err(ReportError::BadParam {
                param: "source",
                message: format!("'{other}': one of events, rollups"),
            })
        }
    };
    let range = match source {
        ExportSource::Rollups(g) => series_range(range, g)?,
        ExportSource::Events => range,
    };
    let format = match q.format {
        None => Format::Ndjson,
        Some(_) => q.format(true)?,
    };
    if format == Format::Json {
        return Err(ReportError::BadParam {
            param: "format",
            message: "an export is `ndjson` or `csv`".into(),
        });
    }
    Ok(ExportPlan {
        source,
        org: ctx.org.map(str::to_owned),
        from: range.from,
        to: range.to,
        format,
    })
}

const EVENT_COLUMNS: [&str; 16] = [
    "id",
    "timestamp",
    "org",
    "user",
    "method",
    "route",
    "status",
    "latency_us",
    "request_bytes",
    "response_bytes",
    "cost",
    "decision",
    "rule",
    "edge",
    "node",
    "dimensions",
];

const ROLLUP_COLUMNS: [&str; 12] = [
    "bucket",
    "org",
    "user",
    "route",
    "method",
    "status_class",
    "decision",
    "calls",
    "errors",
    "cost",
    "request_bytes",
    "response_bytes",
];

/// What starts the stream: the CSV header row, or nothing for NDJSON.
pub fn header(plan: &ExportPlan) -> String {
    if plan.format != Format::Csv {
        return String::new();
    }
    let columns: &[&str] = match plan.source {
        ExportSource::Events => &EVENT_COLUMNS,
        ExportSource::Rollups(_) => &ROLLUP_COLUMNS,
    };
    csv_lines([columns.iter().map(|c| Cell::Text((*c).into())).collect()])
}

fn text(s: &str) -> Cell {
    Cell::Text(s.to_owned())
}

fn opt(s: &Option<String>) -> Cell {
    s.as_deref().map_or(Cell::Empty, text)
}

/// One row as a CSV line (text neutralised against formula injection) or a JSON line.
pub fn encode(record: &ExportRecord, format: Format) -> String {
    if format != Format::Csv {
        let mut line = match record {
            ExportRecord::Event(e) => serde_json::to_string(e),
            ExportRecord::Rollup(r) => serde_json::to_string(r),
        }
        .unwrap_or_default();
        line.push('\n');
        return line;
    }
    let cells = match record {
        ExportRecord::Event(e) => vec![
            text(&e.id),
            text(&e.timestamp),
            text(&e.org),
            opt(&e.user),
            text(&e.method),
            text(&e.route),
            Cell::Int(e.status),
            Cell::Int(e.latency_us),
            Cell::Int(e.request_bytes),
            Cell::Int(e.response_bytes),
            Cell::Int(e.cost),
            text(&e.decision),
            opt(&e.rule),
            text(&e.edge),
            text(&e.node),
            opt(&e.dimensions),
        ],
        ExportRecord::Rollup(r) => vec![
            text(&r.bucket),
            text(&r.org),
            text(&r.user),
            text(&r.route),
            text(&r.method),
            Cell::Int(r.status_class),
            text(&r.decision),
            Cell::Int(r.calls),
            Cell::Int(r.errors),
            Cell::Int(r.cost),
            Cell::Int(r.request_bytes),
            Cell::Int(r.response_bytes),
        ],
    };
    csv_lines([cells])
}
