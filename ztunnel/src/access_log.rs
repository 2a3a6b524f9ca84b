//! The access log: one line per connection when it ends, target `access`, with the
//! fields of Istio's ztunnel: `src.addr`, `src.workload`, `src.namespace`,
//! `src.identity`, `dst.addr`, `dst.hbone_addr`, `dst.service`, `dst.workload`,
//! `dst.namespace`, `dst.identity`, `direction` (`outbound` on 15001, `inbound` on
//! 15006 and 15008), `bytes_sent`, `bytes_recv` (from the local pod's side: for
//! outbound, what it sent as a client and received back; for inbound, what it sent
//! as a server and received from its client), `duration` (`<n>ms`) and `error`.
//!
//! A connection that completed is logged at info (`connection complete`), one that
//! failed at error, with the reason, as Istio's ztunnel does; one that failed before
//! ztunnel knew its endpoints (not captured, no route) at warn (`connection
//! failed`). Workloads are pod names, falling back to the canonical service;
//! identities are only given when the connection was mutual TLS. With
//! `--log-format json` each line is one JSON object whose keys are these names.
//! Lines are written in batches (`ambit_net::process`), as the waypoint's are.
//!
//! This module must not decide anything: it reports what the traffic paths and the
//! metrics already know.

use std::net::SocketAddr;
use std::time::Duration;

use crate::metrics::{ConnectionLabels, Endpoints, Reporter, SecurityPolicy, UNKNOWN};

/// What one ended connection's line says.
#[derive(Debug)]
pub struct Ended<'a> {
    pub labels: &'a ConnectionLabels,
    pub endpoints: &'a Endpoints,
    /// Client → server, and back.
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub duration: Duration,
    pub error: Option<&'a str>,
}

fn direction(reporter: Reporter) -> &'static str {
    match reporter {
        Reporter::source => "outbound",
        Reporter::destination => "inbound",
    }
}

/// Writes the line of a connection that ended.
pub fn connection(e: &Ended<'_>) {
    // Nothing below is worked out when the line would not be written (a filter of
    // `warn`, or `access=off`).
    let enabled = match e.error {
        None => tracing::enabled!(target: "access", tracing::Level::INFO),
        Some(_) => tracing::enabled!(target: "access", tracing::Level::ERROR),
    };
    if !enabled {
        return;
    }
    let l = e.labels;
    let p = e.endpoints;
    let mtls = l.connection_security_policy == SecurityPolicy::mutual_tls;
    let pod_or = |pod: &Option<std::sync::Arc<ambit_core::model::Workload>>, service: &str| {
        pod.as_ref()
            .map_or_else(|| service.to_owned(), |w| w.spec.name.clone())
    };
    let src_workload = pod_or(&p.src_pod, &l.source_canonical_service);
    let dst_workload = pod_or(&p.dst_pod, &l.destination_canonical_service);
    let proven = |principal: &str| {
        if mtls && principal != UNKNOWN {
            principal.to_owned()
        } else {
            "-".to_owned()
        }
    };
    let hbone = p.hbone.map_or_else(|| "-".to_owned(), |a| a.to_string());
    let (bytes_sent, bytes_recv) = match l.reporter {
        Reporter::source => (e.request_bytes, e.response_bytes),
        Reporter::destination => (e.response_bytes, e.request_bytes),
    };
    let duration = format!("{}ms", e.duration.as_millis());
    macro_rules! line {
        ($level:expr, $($error:tt)*) => {
            tracing::event!(
                target: "access",
                $level,
                src.addr = %p.src,
                src.workload = %src_workload,
                src.namespace = %l.source_workload_namespace,
                src.identity = %proven(&l.source_principal),
                dst.addr = %p.dst,
                dst.hbone_addr = %hbone,
                dst.service = %l.destination_service,
                dst.workload = %dst_workload,
                dst.namespace = %l.destination_workload_namespace,
                dst.identity = %proven(&l.destination_principal),
                direction = direction(l.reporter),
                bytes_sent,
                bytes_recv,
                duration = %duration,
                $($error)*
                "connection complete"
            )
        };
    }
    match e.error {
        None => line!(tracing::Level::INFO,),
        Some(error) => line!(tracing::Level::ERROR, error = %error,),
    }
}

/// Writes the line of a connection that failed before ztunnel knew where it was
/// going (it has no labels yet), as Istio's ztunnel's early denials.
pub fn early_failure(src: SocketAddr, dst: SocketAddr, reporter: Reporter, error: &str) {
    tracing::event!(
        target: "access",
        tracing::Level::WARN,
        src.addr = %src,
        dst.addr = %dst,
        direction = direction(reporter),
        error = %error,
        "connection failed"
    );
}
