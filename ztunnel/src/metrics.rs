//! Istio's TCP metrics, with Istio's names and labels so existing dashboards work:
//! `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total` (server → client, i.e. response bytes) and
//! `istio_tcp_received_bytes_total` (client → server, request bytes). Unknown label
//! values are `unknown`, as in Istio.
//!
//! Ambit's own: `ambit_authorization_denials_total`, and
//! `ambit_connections_refused_total`, every connection or tunnel refused before it
//! carried data, by `reporter` and a stable `reason` (`descriptors_exhausted` when
//! ztunnel ran out of file descriptors). A refused client is always told — an HBONE
//! status, or a TCP reset — never accepted and then closed as if it were done.

use std::fmt::Write as _;

use ambit_core::hbone::Baggage;
use ambit_core::model::{Service, Workload};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

const UNKNOWN: &str = "unknown";

/// Which proxy reports the connection.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    source,
    destination,
}

/// Whether the connection was mutual TLS.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SecurityPolicy {
    mutual_tls,
    unknown,
}

/// One side of a connection as metrics see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLabels {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
    pub app: String,
    pub version: String,
    pub cluster: String,
}

impl PeerLabels {
    pub fn unknown() -> Self {
        PeerLabels {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            cluster: UNKNOWN.into(),
        }
    }

    /// From a workload in the model. The workload label is the owning workload's name
    /// (e.g. the Deployment) when known, else the pod's; app and version are the
    /// canonical service name and revision.
    pub fn from_workload(w: &Workload, cluster: &str) -> Self {
        let s = &w.spec;
        PeerLabels {
            workload: s.workload_name.clone().unwrap_or_else(|| s.name.clone()),
            namespace: s.namespace.clone(),
            principal: w.identity.to_string(),
            app: s.canonical_name.clone().unwrap_or_else(|| s.name.clone()),
            version: s
                .canonical_revision
                .clone()
                .unwrap_or_else(|| "latest".into()),
            cluster: cluster.to_string(),
        }
    }

    /// From what a peer's HBONE `baggage` and certificate say, when the peer is not in
    /// this ztunnel's model.
    pub fn from_baggage(b: &Baggage, principal: Option<&str>) -> Self {
        let or_unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| UNKNOWN.into());
        PeerLabels {
            workload: b
                .workload
                .as_ref()
                .map_or_else(|| UNKNOWN.into(), |(_, name)| name.clone()),
            namespace: or_unknown(&b.namespace),
            principal: principal.unwrap_or(UNKNOWN).to_string(),
            app: or_unknown(&b.service),
            version: or_unknown(&b.version),
            cluster: or_unknown(&b.cluster),
        }
    }
}

/// Istio's label set for TCP metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_flags: String,
    pub connection_security_policy: SecurityPolicy,
}

impl ConnectionLabels {
    pub fn new(
        reporter: Reporter,
        source: &PeerLabels,
        destination: &PeerLabels,
        service: Option<&Service>,
        security: SecurityPolicy,
    ) -> Self {
        let (svc_host, svc_ns, svc_name) = match service {
            Some(s) => (
                s.hostname.clone(),
                s.spec.namespace.clone(),
                s.spec.name.clone(),
            ),
            None => (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into()),
        };
        ConnectionLabels {
            reporter,
            source_workload: source.workload.clone(),
            source_workload_namespace: source.namespace.clone(),
            source_principal: source.principal.clone(),
            source_app: source.app.clone(),
            source_version: source.version.clone(),
            source_cluster: source.cluster.clone(),
            destination_service: svc_host,
            destination_service_namespace: svc_ns,
            destination_service_name: svc_name,
            destination_workload: destination.workload.clone(),
            destination_workload_namespace: destination.namespace.clone(),
            destination_principal: destination.principal.clone(),
            destination_app: destination.app.clone(),
            destination_version: destination.version.clone(),
            destination_cluster: destination.cluster.clone(),
            request_protocol: "tcp".into(),
            response_flags: "-".into(),
            connection_security_policy: security,
        }
    }
}

/// The counters of one open connection.
#[derive(Debug)]
#[must_use = "count the connection closed with `closed`"]
pub struct OpenConnection {
    closed: Counter,
    received_bytes: Counter,
    sent_bytes: Counter,
}

impl OpenConnection {
    /// `request_bytes` went client → server, `response_bytes` server → client.
    pub fn closed(&self, request_bytes: u64, response_bytes: u64) {
        self.closed.inc();
        self.received_bytes.inc_by(request_bytes);
        self.sent_bytes.inc_by(response_bytes);
    }
}

