//! ztunnel's operations endpoints, on `ambit_net::admin`'s server: admin on
//! localhost:15000 (`/config_dump`, `/certs`, `/logging`, `/inbound_caller`),
//! Prometheus metrics on 15020 (`/metrics`), readiness on 15021 (`/healthz/ready`,
//! [`Readiness`]). Each endpoint answers from a plain function of the request, so it
//! is tested without sockets.

use std::sync::Arc;

use ambit_net::cert_manager::CertificateManager;
use http::Method;
use serde_json::json;
use tokio::sync::watch;

pub use ambit_net::admin::{serve, Endpoint, LogLevel, Readiness, Reply, SetLogFilter};

use crate::callers::InboundCallers;
use crate::metrics::Metrics;
use crate::model_file::ModelSnapshot;

impl Endpoint for Metrics {
    fn handle(&self, method: &Method, path: &str, _query: Option<&str>) -> Reply {
        ambit_net::admin::metrics(method, path, || self.encode())
    }
}

/// The admin endpoint (bind it to localhost only).
pub struct Admin {
    pub callers: Arc<InboundCallers>,
    pub model: watch::Receiver<ModelSnapshot>,
    pub certs: Arc<CertificateManager>,
    pub logging: LogLevel,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
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
                    "model": &*snap.config,
                    "modelVersion": snap.version,
                    "modelLoadedAt": ambit_net::admin::unix_secs(snap.loaded_at),
                    "modelRejected": snap.rejected,
                    "certificates": ambit_net::admin::certificates(&self.certs),
                }))
            }
            (&Method::GET, "/certs") => Reply::json(ambit_net::admin::certificates(&self.certs)),
            (&Method::GET, "/inbound_caller") => inbound_caller(&self.callers, query),
            _ => Reply::not_found(path),
        }
    }
}

/// `GET /inbound_caller?client=IP:PORT&app=IP:PORT`: the identity that opened the open
/// inbound HBONE tunnel whose app connection has these addresses (as the app sees
/// them: its peer, its local address); 404 when there is none (a plaintext client, or
/// the connection has closed).
fn inbound_caller(callers: &InboundCallers, query: Option<&str>) -> Reply {
    let param = |name: &str| {
        query
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map(|v| {
                v.replace("%5B", "[")
                    .replace("%5D", "]")
                    .replace("%3A", ":")
            })
            .and_then(|v| v.parse::<std::net::SocketAddr>().ok())
    };
    let (Some(client), Some(app)) = (param("client"), param("app")) else {
        return Reply::text(
            400,
            "give both addresses as ?client=IP:PORT&app=IP:PORT, as the app sees its connection\n",
        );
    };
    match callers.lookup(client, app) {
        Some(caller) => Reply::json(json!({
            "client": caller.client.to_string(),
            "app": caller.app.to_string(),
            "identity": caller.identity.to_string(),
        })),
        None => Reply::text(
            404,
            format!("no open inbound HBONE tunnel from {client} to {app}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_caller_names_the_identity_of_an_open_tunnel() {
        let callers = InboundCallers::new();
        let _open = callers.register(crate::callers::Caller {
            client: "10.1.0.2:40000".parse().unwrap(),
            app: "10.2.0.2:8080".parse().unwrap(),
            identity: "spiffe://cluster.local/ns/shop/sa/client".parse().unwrap(),
        });
        let found = inbound_caller(&callers, Some("client=10.1.0.2:40000&app=10.2.0.2:8080"));
        assert_eq!(found.status, 200, "{}", found.body);
        assert!(
            found
                .body
                .contains("\"identity\": \"spiffe://cluster.local/ns/shop/sa/client\""),
            "{}",
            found.body
        );
        let mapped = inbound_caller(
            &callers,
            Some("client=%5B::ffff:10.1.0.2%5D:40000&app=[::ffff:10.2.0.2]:8080"),
        );
        assert_eq!(mapped.status, 200, "{}", mapped.body);
        let none = inbound_caller(&callers, Some("client=10.1.0.9:1&app=10.2.0.2:8080"));
        assert_eq!(none.status, 404);
        assert_eq!(inbound_caller(&callers, Some("client=x")).status, 400);
    }
}
