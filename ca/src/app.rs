//! Wires a [`Config`] into a running CA: store → authority → authenticators → server.

use std::sync::Arc;
use std::time::SystemTime;

use ambit_core::certificate::{ValidityLimits, WorkloadPlacement};
use anyhow::Context;
use tokio::net::TcpListener;

use crate::auth::{Authenticator, PeerCertificateAuthenticator, TokensFile};
use crate::authority::CertificateAuthority;
use crate::config::Config;
use crate::live::LiveAuthority;
use crate::server;
use crate::service::CaService;
use crate::store::{CaMaterial, DirectoryStore, RootStore};
use ambit_proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;

/// Loads the CA from `store`, generating and saving a root when it holds none.
pub fn load_or_create(
    store: &dyn RootStore,
    config: &Config,
    now: SystemTime,
) -> anyhow::Result<CertificateAuthority> {
    Ok(load_or_create_material(store, config, now)?.1)
}

/// [`load_or_create`], with the material and whether it was generated now.
pub fn load_or_create_material(
    store: &dyn RootStore,
    config: &Config,
    now: SystemTime,
) -> anyhow::Result<(CaMaterial, CertificateAuthority, bool)> {
    let (material, generated) = match store.load()? {
        Some(m) => {
            tracing::info!(location = %store.location(), "loaded CA material");
            (m, false)
        }
        None => {
            let m = CertificateAuthority::generate_root(&config.trust_domain, now)?;
            store.save(&m)?;
            tracing::info!(location = %store.location(), "generated a new self-signed root");
            (m, true)
        }
    };
    let ca = authority(&material, config, &store.location(), now)?;
    Ok((material, ca, generated))
}

/// How [`LiveAuthority`] builds a CA from new material: `config`'s lifetimes, and
/// node authorization against `placement` when given.
pub fn builder(
    config: &Config,
    location: String,
    placement: Option<Arc<dyn WorkloadPlacement>>,
) -> crate::live::Build {
    let config = config.clone();
    Box::new(move |material, now| {
        let ca = authority(material, &config, &location, now)?;
        Ok(match &placement {
            Some(p) => ca.with_placement(p.clone()),
            None => ca,
        })
    })
}

/// The CA signing with `material` (found at `location`, for errors), with the
/// configured certificate lifetimes.
pub fn authority(
    material: &CaMaterial,
    config: &Config,
    location: &str,
    now: SystemTime,
) -> anyhow::Result<CertificateAuthority> {
    anyhow::ensure!(
        config.default_ttl <= config.max_ttl,
        "--default-ttl {:?} exceeds --max-ttl {:?}",
        config.default_ttl,
        config.max_ttl
    );
    let limits = ValidityLimits {
        default_ttl: config.default_ttl,
        max_ttl: config.max_ttl,
        ..ValidityLimits::default()
    };
    CertificateAuthority::from_material(material, config.trust_domain.clone(), limits, now)
        .with_context(|| format!("CA material in {location} is unusable"))
}

/// The static-token authenticator of `--tokens`, if given.
pub fn token_authenticator(config: &Config) -> anyhow::Result<Option<Arc<dyn Authenticator>>> {
    let Some(path) = &config.tokens else {
        return Ok(None);
    };
    let tokens = TokensFile::open(path)?;
    tracing::info!(path = %path.display(), tokens = tokens.len(), "loaded bearer tokens");
    Ok(Some(Arc::new(tokens)))
}

/// Runs the CA until `shutdown` completes. `on_listening` gets the bound address
/// (useful with port 0).
pub async fn run(
    config: Config,
    on_listening: impl FnOnce(std::net::SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    run_with(config, None, |_, _| {}, on_listening, shutdown).await
}

/// [`run`], with node authorization against `placement` (where workloads run) and more
/// gRPC services on the CA's port: `add` gets the CA's caller authenticators (for
/// [`crate::auth::authenticate_request`]) and adds its services.
pub async fn run_with(
    config: Config,
    placement: Option<Arc<dyn WorkloadPlacement>>,
    add: impl FnOnce(&[Arc<dyn Authenticator>], &mut tonic::service::RoutesBuilder),
    on_listening: impl FnOnce(std::net::SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let root_dir = config
        .root_dir
        .as_ref()
        .context("--root-dir is required: the directory holding the CA's material")?;
    let store = DirectoryStore::new(root_dir);
    let (material, mut ca, generated) =
        load_or_create_material(&store, &config, SystemTime::now())?;
    match &placement {
        Some(placement) => ca = ca.with_placement(placement.clone()),
        None => tracing::warn!(
            "no workload placement: node agents may request any identity in the trust domain"
        ),
    }
    let live = LiveAuthority::new(material, ca, builder(&config, store.location(), placement));
    // The directory is read again every second: a plug-in CA changed there, or a root
    // rotation asked for there, is taken without a restart.
    let watching = tokio::spawn(crate::live::watch_directory(
        live.clone(),
        store,
        root_dir.clone(),
        config.max_ttl,
        generated,
        std::time::Duration::from_secs(1),
    ));
    let _watching = AbortOnDrop(watching);
    let mut authenticators: Vec<Arc<dyn Authenticator>> = Vec::new();
    match token_authenticator(&config)? {
        Some(tokens) => authenticators.push(tokens),
        None => tracing::warn!(
            "no --tokens file: only callers holding a mesh certificate can be served"
        ),
    }
    authenticators.push(Arc::new(PeerCertificateAuthenticator));
    serve(config, live, authenticators, add, on_listening, shutdown).await
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `ca` on `config.listen` until `shutdown` completes, its callers authenticated
/// by `authenticators` (tried in order), with more gRPC services from `add` on the same
/// port (see [`run_with`]).
pub async fn serve(
    config: Config,
    ca: Arc<LiveAuthority>,
    authenticators: Vec<Arc<dyn Authenticator>>,
    add: impl FnOnce(&[Arc<dyn Authenticator>], &mut tonic::service::RoutesBuilder),
    on_listening: impl FnOnce(std::net::SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let identity = config.control_identity()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, %identity, trust_domain = %config.trust_domain, "CA serving");
    on_listening(addr);
    let mut routes = tonic::service::RoutesBuilder::default();
    add(&authenticators, &mut routes);
    routes.add_service(IstioCertificateServiceServer::new(CaService::new(
        ca.subscribe(),
        authenticators,
    )));
    server::serve(
        listener,
        ca.subscribe(),
        routes.routes(),
        identity,
        config.serving_dns_names(),
        shutdown,
    )
    .await?;
    Ok(())
}
