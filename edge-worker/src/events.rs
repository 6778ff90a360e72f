//! Usage-event buffering per isolate: bounded, batched, retried with backoff, drops counted.
//!
//! Each request's event is pushed here after its response. At most one flusher per isolate runs
//! (inside `ctx.wait_until`, see `frontend_worker.rs`): it takes a batch, POSTs it, and on a
//! failure waits [`Backoff::delay_ms`] and sends the very same batch again. Event ids are UUIDv7
//! from [`tollgate_core::event::EventIdGenerator`] (time-ordered, random per isolate), and the
//! collector stores each id once, so a retried batch is idempotent. A batch that still fails after
//! its attempts goes back to the front of the buffer for the next flusher; when the buffer is
//! full the oldest events are dropped and counted.

use std::collections::VecDeque;

use tollgate_core::event::{EventBatch, UsageEvent};

use crate::config::EventSettings;

/// The per-isolate event buffer.
#[derive(Debug, Default)]
pub struct EventBuffer {
    queue: VecDeque<UsageEvent>,
    /// Events dropped because the buffer was full (since the isolate started).
    pub dropped: u64,
    /// Events the collector accepted (since the isolate started).
    pub sent: u64,
    /// Whether a flusher is running in this isolate.
    pub flushing: bool,
}

impl EventBuffer {
    /// Events waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Adds an event, dropping (and counting) the oldest past `cap`.
    pub fn push(&mut self, event: UsageEvent, cap: usize) {
        self.queue.push_back(event);
        self.trim(cap);
    }

    fn trim(&mut self, cap: usize) {
        while self.queue.len() > cap {
            self.queue.pop_front();
            self.dropped += 1;
        }
    }

    /// Takes up to `max` of the oldest events as a batch; `None` when empty.
    pub fn take_batch(&mut self, max: usize) -> Option<EventBatch> {
        if self.queue.is_empty() {
            return None;
        }
        let n = max.min(self.queue.len());
        Some(EventBatch::new(self.queue.drain(..n).collect()))
    }

    /// Puts a batch that could not be sent back at the front, oldest first, then trims to `cap`
    /// from the front (the oldest go first).
    pub fn put_back(&mut self, batch: EventBatch, cap: usize) {
        for event in batch.events.into_iter().rev() {
            self.queue.push_front(event);
        }
        self.trim(cap);
    }
}

/// Exponential backoff with deterministic jitter: `initial · 2^(attempt-1)`, capped, minus up
/// to a quarter taken from `seed` (so isolates that failed together do not retry together).
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    initial_ms: u64,
    max_ms: u64,
}

impl Backoff {
    /// From the settings.
    pub fn new(settings: &EventSettings) -> Self {
        Self {
            initial_ms: settings.retry_initial_ms.max(1),
            max_ms: settings.retry_max_ms.max(settings.retry_initial_ms.max(1)),
        }
    }

    /// The wait before retry number `attempt` (1-based).
    pub fn delay_ms(&self, attempt: u32, seed: u64) -> u64 {
        let exp = attempt.saturating_sub(1).min(32);
        let base = self.initial_ms.saturating_mul(1u64 << exp).min(self.max_ms);
        let jitter = if base >= 4 { seed % (base / 4) } else { 0 };
        base - jitter
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tollgate_core::event::{EdgeKind, EventIdGenerator, NO_ORG};
    use tollgate_core::{Timestamp, Verdict};

    fn event(ids: &mut EventIdGenerator, n: u64) -> UsageEvent {
        let now = Timestamp::from_millis(1_800_000_000_000 + n);
        UsageEvent {
            id: ids.next_id(now),
            timestamp: tollgate_core::event::to_datetime(now),
            org: NO_ORG.into(),
            user: None,
            plan: "free".into(),
            method: "GET".into(),
            route: "*".into(),
            status: 200,
            latency_us: 1,
            request_bytes: 0,
            response_bytes: 0,
            cost: 1,
            decision: Verdict::Allowed,
            rule: None,
            edge: EdgeKind::Cloudflare,
            node: "test".into(),
            dimensions: BTreeMap::new(),
            metrics: BTreeMap::new(),
            fingerprint: None,
        }
    }

    #[test]
    fn batches_are_bounded_and_a_failed_batch_is_resent_first_with_its_ids() {
        let mut ids = EventIdGenerator::new(7);
        let mut buffer = EventBuffer::default();
        for n in 0..5 {
            buffer.push(event(&mut ids, n), 10);
        }
        let first = buffer.take_batch(3).unwrap();
        assert_eq!(first.events.len(), 3);
        let first_ids: Vec<_> = first.events.iter().map(|e| e.id).collect();
        assert!(
            first_ids.windows(2).all(|w| w[0] < w[1]),
            "time-ordered ids"
        );
        buffer.put_back(first, 10);
        let again = buffer.take_batch(3).unwrap();
        assert_eq!(
            again.events.iter().map(|e| e.id).collect::<Vec<_>>(),
            first_ids
        );
        assert_eq!(buffer.take_batch(3).unwrap().events.len(), 2);
        assert!(buffer.take_batch(3).is_none());
    }

    #[test]
    fn a_full_buffer_drops_the_oldest_and_counts_them() {
        let mut ids = EventIdGenerator::new(7);
        let mut buffer = EventBuffer::default();
        let events: Vec<_> = (0..5).map(|n| event(&mut ids, n)).collect();
        let newest = events[4].id;
        for e in events {
            buffer.push(e, 3);
        }
        assert_eq!((buffer.len(), buffer.dropped), (3, 2));
        let batch = buffer.take_batch(3).unwrap();
        assert_eq!(batch.events.last().unwrap().id, newest);
        buffer.put_back(batch, 2);
        assert_eq!((buffer.len(), buffer.dropped), (2, 3));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let settings = EventSettings {
            retry_initial_ms: 100,
            retry_max_ms: 1_000,
            ..EventSettings::default()
        };
        let b = Backoff::new(&settings);
        for (attempt, base) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1_000),
            (40, 1_000),
        ] {
            for seed in [0, 1, 99, u64::MAX] {
                let d = b.delay_ms(attempt, seed);
                assert!(d <= base && d > base - base / 4 - 1, "{attempt} {seed} {d}");
            }
        }
    }
}
