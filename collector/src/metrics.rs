//! Prometheus metrics, kept in atomics and rendered as text at `/metrics`: few enough that a
//! metrics library would cost more than it saves.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Debug, Default)]
struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            if secs <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {n}");
    }
}

/// The collector's counters and histograms.
#[derive(Debug, Default)]
pub struct Metrics {
    batches: AtomicU64,
    accepted: AtomicU64,
    duplicates: AtomicU64,
    rejected: AtomicU64,
    overloaded: AtomicU64,
    db_errors: AtomicU64,
    commits: AtomicU64,
    committed_events: AtomicU64,
    folded_events: AtomicU64,
    batch_latency: Histogram,
    commit_latency: Histogram,
    fold_latency: Histogram,
}

impl Metrics {
    /// One ingest request answered.
    pub fn observe_batch(
        &self,
        took: Duration,
        accepted: usize,
        duplicates: usize,
        rejected: usize,
    ) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.accepted.fetch_add(accepted as u64, Ordering::Relaxed);
        self.duplicates
            .fetch_add(duplicates as u64, Ordering::Relaxed);
        self.rejected.fetch_add(rejected as u64, Ordering::Relaxed);
        self.batch_latency.observe(took);
    }

    /// One group commit.
    pub fn observe_commit(&self, took: Duration, events: usize) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.committed_events
            .fetch_add(events as u64, Ordering::Relaxed);
        self.commit_latency.observe(took);
    }

    /// One fold of queued events into the rollups.
    pub fn observe_fold(&self, took: Duration, events: usize) {
        self.folded_events
            .fetch_add(events as u64, Ordering::Relaxed);
        self.fold_latency.observe(took);
    }

    /// A batch refused with 503 because the queue was full.
    pub fn overloaded(&self) {
        self.overloaded.fetch_add(1, Ordering::Relaxed);
    }

    /// A database error (a failed commit, a failed query).
    pub fn db_error(&self) {
        self.db_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition.
    pub fn render(&self, queued_events: usize) -> String {
        let mut out = String::with_capacity(4096);
        let counters = [
            (
                "tollgate_ingest_batches_total",
                "Ingest requests answered.",
                &self.batches,
            ),
            (
                "tollgate_ingest_events_accepted_total",
                "Events newly stored.",
                &self.accepted,
            ),
            (
                "tollgate_ingest_events_duplicate_total",
                "Events already stored (retries).",
                &self.duplicates,
            ),
            (
                "tollgate_ingest_events_rejected_total",
                "Events refused by validation.",
                &self.rejected,
            ),
            (
                "tollgate_ingest_overloaded_total",
                "Batches refused with 503 because the write queue was full.",
                &self.overloaded,
            ),
            (
                "tollgate_db_errors_total",
                "Database errors.",
                &self.db_errors,
            ),
            ("tollgate_commits_total", "Group commits.", &self.commits),
            (
                "tollgate_committed_events_total",
                "Events written by group commits (new or not).",
                &self.committed_events,
            ),
            (
                "tollgate_rollup_folded_events_total",
                "Events folded into the rollups.",
                &self.folded_events,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP tollgate_ingest_queued_events Events queued for commit.\n\
             # TYPE tollgate_ingest_queued_events gauge\ntollgate_ingest_queued_events {queued_events}"
        );
        self.batch_latency.render(
            &mut out,
            "tollgate_ingest_batch_seconds",
            "Time from request to acknowledgement of an ingest batch.",
        );
        self.commit_latency.render(
            &mut out,
            "tollgate_commit_seconds",
            "Time of one group commit.",
        );
        self.fold_latency.render(
            &mut out,
            "tollgate_rollup_fold_seconds",
            "Time of one fold of queued events into the rollups.",
        );
        out
    }
}
