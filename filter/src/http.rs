//! The HTTP context: one per request. It translates Envoy's request into the core's
//! [`HttpRequest`], runs [`Policy::gate`](tollgate_core::Policy::gate) over the shared slot
//! table, answers denials and the status path itself, decorates allowed responses, charges a
//! weighted cost, releases concurrency leases and queues the usage event.

use std::rc::Rc;
use std::time::SystemTime;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel, MapType};
use tollgate_core::decision::Lease;
use tollgate_core::engine::Request as EngineRequest;
use tollgate_core::event::{
    request_fingerprint, to_datetime, EdgeKind, EventIdGenerator, UsageEvent, NO_ORG,
};
use tollgate_core::gate::{split_query, GateAction, HttpRequest};
use tollgate_core::policy::document::IdentitySource;
use tollgate_core::policy::Claims;
use tollgate_core::{Identity, Timestamp, Verdict};

use crate::host::{self, Host};
use crate::metrics::Metric;
use crate::root::Runtime;
use crate::store::SlotStore;
use crate::timing::{self, Part, Stopwatch};

/// What the request phase decided, for the later phases.
struct Decided {
    identity: Identity,
    verdict: Verdict,
    rule: Option<String>,
    /// Headers for the upstream's response (none for local replies).
    headers: Vec<(&'static str, String)>,
    leases: Vec<Lease>,
    /// The filter answered itself (429/503, status path): the response is ours.
    local_status: Option<u16>,
    /// Whether counters were consulted (not for a bypass credential): only then is a reported
    /// cost charged.
    metered: bool,
}

/// One request.
pub struct Request {
    rt: Rc<Runtime>,
    started: Option<SystemTime>,
    now: Timestamp,
    method: String,
    path: String,
    cost: u64,
    /// Body bytes that passed the filter each way, summed from the body callbacks Envoy makes
    /// anyway: asking for the `request.size` and `response.size` properties instead costs two
    /// property reads (each several header reads' worth) per request.
    request_body_bytes: u64,
    response_body_bytes: u64,
    /// The response's `:status`, read with its headers: a header read costs a quarter of the
    /// `response.code` property read the log phase would otherwise make.
    response_status: Option<u16>,
    decided: Option<Decided>,
}

impl Request {
    /// A request under runtime `rt` (the policy in force when it arrived).
    pub fn new(rt: Rc<Runtime>) -> Self {
        Self {
            rt,
            started: None,
            now: Timestamp::default(),
            method: String::new(),
            path: String::new(),
            cost: 1,
            request_body_bytes: 0,
            response_body_bytes: 0,
            response_status: None,
            decided: None,
        }
    }

    fn claims_value(&self, claim: &str) -> Option<String> {
        let c = &self.rt.settings.claims;
        host::property_string(&[
            "metadata",
            "filter_metadata",
            &c.namespace,
            &c.payload_key,
            claim,
        ])
        .filter(|v| !v.is_empty())
    }

