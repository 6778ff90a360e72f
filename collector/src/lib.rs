//! Tollgate's usage collector: authenticated ingest of usage events with group commit and
//! idempotency by event id; per-minute, -hour and -day rollups with latency sketches, folded from
//! a queue written in the ingest transaction; reports from the rollups.
//!
//! `main.rs` only parses the command line and calls [`cli::run`]; everything else lives here so
//! that tests drive the same [`api::app`] the binary serves.

pub mod allocator;
pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod db;
pub mod ingest;
pub mod metrics;
pub mod openapi;
pub mod pricing;
pub mod reports;
pub mod rollup;
pub mod rollup_worker;

pub use api::{app, AppState};
pub use config::Limits;
pub use db::Storage;
