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
    // Borrowed, not formatted into new strings: this runs for every connection.
    fn pod_or<'a>(
        pod: &'a Option<std::sync::Arc<ambit_core::model::Workload>>,
        service: &'a str,
    ) -> &'a str {
        pod.as_ref().map_or(service, |w| w.spec.name.as_str())
    }
    let src_workload = pod_or(&p.src_pod, &l.source_canonical_service);
    let dst_workload = pod_or(&p.dst_pod, &l.destination_canonical_service);
    let hbone = OrDash(p.hbone);
    let (bytes_sent, bytes_recv) = match l.reporter {
        Reporter::source => (e.request_bytes, e.response_bytes),
        Reporter::destination => (e.response_bytes, e.request_bytes),
    };
    let duration = Millis(e.duration);
    macro_rules! line {
        ($level:expr, $($error:tt)*) => {
            tracing::event!(
                target: "access",
                $level,
                src.addr = %p.src,
                src.workload = %src_workload,
                src.namespace = %l.source_workload_namespace,
                src.identity = %Proven(mtls, &l.source_principal),
                dst.addr = %p.dst,
                dst.hbone_addr = %hbone,
                dst.service = %l.destination_service,
                dst.workload = %dst_workload,
                dst.namespace = %l.destination_workload_namespace,
                dst.identity = %Proven(mtls, &l.destination_principal),
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

/// A principal proven by mutual TLS, or `-`.
struct Proven<'a>(bool, &'a str);

impl std::fmt::Display for Proven<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 && self.1 != UNKNOWN {
            f.write_str(self.1)
        } else {
            f.write_str("-")
        }
    }
}

/// An address, or `-`.
struct OrDash(Option<SocketAddr>);

impl std::fmt::Display for OrDash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// A duration as Istio's ztunnel logs it: `<n>ms`.
struct Millis(Duration);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}ms", self.0.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absent_address_is_a_dash_and_a_duration_is_in_milliseconds() {
        assert_eq!(OrDash(None).to_string(), "-");
        assert_eq!(
            OrDash(Some("10.0.0.1:15008".parse().unwrap())).to_string(),
            "10.0.0.1:15008"
        );
        assert_eq!(
            Millis(Duration::from_micros(2_500_900)).to_string(),
            "2500ms"
        );
    }
}
