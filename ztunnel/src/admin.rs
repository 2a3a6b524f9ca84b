//! The operations endpoints: admin on localhost:15000 (`/config_dump`, `/certs`,
//! `/logging`), Prometheus metrics on 15020 (`/metrics`), readiness on 15021
//! (`/healthz/ready`). Each endpoint answers from a plain function of the request
//! ([`Endpoint::handle`]), so it is tested without sockets; [`serve`] is the thin HTTP/1
//! server around it.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use ambit_net::cert_manager::CertificateManager;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::callers::InboundCallers;
use crate::metrics::Metrics;
use crate::model_file::ModelSnapshot;

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    fn json(value: serde_json::Value) -> Self {
        Reply {
            status: 200,
            content_type: "application/json",
            body: serde_json::to_string_pretty(&value).unwrap_or_default(),
        }
    }

    fn not_found(path: &str) -> Self {
        Reply::text(404, format!("no such endpoint: {path}\n"))
    }
}

/// Something that answers HTTP requests.
pub trait Endpoint: Send + Sync + 'static {
    fn handle(&self, method: &Method, path: &str, query: Option<&str>) -> Reply;
}

/// Serves `endpoint` over HTTP/1 on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    endpoint: Arc<dyn Endpoint>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    let min = std::time::Duration::from_millis(10);
    let mut backoff = min;
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => {
                    backoff = min;
                    c
                }
                Err(e) => {
                    // Out of file descriptors: back off, doubling, rather than spin.
                    tracing::warn!(error = %e, retry_in = ?backoff, "accept failed on an operations port");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let endpoint = endpoint.clone();
                async move {
                    let reply = endpoint.handle(req.method(), req.uri().path(), req.uri().query());
                    let mut resp = Response::new(Full::new(Bytes::from(reply.body)));
                    *resp.status_mut() = StatusCode::from_u16(reply.status)
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    if let Ok(v) = http::HeaderValue::from_str(reply.content_type) {
                        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// Readiness: ready once every startup task that blocked it has finished.
#[derive(Debug, Default)]
pub struct Readiness {
    pending: Mutex<BTreeSet<String>>,
}

/// Holds readiness back until dropped.
#[derive(Debug)]
pub struct ReadinessBlock {
    readiness: Arc<Readiness>,
    what: String,
}

impl Drop for ReadinessBlock {
    fn drop(&mut self) {
        self.readiness
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.what);
    }
}

impl Readiness {
    pub fn new() -> Arc<Self> {
        Arc::new(Readiness::default())
    }

    /// Marks `what` as pending until the returned guard is dropped.
    pub fn block(self: &Arc<Self>, what: &str) -> ReadinessBlock {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(what.to_string());
        ReadinessBlock {
            readiness: self.clone(),
            what: what.to_string(),
        }
    }

    pub fn pending(&self) -> Vec<String> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

impl Endpoint for Readiness {
    fn handle(&self, method: &Method, path: &str, _query: Option<&str>) -> Reply {
        match (method, path) {
            (&Method::GET, "/healthz/ready") => {
                let pending = self.pending();
                if pending.is_empty() {
                    Reply::text(200, "ready\n")
                } else {
                    Reply::text(
                        503,
                        format!("not ready: waiting for {}\n", pending.join(", ")),
                    )
                }
            }
            _ => Reply::not_found(path),
        }
    }
}

impl Endpoint for Metrics {
    fn handle(&self, method: &Method, path: &str, _query: Option<&str>) -> Reply {
        match (method, path) {
            (&Method::GET, "/metrics") | (&Method::GET, "/stats/prometheus") => Reply {
                status: 200,
                content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body: self.encode(),
            },
            _ => Reply::not_found(path),
        }
    }
}

/// Changes the log filter at run time; returns the error text for a bad filter.
pub type SetLogFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The admin endpoint (bind it to localhost only).
pub struct Admin {
    pub callers: Arc<InboundCallers>,
    pub model: watch::Receiver<ModelSnapshot>,
    pub certs: Arc<CertificateManager>,
    pub set_log_filter: SetLogFilter,
    pub log_filter: Mutex<String>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Admin {
    fn certs_json(&self) -> serde_json::Value {
        let now = SystemTime::now();
        let certs: Vec<_> = self
            .certs
            .identities()
            .into_iter()
            .map(|id| match self.certs.cached(&id) {
                Some(c) => json!({
                    "identity": id.to_string(),
                    "state": "valid",
                    "notBefore": unix_secs(c.not_before()),
                    "notAfter": unix_secs(c.not_after()),
                    "secondsLeft": c.remaining(now).as_secs(),
                    "chainLength": c.chain().len(),
                }),
                None => json!({"identity": id.to_string(), "state": "pending or expired"}),
            })
            .collect();
        json!(certs)
    }
}

impl Endpoint for Admin {
    fn handle(&self, method: &Method, path: &str, query: Option<&str>) -> Reply {
        match (method, path) {
            (&Method::GET, "/config_dump") => {
                let snap = self.model.borrow().clone();
                Reply::json(json!({
                    "model": &*snap.config,
                    "modelVersion": snap.version,
                    "modelLoadedAt": unix_secs(snap.loaded_at),
                    "modelRejected": snap.rejected,
                    "certificates": self.certs_json(),
                }))
            }
            (&Method::GET, "/certs") => Reply::json(self.certs_json()),
            (&Method::GET, "/inbound_caller") => inbound_caller(&self.callers, query),
            (&Method::GET, "/logging") => {
                let current = self
                    .log_filter
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                Reply::text(200, format!("{current}\n"))
            }
            (&Method::POST, "/logging") => {
                let level = query
                    .unwrap_or("")
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("level="))
                    .unwrap_or("");
                if level.is_empty() {
                    return Reply::text(
                        400,
                        "give the filter as ?level=<filter>, e.g. ?level=debug\n",
                    );
                }
                match (self.set_log_filter)(level) {
                    Ok(()) => {
                        *self.log_filter.lock().unwrap_or_else(|p| p.into_inner()) =
                            level.to_string();
                        Reply::text(200, format!("log filter is now {level}\n"))
                    }
                    Err(e) => Reply::text(400, format!("invalid log filter {level:?}: {e}\n")),
                }
            }
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

    #[test]
    fn readiness_waits_for_every_block() {
        let r = Readiness::new();
        assert_eq!(r.handle(&Method::GET, "/healthz/ready", None).status, 200);
        let certs = r.block("certificates");
        let model = r.block("model");
        let reply = r.handle(&Method::GET, "/healthz/ready", None);
        assert_eq!(reply.status, 503);
        assert_eq!(reply.body, "not ready: waiting for certificates, model\n");
        drop(certs);
        drop(model);
        assert_eq!(r.handle(&Method::GET, "/healthz/ready", None).status, 200);
        assert_eq!(r.handle(&Method::GET, "/nope", None).status, 404);
    }

    #[tokio::test]
    async fn served_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let readiness = Readiness::new();
        let _block = readiness.block("model");
        tokio::spawn(serve(listener, readiness.clone(), std::future::pending()));
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tcp.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 503"), "{out}");
        assert!(out.ends_with("not ready: waiting for model\n"), "{out}");
    }
}
