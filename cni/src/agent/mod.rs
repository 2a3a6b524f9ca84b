//! The node agent (`ambit-cni agent`), one per node: it puts the plugin in the node's
//! CNI chain, answers the plugin's requests on a Unix socket, follows the model for
//! label changes on running pods, and hands enrolled pods to the node's ztunnel.
//! See `docs/decisions/0006-node-agent-intent-and-reports.md`.
//!
//! Start-up order matters for failing closed:
//! 1. the plugin binary and the conflist entry, so that from now on no pod of this
//!    node starts without asking the agent (until the agent answers, the runtime is
//!    told to try again);
//! 2. the socket, answering "try again" until the agent's state is rebuilt;
//! 3. the first model, then every pod that is to be captured is enrolled again (rules
//!    are rewritten idempotently, ztunnel is given the pods), and only then may
//!    ztunnel drop pods the agent does not name.
//!
//! Stopping (SIGTERM) leaves everything in place: enrolled pods stay captured, and the
//! plugin stays in the chain, so pods created meanwhile wait for the agent to come
//! back. `ambit-cni uninstall` removes the plugin from the node.

pub mod control;
pub mod install;
pub mod pods;
pub mod ztunnel;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ambit_core::{SpiffeId, TrustDomain};
use ambit_net::redirect::Ipv6Mode;
use ambit_net::token::BearerToken;
use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::protocol::{AgentReply, AgentRequest, DEFAULT_AGENT_SOCKET};
use pods::{Pods, RuleSettings};

