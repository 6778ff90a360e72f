//! Where a request's time goes inside Envoy, part by part: built with the `timing` feature,
//! the filter reads the clock between the parts of each request and logs the averages every
//! [`REPORT_EVERY`] requests (a `tollgate timing` line at warn level in Envoy's log).
//!
//! Why in the filter: Envoy's V8 runs our wasm as JIT code that `perf` cannot name, and a
//! tight loop of the same code outside Envoy runs it several times faster than a request does
//! (`benches/README.md`, "2026-11-25: where the time goes"). A clock read costs next to
//! nothing here (it returns no buffer), so the marks barely move what they measure.
//!
//! Without the feature a [`Stopwatch`] holds nothing and every call is empty: the shipped
//! filter reads no clock for it.

/// The parts of a request, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// `:method`, `:path` and the clock.
    Request,
    /// The caller's identity: client address, verified claims.
    Identity,
    /// The gate: every tier's counter read, decided and written.
    Gate,
    /// The rest of the request phase: stats, the local reply if any.
    Verdict,
    /// The rate-limit headers added to the upstream's response.
    ResponseHeaders,
    /// The log phase before the event: leases released, status and clock read.
    LogPhase,
    /// Building the usage event.
    EventBuild,
    /// Serialising it into the VM's chunk of events.
    EventSerialize,
    /// Putting a full chunk on the shared queue (every 64th event or so).
    EventQueue,
}

/// Nanoseconds spent in each [`Part`], in its order.
pub type Totals = [u64; Part::ALL.len()];

impl Part {
    const ALL: [Part; 9] = [
        Part::Request,
        Part::Identity,
        Part::Gate,
        Part::Verdict,
        Part::ResponseHeaders,
        Part::LogPhase,
        Part::EventBuild,
        Part::EventSerialize,
        Part::EventQueue,
    ];

    fn name(self) -> &'static str {
        match self {
            Part::Request => "request",
            Part::Identity => "identity",
            Part::Gate => "gate",
            Part::Verdict => "verdict",
            Part::ResponseHeaders => "response_headers",
            Part::LogPhase => "log_phase",
            Part::EventBuild => "event_build",
            Part::EventSerialize => "event_serialize",
            Part::EventQueue => "event_queue",
        }
    }
}

/// Requests averaged in one report.
pub const REPORT_EVERY: u64 = 20_000;

/// How every report line starts (the Envoy bench finds the lines by it).
pub const REPORT_PREFIX: &str = "tollgate timing";

/// The report line for `totals` (nanoseconds by [`Part`]) over `requests` requests: the
/// average of each part and their sum, in µs.
pub fn report(totals: &Totals, requests: u64) -> String {
    let avg = |ns: u64| ns as f64 / 1_000.0 / requests.max(1) as f64;
    let mut line = format!("{REPORT_PREFIX}, µs per request over {requests} requests:");
    for (part, ns) in Part::ALL.iter().zip(totals) {
        line.push_str(&format!(" {}={:.2}", part.name(), avg(*ns)));
    }
    line.push_str(&format!(" sum={:.2}", avg(totals.iter().sum())));
    line
}

#[cfg(feature = "timing")]
mod imp {
    use std::cell::RefCell;

    use proxy_wasm::types::LogLevel;

    use super::{report, Part, Totals, REPORT_EVERY};
    use crate::host;

    thread_local! {
        /// Nanoseconds by part, and requests, since the last report (one VM, one thread).
        static TOTALS: RefCell<(Totals, u64)> = const { RefCell::new(([0; Part::ALL.len()], 0)) };
    }

    fn now_ns() -> u64 {
        host::now().as_nanos()
    }

    /// Times consecutive parts of one callback.
    pub struct Stopwatch(u64);

    impl Stopwatch {
        /// Starts timing.
        pub fn start() -> Self {
            Self(now_ns())
        }

        /// Charges the time since the last mark to `part`.
        pub fn lap(&mut self, part: Part) {
            let now = now_ns();
            let spent = now.saturating_sub(self.0);
            TOTALS.with(|t| t.borrow_mut().0[part as usize] += spent);
            self.0 = now;
        }
    }

    /// Counts a finished request; every [`REPORT_EVERY`] logs the averages and starts over.
    pub fn request_done() {
        TOTALS.with(|t| {
            let mut t = t.borrow_mut();
            t.1 += 1;
            if t.1 >= REPORT_EVERY {
                host::log(LogLevel::Warn, &report(&t.0, t.1));
                *t = ([0; Part::ALL.len()], 0);
            }
        });
    }
}

#[cfg(not(feature = "timing"))]
mod imp {
    use super::Part;

    /// Times nothing: the `timing` feature is off.
    pub struct Stopwatch;

    impl Stopwatch {
        /// Starts nothing.
        #[inline(always)]
        pub fn start() -> Self {
            Self
        }

        /// Does nothing.
        #[inline(always)]
        pub fn lap(&mut self, _part: Part) {}
    }

    /// Does nothing.
    #[inline(always)]
    pub fn request_done() {}
}

pub use imp::{request_done, Stopwatch};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_averages_each_part_in_microseconds_and_sums_them() {
        let mut totals: Totals = [0; Part::ALL.len()];
        totals[Part::Gate as usize] = 30_000_000; // 30 ms over 2,000 requests: 15 µs each
        totals[Part::EventQueue as usize] = 1_000_000;
        let line = report(&totals, 2_000);
        assert!(line.contains("over 2000 requests"), "{line}");
        assert!(line.contains(" gate=15.00"), "{line}");
        assert!(line.contains(" event_queue=0.50"), "{line}");
        assert!(line.contains(" request=0.00"), "{line}");
        assert!(line.ends_with(" sum=15.50"), "{line}");
    }

    #[test]
    fn every_part_is_reported_once_in_order() {
        let line = report(&[1_000; Part::ALL.len()], 1);
        let names: Vec<&str> = line
            .split(' ')
            .filter_map(|w| w.split_once('=').map(|(n, _)| n))
            .collect();
        assert_eq!(
            names,
            [
                "request",
                "identity",
                "gate",
                "verdict",
                "response_headers",
                "log_phase",
                "event_build",
                "event_serialize",
                "event_queue",
                "sum"
            ]
        );
    }
}
