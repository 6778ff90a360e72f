//! The collector's limits: what a request may weigh and how much work may wait.

use std::time::Duration;

/// Bounds on input and on queued work. Every one of them is a reason a request can be refused.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request body as sent (compressed or not); more gets 413.
    pub max_body_bytes: usize,
    /// Largest body after decompression; a gzip body that inflates past it is a decompression
    /// bomb and gets 413.
    pub max_decompressed_bytes: usize,
    /// Most events in one batch; more gets 413.
    pub max_events_per_batch: usize,
    /// Furthest an event's timestamp may be ahead of the collector's clock.
    pub max_ahead: Duration,
    /// Raw-event retention: older events are rejected (they would be deleted at once) and
    /// pruned.
    pub retention: Duration,
    /// Events accepted into the write queue but not yet committed; past it, 503 + Retry-After.
    pub max_queued_events: usize,
    /// Most events one group commit takes.
    pub max_group_events: usize,
    /// Report requests per minute per API key.
    pub report_rate_per_minute: u64,
    /// Report requests a key may make at once before the per-minute rate applies.
    pub report_burst: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 << 20,
            max_decompressed_bytes: 64 << 20,
            max_events_per_batch: 10_000,
            max_ahead: Duration::from_secs(300),
            retention: Duration::from_secs(30 * 86_400),
            max_queued_events: 200_000,
            max_group_events: 20_000,
            report_rate_per_minute: 1_200,
            report_burst: 600,
        }
    }
}

/// Largest latency accepted: one day, in microseconds.
pub const MAX_LATENCY_US: u64 = 86_400 * 1_000_000;
/// Largest byte count accepted per body: 1 TiB.
pub const MAX_BYTES: u64 = 1 << 40;
/// Largest cost accepted for one request.
pub const MAX_COST: u64 = 1_000_000_000;
