//! Tollgate's limiter and policy engine.
//!
//! Pure and I/O-free: time, state and the request come in as values, decisions come out as
//! values. The Envoy filter, the Cloudflare Worker and the collector are thin adapters around
//! it, which is what makes every runtime give the same answers from the same inputs.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod algorithm;
pub mod time;

pub use algorithm::{Algorithm, LimitKind, Limiter, Outcome};
pub use time::Timestamp;
pub mod hash;
pub mod policy;

pub use policy::{Identity, Policy, PolicyError};
pub mod decision;
pub mod engine;
pub mod event;
pub mod gate;
mod record;

pub use decision::{Decision, Verdict};
pub use engine::{CounterKey, CounterStore, MemoryStore, Request, Stored};
