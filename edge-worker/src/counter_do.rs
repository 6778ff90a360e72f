//! `CounterObject`: the Durable Object holding one shard of counters.
//!
//! The Worker POSTs a [`ShardCall`] as JSON; the object runs [`shard::handle`] synchronously
//! over its in-memory [`ShardStore`] and writes the counters that changed to its storage before
//! answering (Durable Objects hold back the response until the write is durable), so its state
//! survives eviction and restarts: a fresh instance reads every counter back on its first call.
//!
//! One object runs one event at a time, and nothing awaits between reading a counter and
//! writing it, so decisions are exact under any concurrency. The price is a throughput bound:
//! one object serves about 1,000 requests/s, which bounds one shard (an org, or the whole
//! deployment when the policy has a `global` rule) to that rate through the limiter.

use std::cell::RefCell;
use std::rc::Rc;

use worker::js_sys::Object;
use worker::wasm_bindgen::JsValue;
use worker::{console_error, durable_object, DurableObject, Env, Request, Response, Result, State};

use crate::config::WorkerConfig;
use crate::runtime;
use crate::shard::{self, from_hex, ShardCall, ShardStore, STORAGE_PREFIX};

/// One shard of counters.
#[durable_object]
pub struct CounterObject {
    state: State,
    env: Env,
    store: RefCell<Option<ShardStore>>,
    config: RefCell<Option<Rc<WorkerConfig>>>,
}

impl DurableObject for CounterObject {
    fn new(state: State, env: Env) -> Self {
        Self {
            state,
            env,
            store: RefCell::new(None),
            config: RefCell::new(None),
        }
    }

    async fn fetch(&self, mut req: Request) -> Result<Response> {
        // Parsed in Rust, not with `req.json()`: JavaScript numbers would round the u64s.
        let text = req.text().await?;
        let call: ShardCall = serde_json::from_str(&text)
            .map_err(|e| worker::Error::RustError(format!("bad shard call: {e}")))?;
        let Some(config) = self.config_for(call.config_version()).await else {
            return Response::error("no configuration in KV", 503);
        };
        self.ensure_loaded().await?;
        // From here to the write nothing awaits: the decision and its counter updates are one
        // step of this single-threaded object.
        let (reply, dirty) = {
            let mut store = self.store.borrow_mut();
            let Some(store) = store.as_mut() else {
                return Response::error("counters not loaded", 500);
            };
            let reply = shard::handle(&config.policy, &config.document.gate, &call, store);
            (reply, store.take_dirty())
        };
        if !dirty.is_empty() {
            let values = Object::new();
            for (key, hex) in &dirty {
                worker::js_sys::Reflect::set(
                    &values,
                    &JsValue::from_str(key),
                    &JsValue::from_str(hex),
                )?;
            }
            self.state.storage().put_multiple_raw(values).await?;
        }
        Response::from_json(&reply)
    }
}

impl CounterObject {
    /// The configuration the Worker decided with (or the newest this isolate can read).
    async fn config_for(&self, version: u64) -> Option<Rc<WorkerConfig>> {
        if let Some(config) = self
            .config
            .borrow()
            .as_ref()
            .filter(|c| c.version == version)
        {
            return Some(config.clone());
        }
        let config = runtime::config(&self.env, Some(version)).await?;
        *self.config.borrow_mut() = Some(config.clone());
        Some(config)
    }

    /// Reads every counter from storage the first time; later calls find them in memory.
    async fn ensure_loaded(&self) -> Result<()> {
        if self.store.borrow().is_some() {
            return Ok(());
        }
        let map = self.state.storage().list().await?;
        // Another call may have loaded while this one awaited: the first load wins, since
        // decisions may already have changed its counters.
        if self.store.borrow().is_some() {
            return Ok(());
        }
        let mut counters = Vec::new();
        for entry in map.entries() {
            let Ok(entry) = entry else { continue };
            let pair = worker::js_sys::Array::from(&entry);
            let (Some(key), Some(value)) = (pair.get(0).as_string(), pair.get(1).as_string())
            else {
                continue;
            };
            let Some(key) = key.strip_prefix(STORAGE_PREFIX) else {
                continue;
            };
            match from_hex(&value) {
                Some(bytes) => counters.push((key.to_string(), bytes)),
                None => console_error!("tollgate: unreadable counter {key} (reads as fresh)"),
            }
        }
        *self.store.borrow_mut() = Some(ShardStore::from_stored(counters));
        Ok(())
    }
}
