//! `ambit-cni`'s command line (clap with `env`): the node agent and the node
//! maintenance commands. Without `CNI_COMMAND` in the environment the binary parses
//! this; with it, it is the plugin ([`crate::plugin`]). In the library so that tests
//! parse the manifests' command lines with the binary's own parser.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{agent, protocol};

/// Ambit's CNI plugin and node agent. Invoked with CNI_COMMAND set, it is the plugin.
#[derive(Debug, Parser)]
#[command(name = "ambit-cni", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The node agent: puts the plugin into the node's CNI chain, enrols the node's
    /// pods whose labels ask for it and hands them to the node's ztunnel.
    Agent {
        #[command(flatten)]
        config: Box<agent::Config>,
        /// Log filter (tracing syntax).
        #[arg(long, env = "AMBIT_LOG", default_value = "info")]
        log: String,
        /// Log lines as `text` or `json` (one JSON object per line).
        #[arg(long, env = "AMBIT_LOG_FORMAT", default_value = "text")]
        log_format: ambit_net::process::LogFormat,
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
