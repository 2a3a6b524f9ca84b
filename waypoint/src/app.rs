//! Wires a [`Config`] into a running waypoint: its certificate from the CA (the
//! `ambit_net` certificate manager, authenticated with its service account token),
//! its model over delta xDS (`ambit_net::model_source`), the HBONE listener and the
//! operations endpoints; then drains on shutdown.
//!
//! [`run`] builds the parts from the configuration; [`serve`] runs them, so tests
//! can give it a certificate source and a model of their own.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ambit_core::waypoint::GatewayRef;
use ambit_core::{SpiffeId, TrustDomain};
use ambit_net::admin::{self, LogLevel, Readiness, SetLogFilter};
use ambit_net::ca_client::{CaClientConfig, GrpcCaClient};
use ambit_net::cert_manager::{CertificateManager, ManagerConfig, SystemClock};
use ambit_net::hbone::pool::{HbonePool, PoolConfig};
use ambit_net::hbone::H2Settings;
use ambit_net::model_source::{self, ModelSnapshot};
use ambit_net::tls::{self, CertSlot, ClientAuth};
use ambit_net::token::BearerToken;
use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::Admin;
use crate::config::Config;
use crate::http::Limits;
use crate::metrics::Metrics;
use crate::proxy::{self, Settings, Shared};
use crate::upstream::Upstreams;

