//! The operations endpoints every Ambit proxy serves, as Istio's do: admin on
//! localhost:15000 (`/config_dump`, `/logging`, ...), Prometheus metrics on 15020
//! (`/metrics`), readiness on 15021 (`/healthz/ready`). An endpoint answers from a
//! plain function of the request ([`Endpoint::handle`]), so it is tested without
//! sockets; [`serve`] is the thin HTTP/1 server around it. The pieces every proxy
//! shares live here: [`Readiness`], [`LogLevel`] (`/logging`), [`certificates`] (the
//! certificate manager's state as JSON), [`metrics`] (the Prometheus paths) and
//! [`register_build_info`] (Istio's `istio_build{component,tag}`).
//! What a proxy dumps and which metrics it keeps are its own.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::cert_manager::CertificateManager;

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    pub fn json(value: serde_json::Value) -> Self {
        Reply {
            status: 200,
            content_type: "application/json",
            body: serde_json::to_string_pretty(&value).unwrap_or_default(),
        }
    }

    pub fn not_found(path: &str) -> Self {
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

/// Labels of `istio_build`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct BuildLabels {
    component: String,
    tag: String,
}

/// Registers Istio's build-info gauge, `istio_build{component, tag} 1`, with the
/// proxy's name and version.
pub fn register_build_info(
    registry: &mut prometheus_client::registry::Registry,
    component: &str,
    tag: &str,
) {
    let build: prometheus_client::metrics::family::Family<
        BuildLabels,
        prometheus_client::metrics::gauge::Gauge,
    > = Default::default();
    build
        .get_or_create(&BuildLabels {
            component: component.to_owned(),
            tag: tag.to_owned(),
        })
        .set(1);
    registry.register("istio_build", "Istio component build info", build);
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

/// Answers Prometheus' paths (`/metrics`, and Envoy's `/stats/prometheus`) with the
/// OpenMetrics text `encode` makes.
pub fn metrics(method: &Method, path: &str, encode: impl FnOnce() -> String) -> Reply {
    match (method, path) {
        (&Method::GET, "/metrics") | (&Method::GET, "/stats/prometheus") => Reply {
            status: 200,
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body: encode(),
        },
        _ => Reply::not_found(path),
    }
}

/// Changes the log filter at run time; returns the error text for a bad filter.
pub type SetLogFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// `/logging`: `GET` shows the log filter, `POST ?level=<filter>` replaces it.
pub struct LogLevel {
    set: SetLogFilter,
    current: Mutex<String>,
}

impl std::fmt::Debug for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogLevel")
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl LogLevel {
    /// `initial` is the filter in force now; `set` installs a new one.
    pub fn new(initial: &str, set: SetLogFilter) -> Self {
        LogLevel {
            set,
            current: Mutex::new(initial.to_owned()),
        }
    }

    /// Answers `/logging`, or `None` for another path.
    pub fn handle(&self, method: &Method, path: &str, query: Option<&str>) -> Option<Reply> {
        if path != "/logging" {
            return None;
        }
        let reply = match *method {
            Method::GET => {
                let current = self
                    .current
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                Reply::text(200, format!("{current}\n"))
            }
            Method::POST => {
                let level = query
                    .unwrap_or("")
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("level="))
                    .unwrap_or("");
                if level.is_empty() {
                    return Some(Reply::text(
                        400,
                        "give the filter as ?level=<filter>, e.g. ?level=debug\n",
                    ));
                }
                match (self.set)(level) {
                    Ok(()) => {
                        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = level.to_string();
                        Reply::text(200, format!("log filter is now {level}\n"))
                    }
                    Err(e) => Reply::text(400, format!("invalid log filter {level:?}: {e}\n")),
                }
            }
            _ => Reply::not_found(path),
        };
        Some(reply)
    }
}

/// Seconds since the Unix epoch (0 before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The state of every certificate `certs` manages, for `/certs` and `/config_dump`.
pub fn certificates(certs: &CertificateManager) -> serde_json::Value {
    let now = SystemTime::now();
    let list: Vec<_> = certs
        .identities()
        .into_iter()
        .map(|id| match certs.cached(&id) {
            Some(c) => json!({
                "identity": id.to_string(),
                "state": "valid",
                "notBefore": unix_secs(c.not_before()),
                "notAfter": unix_secs(c.not_after()),
                "secondsLeft": c.remaining(now).as_secs(),
                "chainLength": c.chain().len(),
                "serial": c.serial_hex(),
                // The trust bundle that came with it, and the root its chain ends at
                // (by key identifier): what a root rotation changes.
                "roots": c.roots().iter().map(|r| crate::tls::sha256_hex(r)).collect::<Vec<_>>(),
                "chainsTo": c.issuing_root().map(|r| crate::tls::sha256_hex(r)),
            }),
            None => json!({"identity": id.to_string(), "state": "pending or expired"}),
        })
        .collect();
    json!(list)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn logging_shows_and_replaces_the_filter() {
        let log = LogLevel::new(
            "info",
            Box::new(|f: &str| {
                if f == "nonsense[" {
                    Err("bad directive".into())
                } else {
                    Ok(())
                }
            }),
        );
        let get = |log: &LogLevel| log.handle(&Method::GET, "/logging", None).unwrap();
        assert_eq!(get(&log).body, "info\n");
        let set = log
            .handle(&Method::POST, "/logging", Some("level=debug"))
            .unwrap();
        assert_eq!((set.status, get(&log).body.as_str()), (200, "debug\n"));
        let bad = log
            .handle(&Method::POST, "/logging", Some("level=nonsense["))
            .unwrap();
        assert_eq!(bad.status, 400, "{}", bad.body);
        assert_eq!(get(&log).body, "debug\n");
        let missing = log.handle(&Method::POST, "/logging", None).unwrap();
        assert_eq!(missing.status, 400);
        assert!(log.handle(&Method::GET, "/config_dump", None).is_none());
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
