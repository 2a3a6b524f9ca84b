use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use ambit_cni::{agent, conflist, plugin, protocol};
use clap::{Parser, Subcommand};

/// Ambit's CNI plugin and node agent. Invoked with CNI_COMMAND set, it is the plugin.
#[derive(Debug, Parser)]
#[command(name = "ambit-cni", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The node agent: puts the plugin into the node's CNI chain, enrols the node's
    /// pods whose labels ask for it and hands them to the node's ztunnel.
    Agent {
        #[command(flatten)]
        config: Box<agent::Config>,
        /// Log filter (tracing syntax).
        #[arg(long, env = "AMBIT_LOG", default_value = "info")]
        log: String,
    },
    /// Takes ambit-cni off the node: out of the CNI chain, and its binary removed. Pods
    /// created afterwards are not captured; enrolled ones stay so until deleted.
    Uninstall {
        #[arg(long, env = "AMBIT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        #[arg(long, env = "AMBIT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
    },
    /// Appends ambit-cni to the chain of the node's primary CNI configuration (or
    /// updates its entry), keeping the rest of the file as it is.
    InstallConflist {
        /// The CNI configuration directory.
        #[arg(long, env = "AMBIT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The node agent's socket, written into the plugin's entry.
        #[arg(long, env = "AMBIT_CNI_AGENT_SOCKET", default_value = protocol::DEFAULT_AGENT_SOCKET)]
        agent_socket: PathBuf,
    },
    /// Removes ambit-cni from the node's primary CNI configuration.
    UninstallConflist {
        #[arg(long, env = "AMBIT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
    },
}

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
        Command::Agent { config, log } => {
            use std::io::IsTerminal;
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::try_new(&log)?)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .init();
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
