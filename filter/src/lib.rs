//! Tollgate as a proxy-wasm HTTP filter for Envoy: a thin host adapter around `tollgate-core`.
//!
//! - [`config`]: the plugin configuration, compiled whole or rejected with the field named.
//! - [`store`]: the counter table in shared data (CAS, bounded memory, eviction rule).
//! - [`events`]: usage-event batching, retries and the flusher lease.
//! - `root` / `http`: the proxy-wasm contexts; [`metrics`]: Envoy stats; `host`: host calls
//!   with their errors as values.
//!
//! The host-independent parts (`config`, `store`, `events`) run their unit tests natively
//! against an in-memory shared data with Envoy's semantics.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod config;
pub mod events;
mod host;
mod http;
pub mod metrics;
mod root;
pub mod store;
pub mod timing;

pub use http::strip_port;

use proxy_wasm::types::LogLevel;

// `main!` exports the module's `_initialize` entry point (a `#[no_mangle]` function, which the
// workspace's `unsafe_code` lint flags): it only registers the root context factory.
#[allow(unsafe_code)]
mod entry {
    use super::*;

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Info);
        proxy_wasm::set_root_context(|context_id| Box::new(root::Root::new(context_id)));
    }}
}
