//! `ambitctl`, Ambit's command line. Against a cluster ([`cluster`]): `manifest
//! generate`, `precheck`, `install`, `uninstall`, `verify-install`. And `ambitctl
//! local`: a mesh of network namespaces on this machine, built by `ambit_localmesh` from a directory of
//! Kubernetes YAML ([`manifest`]), kept running by a supervisor process and reached
//! with `local exec` ([`local`]); and the demo app its pods run ([`demo`]).
//!
//! It must not depend on another component: it starts `ambit-control` and `ztunnel`
//! as processes and meets them through `ambit_net` and their endpoints.

/// `println!` that does not panic when stdout's reader has gone (`ambitctl ... | head
/// -1`): the line is dropped and the command carries on and exits as it would have.
/// Any other write error is returned.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` as [`outln!`] does it.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::stdout(format_args!($($arg)*))
    };
}

pub mod analyze;
pub mod authz;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod local;
pub mod manifest;
pub mod waypoint;
pub mod ztunnel_config;

/// Writing to the terminal or a pipe that may close.
pub mod output {
    use std::io::{self, Write};

    /// Writes to stdout; a closed pipe is not an error (see [`outln!`]).
    pub fn stdout(args: std::fmt::Arguments<'_>) -> io::Result<()> {
        quiet(io::stdout().lock().write_fmt(args))
    }

    /// Writes a line to stderr; a closed pipe, or any other failure to report, is
    /// ignored (there is nowhere left to say it).
    pub fn stderr(args: std::fmt::Arguments<'_>) {
        let _ = writeln!(io::stderr().lock(), "{args}");
    }

    /// `Ok` for a reader that has gone.
    pub fn quiet(result: io::Result<()>) -> io::Result<()> {
        match result {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
            other => other,
        }
    }
}

use std::process::ExitCode;

use config::{AppCommand, Cli, Command, ManifestCommand, ManifestFormat, ReportFormat};

/// Runs one command; the exit code is the command's (`local exec` passes its
/// command's through).
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Local { state_dir, command } => local::run(&state_dir, command),
        Command::Authz { command } => authz::run(command),
        Command::Completion { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "ambitctl", &mut script);
            out!("{}", String::from_utf8_lossy(&script))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::ZtunnelConfig {
            what,
            node,
            output,
            state_dir,
        } => ztunnel_config::run(&state_dir, &what, node.as_deref(), &output),
        Command::Waypoint {
            namespace,
            state_dir,
            kubeconfig,
            context,
            command,
        } => {
            let namespace = namespace.as_deref().unwrap_or("default");
            let cluster =
                kubeconfig.is_some() || context.is_some() || local::running(&state_dir).is_err();
            if cluster {
                let args = cluster::ClusterArgs {
                    kubeconfig,
                    context,
                };
                waypoint::run_cluster(&args, namespace, command)
            } else {
                waypoint::run(&state_dir, namespace, command)
            }
        }
        Command::Analyze {
            files,
            cluster,
            root_namespace,
            namespace,
            all_namespaces: _,
            output,
            failure_threshold,
            output_threshold,
            list_codes,
        } => analyze::run(analyze::Options {
            files,
            cluster,
            root_namespace,
            namespace,
            output,
            failure_threshold,
            output_threshold,
            list_codes,
        }),
        Command::Manifest {
            command: ManifestCommand::Generate { set, output },
        } => {
            let values = cluster::chart::Values::from_sets(&set)?;
            let objects = cluster::chart::render(&values);
            match output {
                ManifestFormat::Yaml => out!("{}", cluster::chart::to_yaml(&objects))?,
                ManifestFormat::Json => outln!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "apiVersion": "v1", "kind": "List", "items": objects}))?
                )?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Precheck {
            cluster: args,
            set,
            node,
            output,
        } => {
            let values = cluster::chart::Values::from_sets(&set)?;
            on_cluster(&args, |c| async move {
                let how = cluster::precheck::Precheck {
                    values,
                    node: node.then_some(true),
                };
                let findings = cluster::precheck::precheck(&c, &how).await?;
                report(&findings, output)
            })
        }
        Command::Install {
            cluster: args,
            set,
            wait,
            timeout,
            force_conflicts,
        } => {
            let values = cluster::chart::Values::from_sets(&set)?;
            let install = cluster::install::Install {
                objects: cluster::chart::render(&values),
                force_conflicts,
                wait: wait.then_some(timeout),
            };
            on_cluster(&args, |c| async move {
                cluster::install::install(&c, &install).await?;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Uninstall {
            cluster: args,
            purge,
            wait,
            timeout,
        } => on_cluster(&args, |c| async move {
            let how = cluster::install::Uninstall {
                purge,
                timeout,
                wait,
            };
            cluster::install::uninstall(&c, how).await?;
            Ok(ExitCode::SUCCESS)
        }),
        Command::VerifyInstall {
            cluster: args,
            set,
            output,
        } => {
            let values = cluster::chart::Values::from_sets(&set)?;
            on_cluster(&args, |c| async move {
                let findings =
                    cluster::verify::verify(&c, &cluster::chart::render(&values)).await?;
                report(&findings, output)
            })
        }
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
                    AppCommand::Get {
                        url,
                        count,
                        method,
                        headers,
                    } => demo::get(&method, &url, count, &headers, &hosts).await?,
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

/// Runs `work` on a runtime with the kubeconfig's cluster.
fn on_cluster<F, Fut>(args: &cluster::ClusterArgs, work: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(cluster::Cluster) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let c = cluster::Cluster::connect(args).await?;
        work(c).await
    })
}

/// Prints findings; exit 1 when one is a failure.
fn report(findings: &[cluster::Finding], output: ReportFormat) -> anyhow::Result<ExitCode> {
    let ok = cluster::print_findings(findings, output == ReportFormat::Json)?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
