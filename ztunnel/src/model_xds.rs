//! The model from the control plane over delta xDS, the normal source: ztunnel's xDS
//! client (`ambit_net::xds::client`) keeps the resources and the `MeshConfig` they make,
//! and this builds the `MeshState` traffic reads from each new one. A model that does
//! not validate as a whole is reported and the last good one stays in force, as with
//! the file source; so does the last model while the control plane is unreachable.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit_core::model::{MeshConfig, MeshState};
use ambit_core::{SpiffeId, TrustDomain};
use ambit_net::ca_client::tls_channel;
use ambit_net::token::BearerToken;
use ambit_net::xds::client::{ClientConfig, XdsClient};
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;

use crate::model_file::{reject, ModelSnapshot};

/// How to reach the control plane's xDS.
#[derive(Debug, Clone)]
pub struct XdsSource {
    pub address: String,
    /// The identity the control plane must present.
    pub identity: SpiffeId,
    pub roots: Vec<CertificateDer<'static>>,
    pub token: BearerToken,
    pub node: String,
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
    let empty = MeshConfig::default();
    let state = MeshState::build(&empty, &trust_domain).unwrap_or_default();
    let (tx, rx) = watch::channel(ModelSnapshot {
        state: Arc::new(state),
        config: Arc::new(empty),
        version: 0,
        loaded_at: SystemTime::now(),
        rejected: None,
    });
    let (configs_tx, mut configs) = watch::channel(Arc::new(MeshConfig::default()));
    let mut config = ClientConfig::new(&format!("ztunnel~{}", source.node));
    config.token = Some(source.token.clone());
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
