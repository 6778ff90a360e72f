//! Usage events: from every worker's log phase into one shared queue, and from there to the
//! collector by exactly one flusher.
//!
//! **One flusher, by lease.** `on_tick` fires in every worker's VM. The VM holding the lease (a
//! shared-data entry `tg:flusher` = owner id + expiry, taken and renewed by CAS) is the only one
//! that dequeues from the shared queue; the lease expires after three flush intervals, so if its
//! owner's VM goes away another worker takes over. A lease was chosen over a singleton
//! `envoy.bootstrap.wasm` service because it needs no second plugin in every config (Istio's
//! `WasmPlugin` cannot declare one), and it survives the owner's VM being torn down. Dequeuing
//! is atomic per item, so even two flushers for a moment (a lease race) never duplicate an event;
//! a VM that loses the lease still finishes sending what it already holds.
//!
//! **Delivery.** [`Outbox`] is the host-independent state machine: a bounded buffer, one batch
//! in flight at a time, retries with exponential backoff and jitter. A failed batch goes back to
//! the front with the same event ids, so the collector can drop a retry it already stored. When
//! the buffer is full the oldest waiting event is dropped and counted; nothing is dropped
//! silently.
//!
//! **Chunks.** Each worker's VM gathers its events in a [`Chunk`] and enqueues it every
//! [`CHUNK_EVENTS`] events, on every tick and when the VM is done, so the shared queue carries
//! one item per chunk rather than per request.
//!
//! **Limits.** The buffer lives in the flushing VM's memory: events it holds when Envoy replaces
//! that VM (a configuration change, a restart) are lost with it; events still on the shared
//! queue survive a configuration change and are sent by the next lease holder. Envoy does not
//! bound the shared queue itself; the lease holder drains it every tick (at most 250 ms), so it
//! holds at most a tick's worth of traffic.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

use crate::config::Batching;
use crate::store::{HostError, SharedData};

/// What the outbox asks the host to do on a tick.
#[derive(Debug, PartialEq, Eq)]
pub enum Flush {
    /// Nothing to send now.
    Idle,
    /// Send this body (an `EventBatch` JSON) holding `count` events.
    Send {
        /// The batch JSON.
        body: String,
        /// Events in it.
        count: usize,
    },
}

/// A batch's fate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the collector has it.
    Delivered,
    /// Anything else (non-2xx, timeout, no connection, a call that could not start).
    Failed,
}

/// Event delivery state for one VM.
#[derive(Debug)]
pub struct Outbox {
    cfg: Batching,
    buffer: VecDeque<String>,
    in_flight: Option<Vec<String>>,
    failures: u32,
    retry_at_ms: u64,
    last_flush_ms: u64,
    rng: u64,
    /// Events dropped because the buffer was full.
    pub dropped: u64,
}

impl Outbox {
    /// An empty outbox; `seed` feeds the jitter.
    pub fn new(cfg: Batching, seed: u64) -> Self {
        Self {
            cfg,
            buffer: VecDeque::new(),
            in_flight: None,
            failures: 0,
            retry_at_ms: 0,
            last_flush_ms: 0,
            rng: seed | 1,
            dropped: 0,
        }
    }

    /// Updates the settings (a reconfigure); events held are kept.
    pub fn reconfigure(&mut self, cfg: Batching) {
        self.cfg = cfg;
    }

    /// Events held (waiting and in flight).
    pub fn held(&self) -> usize {
        self.buffer.len() + self.in_flight.as_ref().map_or(0, Vec::len)
    }

