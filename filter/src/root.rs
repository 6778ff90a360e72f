//! The root context: one per worker VM. It compiles the configuration, owns the runtime every
//! request of this worker shares, and on its tick flushes usage events (when it holds the
//! flusher lease) and follows policy updates.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};
use tollgate_core::event::{EventIdGenerator, UsageEvent};
use tollgate_core::hash::fingerprint;
use tollgate_core::Policy;

use crate::config::{Compiled, Settings};
use crate::events::{acquire_lease, chunk_events, Chunk, Flush, FullChunk, Outbox, Outcome};
use crate::host::{self, Host};
use crate::http::Request;
use crate::metrics::{Metric, Metrics};
use crate::store::{init_table, SharedData};

/// The name of the shared queue usage events travel on.
pub const QUEUE: &str = "tollgate.events";
/// Shared-data key of the per-process VM sequence (unique flusher ids and id seeds).
const VM_SEQ_KEY: &str = "tg:vm-seq";
/// Longest tick: "batched on size" waits at most this long.
const MAX_TICK: Duration = Duration::from_millis(250);

/// What every request of one worker shares; replaced whole when the policy changes, so a
/// request sees one policy from start to end.
pub struct Runtime {
    /// The policy.
    pub policy: Policy,
    /// Everything else.
    pub settings: Settings,
    /// Stats.
    pub metrics: Rc<Metrics>,
    /// Node name for events.
    pub node: String,
    /// The events queue, when events are sent.
    pub queue: Option<u32>,
    /// Event ids: taken out, used, put back (a VM is single-threaded).
    pub ids: Rc<Cell<Option<EventIdGenerator>>>,
    /// Seed for a fresh generator, should the cell ever be empty.
    pub seed: u64,
    /// Events of this VM not yet on the shared queue (kept across policy swaps).
    pub pending: Rc<RefCell<Chunk>>,
}

impl Runtime {
    /// Serialises one event into this VM's chunk; returns the chunk when that filled it, to be
    /// handed to [`Runtime::enqueue`].
    pub fn gather_event(&self, event: &UsageEvent) -> serde_json::Result<Option<FullChunk>> {
        self.pending.borrow_mut().push_event(event)
    }

    /// Puts whatever this VM has gathered on the shared queue (every tick, and at shutdown).
    pub fn flush_pending(&self) {
        let gathered = self.pending.borrow_mut().take();
        if let Some((chunk, count)) = gathered {
            self.enqueue(&chunk, count);
        }
    }

    /// Puts a chunk of `count` events on the shared queue.
    pub fn enqueue(&self, chunk: &[u8], count: usize) {
        let Some(queue) = self.queue else {
            return;
        };
        match hostcalls::enqueue_shared_queue(queue, Some(chunk)) {
            Ok(()) => self.metrics.add(Metric::EventsQueued, count as u64),
            Err(s) => {
                self.metrics.add(Metric::EventsDropped, count as u64);
                host::log(
                    LogLevel::Warn,
                    &format!("tollgate: cannot queue {count} usage events: {s:?}"),
                );
            }
        }
    }
}

/// The batch in flight: call token, events in it, when it left.
struct EventsCall {
    token: u32,
    count: usize,
    sent_ms: u64,
}

/// The root context.
pub struct Root {
    context_id: u32,
    runtime: Option<Rc<Runtime>>,
    metrics: Rc<Metrics>,
    owner: u64,
    outbox: Option<Outbox>,
    events_call: Option<EventsCall>,
    policy_call: Option<u32>,
    tick: Duration,
    last_poll_ms: u64,
    fetched_etag: Option<String>,
    applied_policy_cas: Option<u32>,
}

impl Root {
    /// A root context (nothing configured yet).
    pub fn new(context_id: u32) -> Self {
        Self {
            context_id,
            runtime: None,
            metrics: Rc::new(Metrics::default()),
            owner: 0,
            outbox: None,
            events_call: None,
            policy_call: None,
            tick: MAX_TICK,
            last_poll_ms: 0,
            fetched_etag: None,
            applied_policy_cas: None,
        }
    }

