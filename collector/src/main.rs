//! The `tollgate-collector` binary: parse flags (with environment fallbacks) and run.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = tollgate_collector::cli::Cli::parse();
    tollgate_collector::cli::run(cli)
}