    fn decide(&mut self, watch: &mut Stopwatch) -> Action {
        self.started = host::system_now();
        self.method = host::request_header(":method").unwrap_or_default();
        self.path = host::request_header(":path").unwrap_or_default();
        self.now = self
            .rt
            .settings
            .clock_header
            .as_deref()
            .and_then(host::request_header)
            .and_then(|ms| ms.trim().parse::<u64>().ok())
            // The request's start time is the decision's clock: one host call, not two.
            .map_or_else(|| host::timestamp(self.started), Timestamp::from_millis);

        watch.lap(Part::Request);
        // Each read is a host call: only for the sources the policy tries.
        let policy = &self.rt.policy;
        let client_ip = policy
            .tries(IdentitySource::ClientIp)
            .then(|| host::property_string(&["source", "address"]))
            .flatten()
            .map(|a| strip_port(&a));
        let (sub, org, plan) = {
            let c = &self.rt.settings.claims;
            let sub = policy
                .tries(IdentitySource::Jwt)
                .then(|| self.claims_value(&c.sub))
                .flatten();
            // Claims are read only when a verified subject is there.
            match sub {
                Some(sub) => (
                    Some(sub),
                    self.claims_value(&c.org),
                    self.claims_value(&c.plan),
                ),
                None => (None, None, None),
            }
        };
        let claims = sub.as_deref().map(|sub| Claims {
            sub: Some(sub),
            org: org.as_deref(),
            plan: plan.as_deref(),
        });
        let lookup = |name: &str| host::request_header(name);
        let req = HttpRequest {
            method: &self.method,
            path: &self.path,
            header: &lookup,
            client_ip: client_ip.as_deref(),
            claims,
            cost: self.cost,
        };
        watch.lap(Part::Identity);
        let mut store = SlotStore::new(&Host, self.rt.settings.slots);
        store.fail = self.rt.settings.fail_store;
        let action = self
            .rt
            .policy
            .gate(&self.rt.settings.gate, &req, self.now, &mut store);
        watch.lap(Part::Gate);
        let m = &self.rt.metrics;
        m.add(Metric::SlotCreatedLate, u64::from(store.created_late));

        match action {
            GateAction::Skip => Action::Continue,
            GateAction::Status { identity, body } => {
                m.inc(Metric::StatusServed);
                self.decided = Some(Decided {
                    identity,
                    verdict: Verdict::Allowed,
                    rule: None,
                    headers: Vec::new(),
                    leases: Vec::new(),
                    local_status: Some(200),
                    metered: false,
                });
                self.respond(200, &[("content-type", "application/json".into())], &body)
            }
            GateAction::Proceed {
                identity,
                decision,
                headers,
            } => {
                m.add(Metric::CasRetries, u64::from(decision.stats.cas_retries));
                m.add(Metric::FailOpen, u64::from(decision.stats.failures));
                if decision.verdict == Verdict::ShadowLimited {
                    m.inc(Metric::ShadowLimited);
                } else {
                    m.inc(Metric::Allowed);
                }
                let metered = !decision.statuses.is_empty();
                if decision.bypassed {
                    m.inc(Metric::Bypassed);
                }
                self.decided = Some(Decided {
                    identity,
                    verdict: decision.verdict,
                    rule: decision.rule.as_deref().map(str::to_string),
                    headers,
                    leases: decision.leases,
                    local_status: None,
                    metered,
                });
                Action::Continue
            }
            GateAction::Reject {
                identity,
                decision,
                status,
                headers,
                body,
            } => {
                m.add(Metric::CasRetries, u64::from(decision.stats.cas_retries));
                if decision.failed_closed {
                    m.inc(Metric::FailClosed);
                } else {
                    m.add(Metric::FailOpen, u64::from(decision.stats.failures));
                }
                m.inc(Metric::Limited);
                self.decided = Some(Decided {
                    identity,
                    verdict: decision.verdict,
                    rule: decision.rule.as_deref().map(str::to_string),
                    headers: Vec::new(),
                    leases: Vec::new(),
                    local_status: Some(status),
                    metered: true,
                });
                self.respond(status, &headers, &body)
            }
        }
    }

    /// Answers the request without forwarding it.
    fn respond(&self, status: u16, headers: &[(&str, String)], body: &str) -> Action {
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match hostcalls::send_http_response(u32::from(status), pairs, Some(body.as_bytes())) {
            Ok(()) => Action::Pause,
            Err(s) => {
                // The local reply failed: let the request through rather than hang it.
                self.rt.metrics.inc(Metric::HostErrors);
                host::log(
                    LogLevel::Error,
                    &format!("tollgate: cannot send a local response: {s:?}"),
                );
                Action::Continue
            }
        }
    }

    /// Charges the cost the upstream reported, beyond the unit paid up front.
    fn charge_reported_cost(&mut self) {
        let Some(name) = self.rt.settings.cost_header.as_deref() else {
            return;
        };
        let Some(reported) = host::response_header(name).and_then(|v| v.trim().parse::<u64>().ok())
        else {
            return;
        };
        let Some(decided) = self.decided.as_ref().filter(|d| d.metered) else {
            return;
        };
        let extra = reported.saturating_sub(self.cost);
        let (path, _) = split_query(&self.path);
        let req = EngineRequest {
            identity: &decided.identity,
            method: &self.method,
            path,
            cost: self.cost,
        };
        let mut store = SlotStore::new(&Host, self.rt.settings.slots);
        let stats = self.rt.policy.charge(&req, self.now, extra, &mut store);
        self.rt
            .metrics
            .add(Metric::CasRetries, u64::from(stats.cas_retries));
        self.rt
            .metrics
            .add(Metric::FailOpen, u64::from(stats.failures));
        self.cost = self.cost.max(reported);
    }

