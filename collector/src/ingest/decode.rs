//! Request bodies into events: the core's JSON batch, NDJSON, a CloudEvents JSON batch; gzip
//! inflated under a hard bound. Whole-body problems are errors (400/413/415); a single bad
//! event is reported by index and the rest of the batch goes on.

use std::io::Read;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tollgate_core::event::{UsageEvent, BATCH_VERSION};

/// The CloudEvents `type` of a Tollgate usage event.
pub const CLOUDEVENT_TYPE: &str = "dev.tollgate.usage.v1";

/// Why a body was refused whole.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Not parseable; the message names what is wrong and where.
    #[error("{0}")]
    Malformed(String),
    /// Too big, compressed or inflated.
    #[error("{0}")]
    TooLarge(String),
    /// A content type or encoding we do not read.
    #[error("{0}")]
    Unsupported(String),
}

/// Body formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `{"version":1,"events":[…]}`.
    Batch,
    /// One event per line.
    Ndjson,
    /// `application/cloudevents-batch+json`: an array of CloudEvents.
    CloudEvents,
}

impl Format {
    /// From a `Content-Type`; JSON when absent.
    pub fn from_content_type(ct: Option<&str>) -> Result<Self, DecodeError> {
        let mime = ct
            .unwrap_or("application/json")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match mime.as_str() {
            "application/json" => Ok(Format::Batch),
            "application/x-ndjson" | "application/ndjson" | "application/jsonl" => {
                Ok(Format::Ndjson)
            }
            "application/cloudevents-batch+json" => Ok(Format::CloudEvents),
            other => Err(DecodeError::Unsupported(format!(
                "content type '{other}' is not accepted: send application/json, \
                 application/x-ndjson or application/cloudevents-batch+json"
            ))),
        }
    }
}

/// Inflates a gzip body, refusing to produce more than `max` bytes.
pub fn gunzip(body: &[u8], max: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(max));
    let mut reader = flate2::read::MultiGzDecoder::new(body).take(max as u64 + 1);
    reader
        .read_to_end(&mut out)
        .map_err(|e| DecodeError::Malformed(format!("gzip body: {e}")))?;
    if out.len() > max {
        return Err(DecodeError::TooLarge(format!(
            "body inflates past {max} bytes; send smaller batches"
        )));
    }
    Ok(out)
}

/// One event's parse result: the event, or why not.
pub type Parsed = Result<UsageEvent, String>;

/// Parses a body into per-event results (index = position in the batch).
pub fn parse(format: Format, body: &[u8], max_events: usize) -> Result<Vec<Parsed>, DecodeError> {
    let parsed = match format {
        Format::Batch => parse_batch(body, max_events)?,
        Format::Ndjson => parse_ndjson(body, max_events)?,
        Format::CloudEvents => parse_cloudevents(body, max_events)?,
    };
    Ok(parsed)
}

fn too_many(n: usize, max: usize) -> DecodeError {
    DecodeError::TooLarge(format!("{n} events in one batch; at most {max}"))
}

fn parse_batch(body: &[u8], max_events: usize) -> Result<Vec<Parsed>, DecodeError> {
    // A batch whose events are all well-formed — nearly every batch an edge sends — is read in
    // one pass. Any other body is read again element by element, so each bad event is named by
    // its index and the others still go on.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct WellFormed {
        version: u32,
        events: Vec<UsageEvent>,
    }
    if let Ok(batch) = serde_json::from_slice::<WellFormed>(body) {
        if batch.version == BATCH_VERSION && batch.events.len() <= max_events {
            return Ok(batch.events.into_iter().map(Ok).collect());
        }
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Batch<'a> {
        version: u32,
        #[serde(borrow)]
        events: Vec<&'a RawValue>,
    }
    let batch: Batch<'_> = serde_json::from_slice(body)
        .map_err(|e| DecodeError::Malformed(format!("malformed batch: {e}")))?;
    if batch.version != BATCH_VERSION {
        return Err(DecodeError::Malformed(format!(
            "batch version {} is not supported; send version {BATCH_VERSION}",
            batch.version
        )));
    }
    if batch.events.len() > max_events {
        return Err(too_many(batch.events.len(), max_events));
    }
    Ok(batch
        .events
        .into_iter()
        .map(|raw| serde_json::from_str(raw.get()).map_err(|e| e.to_string()))
        .collect())
}

fn parse_ndjson(body: &[u8], max_events: usize) -> Result<Vec<Parsed>, DecodeError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| DecodeError::Malformed(format!("NDJSON body is not UTF-8: {e}")))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() > max_events {
        return Err(too_many(lines.len(), max_events));
    }
    Ok(lines
        .into_iter()
        .map(|l| serde_json::from_str(l).map_err(|e| e.to_string()))
        .collect())
}

