//! The filter's Envoy stats. Envoy files wasm-defined metrics under its custom-stat namespace,
//! so `tollgate.allowed` shows on the admin `/stats` page as `wasmcustom.tollgate.allowed`.
//! Every worker's VM defines the same names and so shares one process-wide counter per name.
//!
//! Counters are added up in the VM and handed to Envoy on the VM's tick (at most 250 ms
//! apart) and when it shuts down: an `increment_metric` per request is a host call (a
//! wasm→C++ transition) on the request path, and `/stats` a tick behind is no loss for a
//! counter that Envoy's own stats sinks flush every few seconds anyway. The price: a VM that
//! dies without `on_done` (a trap) loses up to one tick of counts, as it loses the usage
//! events it had not queued yet.

use std::cell::Cell;

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

/// One stat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Requests allowed (shadow-limited ones excluded).
    Allowed,
    /// Requests denied (429, or 503 when failing closed).
    Limited,
    /// Requests a shadow rule would have denied; they went through.
    ShadowLimited,
    /// Requests let through by a bypass credential.
    Bypassed,
    /// Status-path requests answered by the filter.
    StatusServed,
    /// CAS conflicts on counters that were retried.
    CasRetries,
    /// Counters that could not be updated and were skipped (failure mode open).
    FailOpen,
    /// Requests denied because counters could not be updated (failure mode closed).
    FailClosed,
    /// Counter slots that had to be created on the request path.
    SlotCreatedLate,
    /// Usage events put on the shared queue.
    EventsQueued,
    /// Usage events the collector accepted.
    EventsSent,
    /// Usage events in batches that failed and will be retried.
    EventsRetried,
    /// Usage events dropped (buffer full, or the queue refused them).
    EventsDropped,
    /// Batches sent (attempts, successes and failures alike).
    Batches,
    /// Milliseconds from a batch's dispatch to its answer (histogram).
    FlushLatencyMs,
    /// Policies fetched from `config_url` and applied.
    PolicyUpdates,
    /// Policies fetched from `config_url` and rejected (the last good one stays).
    PolicyRejected,
    /// Host calls that failed outside the counter store (logged where they happen).
    HostErrors,
}

const ALL: [(Metric, &str, MetricType); 18] = [
    (Metric::Allowed, "tollgate.allowed", MetricType::Counter),
    (Metric::Limited, "tollgate.limited", MetricType::Counter),
    (
        Metric::ShadowLimited,
        "tollgate.shadow_limited",
        MetricType::Counter,
    ),
    (Metric::Bypassed, "tollgate.bypassed", MetricType::Counter),
    (
        Metric::StatusServed,
        "tollgate.status_served",
        MetricType::Counter,
    ),
    (
        Metric::CasRetries,
        "tollgate.cas_retries",
        MetricType::Counter,
    ),
    (Metric::FailOpen, "tollgate.fail_open", MetricType::Counter),
    (
        Metric::FailClosed,
        "tollgate.fail_closed",
        MetricType::Counter,
    ),
    (
        Metric::SlotCreatedLate,
        "tollgate.slot_created_late",
        MetricType::Counter,
    ),
    (
        Metric::EventsQueued,
        "tollgate.events_queued",
        MetricType::Counter,
    ),
    (
        Metric::EventsSent,
        "tollgate.events_sent",
        MetricType::Counter,
    ),
    (
        Metric::EventsRetried,
        "tollgate.events_retried",
        MetricType::Counter,
    ),
    (
        Metric::EventsDropped,
        "tollgate.events_dropped",
        MetricType::Counter,
    ),
    (Metric::Batches, "tollgate.batches", MetricType::Counter),
    (
        Metric::FlushLatencyMs,
        "tollgate.flush_latency_ms",
        MetricType::Histogram,
    ),
    (
        Metric::PolicyUpdates,
        "tollgate.policy_updates",
        MetricType::Counter,
    ),
    (
        Metric::PolicyRejected,
        "tollgate.policy_rejected",
        MetricType::Counter,
    ),
    (
        Metric::HostErrors,
        "tollgate.host_errors",
        MetricType::Counter,
    ),
];

/// Metric ids as the host gave them (a metric the host refused is simply not recorded), and
/// the counts not yet handed to the host.
#[derive(Debug, Default)]
pub struct Metrics {
    ids: Vec<Option<u32>>,
    pending: Vec<Cell<u64>>,
}

impl Metrics {
    /// Defines every metric with the host.
    pub fn define() -> Self {
        let ids = ALL
            .iter()
            .map(|(_, name, kind)| hostcalls::define_metric(*kind, name).ok())
            .collect();
        Self {
            ids,
            pending: ALL.iter().map(|_| Cell::new(0)).collect(),
        }
    }

    /// Whether nothing was defined yet.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The metric's place in [`ALL`], which lists them in declaration order (a test checks).
    fn index(metric: Metric) -> usize {
        metric as usize
    }

    fn id(&self, metric: Metric) -> Option<u32> {
        self.ids.get(Self::index(metric)).copied().flatten()
    }

    /// Adds `by` to a counter (handed to the host by the next [`Metrics::flush`]).
    pub fn add(&self, metric: Metric, by: u64) {
        // Most calls on the request path add 0 (no retries, no failures).
        if by == 0 {
            return;
        }
        if let Some(count) = self.pending.get(Self::index(metric)) {
            count.set(count.get().saturating_add(by));
        }
    }

    /// Hands the counts gathered since the last flush to the host.
    pub fn flush(&self) {
        for (id, count) in self.ids.iter().zip(&self.pending) {
            let by = count.take();
            if let (Some(id), true) = (id, by > 0) {
                let _ = hostcalls::increment_metric(*id, i64::try_from(by).unwrap_or(i64::MAX));
            }
        }
    }

    /// Adds one to a counter.
    pub fn inc(&self, metric: Metric) {
        self.add(metric, 1);
    }

    /// Records a histogram value.
    pub fn record(&self, metric: Metric, value: u64) {
        if let Some(id) = self.id(metric) {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_one_name() {
        for (i, (m, name, _)) in ALL.iter().enumerate() {
            assert_eq!(ALL.iter().position(|(x, _, _)| x == m), Some(i), "{name}");
            assert_eq!(
                Metrics::index(*m),
                i,
                "{name} is listed in declaration order"
            );
            assert!(name.starts_with("tollgate."));
        }
    }
}
