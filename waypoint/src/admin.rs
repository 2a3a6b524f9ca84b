//! The waypoint's admin endpoint (localhost:15000), on `ambit_net::admin`'s server:
//! `/config_dump` (this waypoint, what it serves, its model and certificate),
//! `/certs` and `/logging`.

use std::sync::Arc;

use ambit_core::waypoint::{GatewayRef, Waypoint};
use ambit_net::admin::{certificates, unix_secs, Endpoint, LogLevel, Reply};
use ambit_net::cert_manager::CertificateManager;
use ambit_net::model_source::ModelSnapshot;
use http::Method;
use serde_json::json;
use tokio::sync::watch;

/// The admin endpoint (bind it to localhost only).
pub struct Admin {
    pub gateway: GatewayRef,
    pub model: watch::Receiver<ModelSnapshot>,
    pub certs: Arc<CertificateManager>,
    pub logging: LogLevel,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("gateway", &self.gateway)
            .finish_non_exhaustive()
    }
}

impl Admin {
    /// What this waypoint serves in the current model.
    fn serves(&self, snap: &ModelSnapshot) -> serde_json::Value {
        let state = &snap.state;
        let me = Waypoint::in_model(&self.gateway, state);
        let mut services: Vec<String> = state
            .services()
            .filter(|s| me.binds(s.spec.waypoint.as_ref()))
            .map(|s| s.key())
            .collect();
        services.sort();
        let mut workloads: Vec<String> = state
            .workloads()
            .filter(|w| me.binds(w.spec.waypoint.as_ref()))
            .map(|w| w.uid().to_owned())
            .collect();
        workloads.sort();
        json!({
            "gateway": self.gateway.to_string(),
            "addresses": me.addresses,
            "services": services,
            "workloads": workloads,
        })
    }
}

impl Endpoint for Admin {
    fn handle(&self, method: &Method, path: &str, query: Option<&str>) -> Reply {
        if let Some(reply) = self.logging.handle(method, path, query) {
            return reply;
        }
        match (method, path) {
            (&Method::GET, "/config_dump") => {
                let snap = self.model.borrow().clone();
                Reply::json(json!({
                    "waypoint": self.serves(&snap),
                    "model": &*snap.config,
                    "modelVersion": snap.version,
                    "modelLoadedAt": unix_secs(snap.loaded_at),
                    "modelRejected": snap.rejected,
                    "certificates": certificates(&self.certs),
                }))
            }
            (&Method::GET, "/certs") => Reply::json(certificates(&self.certs)),
            _ => Reply::not_found(path),
        }
    }
}
