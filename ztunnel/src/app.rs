//! Wires a [`Config`] into a running ztunnel: model source, certificate manager, the
//! operations endpoints, and the hand-off socket through which pods arrive.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ambit_net::ca_client::{CaClientConfig, GrpcCaClient};
use ambit_net::cert_manager::{CertificateManager, ManagerConfig, SystemClock};
use ambit_net::handoff::{self, PacketListener};
use ambit_net::hbone::H2Settings;
use ambit_net::token::BearerToken;
use anyhow::Context;
use tokio::net::TcpListener;

use crate::admin::{self, Admin, LogLevel, Readiness, SetLogFilter};
use crate::callers::InboundCallers;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::model_file;
use crate::pods::Pods;
use crate::proxy::Shared;
use ambit_net::model_source;

/// Runs ztunnel until `shutdown` completes, then drains open connections for up to the
/// configured deadline.
pub async fn run(
    config: Config,
    set_log_filter: SetLogFilter,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let readiness = Readiness::new();
    let starting = readiness.block("startup");

    // Read again for every new connection to the control plane: a trust bundle
    // published there during a root rotation is picked up without a restart.
    let roots = ambit_net::tls::TrustSource::file(&config.ca_root)
        .map_err(|e| anyhow::anyhow!("--ca-root {e}"))?;
    let token = BearerToken::File(config.ca_token_file.clone());
    // Read now too, so a missing or empty file stops startup with a clear error.
    token.current().context("--ca-token-file")?;
    // Becomes true once there is a model: pods are taken from then on only.
    let (first_model_tx, mut first_model) = tokio::sync::watch::channel(false);
    let xds_metrics = ambit_net::xds::client::XdsMetrics::default();
    let (model, _model_task) = match (&config.model_file, &config.xds_address) {
        (Some(path), _) => {
            first_model_tx.send_replace(true);
            model_file::watch_file(path.clone(), config.trust_domain.clone(), config.model_poll)?
        }
        (None, Some(address)) => {
            let (model, synced, task) = model_source::watch_xds(
                model_source::XdsSource {
                    address: address.clone(),
                    identity: config.ca_identity()?,
                    roots: roots.clone(),
                    token: token.clone(),
                    node_id: format!("ztunnel~{}", config.node),
                    metrics: xds_metrics.clone(),
                },
                config.trust_domain.clone(),
            );
            // Not ready before the first model: a pod handed over earlier would be
            // served with none, and its connections to peers it does not know yet
            // would pass in plaintext.
            let waiting = readiness.block("xds");
            tokio::spawn(async move {
                if synced.await.is_ok() {
                    first_model_tx.send_replace(true);
                    drop(waiting);
                }
            });
            (model, task)
        }
        (None, None) => anyhow::bail!("one of --model-file and --xds-address is required"),
    };
    let ca = GrpcCaClient::new(CaClientConfig {
        address: config.ca_address.clone(),
        ca_identity: config.ca_identity()?,
        roots,
        token: Some(token),
        impersonate: true,
        timeout: Duration::from_secs(10),
    })?;
    let certs = Arc::new(CertificateManager::new(
        Arc::new(ca),
        Arc::new(SystemClock),
        ManagerConfig {
            requested_ttl: config.cert_ttl,
            ..ManagerConfig::default()
        },
    ));
    let metrics = Arc::new(Metrics::new(&xds_metrics));
    let (draining_tx, draining_rx) = tokio::sync::watch::channel(false);
    let shared = Arc::new(Shared {
        node: config.node.clone(),
        cluster: config.cluster_id.clone(),
        trust_domain: config.trust_domain.clone(),
        model: model.clone(),
        certs: certs.clone(),
        metrics: metrics.clone(),
        settings: H2Settings {
            stream_window: config.hbone_stream_window,
            connection_window: config.hbone_connection_window,
            max_streams: config.hbone_max_streams,
            ..H2Settings::default()
        },
        picks: Default::default(),
        active: Default::default(),
        none_active: Default::default(),
        draining: draining_rx,
        callers: InboundCallers::new(),
        open_inbound: crate::open_inbound::OpenInbounds::new(),
    });
    // Late rejection: every new model (policies included) is checked against the open
    // inbound connections; those it denies are closed.
    {
        let shared = shared.clone();
        let mut model = shared.model.clone();
        tokio::spawn(async move {
            while model.changed().await.is_ok() {
                let state = model.borrow_and_update().state.clone();
                let closed = crate::proxy::close_denied(&shared, &state);
                if closed > 0 {
                    tracing::info!(closed, "connections closed: the new policies deny them");
                }
            }
        });
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    // SO_REUSEPORT: a new ztunnel starting beside the one it replaces in the same
    // network namespace (the local mesh's nodes, a host-network deployment) can open
    // these too; until the old one exits, the kernel spreads requests over both.
    let bind = |addr: std::net::SocketAddr| async move {
        let listen = || -> std::io::Result<TcpListener> {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            socket.set_nonblocking(true)?;
            TcpListener::from_std(socket.into())
        };
        listen().with_context(|| format!("cannot listen on {addr}"))
    };
    let admin = Arc::new(Admin {
        callers: shared.callers.clone(),
        model,
        certs,
        logging: LogLevel::new(&config.log, set_log_filter),
    });
    tokio::spawn(admin::serve(
        bind(config.admin_addr).await?,
        admin,
        stopped(),
    ));
    tokio::spawn(admin::serve(
        bind(config.metrics_addr).await?,
        metrics,
        stopped(),
    ));
    tokio::spawn(admin::serve(
        bind(config.readiness_addr).await?,
        readiness.clone(),
        stopped(),
    ));

    // The hand-off socket opens with the first model: until then the node agent cannot
    // hand pods over, and enrolled pods' connections are refused, not sent in
    // plaintext to peers this ztunnel does not know yet.
    tokio::pin!(shutdown);
    if !*first_model.borrow() {
        tracing::info!("waiting for the first model before taking pods");
        tokio::select! {
            _ = first_model.wait_for(|m| *m) => {}
            () = &mut shutdown => {
                tracing::info!("stopped before the first model");
                return Ok(());
            }
        }
    }
    if let Some(dir) = config.handoff_socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    }
    let listener = PacketListener::bind(&config.handoff_socket)?;
    let pods = Pods::new(shared.clone());
    let handoff_pods = pods.clone();
    let handoff_task = tokio::spawn(async move {
        if let Err(e) = handoff::serve(listener, &handoff_pods).await {
            tracing::error!(error = %e, "hand-off socket failed");
        }
    });
    drop(starting);
    tracing::info!(node = %config.node, handoff = %config.handoff_socket.display(), "ztunnel ready");
    // Ready for traffic once the node agent's snapshot is served: a ztunnel that
    // replaces another one (an upgrade) must hold every pod's listeners before the
    // old one is stopped.
    {
        let waiting = readiness.block("node agent snapshot");
        let mut served = pods.snapshot_served();
        tokio::spawn(async move {
            if served.wait_for(|s| *s).await.is_ok() {
                tracing::info!(
                    "node agent snapshot served: serving every enrolled pod of the node"
                );
                drop(waiting);
            }
        });
    }

    shutdown.await;
    // Drain: not ready any more, stop taking pods and new connections, tell HBONE
    // peers (GOAWAY), let open connections finish.
    let _draining = readiness.block("draining");
    tracing::info!(active = shared.active.load(Ordering::Relaxed), "draining");
    let _ = draining_tx.send(true);
    handoff_task.abort();
    for uid in ambit_net::handoff::HandoffHandler::served(&pods) {
        if let Some(pod) = pods.get(&uid) {
            pod.stop();
        }
    }
    let _ = tokio::time::timeout(config.drain_deadline, shared.all_closed()).await;
    let _ = stop_tx.send(true);
    tracing::info!(
        left = shared.active.load(Ordering::Relaxed),
        "ztunnel stopped"
    );
    Ok(())
}