    fn finish(&mut self, watch: &mut Stopwatch) {
        let Some(decided) = self.decided.take() else {
            return; // a skipped path, or a request that never reached the filter's decision
        };
        let mut store = SlotStore::new(&Host, self.rt.settings.slots);
        for lease in &decided.leases {
            let stats = self.rt.policy.release(lease, self.now, &mut store);
            self.rt
                .metrics
                .add(Metric::FailOpen, u64::from(stats.failures));
        }
        if self.rt.queue.is_none() {
            return;
        }
        let status = self
            .response_status
            .or_else(|| {
                host::property_u64(&["response", "code"]).and_then(|c| u16::try_from(c).ok())
            })
            .filter(|c| (100..=599).contains(c))
            .or(decided.local_status)
            .unwrap_or(200);
        let latency_us = match (self.started, host::system_now()) {
            (Some(start), Some(end)) => end
                .duration_since(start)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            _ => 0,
        };
        let (path, query) = split_query(&self.path);
        watch.lap(Part::LogPhase);
        let id = {
            let mut ids = self
                .rt
                .ids
                .take()
                .unwrap_or_else(|| EventIdGenerator::new(self.rt.seed ^ self.now.as_nanos()));
            let id = ids.next_id(self.now);
            self.rt.ids.set(Some(ids));
            id
        };
        let identity = &decided.identity;
        let event = UsageEvent {
            id,
            timestamp: to_datetime(self.now),
            org: identity.org.as_deref().unwrap_or(NO_ORG).to_string(),
            user: identity.user.as_deref().map(str::to_string),
            plan: identity.plan.to_string(),
            method: if self.method.is_empty() {
                "GET".into()
            } else {
                self.method.clone()
            },
            route: self.rt.policy.route_for(path).to_string(),
            status,
            latency_us,
            request_bytes: self.request_body_bytes,
            response_bytes: self.response_body_bytes,
            cost: self.cost,
            decision: decided.verdict,
            rule: decided.rule,
            edge: EdgeKind::Envoy,
            node: self.rt.node.clone(),
            dimensions: Default::default(),
            metrics: Default::default(),
            fingerprint: Some(request_fingerprint(&self.method, path, query)),
        };
        watch.lap(Part::EventBuild);
        let gathered = self.rt.gather_event(&event);
        watch.lap(Part::EventSerialize);
        match gathered {
            Ok(Some((chunk, count))) => self.rt.enqueue(&chunk, count),
            Ok(None) => {}
            Err(_) => self.rt.metrics.inc(Metric::EventsDropped),
        }
        watch.lap(Part::EventQueue);
    }
}

/// The address without its port: `1.2.3.4:5678` → `1.2.3.4`, `[::1]:80` → `::1`.
pub fn strip_port(address: &str) -> String {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest).to_string();
    }
    match address.rsplit_once(':') {
        // One colon: host:port. More: a bare IPv6 address.
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host.to_string()
        }
        _ => address.to_string(),
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let mut watch = Stopwatch::start();
        let action = self.decide(&mut watch);
        watch.lap(Part::Verdict);
        action
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let local = match &self.decided {
            None => return Action::Continue,
            Some(d) => d.local_status.is_some(),
        };
        // Read for our own replies too: the log phase would otherwise ask for the
        // `response.code` property on every denied request.
        self.response_status = host::response_header(":status").and_then(|s| s.parse().ok());
        if local {
            return Action::Continue; // our own reply already carries its headers
        }
        self.charge_reported_cost();
        let mut watch = Stopwatch::start();
        if let Some(decided) = &self.decided {
            for (name, value) in &decided.headers {
                if hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value).is_err() {
                    self.rt.metrics.inc(Metric::HostErrors);
                }
            }
        }
        watch.lap(Part::ResponseHeaders);
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        // The filter never buffers, so each call hands over one new frame's size.
        self.request_body_bytes += body_size as u64;
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        self.response_body_bytes += body_size as u64;
        Action::Continue
    }

    fn on_log(&mut self) {
        let mut watch = Stopwatch::start();
        self.finish(&mut watch);
        timing::request_done();
    }
}

#[cfg(test)]
mod tests {
    use super::strip_port;

    #[test]
    fn ports_are_stripped() {
        for (input, want) in [
            ("1.2.3.4:5678", "1.2.3.4"),
            ("1.2.3.4", "1.2.3.4"),
            ("[::1]:80", "::1"),
            ("::1", "::1"),
            ("2001:db8::1", "2001:db8::1"),
        ] {
            assert_eq!(strip_port(input), want, "{input}");
        }
    }
}