/// The ztunnel's metrics registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    denied: Family<DenialLabels, Counter>,
    refused: Family<RefusalLabels, Counter>,
    opened: Family<ConnectionLabels, Counter>,
    closed: Family<ConnectionLabels, Counter>,
    sent_bytes: Family<ConnectionLabels, Counter>,
    received_bytes: Family<ConnectionLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let opened = Family::default();
        let closed = Family::default();
        let sent_bytes = Family::default();
        let received_bytes = Family::default();
        let denied = Family::default();
        let refused = Family::default();
        // prometheus-client appends `_total` to counters.
        registry.register(
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            received_bytes.clone(),
        );
        registry.register(
            "ambit_authorization_denials",
            "Inbound connections denied by authorization policy (at their start, or closed later when a policy came to deny them)",
            denied.clone(),
        );
        registry.register(
            "ambit_connections_refused",
            "Connections and HBONE tunnels refused before carrying data, by reason; the client was told (HBONE status or TCP reset)",
            refused.clone(),
        );
        Metrics {
            registry,
            denied,
            refused,
            opened,
            closed,
            sent_bytes,
            received_bytes,
        }
    }

    /// Counts a connection denied by authorization policy.
    pub fn denied(&self, labels: &DenialLabels) {
        self.denied.get_or_create(labels).inc();
    }

    /// Counts a connection or tunnel refused before it carried data.
    pub fn refused(&self, labels: &RefusalLabels) {
        self.refused.get_or_create(labels).inc();
    }

    /// Counts a connection as opened; the returned handle counts it closed. The label
    /// set is needed only here: the handle holds the counters themselves, so an open
    /// connection costs a few pointers, not a copy of its labels.
    pub fn connection_opened(&self, labels: &ConnectionLabels) -> OpenConnection {
        self.opened.get_or_create(labels).inc();
        OpenConnection {
            closed: self.closed.get_or_create(labels).clone(),
            received_bytes: self.received_bytes.get_or_create(labels).clone(),
            sent_bytes: self.sent_bytes.get_or_create(labels).clone(),
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            let _ = writeln!(out, "# metrics encoding failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_core::model::{MeshConfig, MeshState};
    use ambit_core::TrustDomain;

    #[test]
    fn exposition_has_istio_names_and_labels() {
        let config: MeshConfig = serde_yaml_ng::from_str(
            "workloads:\n- {uid: shop/cart-1, name: cart-1, namespace: shop, serviceAccount: cart, node: a, ips: [10.1.0.5], canonicalName: cart, canonicalRevision: v1, workloadName: cart}\n\
             services:\n- {name: cart, namespace: shop, vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080}]}\n",
        )
        .unwrap();
        let state = MeshState::build(&config, &TrustDomain::default()).unwrap();
        let dest = PeerLabels::from_workload(state.workload("shop/cart-1").unwrap(), "Kubernetes");
        let src = PeerLabels::from_baggage(
            &Baggage::parse("k8s.namespace.name=front,k8s.deployment.name=web,service.name=web,service.version=v2"),
            Some("spiffe://cluster.local/ns/front/sa/web"),
        );
        let svc = state.service_by_vip("10.96.0.1".parse().unwrap()).unwrap();
        let labels = ConnectionLabels::new(
            Reporter::destination,
            &src,
            &dest,
            Some(svc),
            SecurityPolicy::mutual_tls,
        );
        let m = Metrics::new();
        m.connection_opened(&labels).closed(100, 2500);
        let text = m.encode();
        for want in [
            "istio_tcp_connections_opened_total{",
            "istio_tcp_connections_closed_total{",
            "istio_tcp_received_bytes_total{",
            "istio_tcp_sent_bytes_total{",
            "reporter=\"destination\"",
            "source_workload=\"web\"",
            "source_workload_namespace=\"front\"",
            "source_principal=\"spiffe://cluster.local/ns/front/sa/web\"",
            "source_app=\"web\"",
            "source_version=\"v2\"",
            "source_cluster=\"unknown\"",
            "destination_service=\"cart.shop.svc.cluster.local\"",
            "destination_service_namespace=\"shop\"",
            "destination_service_name=\"cart\"",
            "destination_workload=\"cart\"",
            "destination_workload_namespace=\"shop\"",
            "destination_principal=\"spiffe://cluster.local/ns/shop/sa/cart\"",
            "destination_app=\"cart\"",
            "destination_version=\"v1\"",
            "destination_cluster=\"Kubernetes\"",
            "request_protocol=\"tcp\"",
            "response_flags=\"-\"",
            "connection_security_policy=\"mutual_tls\"",
        ] {
            assert!(text.contains(want), "missing {want} in:\n{text}");
        }
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap()
                .to_string()
        };
        assert!(line("istio_tcp_received_bytes_total").ends_with(" 100"));
        assert!(line("istio_tcp_sent_bytes_total").ends_with(" 2500"));
        assert!(line("istio_tcp_connections_opened_total").ends_with(" 1"));
    }
}

/// Labels of `ambit_authorization_denials_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    pub destination_workload_namespace: String,
    pub destination_workload: String,
    /// `namespace/name` of the deciding policy; empty when no ALLOW policy matched.
    pub policy: String,
    /// `denied` (a DENY policy), `custom` (a CUSTOM policy), `not_allowed` (ALLOW
    /// policies apply, none matched).
    pub reason: String,
    /// `connect` (refused at its start) or `late` (open, closed on a policy change).
    pub when: String,
}

/// Labels of `ambit_connections_refused_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `source` (15001, outbound) or `destination` (15006 and 15008, inbound).
    pub reporter: Reporter,
    /// The destination's workload, `unknown` when the refusal came before it was known.
    pub destination_workload_namespace: String,
    pub destination_workload: String,
    /// A stable label: an HBONE refusal's (`denied`, `not_local`,
    /// `upstream_connect_failed`, ...), a pool failure's (`hbone_connect_failed`, ...),
    /// or `descriptors_exhausted` when ztunnel had no file descriptor left.
    pub reason: String,
}

impl RefusalLabels {
    pub fn new(reporter: Reporter, destination: Option<&Workload>, reason: &str) -> Self {
        let (namespace, workload) = destination.map_or_else(
            || (UNKNOWN.to_owned(), UNKNOWN.to_owned()),
            |w| (w.spec.namespace.clone(), w.spec.name.clone()),
        );
        RefusalLabels {
            reporter,
            destination_workload_namespace: namespace,
            destination_workload: workload,
            reason: reason.to_owned(),
        }
    }
}
