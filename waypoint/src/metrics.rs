//! Istio's HTTP request metrics, reported by the waypoint (`reporter="waypoint"`):
//! `istio_requests_total` and `istio_request_duration_milliseconds` (Istio's
//! buckets), labelled with the source and destination as the model knows them.

use std::fmt::Write as _;
use std::sync::Arc;

use ambit_core::model::Workload;
use ambit_core::waypoint::{BoundTarget, Endpoint};
use http::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::http::{Body, RequestSummary, TunnelContext};

/// Istio's request duration buckets, milliseconds.
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
    requests: Family<RequestLabels, Counter>,
    durations: Family<RequestLabels, Histogram>,
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
        let durations = Family::<RequestLabels, Histogram>::new_with_constructor(
            new_histogram as fn() -> Histogram,
        );
        // prometheus-client adds `_total` to counters.
        registry.register("istio_requests", "Requests handled", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Time to the response's headers, milliseconds",
            durations.clone(),
        );
        Metrics {
            registry,
            requests,
            durations,
        }
    }

    /// Counts one answered request.
    pub fn request(
        &self,
        context: &TunnelContext,
        request: &RequestSummary,
        response: &Response<Body>,
        flag: &str,
        endpoint: Option<&Endpoint>,
    ) {
        let state = context.shared.model.borrow().state.clone();
        let source = state.workload_by_ip(context.client.ip());
        let name = |w: Option<&Arc<Workload>>| {
            w.map(|w| {
                w.spec
                    .workload_name
                    .clone()
                    .unwrap_or_else(|| w.spec.name.clone())
            })
            .unwrap_or_else(|| "unknown".into())
        };
        let service = match &context.target {
            BoundTarget::Service { service, .. } => Some(service),
            BoundTarget::Workload { .. } => None,
        };
        let destination = endpoint.map(|e| &e.workload);
        let grpc_status = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_default();
        let labels = RequestLabels {
            reporter: "waypoint",
            source_workload: name(source),
            source_workload_namespace: source
                .map(|w| w.spec.namespace.clone())
                .unwrap_or_else(|| "unknown".into()),
            source_principal: context.peer.to_string(),
            source_app: source
                .and_then(|w| w.spec.canonical_name.clone())
                .unwrap_or_else(|| "unknown".into()),
            source_version: source
                .and_then(|w| w.spec.canonical_revision.clone())
                .unwrap_or_else(|| "unknown".into()),
            destination_workload: name(destination),
            destination_workload_namespace: destination
                .map(|w| w.spec.namespace.clone())
                .unwrap_or_else(|| "unknown".into()),
            destination_principal: destination
                .map(|w| w.identity.to_string())
                .unwrap_or_else(|| "unknown".into()),
            destination_service: service
                .map(|s| s.hostname.clone())
                .unwrap_or_else(|| "unknown".into()),
            destination_service_name: service
                .map(|s| s.spec.name.clone())
                .unwrap_or_else(|| "unknown".into()),
            destination_service_namespace: service
                .map(|s| s.spec.namespace.clone())
                .unwrap_or_else(|| "unknown".into()),
            request_protocol: request.protocol,
            response_code: response.status().as_u16(),
            grpc_response_status: grpc_status,
            response_flags: if flag.is_empty() {
                "-".into()
            } else {
                flag.to_owned()
            },
            connection_security_policy: "mutual_tls",
        };
        self.requests.get_or_create(&labels).inc();
        self.durations
            .get_or_create(&labels)
            .observe(request.started.elapsed().as_secs_f64() * 1000.0);
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
