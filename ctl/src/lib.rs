//! `ambitctl`, Ambit's command line. For now `ambitctl local`: a mesh of network
//! namespaces on this machine, built by `ambit_localmesh` from a directory of
//! Kubernetes YAML ([`manifest`]), kept running by a supervisor process and reached
//! with `local exec` ([`local`]); and the demo app its pods run ([`demo`]).
//!
//! It must not depend on another component: it starts `ambit-control` and `ztunnel`
//! as processes and meets them through `ambit_net` and their endpoints.

pub mod config;
pub mod demo;
pub mod local;
pub mod manifest;

use std::process::ExitCode;

use config::{AppCommand, Cli, Command};

/// Runs one command; the exit code is the command's (`local exec` passes its
/// command's through).
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Local { state_dir, command } => local::run(&state_dir, command),
        Command::App { hosts, command } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let hosts = demo::read_hosts(hosts.as_deref());
                let ok = match command {
                    AppCommand::Serve {
                        pod,
                        node,
                        http_ports,
                        tcp_ports,
                        node_netns,
                    } => {
                        demo::serve(demo::Serve {
                            pod,
                            node,
                            http_ports,
                            tcp_ports,
                            node_netns,
                        })
                        .await?;
                        true
                    }
                    AppCommand::Get { url, count } => demo::get(&url, count, &hosts).await?,
                    AppCommand::Send { to, message } => demo::send(&to, &message, &hosts).await?,
                };
                Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            })
        }
    }
}
