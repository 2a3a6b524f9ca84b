//! The access log: one line per request at info, target `access`, written when the
//! response has ended (or was abandoned), so its duration and byte counts are the
//! whole exchange's, as Envoy's access log is. With `--log-format json` each line is
//! one JSON object whose keys are the fields below. Lines are written in batches, at
//! least every second and as the waypoint exits (`ambit_net::process::flush_logs`),
//! as Envoy's access log is: a `write(2)` per request was a tenth of the waypoint's
//! CPU at saturation.
//!
//! This module must not: decide anything about the request; it reports what the
//! request path and the metrics already know.

use std::net::SocketAddr;
use std::time::Duration;

use crate::http::RequestSummary;
use crate::metrics::RequestLabels;

/// What one finished request's line says beyond its [`RequestSummary`] and labels.
#[derive(Debug)]
pub struct Ended<'a> {
    pub request: &'a RequestSummary,
    pub labels: &'a RequestLabels,
    /// The original client (`x-forwarded-for`'s last hop).
    pub client: SocketAddr,
    /// The endpoint the request went to; none for a local reply.
    pub upstream: Option<SocketAddr>,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// Writes the line.
pub fn log(e: &Ended<'_>) {
    let l = e.labels;
    let r = e.request;
    let upstream = e.upstream.map_or_else(|| "-".to_owned(), |u| u.to_string());
    tracing::info!(
        target: "access",
        method = %r.method,
        authority = %r.authority,
        path = %r.path,
        protocol = r.version,
        response_code = l.response_code,
        response_flags = %l.response_flags,
        grpc_status = %dash(&l.grpc_response_status),
        duration_ms = u64::try_from(e.duration.as_millis()).unwrap_or(u64::MAX),
        request_bytes = e.request_bytes,
        response_bytes = e.response_bytes,
        upstream_host = %upstream,
        downstream_remote_address = %e.client,
        source_workload = %l.source_workload,
        source_namespace = %l.source_workload_namespace,
        source_principal = %l.source_principal,
        destination_workload = %l.destination_workload,
        destination_namespace = %l.destination_workload_namespace,
        destination_principal = %l.destination_principal,
        destination_service = %l.destination_service,
        trace_id = %r.trace_id,
        x_request_id = %dash(&r.request_id),
        "request"
    );
}

fn dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}
