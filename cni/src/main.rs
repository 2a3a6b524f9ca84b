use std::io::{Read, Write};
use std::process::ExitCode;

use ambit_cni::cli::{Cli, Command};
use ambit_cni::{agent, conflist, plugin, protocol};
use ambit_net::process::LogFormat;
use clap::Parser;

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        return plugin_main();
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ambit-cni: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The plugin: environment and standard input in, result or error on standard output.
fn plugin_main() -> ExitCode {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        eprintln!("ambit-cni: reading standard input: {e}");
    }
    let outcome = plugin::run(
        &|name| std::env::var(name).ok(),
        &stdin,
        &mut |socket, request| protocol::call(socket, request),
    );
    let mut stdout = std::io::stdout();
    let written = stdout
        .write_all(outcome.stdout.as_bytes())
        .and_then(|()| stdout.flush());
    if let Some(line) = &outcome.stderr {
        eprintln!("{line}");
    }
    match (written, outcome.exit_code) {
        (Ok(()), 0) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent {
            config,
            log,
            log_format,
        } => {
            use std::io::IsTerminal;
            let logs = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::try_new(&log)?)
                .with_writer(std::io::stderr);
            match log_format {
                LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
                LogFormat::Json => logs.json().init(),
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(agent::run(*config, async {
                ambit_net::process::shutdown_signal().await;
            }))?;
        }
        Command::Uninstall { conf_dir, bin_dir } => agent::install::uninstall(&conf_dir, &bin_dir)?,
        Command::InstallConflist {
            conf_dir,
            agent_socket,
        } => {
            let mut entry = serde_json::Map::new();
            entry.insert(
                "agentSocket".into(),
                agent_socket.display().to_string().into(),
            );
            let path = conflist::install(&conf_dir, &entry)?;
            eprintln!("ambit-cni: in the chain of {}", path.display());
        }
        Command::UninstallConflist { conf_dir } => match conflist::uninstall(&conf_dir)? {
            Some(path) => eprintln!("ambit-cni: removed from {}", path.display()),
            None => eprintln!("ambit-cni: not in {}; nothing to do", conf_dir.display()),
        },
    }
    Ok(())
}
