use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use ambit_cni::{conflist, plugin, protocol};
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
