//! Istio's HTTP request metrics, reported by the waypoint (`reporter="waypoint"`):
//! `istio_requests_total`, `istio_request_duration_milliseconds` (Istio's buckets),
//! `istio_request_bytes` and `istio_response_bytes`, labelled with the source and
//! destination as the model knows them (the source's `baggage` where it does not),
//! recorded once a response has ended ([`Counted`]), when the access log's line is
//! written too ([`crate::access_log`]).

use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use ambit_core::model::Workload;
use ambit_core::waypoint::{BoundTarget, Endpoint};
use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::http::{Body, RequestSummary, TunnelContext};

/// Istio's request duration buckets, milliseconds (Envoy's default histogram
/// buckets, which Istio's byte-size histograms use too).
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_response_status: String,
    pub response_flags: String,
    pub connection_security_policy: &'static str,
}

/// The waypoint's metrics registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    families: Families,
}

/// The request metrics' families, which a finished response's body counts into.
#[derive(Debug, Clone)]
struct Families {
    requests: Family<RequestLabels, Counter>,
    durations: Family<RequestLabels, Histogram>,
    request_bytes: Family<RequestLabels, Histogram>,
    response_bytes: Family<RequestLabels, Histogram>,
}

impl Families {
    fn record(
        &self,
        labels: &RequestLabels,
        duration_ms: f64,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        self.requests.get_or_create(labels).inc();
        self.durations.get_or_create(labels).observe(duration_ms);
        self.request_bytes
            .get_or_create(labels)
            .observe(request_bytes as f64);
        self.response_bytes
            .get_or_create(labels)
            .observe(response_bytes as f64);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn new_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let histograms = || {
            Family::<RequestLabels, Histogram>::new_with_constructor(
                new_histogram as fn() -> Histogram,
            )
        };
        let (durations, request_bytes, response_bytes) = (histograms(), histograms(), histograms());
        // prometheus-client adds `_total` to counters.
        ambit_net::admin::register_build_info(&mut registry, "waypoint", env!("CARGO_PKG_VERSION"));
        registry.register("istio_requests", "Requests handled", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from the request's headers to the response's end, milliseconds",
            durations.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body size, bytes",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body size, bytes",
            response_bytes.clone(),
        );
        Metrics {
            registry,
            families: Families {
                requests,
                durations,
                request_bytes,
                response_bytes,
            },
        }
    }

    /// Counts one finished request with `labels` (what [`Metrics::request`] does once
    /// the response has ended).
    pub fn record(
        &self,
        labels: &RequestLabels,
        duration_ms: f64,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        self.families
            .record(labels, duration_ms, request_bytes, response_bytes);
    }

    /// Serves the xDS client's counters with these.
    pub fn register_xds(&mut self, xds: &ambit_net::xds::client::XdsMetrics) {
        xds.register(&mut self.registry);
    }

