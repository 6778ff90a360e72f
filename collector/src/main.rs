//! The `tollgate-collector` binary: parse flags (with environment fallbacks) and run.

use clap::Parser;

/// mimalloc rather than the system allocator: malloc and free were 18 % of the collector's CPU
/// under PostgreSQL ingest (`perf`), and with mimalloc the collector spent 4.9 ms of CPU per
/// 1,000 fresh events against 5.3–5.4 ms (the ingest bench, alternating runs; SQLite
/// 12.1 / 12.1 against 14.2 / 12.2 ms).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // Before tracing is set up, hence stderr.
    if !tollgate_collector::allocator::keep_freed_memory_longer() {
        eprintln!("warning: unknown mimalloc release; its purge delay is left at its default");
    }
    let cli = tollgate_collector::cli::Cli::parse();
    tollgate_collector::cli::run(cli)
}