    fn configure(&mut self) -> Result<(), String> {
        let bytes = host::plugin_configuration()
            .ok_or_else(|| "invalid configuration at (document): it is empty".to_string())?;
        let compiled = Compiled::from_json(&bytes).map_err(|e| e.to_string())?;
        let Compiled { policy, settings } = compiled;

        // The table is written before any request can touch it (see store.rs); the marker
        // makes this a no-op everywhere but in the first VM configured, the main thread's canary.
        let written = init_table(&Host, settings.slots)
            .map_err(|e| format!("cannot set up counters: {e}"))?;
        host::log(
            LogLevel::Info,
            &format!(
                "tollgate: configured (context {}, {} counter slots, {written} written now)",
                self.context_id, settings.slots
            ),
        );
        if Host.get(VM_SEQ_KEY).ok().and_then(|(_, cas)| cas).is_none() {
            let _ = Host.set(VM_SEQ_KEY, &0u64.to_le_bytes(), None);
        }
        if settings.clock_header.is_some() || settings.fail_store {
            host::log(
                LogLevel::Warn,
                "tollgate: TEST-ONLY settings are enabled (test_only); never use them in production",
            );
        }

        if self.metrics.is_empty() {
            self.metrics = Rc::new(Metrics::define());
        }
        let seq = next_vm_seq();
        let now = host::now();
        self.owner = fingerprint(
            &[
                seq.to_le_bytes(),
                now.as_nanos().to_le_bytes(),
                u64::from(self.context_id).to_le_bytes(),
            ]
            .concat(),
        ) | 1;
        let queue = match &settings.collector {
            Some(_) => Some(
                hostcalls::register_shared_queue(QUEUE)
                    .map_err(|s| format!("cannot register the events queue: {s:?}"))?,
            ),
            None => None,
        };
        let node = settings
            .node
            .clone()
            .or_else(|| host::property_string(&["node", "id"]).filter(|n| !n.is_empty()))
            .unwrap_or_else(|| "envoy".to_string());
        match &mut self.outbox {
            Some(outbox) => outbox.reconfigure(settings.batching),
            None => self.outbox = Some(Outbox::new(settings.batching, self.owner)),
        }
        self.tick = settings.batching.flush_interval.min(MAX_TICK);
        if let Some(src) = &settings.policy_source {
            self.tick = self.tick.min(src.every);
        }
        self.runtime = Some(Rc::new(Runtime {
            policy,
            node,
            queue,
            metrics: self.metrics.clone(),
            ids: Rc::new(Cell::new(Some(EventIdGenerator::new(self.owner)))),
            seed: self.owner,
            pending: self
                .runtime
                .as_ref()
                .map_or_else(Rc::default, |rt| rt.pending.clone()),
            settings,
        }));
        self.applied_policy_cas = None;
        hostcalls::set_tick_period(self.tick).map_err(|s| format!("cannot set a tick: {s:?}"))?;
        Ok(())
    }

    fn now_ms() -> u64 {
        host::now().as_millis()
    }

    fn lease_ttl_ms(&self) -> u64 {
        u64::try_from(self.tick.as_millis())
            .unwrap_or(1_000)
            .saturating_mul(4)
            .max(1_000)
    }

    /// Moves events from the shared queue into this VM's outbox, as room allows.
    fn drain_queue(&mut self, rt: &Runtime) {
        let (Some(queue), Some(outbox)) = (rt.queue, self.outbox.as_mut()) else {
            return;
        };
        // Take at most what fits, plus one batch: the cap applies to what is held, and
        // dequeuing a little past it keeps the shared queue (which Envoy does not bound) short.
        // Items are chunks of up to `CHUNK_EVENTS` events.
        let limit = outbox.room() + rt.settings.batching.batch_size;
        let mut taken = 0;
        while taken < limit {
            match hostcalls::dequeue_shared_queue(queue) {
                Ok(Some(bytes)) => match String::from_utf8(bytes) {
                    Ok(chunk) => {
                        for event in chunk_events(&chunk) {
                            taken += 1;
                            let dropped = outbox.push(event.to_string());
                            rt.metrics.add(Metric::EventsDropped, dropped);
                        }
                    }
                    // Not ours to read: one chunk, its event count unknown.
                    Err(_) => {
                        taken += 1;
                        rt.metrics.inc(Metric::EventsDropped);
                    }
                },
                Ok(None) => break,
                Err(s) => {
                    rt.metrics.inc(Metric::HostErrors);
                    host::log(LogLevel::Warn, &format!("tollgate: dequeue failed: {s:?}"));
                    break;
                }
            }
        }
    }