/// Runs the waypoint until `shutdown` completes, then drains.
pub async fn run(
    config: Config,
    set_log_filter: SetLogFilter,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    // Read again for every new connection to the control plane: a trust bundle
    // published there during a root rotation is picked up without a restart.
    let roots =
        tls::TrustSource::file(&config.ca_root).map_err(|e| anyhow::anyhow!("--ca-root {e}"))?;
    let token = BearerToken::File(config.token_file.clone());
    // Read now too, so a missing or empty file stops startup with a clear error.
    token.current().context("--token-file")?;
    let identity = config.identity().context("--gateway / --service-account")?;
    let control_identity = config.control_identity().context("--control-identity")?;
    let ca = GrpcCaClient::new(CaClientConfig {
        address: config.control_address.clone(),
        ca_identity: control_identity.clone(),
        roots: roots.clone(),
        token: Some(token.clone()),
        // The token is the waypoint's own service account's: no impersonation.
        impersonate: false,
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
    let xds_metrics = ambit_net::xds::client::XdsMetrics::default();
    let (model, synced, _model_task) = model_source::watch_xds(
        model_source::XdsSource {
            address: config.control_address.clone(),
            identity: control_identity,
            roots,
            token,
            node_id: format!("waypoint~{}", config.gateway),
            metrics: xds_metrics.clone(),
        },
        config.trust_domain.clone(),
    );
    let bind = |addr, what: &'static str| async move {
        TcpListener::bind(addr)
            .await
            .with_context(|| format!("{what}: cannot listen on {addr}"))
    };
    let parts = Parts {
        gateway: config.gateway.clone(),
        identity,
        trust_domain: config.trust_domain.clone(),
        certs,
        model,
        xds_metrics,
        model_synced: Box::pin(async move {
            let _ = synced.await;
        }),
        hbone: bind(config.hbone_addr, "--hbone-addr").await?,
        admin: bind(config.admin_addr, "--admin-addr").await?,
        metrics: bind(config.metrics_addr, "--metrics-addr").await?,
        readiness: bind(config.readiness_addr, "--readiness-addr").await?,
        limits: Limits {
            max_request_headers: config.max_request_headers_kb << 10,
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
        },
        detection_timeout: config.protocol_detection_timeout,
        instance_ip: config.instance_ip,
        drain_deadline: config.drain_deadline,
        logging: LogLevel::new(&config.log, set_log_filter),
        authn: crate::authn::AuthnSettings {
            ca_bundle: match &config.jwks_ca_bundle {
                Some(path) => {
                    tls::read_roots(path).map_err(|e| anyhow::anyhow!("--jwks-ca-bundle {e}"))?
                }
                None => Vec::new(),
            },
            refresh_interval: config.jwks_refresh_interval,
            refetch_min_interval: config.jwks_refetch_min_interval,
            fetch_timeout: config.jwks_fetch_timeout,
        },
    };
    serve(parts, shutdown).await
}

/// Everything a running waypoint is made of.
pub struct Parts {
    pub gateway: GatewayRef,
    pub identity: SpiffeId,
    pub trust_domain: TrustDomain,
    /// Issues and renews the waypoint's certificate.
    pub certs: Arc<CertificateManager>,
    pub model: watch::Receiver<ModelSnapshot>,
    /// The xDS client's counters, served with the waypoint's metrics.
    pub xds_metrics: ambit_net::xds::client::XdsMetrics,
    /// Completes once the first model has arrived.
    pub model_synced: Pin<Box<dyn Future<Output = ()> + Send>>,
    pub hbone: TcpListener,
    pub admin: TcpListener,
    pub metrics: TcpListener,
    pub readiness: TcpListener,
    pub limits: Limits,
    pub detection_timeout: Duration,
    pub instance_ip: Option<IpAddr>,
    pub drain_deadline: Duration,
    pub logging: LogLevel,
    /// How remote JWKS are fetched (RequestAuthentication).
    pub authn: crate::authn::AuthnSettings,
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts")
            .field("gateway", &self.gateway)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Runs the waypoint made of `parts` until `shutdown` completes, then drains: not
/// ready any more, GOAWAY to HBONE clients, open tunnels given up to the drain
/// deadline.
pub async fn serve(parts: Parts, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let readiness = Readiness::new();
    let waiting_cert = readiness.block("certificate");
    let waiting_model = readiness.block("xds");
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut metrics = Metrics::new();
    metrics.register_xds(&parts.xds_metrics);
    let metrics = Arc::new(metrics);
    tokio::spawn(admin::serve(
        parts.admin,
        Arc::new(Admin {
            gateway: parts.gateway.clone(),
            model: parts.model.clone(),
            certs: parts.certs.clone(),
            logging: parts.logging,
        }),
        stopped(),
    ));
    tokio::spawn(admin::serve(parts.metrics, metrics.clone(), stopped()));
    tokio::spawn(admin::serve(parts.readiness, readiness.clone(), stopped()));
    let model_synced = parts.model_synced;
    let (synced_tx, mut synced_rx) = watch::channel(false);
    tokio::spawn(async move {
        model_synced.await;
        drop(waiting_model);
        let _ = synced_tx.send(true);
    });

    tokio::pin!(shutdown);
    // The HBONE listener needs the certificate it presents.
    let mut cert_state = parts.certs.watch(&parts.identity);
    let cert = tokio::select! {
        cert = async {
            loop {
                if let Some(cert) = cert_state.borrow_and_update().cert.clone() {
                    return Some(cert);
                }
                if cert_state.changed().await.is_err() {
                    return None;
                }
            }
        } => cert.context("the certificate manager stopped")?,
        () = &mut shutdown => {
            tracing::info!("stopped before a certificate was issued");
            return Ok(());
        }
    };
    let slot = CertSlot::new(&cert);
    drop(waiting_cert);
    let server_tls = Arc::new(tls::server_config(
        slot,
        cert.roots(),
        ClientAuth::Required(parts.trust_domain.clone()),
    )?);
    {
        // Renewed certificates are served from the next handshake on, and peers
        // verified against the trust bundle that came with them (a root rotation).
        let server_tls = server_tls.clone();
        tokio::spawn(async move {
            while cert_state.changed().await.is_ok() {
                if let Some(cert) = cert_state.borrow_and_update().cert.clone() {
                    match server_tls.rotate(&cert) {
                        Ok(true) => {
                            tracing::info!(roots = cert.roots().len(), "trust bundle changed")
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "cannot trust the new bundle; keeping the current one")
                        }
                    }
                }
            }
        });
    }

    let (draining_tx, draining_rx) = watch::channel(false);
    let settings = H2Settings::default();
    let upstreams = Upstreams::new(
        HbonePool::new(
            PoolConfig {
                settings,
                ..PoolConfig::default()
            },
            ambit_net::hbone::pool::MeshConnector::new(),
        ),
        parts.certs.clone(),
        parts.identity.clone(),
        proxy::forwarded_for(parts.instance_ip),
    );
    let shared = Shared::new(
        Settings {
            gateway: parts.gateway.clone(),
            identity: parts.identity.clone(),
            limits: parts.limits,
            settings,
            detection_timeout: parts.detection_timeout,
            authn: crate::authn::Authenticator::new(parts.authn).context("the JWKS client")?,
        },
        parts.model,
        parts.certs,
        upstreams,
        metrics,
        draining_rx,
    );
    let hbone_addr = parts.hbone.local_addr()?;
    tokio::spawn(proxy::serve_hbone(parts.hbone, shared.clone(), server_tls));
    tracing::info!(gateway = %parts.gateway, identity = %parts.identity, hbone = %hbone_addr, "waypoint serving");
    // Ready (15021 answers 200) once it has its certificate and a first model; said
    // once in the log, which is what the local mesh waits for.
    let stopping = tokio::select! {
        synced = synced_rx.wait_for(|synced| *synced) => {
            if synced.is_ok() {
                tracing::info!(gateway = %parts.gateway, "waypoint ready");
            }
            false
        }
        () = &mut shutdown => true,
    };
    if !stopping {
        shutdown.await;
    }
    let _draining = readiness.block("draining");
    tracing::info!(open = shared.open.load(Ordering::Relaxed), "draining");
    let _ = draining_tx.send(true);
    let deadline = tokio::time::Instant::now() + parts.drain_deadline;
    while shared.open.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    tracing::info!(
        left = shared.open.load(Ordering::Relaxed),
        "waypoint stopped"
    );
    Ok(())
}
