//! The model a proxy works from, kept current: [`ModelSnapshot`] is what traffic reads
//! (the indexed `MeshState`, the `MeshConfig` it was built from for `/config_dump`,
//! and why the latest change was rejected, if it was), and [`watch_xds`] keeps one up
//! to date from the control plane over delta xDS (`crate::xds::client`), the normal
//! source for ztunnel and the waypoint alike. A model that does not validate as a
//! whole is reported and the last good one stays in force; so does the last model
//! while the control plane is unreachable.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit_core::model::{MeshConfig, MeshState};
use ambit_core::{SpiffeId, TrustDomain};
use tokio::sync::watch;

use crate::ca_client::tls_channel;
use crate::token::BearerToken;
use crate::xds::client::{ClientConfig, XdsClient};

/// What a proxy currently works from, and how it got there.
#[derive(Debug, Clone)]
pub struct ModelSnapshot {
    pub state: Arc<MeshState>,
    /// The model as loaded, for `/config_dump`.
    pub config: Arc<MeshConfig>,
    /// Incremented on every successful load.
    pub version: u64,
    pub loaded_at: SystemTime,
    /// Why the latest change was rejected, if it was (the previous model is in force).
    pub rejected: Option<String>,
}

impl ModelSnapshot {
    /// An empty model, version 0: what a proxy has before its first one.
    pub fn empty(trust_domain: &TrustDomain) -> Self {
        let config = MeshConfig::default();
        ModelSnapshot {
            state: Arc::new(MeshState::build(&config, trust_domain).unwrap_or_default()),
            config: Arc::new(config),
            version: 0,
            loaded_at: SystemTime::now(),
            rejected: None,
        }
    }
}

/// Records that a change was rejected (logged once per distinct reason); the model in
/// force stays.
pub fn reject(tx: &watch::Sender<ModelSnapshot>, reason: String) {
    let same = tx.borrow().rejected.as_deref() == Some(reason.as_str());
    if !same {
        tracing::error!(error = %reason, "model change rejected; keeping the last good model");
        tx.send_modify(|s| s.rejected = Some(reason));
    }
}

/// How to reach the control plane's xDS.
#[derive(Debug, Clone)]
pub struct XdsSource {
    pub address: String,
    /// The identity the control plane must present.
    pub identity: SpiffeId,
    pub roots: crate::tls::TrustSource,
    pub token: BearerToken,
    /// `Node.id` the server logs this client by, e.g. `ztunnel~<node>`.
    pub node_id: String,
    /// Where the client counts its streams and messages.
    pub metrics: crate::xds::client::XdsMetrics,
}

/// Starts the client; the receiver holds an empty model until the first response, and
/// `synced` fires once one has been applied.
pub fn watch_xds(
    source: XdsSource,
    trust_domain: TrustDomain,
) -> (
    watch::Receiver<ModelSnapshot>,
    tokio::sync::oneshot::Receiver<()>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = watch::channel(ModelSnapshot::empty(&trust_domain));
    let (configs_tx, mut configs) = watch::channel(Arc::new(MeshConfig::default()));
    let mut config = ClientConfig::new(&source.node_id);
    config.token = Some(source.token.clone());
    config.metrics = source.metrics.clone();
    let client = XdsClient::new(config, configs_tx);
    let (synced_tx, synced) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let connect = move || {
            let channel = tls_channel(
                &source.address,
                &source.identity,
                &source.roots,
                None,
                Duration::from_secs(10),
            );
            async move { channel }
        };
        let run = tokio::spawn(client.run(connect));
        let mut synced_tx = Some(synced_tx);
        while configs.changed().await.is_ok() {
            let config = configs.borrow_and_update().clone();
            match MeshState::build(&config, &trust_domain) {
                Ok(state) => {
                    tracing::info!(
                        workloads = config.workloads.len(),
                        services = config.services.len(),
                        "model received over xDS"
                    );
                    tx.send_modify(|s| {
                        s.state = Arc::new(state);
                        s.config = config;
                        s.version += 1;
                        s.loaded_at = SystemTime::now();
                        s.rejected = None;
                    });
                    if let Some(synced) = synced_tx.take() {
                        let _ = synced.send(());
                    }
                }
                Err(e) => reject(&tx, format!("model from xDS: {e}")),
            }
        }
        run.abort();
    });
    (rx, synced, task)
}