    fn flush(&mut self, rt: &Runtime, now_ms: u64) {
        let Some(collector) = &rt.settings.collector else {
            return;
        };
        if self.events_call.is_some() {
            return;
        }
        let Some(outbox) = self.outbox.as_mut() else {
            return;
        };
        let Flush::Send { body, count } = outbox.poll(now_ms) else {
            return;
        };
        let mut headers = vec![
            (":method", "POST"),
            (":path", collector.path.as_str()),
            (":authority", collector.authority.as_str()),
            ("content-type", "application/json"),
        ];
        if let Some(auth) = &collector.authorization {
            headers.push(("authorization", auth.as_str()));
        }
        rt.metrics.inc(Metric::Batches);
        match hostcalls::dispatch_http_call(
            &collector.cluster,
            headers,
            Some(body.as_bytes()),
            vec![],
            collector.timeout,
        ) {
            Ok(token) => {
                self.events_call = Some(EventsCall {
                    token,
                    count,
                    sent_ms: now_ms,
                })
            }
            Err(s) => {
                host::log(
                    LogLevel::Warn,
                    &format!("tollgate: cannot call the collector: {s:?}"),
                );
                rt.metrics.add(Metric::EventsRetried, count as u64);
                outbox.complete(Outcome::Failed, now_ms);
            }
        }
    }

    fn poll_policy(&mut self, rt: &Runtime, now_ms: u64) {
        let Some(src) = &rt.settings.policy_source else {
            return;
        };
        let every = u64::try_from(src.every.as_millis()).unwrap_or(u64::MAX);
        if self.policy_call.is_some() || now_ms.saturating_sub(self.last_poll_ms) < every {
            return;
        }
        self.last_poll_ms = now_ms;
        let mut headers = vec![
            (":method", "GET"),
            (":path", src.path.as_str()),
            (":authority", src.authority.as_str()),
        ];
        if let Some(etag) = &self.fetched_etag {
            headers.push(("if-none-match", etag.as_str()));
        }
        match hostcalls::dispatch_http_call(
            &src.cluster,
            headers,
            None,
            vec![],
            Duration::from_secs(2),
        ) {
            Ok(token) => self.policy_call = Some(token),
            Err(s) => {
                rt.metrics.inc(Metric::HostErrors);
                host::log(
                    LogLevel::Warn,
                    &format!("tollgate: cannot fetch the policy: {s:?}"),
                );
            }
        }
    }

    /// Adopts the policy the flusher published in shared data, if it changed.
    fn follow_policy(&mut self) {
        let Some(rt) = self.runtime.clone() else {
            return;
        };
        let Some(src) = &rt.settings.policy_source else {
            return;
        };
        let key = policy_key(&src.path, &src.authority);
        let Ok((Some(bytes), cas)) = Host.get(&key) else {
            return;
        };
        if cas.is_none() || cas == self.applied_policy_cas {
            return;
        }
        self.applied_policy_cas = cas;
        let text = String::from_utf8_lossy(&bytes);
        // Published policies were compiled by the flusher before publishing; this cannot fail
        // unless the build differs, and then the last good policy stays.
        match Policy::from_json(&text) {
            Ok(policy) => {
                self.runtime = Some(Rc::new(Runtime {
                    policy,
                    settings: rt.settings.clone(),
                    metrics: rt.metrics.clone(),
                    node: rt.node.clone(),
                    queue: rt.queue,
                    ids: rt.ids.clone(),
                    seed: rt.seed,
                    pending: rt.pending.clone(),
                }));
            }
            Err(e) => host::log(
                LogLevel::Error,
                &format!("tollgate: published policy rejected, keeping the last good one: {e}"),
            ),
        }
    }