/// The agent's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// This node's name (Kubernetes: spec.nodeName, from the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// The control plane, host:port (xDS and the node agent's calls).
    #[arg(
        long,
        env = "AMBIT_CONTROL_ADDRESS",
        default_value = "ambit-control.ambit-system.svc:15012"
    )]
    pub control_address: String,
    /// The mesh root certificate (PEM) the control plane's certificate chains to.
    #[arg(long, env = "AMBIT_CA_ROOT")]
    pub ca_root: PathBuf,
    /// The identity the control plane must present; defaults to
    /// spiffe://<trust-domain>/ns/ambit-system/sa/ambit-control.
    #[arg(long, env = "AMBIT_CONTROL_IDENTITY")]
    pub control_identity: Option<SpiffeId>,
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: TrustDomain,
    /// The node agent's token (audience istio-ca), read again for every call.
    #[arg(long, env = "AMBIT_CA_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// ztunnel's hand-off socket.
    #[arg(
        long,
        env = "AMBIT_HANDOFF_SOCKET",
        default_value = "/var/run/ambit/ztunnel.sock"
    )]
    pub handoff_socket: PathBuf,
    /// The socket the plugin calls.
    #[arg(long, env = "AMBIT_CNI_AGENT_SOCKET", default_value = DEFAULT_AGENT_SOCKET)]
    pub agent_socket: PathBuf,
    /// The node's CNI configuration directory, whose primary conflist gets ambit-cni
    /// appended to its chain.
    #[arg(long, env = "AMBIT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// Where the runtime finds CNI plugins; ambit-cni installs itself there.
    #[arg(long, env = "AMBIT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// Do not install the binary or edit the conflist (they are managed otherwise).
    #[arg(long)]
    pub no_install: bool,
    /// More sources never captured, besides 169.254.7.127 and
    /// fd16:9254:7127:1337:ffff:ffff:ffff:ffff, to which the agent has the node SNAT
    /// its own connections to enrolled pods (kubelet probes). The node's own addresses
    /// are not exempt: traffic it forwards (NodePort) is captured.
    #[arg(
        long = "probe-source",
        env = "AMBIT_PROBE_SOURCES",
        value_delimiter = ','
    )]
    pub probe_sources: Vec<IpAddr>,
    /// Drop enrolled pods' IPv6 TCP instead of capturing it (for nodes where IPv6
    /// capture cannot be set up).
    #[arg(long)]
    pub ipv6_drop: bool,
    /// Namespaces whose pods the plugin never asks about.
    #[arg(long, value_delimiter = ',')]
    pub exclude_namespaces: Option<Vec<String>>,
    /// How often pods whose enrolment failed are tried again.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub retry_interval: Duration,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| text.split_at(i))
        .ok_or_else(|| format!("{text:?}: a unit is needed (ms or s)"))?;
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        _ => Err(format!("{text:?}: the unit must be ms or s")),
    }
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    // Read again for every new connection: a bundle published during a root
    // rotation is picked up without a restart.
    let roots = ambit_net::tls::TrustSource::file(&config.ca_root)
        .map_err(|e| anyhow::anyhow!("--ca-root {e}"))?;
    let token = BearerToken::File(config.token_file.clone());
    token
        .current()
        .with_context(|| format!("--token-file {}", config.token_file.display()))?;
    let identity = match &config.control_identity {
        Some(id) => id.clone(),
        None => SpiffeId::new(config.trust_domain.clone(), "ambit-system", "ambit-control")
            .context("the control plane's default identity")?,
    };
    let control = control::Control::new(&config.control_address, identity, roots, token)
        .map_err(anyhow::Error::msg)?;

    tokio::pin!(shutdown);
    if !config.no_install {
        let binary = install::install_binary(&config.bin_dir)?;
        tracing::info!(path = %binary.display(), "CNI plugin binary in place");
        let mut waiting = false;
        loop {
            match crate::conflist::install(&config.conf_dir, &install::entry(&config)) {
                Ok(list) => {
                    tracing::info!(conflist = %list.display(), "ambit-cni is in the node's CNI chain");
                    break;
                }
                Err(e @ crate::conflist::ConflistError::NoPrimary { .. }) => {
                    if !waiting {
                        tracing::warn!(error = %e, "waiting for the node's network plugin to write its configuration");
                        waiting = true;
                    }
                }
                Err(e) => return Err(e).context("putting ambit-cni into the node's CNI chain"),
            }
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
    let ztunnel = ztunnel::start(config.handoff_socket.clone());
    let pods = Pods::new(
        config.node.clone(),
        control.clone(),
        ztunnel.clone(),
        RuleSettings {
            extra_probe_sources: config.probe_sources.clone(),
            ipv6: if config.ipv6_drop {
                Ipv6Mode::Drop
            } else {
                Ipv6Mode::Capture
            },
        },
    );
    let (ready_tx, ready) = watch::channel(false);
    let listener = bind(&config.agent_socket)?;
    tracing::info!(socket = %config.agent_socket.display(), node = %config.node, "node agent listening");
    let server = tokio::spawn(serve(listener, pods.clone(), ready));

    let mut model = control.watch_model(&config.node);
    let reconciler = tokio::spawn({
        let pods = pods.clone();
        let ztunnel = ztunnel.clone();
        let retry = config.retry_interval;
        let config = config.clone();
        async move {
            // The first model: until then nothing is known about running pods.
            if model.changed().await.is_err() {
                return;
            }
            let first = model.borrow_and_update().clone();
            pods.reconcile(&first).await;
            ztunnel.state_complete();
            ready_tx.send_replace(true);
            let enrolled = pods.enrolled().await.len();
            tracing::info!(
                enrolled,
                "node agent ready: pods of this node enrolled from the model"
            );
            let mut connections = ztunnel.connections();
            let mut tick = tokio::time::interval(retry);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    changed = model.changed() => if changed.is_err() { return },
                    changed = connections.changed() => if changed.is_err() { return },
                    _ = tick.tick() => {}
                }
                let current = model.borrow_and_update().clone();
                pods.reconcile(&current).await;
                if !config.no_install {
                    if let Err(e) = install::keep_in_chain(&config) {
                        tracing::warn!(error = %e, "checking ambit-cni's place in the CNI chain failed");
                    }
                }
            }
        }
    });
    shutdown.await;
    tracing::info!("node agent stopping; enrolled pods stay captured");
    server.abort();
    reconciler.abort();
    let _ = std::fs::remove_file(&config.agent_socket);
    Ok(())
}

fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))
}

async fn serve(listener: UnixListener, pods: Arc<Pods>, ready: watch::Receiver<bool>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a plugin connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let pods = pods.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &pods, &ready).await {
                tracing::warn!(error = %e, "plugin request failed");
            }
        });
    }
}

/// Reads one request line, answers one reply line.
async fn answer(
    stream: UnixStream,
    pods: &Pods,
    ready: &watch::Receiver<bool>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(64 * 1024))
        .read_line(&mut line)
        .await?;
    let reply = match serde_json::from_str::<AgentRequest>(&line) {
        Err(e) => AgentReply::Failed {
            reason: format!("unreadable request: {e}"),
            retry: false,
        },
        Ok(request) if !*ready.borrow() => {
            tracing::info!(pod = %request.pod, command = ?request.command, "request while the agent is starting; the runtime will retry");
            AgentReply::Failed {
                reason: "the node agent is starting (waiting for the model from the control plane)"
                    .into(),
                retry: true,
            }
        }
        Ok(request) => {
            tracing::debug!(pod = %request.pod, command = ?request.command, "plugin request");
            pods.handle(request).await
        }
    };
    let mut text = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    text.push(b'\n');
    write.write_all(&text).await
}
