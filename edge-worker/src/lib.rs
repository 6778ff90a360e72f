//! Tollgate as a Cloudflare Worker: a thin workers-rs adapter around `tollgate-core`.
//!
//! - `frontend_worker` (wasm32 only): the `fetch` handler. It identifies the caller with the
//!   policy (API key, verified JWT, or `CF-Connecting-IP`), sends the decision to the caller's
//!   counter shard, then answers 429 or forwards to the origin and adds the headers; after the
//!   response it releases leases, charges post-response cost and queues the usage event.
//! - `counter_do` (wasm32 only): the `CounterObject` Durable Object, one per shard of counters,
//!   running [`shard::handle`] over counters persisted in its storage.
//! - `config_cron` (wasm32 only): the Cron Trigger that fetches the config URL, validates the
//!   document with [`config::WorkerConfig::parse`] and writes it to KV (a bad one is refused).
//! - [`config`], [`shard`], [`events`], [`jwt`]: everything that does not need the Workers
//!   runtime, unit-tested natively.
//!
//! `wrangler.toml` beside this crate documents every binding; `cargo xtask dist` writes the
//! deployable bundle to `dist/edge-worker/`.

pub mod config;
pub mod events;
pub mod jwt;
pub mod shard;

#[cfg(target_arch = "wasm32")]
mod config_cron;
#[cfg(target_arch = "wasm32")]
mod counter_do;
#[cfg(target_arch = "wasm32")]
mod frontend_worker;
#[cfg(target_arch = "wasm32")]
mod runtime;
