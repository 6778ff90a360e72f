//! A proxy-wasm HTTP filter that does nothing: every request and response continues untouched.
//!
//! The `envoy_filter` benchmark loads it to measure what a Rust wasm filter costs in Envoy
//! before it does any work (the VM call per callback, the context per request), so that
//! Tollgate's own cost can be read as the difference. It is built with the same SDK, profile
//! and runtime (V8) as `tollgate-filter`.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

/// The root context: creates one [`Request`] per request.
struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One request: the SDK's default callbacks, which all continue.
struct Request;

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }
}

// `main!` exports the module's `_initialize` entry point (a `#[no_mangle]` function, which the
// workspace's `unsafe_code` lint flags): it only registers the root context factory.
#[allow(unsafe_code)]
mod entry {
    use super::*;

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| Box::new(Root));
    }}
}
