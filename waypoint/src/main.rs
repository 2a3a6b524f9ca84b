/// jemalloc, as ztunnel: less waste for a proxy's many small long-lived allocations.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use ambit_waypoint::config::Config;
use clap::Parser;

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
    let set_filter = ambit_net::process::init_proxy_process(&config.log, config.log_format)
        .map_err(anyhow::Error::msg)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.worker_threads {
        runtime.worker_threads(usize::from(n));
    }
    let runtime = runtime.enable_all().build()?;
    let ran = runtime.block_on(ambit_waypoint::app::run(config, set_filter, async {
        ambit_net::process::shutdown_signal().await;
        tracing::info!("shutting down");
    }));
    // The access log's last lines.
    ambit_net::process::flush_logs();
    ran
}
