//! What the Worker and the Durable Object share on the Workers runtime: the clock, randomness,
//! and the per-isolate cache of the compiled configuration read from KV.

use std::cell::RefCell;
use std::rc::Rc;

use tollgate_core::Timestamp;
use worker::js_sys::{self, Reflect, Uint8Array};
use worker::wasm_bindgen::{JsCast, JsValue};
use worker::{console_error, Env};

use crate::config::{WorkerConfig, CONFIG_KEY};

/// The KV namespace binding holding the configuration.
pub const CONFIG_KV: &str = "CONFIG";
/// The Durable Object namespace binding of the counter shards.
pub const COUNTERS_DO: &str = "COUNTERS";

/// `now` from the runtime clock (`Date.now()`, ms; Workers freeze it during a request's CPU
/// work, which is fine for rate limiting at ms resolution).
pub fn now() -> Timestamp {
    Timestamp::from_millis(worker::Date::now().as_millis())
}

/// 8 random bytes from `crypto.getRandomValues`, for the event id generator's seed.
pub fn random_seed() -> u64 {
    let bytes = Uint8Array::new_with_length(8);
    let filled = Reflect::get(&js_sys::global(), &JsValue::from_str("crypto"))
        .and_then(|crypto| {
            let get = Reflect::get(&crypto, &JsValue::from_str("getRandomValues"))?;
            get.dyn_into::<js_sys::Function>()?.call1(&crypto, &bytes)
        })
        .is_ok();
    let mut seed = [0u8; 8];
    bytes.copy_to(&mut seed);
    if !filled {
        // Never expected on Workers; fall back to Math.random so ids stay distinct anyway.
        seed = ((js_sys::Math::random() * 2f64.powi(53)) as u64).to_le_bytes();
    }
    u64::from_le_bytes(seed)
}

/// A string var, or `default` when unset.
pub fn var_or(env: &Env, name: &str, default: &str) -> String {
    env.var(name)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| default.to_string())
}

struct Cached {
    config: Rc<WorkerConfig>,
    read_at_ms: u64,
}

thread_local! {
    static CONFIG: RefCell<Option<Cached>> = const { RefCell::new(None) };
}

/// The configuration, from this isolate's cache when it is younger than `CONFIG_TTL_MS`
/// (default 10 s) and `want` (a version a caller saw) does not differ, else from KV. A document
/// in KV that does not compile (it cannot get there through the cron, but could be written by
/// hand) is logged and the last good one kept. `None` when KV holds no document yet.
pub async fn config(env: &Env, want: Option<u64>) -> Option<Rc<WorkerConfig>> {
    let now_ms = worker::Date::now().as_millis();
    let ttl: u64 = var_or(env, "CONFIG_TTL_MS", "10000")
        .parse()
        .unwrap_or(10_000);
    let cached = CONFIG.with(|c| {
        c.borrow().as_ref().and_then(|cached| {
            let fresh = now_ms.saturating_sub(cached.read_at_ms) < ttl;
            let same = want.is_none_or(|v| v == cached.config.version);
            (fresh && same).then(|| cached.config.clone())
        })
    });
    if cached.is_some() {
        return cached;
    }
    let text = match env.kv(CONFIG_KV) {
        Ok(kv) => kv.get(CONFIG_KEY).text().await,
        Err(e) => {
            console_error!("tollgate: no KV binding {CONFIG_KV}: {e}");
            return last_good();
        }
    };
    let text = match text {
        Ok(Some(text)) => text,
        Ok(None) => return last_good(),
        Err(e) => {
            console_error!("tollgate: reading the config from KV failed: {e}");
            return last_good();
        }
    };
    if let Some(current) =
        last_good().filter(|c| c.version == tollgate_core::hash::fingerprint(text.as_bytes()))
    {
        CONFIG.with(|c| {
            *c.borrow_mut() = Some(Cached {
                config: current.clone(),
                read_at_ms: now_ms,
            })
        });
        return Some(current);
    }
    match WorkerConfig::parse(&text) {
        Ok(config) => {
            let config = Rc::new(config);
            CONFIG.with(|c| {
                *c.borrow_mut() = Some(Cached {
                    config: config.clone(),
                    read_at_ms: now_ms,
                })
            });
            Some(config)
        }
        Err(e) => {
            console_error!("tollgate: the config in KV is refused, keeping the last good one: {e}");
            last_good()
        }
    }
}

fn last_good() -> Option<Rc<WorkerConfig>> {
    CONFIG.with(|c| c.borrow().as_ref().map(|cached| cached.config.clone()))
}