    fn policy_response(&mut self, rt: &Runtime, num_headers: usize, body_size: usize) {
        let status = host::call_response_header(":status");
        match status.as_deref() {
            Some("304") => {}
            Some("200") => {
                let etag = host::call_response_header("etag");
                let body = host::call_response_body(body_size).unwrap_or_default();
                let text = String::from_utf8_lossy(&body);
                self.fetched_etag = etag;
                match Policy::from_json(&text) {
                    Ok(_) => {
                        let Some(src) = &rt.settings.policy_source else {
                            return;
                        };
                        let key = policy_key(&src.path, &src.authority);
                        match Host.set(&key, text.as_bytes(), None) {
                            Ok(_) => {
                                rt.metrics.inc(Metric::PolicyUpdates);
                                host::log(
                                    LogLevel::Info,
                                    "tollgate: fetched a new policy; every worker switches on its next tick",
                                );
                            }
                            Err(e) => {
                                rt.metrics.inc(Metric::HostErrors);
                                host::log(LogLevel::Warn, &format!("tollgate: {e}"));
                            }
                        }
                    }
                    Err(e) => {
                        rt.metrics.inc(Metric::PolicyRejected);
                        host::log(
                            LogLevel::Error,
                            &format!(
                                "tollgate: fetched policy rejected, keeping the last good one: {e}"
                            ),
                        );
                    }
                }
            }
            other => {
                let _ = num_headers;
                host::log(
                    LogLevel::Warn,
                    &format!(
                        "tollgate: policy fetch answered {}",
                        other.unwrap_or("nothing (timeout or no connection)")
                    ),
                );
            }
        }
    }

    /// A tick's work: follow a new policy, queue this VM's events, and (holding the lease) drain
    /// the queue and poll for policy; deliver what this VM holds.
    fn tick(&mut self) {
        self.follow_policy();
        let Some(rt) = self.runtime.clone() else {
            return;
        };
        rt.flush_pending();
        let now_ms = Self::now_ms();
        let owner = match acquire_lease(&Host, self.owner, now_ms, self.lease_ttl_ms()) {
            Ok(owner) => owner,
            Err(e) => {
                rt.metrics.inc(Metric::HostErrors);
                host::log(LogLevel::Warn, &format!("tollgate: {e}"));
                false
            }
        };
        if owner {
            self.drain_queue(&rt);
            self.poll_policy(&rt, now_ms);
        }
        // A VM that lost the lease still delivers what it holds.
        self.flush(&rt, now_ms);
    }
}

fn policy_key(path: &str, authority: &str) -> String {
    format!("tg:policy:{authority}{path}")
}

/// A number no other VM in this process has (a CAS-incremented shared counter; 0 if the host
/// keeps refusing, which only weakens id seeds, never correctness of counters).
fn next_vm_seq() -> u64 {
    for _ in 0..16 {
        let Ok((value, cas)) = Host.get(VM_SEQ_KEY) else {
            return 0;
        };
        let current = value
            .as_deref()
            .and_then(|v| v.get(..8))
            .and_then(|v| <[u8; 8]>::try_from(v).ok())
            .map_or(0, u64::from_le_bytes);
        let next = current.wrapping_add(1);
        if cas.is_some() && Host.set(VM_SEQ_KEY, &next.to_le_bytes(), cas) == Ok(true) {
            return next;
        }
    }
    0
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        // The VM is going away (a configuration change, a drain): what it gathered goes on the
        // shared queue, which outlives it, for the next flusher.
        if let Some(rt) = &self.runtime {
            rt.flush_pending();
        }
        self.metrics.flush();
        true
    }

    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let Some(rt) = self.runtime.clone() else {
            return;
        };
        let now_ms = Self::now_ms();
        if self.policy_call == Some(token_id) {
            self.policy_call = None;
            self.policy_response(&rt, num_headers, body_size);
            return;
        }
        let Some(call) = self.events_call.take_if(|c| c.token == token_id) else {
            return;
        };
        rt.metrics
            .record(Metric::FlushLatencyMs, now_ms.saturating_sub(call.sent_ms));
        let ok = host::call_response_header(":status")
            .and_then(|s| s.parse::<u16>().ok())
            .is_some_and(|s| (200..300).contains(&s));
        let Some(outbox) = self.outbox.as_mut() else {
            return;
        };
        if ok {
            outbox.complete(Outcome::Delivered, now_ms);
            rt.metrics.add(Metric::EventsSent, call.count as u64);
            // A full batch may be waiting: send it now rather than on the next tick.
            self.flush(&rt, now_ms);
        } else {
            outbox.complete(Outcome::Failed, now_ms);
            rt.metrics.add(Metric::EventsRetried, call.count as u64);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        match self.configure() {
            Ok(()) => true,
            Err(message) => {
                host::log(LogLevel::Critical, &format!("tollgate: {message}"));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        self.tick();
        // Last, so the tick's own counts go too.
        self.metrics.flush();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let rt = self.runtime.clone()?;
        Some(Box::new(Request::new(rt)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
