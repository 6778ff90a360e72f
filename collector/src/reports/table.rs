//! Reports as rows and columns: CSV (through the `csv` crate, formula-safe) and a plain-text
//! table for the terminal.

use chrono::{DateTime, SecondsFormat, Utc};

/// One value in a table.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    /// Text from the data (user ids, routes…): the cell a spreadsheet could execute.
    Text(String),
    /// An integer.
    Int(i64),
    /// A ratio or mean.
    Float(f64),
    /// A time.
    Time(DateTime<Utc>),
    /// Nothing.
    Empty,
}

impl Cell {
    fn render(&self) -> String {
        match self {
            Cell::Text(s) => s.clone(),
            Cell::Int(i) => i.to_string(),
            Cell::Float(f) => format!("{f:.4}"),
            Cell::Time(t) => t.to_rfc3339_opts(SecondsFormat::Secs, true),
            Cell::Empty => String::new(),
        }
    }
}

/// A report's rows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Table {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows, each as long as `columns`.
    pub rows: Vec<Vec<Cell>>,
}

/// Makes a text value inert in spreadsheets: a leading `=`, `+`, `-`, `@`, tab or carriage
/// return would start a formula (CSV injection, OWASP), so such values get a leading `'`,
/// which spreadsheets display as text and strip.
pub fn neutralise(text: &str) -> std::borrow::Cow<'_, str> {
    match text.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{text}").into(),
        _ => text.into(),
    }
}

/// CSV lines for `rows`, text cells neutralised.
pub fn csv_lines(rows: impl IntoIterator<Item = Vec<Cell>>) -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    for row in rows {
        // Writing to a Vec cannot fail; rows of unequal width are a bug the tests catch.
        let _ = w.write_record(row.iter().map(|c| match c {
            Cell::Text(s) => neutralise(s).into_owned(),
            other => other.render(),
        }));
    }
    let bytes = w.into_inner().unwrap_or_default();
    String::from_utf8(bytes).unwrap_or_default()
}

impl Table {
    /// A table with these columns and no rows.
    pub fn new<S: Into<String>>(columns: impl IntoIterator<Item = S>) -> Self {
        Self {
            columns: columns.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// CSV with a header row; text cells neutralised (numbers are ours and stay numbers).
    pub fn to_csv(&self) -> String {
        csv_lines(
            std::iter::once(self.columns.iter().map(|c| Cell::Text(c.clone())).collect())
                .chain(self.rows.iter().cloned()),
        )
    }

    /// Columns padded to their widest value, for a terminal.
    pub fn to_text(&self) -> String {
        let rendered: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| r.iter().map(Cell::render).collect())
            .collect();
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|i| {
                rendered
                    .iter()
                    .filter_map(|r| r.get(i))
                    .map(|s| s.chars().count())
                    .chain([self.columns[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        };
        let mut out = line(&self.columns);
        out.push('\n');
        for r in &rendered {
            out.push_str(&line(r));
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_neutralises_formulas_and_quotes_what_needs_it() {
        let mut t = Table::new(["user", "calls"]);
        for user in ["=1+1", "+cmd", "-2", "@SUM(A1)", "plain", "a,b", "\tx"] {
            t.rows.push(vec![Cell::Text(user.into()), Cell::Int(-3)]);
        }
        let csv = t.to_csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines,
            [
                "user,calls",
                "'=1+1,-3",
                "'+cmd,-3",
                "'-2,-3",
                "'@SUM(A1),-3",
                "plain,-3",
                "\"a,b\",-3",
                "'\tx,-3",
            ]
        );
    }

    #[test]
    fn text_tables_align_columns() {
        let mut t = Table::new(["route", "calls"]);
        t.rows
            .push(vec![Cell::Text("/v1/long/route".into()), Cell::Int(5)]);
        t.rows.push(vec![Cell::Text("/x".into()), Cell::Int(12345)]);
        assert_eq!(
            t.to_text(),
            "route           calls\n/v1/long/route  5\n/x              12345\n"
        );
    }
}