fn parse_cloudevents(body: &[u8], max_events: usize) -> Result<Vec<Parsed>, DecodeError> {
    let items: Vec<&RawValue> = serde_json::from_slice(body).map_err(|e| {
        DecodeError::Malformed(format!("malformed CloudEvents batch (a JSON array): {e}"))
    })?;
    if items.len() > max_events {
        return Err(too_many(items.len(), max_events));
    }
    Ok(items
        .into_iter()
        .map(|raw| from_cloudevent(raw.get()))
        .collect())
}

/// A CloudEvent (`specversion` 1.0, `type` [`CLOUDEVENT_TYPE`]) whose `data` is a usage event;
/// `data.id` defaults to the CloudEvent's `id` (a UUIDv7), `data.timestamp` to its `time`,
/// `data.node` to its `source`, and `data.edge` to `external`.
fn from_cloudevent(text: &str) -> Parsed {
    let mut ce: Map<String, Value> =
        serde_json::from_str(text).map_err(|e| format!("not a CloudEvent object: {e}"))?;
    match ce.get("specversion").and_then(Value::as_str) {
        Some("1.0") => {}
        other => return Err(format!("`specversion` must be \"1.0\", got {other:?}")),
    }
    match ce.get("type").and_then(Value::as_str) {
        Some(CLOUDEVENT_TYPE) => {}
        other => {
            return Err(format!(
                "`type` must be \"{CLOUDEVENT_TYPE}\", got {other:?}"
            ))
        }
    }
    let mut data = match ce.remove("data") {
        Some(Value::Object(map)) => map,
        _ => return Err("`data` must be a JSON object holding the usage event".into()),
    };
    let defaults = [("id", "id"), ("time", "timestamp"), ("source", "node")];
    for (ce_field, event_field) in defaults {
        if !data.contains_key(event_field) {
            if let Some(v) = ce.get(ce_field) {
                data.insert(event_field.into(), v.clone());
            }
        }
    }
    data.entry("edge")
        .or_insert_with(|| Value::String("external".into()));
    serde_json::from_value(Value::Object(data)).map_err(|e| format!("`data`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        let check = |ct: Option<&str>, expected: Option<Format>| {
            assert_eq!(Format::from_content_type(ct).ok(), expected, "{ct:?}");
        };
        check(None, Some(Format::Batch));
        check(Some("application/json; charset=utf-8"), Some(Format::Batch));
        check(Some("application/x-ndjson"), Some(Format::Ndjson));
        check(
            Some("application/cloudevents-batch+json"),
            Some(Format::CloudEvents),
        );
        check(Some("text/plain"), None);
    }

    #[test]
    fn gzip_bombs_are_refused() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![b' '; 10 << 20]).unwrap();
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 64 << 10);
        assert!(matches!(
            gunzip(&bomb, 1 << 20),
            Err(DecodeError::TooLarge(_))
        ));
        assert_eq!(gunzip(&bomb, 11 << 20).unwrap().len(), 10 << 20);
        assert!(matches!(
            gunzip(b"nope", 100),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn a_well_formed_batch_and_one_with_a_bad_event_read_alike_but_for_it() {
        let event = |n: u64| {
            format!(
                r#"{{"id":"0190f5a0-0000-7000-8000-{n:012}","timestamp":"2026-01-01T00:00:00Z",
                "org":"acme","plan":"pro","method":"GET","route":"/v1/x","status":200,
                "latency_us":1,"request_bytes":0,"response_bytes":0,"cost":1,
                "decision":"allowed","edge":"envoy","node":"n"}}"#
            )
        };
        let good = format!(r#"{{"version":1,"events":[{},{}]}}"#, event(1), event(2));
        let good = parse(Format::Batch, good.as_bytes(), 10).unwrap();
        assert_eq!(good.len(), 2);
        assert!(good.iter().all(Result::is_ok));
        // The same events around a bad one: the good ones come out the same, the bad one named.
        let mixed = format!(
            r#"{{"version":1,"events":[{},{{"id":"nope"}},{}]}}"#,
            event(1),
            event(2)
        );
        let mixed = parse(Format::Batch, mixed.as_bytes(), 10).unwrap();
        assert_eq!(mixed[0].as_ref().unwrap(), good[0].as_ref().unwrap());
        assert!(mixed[1].is_err());
        assert_eq!(mixed[2].as_ref().unwrap(), good[1].as_ref().unwrap());
        // The bound holds on the one-pass read too.
        let three = format!(
            r#"{{"version":1,"events":[{},{},{}]}}"#,
            event(1),
            event(2),
            event(3)
        );
        assert!(matches!(
            parse(Format::Batch, three.as_bytes(), 2),
            Err(DecodeError::TooLarge(_))
        ));
    }

    #[test]
    fn malformed_json_names_the_problem() {
        let err = parse(Format::Batch, b"{\"version\":1,\"events\":[", 10).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        let err = parse(Format::Batch, b"{\"version\":2,\"events\":[]}", 10).unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
        let bad = parse(Format::Ndjson, b"{}\n", 10).unwrap();
        assert!(bad[0].as_ref().unwrap_err().contains("missing field"));
    }
}
