/// jemalloc, as ztunnel: less waste for a proxy's many small long-lived allocations.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::io::IsTerminal;

use ambit_waypoint::config::Config;
use clap::Parser;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{reload, EnvFilter};

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    match run(config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("waypoint: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    let (filter, handle) = reload::Layer::new(EnvFilter::try_new(&config.log)?);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
    let set_filter = Box::new(move |f: &str| {
        let new = EnvFilter::try_new(f).map_err(|e| e.to_string())?;
        handle.reload(new).map_err(|e| e.to_string())
    });
    match ambit_net::process::raise_nofile_limit() {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(ambit_waypoint::app::run(config, set_filter, async {
        ambit_net::process::shutdown_signal().await;
        tracing::info!("shutting down");
    }))
}