    /// Whether a batch is in flight.
    pub fn busy(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Room for more events without dropping.
    pub fn room(&self) -> usize {
        self.cfg.buffer_cap.saturating_sub(self.held())
    }

    /// Adds one event's JSON; drops the oldest waiting event when full. Returns how many were
    /// dropped (0 or 1).
    pub fn push(&mut self, event: String) -> u64 {
        let mut dropped = 0;
        while self.held() >= self.cfg.buffer_cap && self.buffer.pop_front().is_some() {
            dropped += 1;
        }
        if self.held() >= self.cfg.buffer_cap {
            // Everything held is in flight: the newcomer is the one dropped.
            self.dropped += 1;
            return dropped + 1;
        }
        self.buffer.push_back(event);
        self.dropped += dropped;
        dropped
    }

    /// Decides whether to send a batch at `now_ms`: when none is in flight, the backoff has
    /// passed, and either a full batch is waiting or the flush interval has elapsed.
    pub fn poll(&mut self, now_ms: u64) -> Flush {
        if self.in_flight.is_some() || self.buffer.is_empty() || now_ms < self.retry_at_ms {
            return Flush::Idle;
        }
        let interval = u64::try_from(self.cfg.flush_interval.as_millis()).unwrap_or(u64::MAX);
        let due = now_ms.saturating_sub(self.last_flush_ms) >= interval;
        if self.buffer.len() < self.cfg.batch_size && !due {
            return Flush::Idle;
        }
        let n = self.buffer.len().min(self.cfg.batch_size);
        let batch: Vec<String> = self.buffer.drain(..n).collect();
        let body = batch_json(&batch);
        self.in_flight = Some(batch);
        self.last_flush_ms = now_ms;
        Flush::Send { body, count: n }
    }

    /// Records the fate of the batch in flight at `now_ms`; returns the retry delay when it
    /// failed.
    pub fn complete(&mut self, outcome: Outcome, now_ms: u64) -> Option<Duration> {
        let batch = self.in_flight.take()?;
        match outcome {
            Outcome::Delivered => {
                self.failures = 0;
                self.retry_at_ms = 0;
                None
            }
            Outcome::Failed => {
                for event in batch.into_iter().rev() {
                    self.buffer.push_front(event);
                }
                // Failures put events back: the cap still holds, dropping the oldest.
                while self.buffer.len() > self.cfg.buffer_cap {
                    self.buffer.pop_front();
                    self.dropped += 1;
                }
                self.failures = self.failures.saturating_add(1);
                let delay = self.backoff();
                let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                self.retry_at_ms = now_ms.saturating_add(delay_ms);
                Some(delay)
            }
        }
    }

    /// Exponential backoff with "equal jitter": half the capped exponential delay, plus a random
    /// share of the other half, so retries from many proxies spread out but never come early.
    fn backoff(&mut self) -> Duration {
        let base = u64::try_from(self.cfg.retry_initial.as_millis()).unwrap_or(u64::MAX);
        let max = u64::try_from(self.cfg.retry_max.as_millis()).unwrap_or(u64::MAX);
        let exp = self.failures.saturating_sub(1).min(30);
        let capped = base.saturating_mul(1u64 << exp).min(max);
        let half = capped / 2;
        let jitter = if half == 0 {
            0
        } else {
            self.next_random() % (half + 1)
        };
        Duration::from_millis(half + jitter)
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64: enough for jitter.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

/// `{"version":1,"events":[...]}` from events already serialised (no re-parse).
pub fn batch_json(events: &[String]) -> String {
    let len = events.iter().map(String::len).sum::<usize>() + events.len() + 32;
    let mut out = String::with_capacity(len);
    out.push_str("{\"version\":");
    out.push_str(&tollgate_core::event::BATCH_VERSION.to_string());
    out.push_str(",\"events\":[");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(e);
    }
    out.push_str("]}");
    out
}

/// Events a worker's VM gathers before it puts them on the shared queue as one item.
pub const CHUNK_EVENTS: usize = 64;

/// The events one worker's VM has serialised and not yet put on the shared queue, as one
/// newline-separated chunk.
///
/// Why: every enqueue takes the queue's lock and makes Envoy post a queue-ready callback into
/// the VM that registered the queue (a call into wasm), so one enqueue per request cost more
/// than the rest of the event path. A chunk pays that once per [`CHUNK_EVENTS`] events, or per
/// tick when traffic is light. Compact JSON has no raw newline (inside strings it is escaped),
/// so the newline separates events unambiguously.
#[derive(Debug, Default)]
pub struct Chunk {
    text: Vec<u8>,
    count: usize,
}

/// A full chunk: newline-separated JSON events, and how many.
pub type FullChunk = (Vec<u8>, usize);

impl Chunk {
    /// Adds one event's JSON; returns the full chunk when this event completed it.
    pub fn push(&mut self, event: &str) -> Option<FullChunk> {
        self.separate();
        self.text.extend_from_slice(event.as_bytes());
        self.added()
    }

    /// Serialises one event straight into the chunk (no string of its own to build and copy);
    /// returns the full chunk when this event completed it. On an error nothing is added.
    pub fn push_event<T: Serialize>(&mut self, event: &T) -> serde_json::Result<Option<FullChunk>> {
        let before = self.text.len();
        self.separate();
        if let Err(e) = serde_json::to_writer(&mut self.text, event) {
            self.text.truncate(before);
            return Err(e);
        }
        Ok(self.added())
    }

    fn separate(&mut self) {
        if self.count > 0 {
            self.text.push(b'\n');
        }
    }

    fn added(&mut self) -> Option<FullChunk> {
        self.count += 1;
        (self.count >= CHUNK_EVENTS).then(|| self.take()).flatten()
    }

    /// Whatever is gathered, emptying the chunk; `None` when empty.
    pub fn take(&mut self) -> Option<FullChunk> {
        if self.count == 0 {
            return None;
        }
        let count = std::mem::take(&mut self.count);
        let text = std::mem::replace(&mut self.text, Vec::with_capacity(CHUNK_EVENTS * 512));
        Some((text, count))
    }
}

/// The events of a chunk taken off the shared queue.
pub fn chunk_events(chunk: &str) -> impl Iterator<Item = &str> {
    chunk.split('\n').filter(|e| !e.is_empty())
}

/// The shared-data key of the flusher lease.
pub const LEASE_KEY: &str = "tg:flusher";

/// Tries to hold the flusher lease for `owner` until `now_ms + ttl_ms`: renews it when `owner`
/// holds it, takes it when it is free or expired. Returns whether `owner` holds it now.
pub fn acquire_lease<H: SharedData>(
    host: &H,
    owner: u64,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<bool, HostError> {
    let (value, cas) = host.get(LEASE_KEY)?;
    let current = value.as_deref().and_then(|v| {
        let owner = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
        let until = u64::from_le_bytes(v.get(8..16)?.try_into().ok()?);
        Some((owner, until))
    });
    let free = match current {
        None => true,
        Some((holder, until)) => holder == owner || until <= now_ms,
    };
    if !free {
        return Ok(false);
    }
    let mut lease = Vec::with_capacity(16);
    lease.extend_from_slice(&owner.to_le_bytes());
    lease.extend_from_slice(&now_ms.saturating_add(ttl_ms).to_le_bytes());
    // A missing lease is created unconditionally; two VMs may then both flush for a tick, which
    // costs nothing but a second batch (dequeues are atomic).
    host.set(LEASE_KEY, &lease, cas)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fake::FakeShared;

    fn cfg(batch: usize, cap: usize) -> Batching {
        Batching {
            flush_interval: Duration::from_millis(1000),
            batch_size: batch,
            buffer_cap: cap,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_millis(1000),
        }
    }

    fn sent(f: Flush) -> (String, usize) {
        match f {
            Flush::Send { body, count } => (body, count),
            Flush::Idle => panic!("expected a batch"),
        }
    }

    #[test]
    fn batches_on_size_and_on_interval() {
        let mut o = Outbox::new(cfg(2, 10), 1);
        o.push("1".into());
        assert_eq!(
            o.poll(10_000),
            Flush::Send {
                body: r#"{"version":1,"events":[1]}"#.into(),
                count: 1
            }
        );
        o.complete(Outcome::Delivered, 10_000);
        o.push("2".into());
        assert_eq!(o.poll(10_500), Flush::Idle, "not full, not due");
        o.push("3".into());
        o.push("4".into());
        let (body, n) = sent(o.poll(10_600));
        assert_eq!((body.as_str(), n), (r#"{"version":1,"events":[2,3]}"#, 2));
        assert_eq!(o.poll(10_600), Flush::Idle, "one batch in flight at a time");
        o.complete(Outcome::Delivered, 10_600);
        assert_eq!(o.poll(10_700), Flush::Idle);
        assert_eq!(sent(o.poll(11_600)).1, 1);
    }

    #[test]
    fn failures_retry_the_same_events_with_growing_jittered_delays() {
        let mut o = Outbox::new(cfg(3, 10), 42);
        for i in 0..3 {
            o.push(i.to_string());
        }
        let mut now = 5_000;
        let (first, _) = sent(o.poll(now));
        let mut delays = Vec::new();
        for _ in 0..6 {
            let d = o.complete(Outcome::Failed, now).unwrap();
            delays.push(d.as_millis() as u64);
            assert_eq!(o.poll(now + d.as_millis() as u64 - 1), Flush::Idle);
            now += d.as_millis() as u64;
            assert_eq!(sent(o.poll(now)).0, first, "same events, same order");
        }
        // 100, 200, 400, 800, 1000, 1000 capped, each in [half, full].
        for (d, cap) in delays.iter().zip([100, 200, 400, 800, 1000, 1000]) {
            assert!((cap / 2..=cap).contains(d), "{d} vs {cap}");
        }
        o.complete(Outcome::Delivered, now);
        assert_eq!(o.held(), 0);
        assert_eq!(o.dropped, 0);
    }

    #[test]
    fn the_buffer_is_bounded_and_drops_are_counted() {
        let mut o = Outbox::new(cfg(2, 3), 7);
        for i in 0..5 {
            o.push(i.to_string());
        }
        assert_eq!((o.held(), o.dropped), (3, 2));
        let (body, _) = sent(o.poll(2_000));
        assert_eq!(
            body, r#"{"version":1,"events":[2,3]}"#,
            "the oldest went first"
        );
        o.push("5".into()); // fills: held = 2 in flight + 4, 5 waiting -> drops 4
        assert_eq!((o.held(), o.dropped), (3, 3));
        o.push("6".into());
        assert_eq!((o.held(), o.dropped), (3, 4));
    }

    #[test]
    fn chunks_fill_at_the_chunk_size_and_split_back_into_the_same_events() {
        let mut chunk = Chunk::default();
        let events: Vec<String> = (0..CHUNK_EVENTS + 3)
            .map(|i| format!(r#"{{"n":{i},"text":"a\nb"}}"#))
            .collect();
        let mut full = Vec::new();
        for e in &events {
            full.extend(chunk.push(e));
        }
        assert_eq!(full.len(), 1, "one full chunk");
        assert_eq!(full[0].1, CHUNK_EVENTS);
        let rest = chunk.take().unwrap();
        assert_eq!(rest.1, 3);
        assert!(chunk.take().is_none(), "taken means empty");
        let (first, rest) = (
            std::str::from_utf8(&full[0].0).unwrap(),
            std::str::from_utf8(&rest.0).unwrap(),
        );
        let back: Vec<&str> = chunk_events(first).chain(chunk_events(rest)).collect();
        assert_eq!(back, events.iter().map(String::as_str).collect::<Vec<_>>());
    }

    #[test]
    fn events_are_serialised_into_the_chunk_as_their_json() {
        #[derive(serde::Serialize)]
        struct Event<'a> {
            n: u32,
            text: &'a str,
        }
        let mut chunk = Chunk::default();
        chunk.push_event(&Event { n: 1, text: "a\nb" }).unwrap();
        chunk.push(r#"{"n":2}"#);
        // A value serde_json refuses (a map with non-string keys) adds nothing.
        let bad: std::collections::BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into();
        assert!(chunk.push_event(&bad).is_err());
        chunk.push_event(&Event { n: 3, text: "" }).unwrap();
        let (text, count) = chunk.take().unwrap();
        assert_eq!(count, 3);
        let back: Vec<&str> = chunk_events(std::str::from_utf8(&text).unwrap()).collect();
        assert_eq!(
            back,
            [
                r#"{"n":1,"text":"a\nb"}"#,
                r#"{"n":2}"#,
                r#"{"n":3,"text":""}"#
            ]
        );
    }

    #[test]
    fn one_lease_holder_at_a_time() {
        let host = FakeShared::default();
        assert!(acquire_lease(&host, 1, 1_000, 3_000).unwrap());
        assert!(!acquire_lease(&host, 2, 2_000, 3_000).unwrap());
        assert!(acquire_lease(&host, 1, 2_000, 3_000).unwrap(), "renewal");
        assert!(!acquire_lease(&host, 2, 4_999, 3_000).unwrap());
        assert!(acquire_lease(&host, 2, 5_000, 3_000).unwrap(), "expired");
        assert!(!acquire_lease(&host, 1, 5_001, 3_000).unwrap());
    }
}
