//! The proxy-wasm host calls the filter makes, each returning its error as a value. (The SDK's
//! `Context` trait methods `unwrap` host results; they are not used.) The SDK's `hostcalls`
//! themselves still `panic!` on a status the ABI does not allow for that call, which only a
//! broken host can return; everything a working host can say is handled as a value here.

use std::time::{SystemTime, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, Status};
use tollgate_core::Timestamp;

use crate::store::{HostError, SharedData};

/// Shared data through the host.
pub struct Host;

fn host_error(op: &'static str, key: &str, status: Status) -> HostError {
    HostError {
        op,
        key: key.to_string(),
        status: format!("{status:?}"),
    }
}

impl SharedData for Host {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), HostError> {
        hostcalls::get_shared_data(key).map_err(|s| host_error("get", key, s))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, HostError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(true),
            Err(Status::CasMismatch) => Ok(false),
            Err(s) => Err(host_error("set", key, s)),
        }
    }
}

/// Logs at `level`; a failing log call has nowhere to be reported.
pub fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// The host clock (0 if the host cannot say).
pub fn now() -> Timestamp {
    timestamp(system_now())
}

/// A host time as a [`Timestamp`] (the epoch when the host gave none).
pub fn timestamp(time: Option<SystemTime>) -> Timestamp {
    let nanos = time
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    Timestamp::from_nanos(nanos)
}

/// The host clock as a `SystemTime`, for latencies.
pub fn system_now() -> Option<SystemTime> {
    hostcalls::get_current_time().ok()
}

/// A request header.
pub fn request_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

/// A response header.
pub fn response_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpResponseHeaders, name)
        .ok()
        .flatten()
}

/// A header of an `dispatch_http_call` answer.
pub fn call_response_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpCallResponseHeaders, name)
        .ok()
        .flatten()
}

/// The body of a `dispatch_http_call` answer.
pub fn call_response_body(size: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size)
        .ok()
        .flatten()
}

/// The plugin configuration.
pub fn plugin_configuration() -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
        .ok()
        .flatten()
}

/// A property as raw bytes (strings come as their bytes, integers as 8 bytes little-endian).
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

/// A string property.
pub fn property_string(path: &[&str]) -> Option<String> {
    property(path).and_then(|b| String::from_utf8(b).ok())
}

/// An integer property.
pub fn property_u64(path: &[&str]) -> Option<u64> {
    let bytes = property(path)?;
    let arr: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    u64::try_from(i64::from_le_bytes(arr)).ok()
}
