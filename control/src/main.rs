use std::io::IsTerminal;

use ambit_control::config::Config;
use ambit_net::process::LogFormat;
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&config.ca.log)?)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(ambit_control::app::run(config, |_| {}, async {
        ambit_net::process::shutdown_signal().await;
        tracing::info!("shutting down");
    }))
}
