//! Tollgate as a proxy-wasm HTTP filter for Envoy (filled by the filter issue).