    /// Counts one answered request once its response has ended (or was dropped):
    /// requests, duration to the response's end, request and response body bytes,
    /// and the gRPC status from the trailers. `request_bytes` counts the request body
    /// as it is sent on.
    pub fn request(
        &self,
        context: &TunnelContext,
        request: &RequestSummary,
        response: Response<Body>,
        flag: &str,
        endpoint: Option<&Endpoint>,
        request_bytes: Arc<AtomicU64>,
    ) -> Response<Body> {
        let state = context.shared.model.borrow().state.clone();
        let source = state.workload_by_ip(context.client.ip());
        let baggage = &context.baggage;
        let name = |w: Option<&Arc<Workload>>| {
            w.map(|w| {
                w.spec
                    .workload_name
                    .clone()
                    .unwrap_or_else(|| w.spec.name.clone())
            })
        };
        let unknown = |v: Option<String>| v.unwrap_or_else(|| "unknown".into());
        let service = match &context.target {
            BoundTarget::Service { service, .. } => Some(service),
            BoundTarget::Workload { .. } => None,
        };
        let destination = endpoint.map(|e| &e.workload);
        let grpc_status = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // The model first; the client's baggage for what the model does not know.
        let mut labels = RequestLabels {
            reporter: "waypoint",
            source_workload: unknown(
                name(source).or_else(|| baggage.workload.as_ref().map(|(_, n)| n.clone())),
            ),
            source_workload_namespace: unknown(
                source
                    .map(|w| w.spec.namespace.clone())
                    .or_else(|| baggage.namespace.clone()),
            ),
            source_principal: context.peer.to_string(),
            source_app: unknown(
                source
                    .and_then(|w| w.spec.canonical_name.clone())
                    .or_else(|| baggage.service.clone()),
            ),
            source_version: unknown(
                source
                    .and_then(|w| w.spec.canonical_revision.clone())
                    .or_else(|| baggage.version.clone()),
            ),
            destination_workload: unknown(name(destination)),
            destination_workload_namespace: unknown(destination.map(|w| w.spec.namespace.clone())),
            destination_principal: unknown(destination.map(|w| w.identity.to_string())),
            destination_service: unknown(service.map(|s| s.hostname.clone())),
            destination_service_name: unknown(service.map(|s| s.spec.name.clone())),
            destination_service_namespace: unknown(service.map(|s| s.spec.namespace.clone())),
            request_protocol: request.protocol,
            response_code: response.status().as_u16(),
            grpc_response_status: String::new(),
            response_flags: if flag.is_empty() {
                "-".into()
            } else {
                flag.to_owned()
            },
            connection_security_policy: "mutual_tls",
        };
        let families = self.families.clone();
        let request = request.clone();
        let (client, upstream) = (context.client, endpoint.map(|e| e.addr));
        response.map(move |body| {
            Counted::new(body, grpc_status, move |sent, grpc_status| {
                labels.grpc_response_status = grpc_status.unwrap_or_default();
                let duration = request.started.elapsed();
                let received = request_bytes.load(Ordering::Relaxed);
                families.record(&labels, duration.as_secs_f64() * 1000.0, received, sent);
                crate::access_log::log(&crate::access_log::Ended {
                    request: &request,
                    labels: &labels,
                    client,
                    upstream,
                    duration,
                    request_bytes: received,
                    response_bytes: sent,
                });
            })
            .boxed()
        })
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            let _ = writeln!(out, "# metrics encoding failed");
        }
        out
    }
}

impl ambit_net::admin::Endpoint for Metrics {
    fn handle(
        &self,
        method: &http::Method,
        path: &str,
        _query: Option<&str>,
    ) -> ambit_net::admin::Reply {
        ambit_net::admin::metrics(method, path, || self.encode())
    }
}

/// Called once when a [`Counted`] body ends: its data bytes and its gRPC status.
type OnEnd = Box<dyn FnOnce(u64, Option<String>) + Send + Sync>;

/// A body that counts its data bytes as it is read and reports them (and the
/// `grpc-status` of its trailers) once, at its end, or when dropped before it.
pub struct Counted<B> {
    inner: B,
    bytes: u64,
    grpc_status: Option<String>,
    on_end: Option<OnEnd>,
}

impl<B> std::fmt::Debug for Counted<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counted")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl<B> Counted<B> {
    /// `grpc_status`: the status already known from the headers (trailers-only).
    pub fn new(
        inner: B,
        grpc_status: Option<String>,
        on_end: impl FnOnce(u64, Option<String>) + Send + Sync + 'static,
    ) -> Self {
        Counted {
            inner,
            bytes: 0,
            grpc_status,
            on_end: Some(Box::new(on_end)),
        }
    }

    fn end(&mut self) {
        if let Some(on_end) = self.on_end.take() {
            on_end(self.bytes, self.grpc_status.take());
        }
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        self.end();
    }
}

impl<B> hyper::body::Body for Counted<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
                if let Some(status) = frame
                    .trailers_ref()
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(|v| v.to_str().ok())
                {
                    this.grpc_status = Some(status.to_owned());
                }
                if this.inner.is_end_stream() {
                    this.end();
                }
            }
            None | Some(Err(_)) => this.end(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};
    use std::sync::Mutex;

    #[tokio::test]
    async fn a_counted_body_reports_its_bytes_and_grpc_status_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "7".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::data(Bytes::from_static(b" world"))),
            Ok(Frame::trailers(trailers)),
        ];
        let record = seen.clone();
        let body = Counted::new(
            StreamBody::new(futures::stream::iter(frames)),
            None,
            move |n, status| record.lock().unwrap().push((n, status)),
        );
        let collected = body.collect().await.unwrap();
        assert_eq!(&collected.to_bytes()[..], b"hello world");
        assert_eq!(*seen.lock().unwrap(), [(11, Some("7".to_owned()))]);

        // Dropped unread: reported with what was read, and the status from headers.
        let record = seen.clone();
        drop(Counted::new(
            Full::new(Bytes::from_static(b"x")),
            Some("0".into()),
            move |n, s| record.lock().unwrap().push((n, s)),
        ));
        assert_eq!(seen.lock().unwrap()[1], (0, Some("0".to_owned())));
    }
}
