//! ztunnel's metrics, with the names and labels of Istio's ztunnel so that existing
//! dashboards and Kiali work unchanged.
//!
//! Istio's TCP metrics: `istio_tcp_connections_opened_total`,
//! `istio_tcp_connections_closed_total`, `istio_tcp_connections_failed_total`,
//! `istio_tcp_sent_bytes_total` (server → client, i.e. response bytes) and
//! `istio_tcp_received_bytes_total` (client → server, request bytes), all with Istio's
//! full label set ([`ConnectionLabels`]). Unknown label values are `unknown`, as in
//! Istio. A connection that fails once its labels are known (denied by policy:
//! `response_flags="DENY"`; its far end could not be opened: `"CONNECT"`) is counted
//! as Istio's ztunnel counts it: opened (with `-`), then closed and failed with the
//! flag. Principals are only ever identities proven by mutual TLS: a plaintext peer's
//! is `unknown`, whatever the model says it runs as.
//!
//! Also Istio's: `istio_tcp_sockets_open{reporter}` (accepted sockets open now),
//! `istio_build{component,tag}`, `workload_manager_active_proxy_count` (pods served),
//! `workload_manager_proxies_started_total` / `_stopped_total`, and the xDS client's
//! `istio_xds_*` (`ambit_net::xds::client::XdsMetrics`, with Ambit's
//! `ambit_xds_resources_rejected_total{url}` for every resource NACKed).
//!
//! Ambit's own: `ambit_authorization_denials_total`, and
//! `ambit_connections_refused_total`, every connection or tunnel refused before it
//! carried data, by `reporter` and a stable `reason` (`descriptors_exhausted` when
//! ztunnel ran out of file descriptors; `tls_handshake_failed`,
//! `tls_handshake_timeout`, `no_peer_identity`, `h2_preface_timeout` for an inbound
//! HBONE connection that never got as far as a CONNECT; `accept_failed` when a listener could not accept,
//! the connection left queued); `ambit_hbone_connections_dropped_total{reason}`, HBONE
//! connections ztunnel closed with their tunnels (`ping_unanswered`). A refused client is always
//! told — an HBONE status, or a TCP reset — never accepted and then closed as if it
//! were done.
//!
//! Each label set's counters are looked up once ([`Series`], kept for the life of the
//! process as the counters themselves are): an open connection holds one pointer to
//! them and what its access-log line needs ([`OpenConnection`]), not a copy of its
//! labels.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ambit_core::hbone::Baggage;
use ambit_core::model::{Service, Workload};
use ambit_core::SpiffeId;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::access_log;

pub const UNKNOWN: &str = "unknown";

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

/// Istio's `response_flags` of a TCP connection: `-` (none), `DENY` (authorization
/// policy denied it), `CONNECT` (its upstream could not be connected).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, Default)]
pub enum ResponseFlags {
    #[default]
    None,
    Deny,
    Connect,
}

impl ResponseFlags {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Deny => "DENY",
            ResponseFlags::Connect => "CONNECT",
        }
    }
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// One side of a connection as metrics see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLabels {
    pub workload: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub namespace: String,
    /// Only an identity proven by mutual TLS; `unknown` otherwise.
    pub principal: String,
    pub app: String,
    pub version: String,
    pub cluster: String,
}

impl PeerLabels {
    pub fn unknown() -> Self {
        PeerLabels {
            workload: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            cluster: UNKNOWN.into(),
        }
    }

    /// From a workload in the model, principal `unknown` until [`Self::proven`] sets
    /// it. The workload label is the owning workload's name (e.g. the Deployment)
    /// when known, else the pod's; app and version are the canonical service and
    /// revision, as in Istio (the control plane takes them from
    /// `service.istio.io/canonical-name`, `app.kubernetes.io/name`, `app`, else the
    /// workload's name; `service.istio.io/canonical-revision`,
    /// `app.kubernetes.io/version`, `version`, else `latest`).
    pub fn from_workload(w: &Workload, cluster: &str) -> Self {
        let s = &w.spec;
        let workload = s.workload_name.clone().unwrap_or_else(|| s.name.clone());
        let service = s.canonical_name.clone().unwrap_or_else(|| workload.clone());
        let revision = s
            .canonical_revision
            .clone()
            .unwrap_or_else(|| "latest".into());
        PeerLabels {
            workload,
            canonical_service: service.clone(),
            canonical_revision: revision.clone(),
            namespace: s.namespace.clone(),
            principal: UNKNOWN.into(),
            app: service,
            version: revision,
            cluster: cluster.to_string(),
        }
    }

    /// From what a peer's HBONE `baggage` says, when the peer is not in this
    /// ztunnel's model.
    pub fn from_baggage(b: &Baggage) -> Self {
        let or_unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| UNKNOWN.into());
        PeerLabels {
            workload: b
                .workload
                .as_ref()
                .map_or_else(|| UNKNOWN.into(), |(_, name)| name.clone()),
            canonical_service: or_unknown(&b.service),
            canonical_revision: or_unknown(&b.version),
            namespace: or_unknown(&b.namespace),
            principal: UNKNOWN.into(),
            app: or_unknown(&b.service),
            version: or_unknown(&b.version),
            cluster: or_unknown(&b.cluster),
        }
    }

    /// The identity this side proved in the mutual TLS handshake.
    pub fn proven(mut self, identity: &SpiffeId) -> Self {
        self.principal = identity.to_string();
        self
    }
}

/// Istio's label set for TCP metrics, in Istio's ztunnel's order.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_flags: ResponseFlags,
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
            source_canonical_service: source.canonical_service.clone(),
            source_canonical_revision: source.canonical_revision.clone(),
            source_workload_namespace: source.namespace.clone(),
            source_principal: source.principal.clone(),
            source_app: source.app.clone(),
            source_version: source.version.clone(),
            source_cluster: source.cluster.clone(),
            destination_service: svc_host,
            destination_service_namespace: svc_ns,
            destination_service_name: svc_name,
            destination_workload: destination.workload.clone(),
            destination_canonical_service: destination.canonical_service.clone(),
            destination_canonical_revision: destination.canonical_revision.clone(),
            destination_workload_namespace: destination.namespace.clone(),
            destination_principal: destination.principal.clone(),
            destination_app: destination.app.clone(),
            destination_version: destination.version.clone(),
            destination_cluster: destination.cluster.clone(),
            request_protocol: "tcp",
            response_flags: ResponseFlags::None,
            connection_security_policy: security,
        }
    }

    fn with_flags(&self, flags: ResponseFlags) -> ConnectionLabels {
        ConnectionLabels {
            response_flags: flags,
            ..self.clone()
        }
    }
}

/// The counters of one label set, looked up once.
#[derive(Debug)]
pub struct Series {
    pub labels: ConnectionLabels,
    opened: Counter,
    closed: Counter,
    received_bytes: Counter,
    sent_bytes: Counter,
}

/// A [`Series`] in the set of known ones, found by its labels.
#[derive(Debug, Clone)]
struct Known(Arc<Series>);

impl PartialEq for Known {
    fn eq(&self, other: &Self) -> bool {
        self.0.labels == other.0.labels
    }
}

impl Eq for Known {}

impl Hash for Known {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.labels.hash(state);
    }
}

impl Borrow<ConnectionLabels> for Known {
    fn borrow(&self) -> &ConnectionLabels {
        &self.0.labels
    }
}

/// Where a connection went, for its access-log line: what its labels do not say.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// The client's address, and the address the connection was made to (for
    /// outbound HBONE, the HBONE peer's `ip:15008`).
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The HBONE CONNECT's target, for HBONE.
    pub hbone: Option<SocketAddr>,
    /// The pods at either end, when the model knows them (the line names pods;
    /// the labels name their workloads).
    pub src_pod: Option<Arc<Workload>>,
    pub dst_pod: Option<Arc<Workload>>,
}

/// One open connection: its counters and what its access-log line says when it ends.
#[derive(Debug)]
#[must_use = "count the connection closed with `closed`"]
pub struct OpenConnection(Box<Open>);

#[derive(Debug)]
struct Open {
    series: Arc<Series>,
    endpoints: Endpoints,
    start: Instant,
}

impl OpenConnection {
    /// Counts the connection closed and writes its access-log line.
    /// `request_bytes` went client → server, `response_bytes` server → client.
    pub fn closed(&self, request_bytes: u64, response_bytes: u64, error: Option<&str>) {
        let open = &*self.0;
        open.series.closed.inc();
        open.series.received_bytes.inc_by(request_bytes);
        open.series.sent_bytes.inc_by(response_bytes);
        access_log::connection(&access_log::Ended {
            labels: &open.series.labels,
            endpoints: &open.endpoints,
            request_bytes,
            response_bytes,
            duration: open.start.elapsed(),
            error,
        });
    }
}

/// The ztunnel's metrics registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    denied: Family<DenialLabels, Counter>,
    refused: Family<RefusalLabels, Counter>,
    dropped: Family<DroppedLabels, Counter>,
    opened: Family<ConnectionLabels, Counter>,
    closed: Family<ConnectionLabels, Counter>,
    failed: Family<ConnectionLabels, Counter>,
    sent_bytes: Family<ConnectionLabels, Counter>,
    received_bytes: Family<ConnectionLabels, Counter>,
    sockets: Family<SocketLabels, Gauge>,
    pub active_proxies: Gauge,
    pub proxies_started: Counter,
    pub proxies_stopped: Counter,
    known: Mutex<HashSet<Known>>,
}

/// Labels of `istio_tcp_sockets_open`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SocketLabels {
    pub reporter: Reporter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(&ambit_net::xds::client::XdsMetrics::default())
    }
}

impl Metrics {
    /// The registry, serving the xDS client's counters `xds` too.
    pub fn new(xds: &ambit_net::xds::client::XdsMetrics) -> Self {
        let mut registry = Registry::default();
        ambit_net::admin::register_build_info(&mut registry, "ztunnel", env!("CARGO_PKG_VERSION"));
        let m = Metrics {
            registry: Registry::default(),
            denied: Family::default(),
            refused: Family::default(),
            dropped: Family::default(),
            opened: Family::default(),
            closed: Family::default(),
            failed: Family::default(),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            sockets: Family::default(),
            active_proxies: Gauge::default(),
            proxies_started: Counter::default(),
            proxies_stopped: Counter::default(),
            known: Mutex::default(),
        };
        // prometheus-client appends `_total` to counters.
        registry.register(
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
            m.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
            m.closed.clone(),
        );
        registry.register(
            "istio_tcp_connections_failed",
            "The total number of TCP connections that failed to establish",
            m.failed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            m.sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            m.received_bytes.clone(),
        );
        registry.register(
            "istio_tcp_sockets_open",
            "Accepted TCP sockets open now (15001, 15006 and 15008 of every served pod)",
            m.sockets.clone(),
        );
        registry.register(
            "workload_manager_active_proxy_count",
            "The number of pods ztunnel serves now",
            m.active_proxies.clone(),
        );
        registry.register(
            "workload_manager_proxies_started",
            "The total number of pods ztunnel started serving",
            m.proxies_started.clone(),
        );
        registry.register(
            "workload_manager_proxies_stopped",
            "The total number of pods ztunnel stopped serving",
            m.proxies_stopped.clone(),
        );
        xds.register(&mut registry);
        registry.register(
            "ambit_authorization_denials",
            "Inbound connections denied by authorization policy (at their start, or closed later when a policy came to deny them)",
            m.denied.clone(),
        );
        registry.register(
            "ambit_connections_refused",
            "Connections and HBONE tunnels refused before carrying data, by reason; the client was told (HBONE status or TCP reset)",
            m.refused.clone(),
        );
        registry.register(
            "ambit_hbone_connections_dropped",
            "HBONE connections ztunnel closed with their tunnels, by reason (ping_unanswered: the peer stopped answering keepalive PINGs)",
            m.dropped.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts an HBONE connection closed by ztunnel, with its tunnels, for `reason`.
    pub fn hbone_dropped(&self, reporter: Reporter, reason: &str) {
        self.dropped
            .get_or_create(&DroppedLabels {
                reporter,
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts a connection denied by authorization policy.
    pub fn denied(&self, labels: &DenialLabels) {
        self.denied.get_or_create(labels).inc();
    }

    /// Counts a connection or tunnel refused before it carried data.
    pub fn refused(&self, labels: &RefusalLabels) {
        self.refused.get_or_create(labels).inc();
    }

    /// The gauge of open accepted sockets that `reporter` reports.
    pub fn sockets(&self, reporter: Reporter) -> Gauge {
        self.sockets
            .get_or_create(&SocketLabels { reporter })
            .clone()
    }

    fn series(&self, labels: &ConnectionLabels) -> Arc<Series> {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = known.get(labels) {
            return k.0.clone();
        }
        let series = Arc::new(Series {
            labels: labels.clone(),
            opened: self.opened.get_or_create(labels).clone(),
            closed: self.closed.get_or_create(labels).clone(),
            received_bytes: self.received_bytes.get_or_create(labels).clone(),
            sent_bytes: self.sent_bytes.get_or_create(labels).clone(),
        });
        known.insert(Known(series.clone()));
        series
    }

    /// Counts a connection as opened; the returned handle counts it closed and
    /// writes its access-log line.
    pub fn connection_opened(
        &self,
        labels: &ConnectionLabels,
        endpoints: Endpoints,
    ) -> OpenConnection {
        let series = self.series(labels);
        series.opened.inc();
        OpenConnection(Box::new(Open {
            series,
            endpoints,
            start: Instant::now(),
        }))
    }

    /// Counts a connection that failed once its labels were known, as Istio's
    /// ztunnel does: opened, then closed and failed with `flags`; and writes its
    /// access-log line with `error`.
    pub fn connection_failed(
        &self,
        labels: &ConnectionLabels,
        flags: ResponseFlags,
        endpoints: &Endpoints,
        start: Instant,
        error: &str,
    ) {
        self.opened.get_or_create(labels).inc();
        let flagged = labels.with_flags(flags);
        self.closed.get_or_create(&flagged).inc();
        self.failed.get_or_create(&flagged).inc();
        access_log::connection(&access_log::Ended {
            labels: &flagged,
            endpoints,
            request_bytes: 0,
            response_bytes: 0,
            duration: start.elapsed(),
            error: Some(error),
        });
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

/// Labels of `ambit_hbone_connections_dropped_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DroppedLabels {
    pub reporter: Reporter,
    pub reason: String,
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

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_core::model::{MeshConfig, MeshState};
    use ambit_core::TrustDomain;

    fn state() -> MeshState {
        let config: MeshConfig = serde_yaml_ng::from_str(
            "workloads:\n- {uid: shop/cart-1, name: cart-1, namespace: shop, serviceAccount: cart, node: a, ips: [10.1.0.5], canonicalName: cart, canonicalRevision: v1, workloadName: cart}\n\
             services:\n- {name: cart, namespace: shop, vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080}]}\n",
        )
        .unwrap();
        MeshState::build(&config, &TrustDomain::default()).unwrap()
    }

    fn endpoints() -> Endpoints {
        Endpoints {
            src: "10.2.0.9:40000".parse().unwrap(),
            dst: "10.1.0.5:8080".parse().unwrap(),
            hbone: Some("10.1.0.5:8080".parse().unwrap()),
            src_pod: None,
            dst_pod: None,
        }
    }

    #[test]
    fn exposition_has_istio_names_and_labels() {
        let state = state();
        let cart = state.workload("shop/cart-1").unwrap();
        let dest = PeerLabels::from_workload(cart, "Kubernetes").proven(&cart.identity);
        let peer: SpiffeId = "spiffe://cluster.local/ns/front/sa/web".parse().unwrap();
        let src = PeerLabels::from_baggage(&Baggage::parse(
            "k8s.namespace.name=front,k8s.deployment.name=web,service.name=web,service.version=v2",
        ))
        .proven(&peer);
        let svc = state.service_by_vip("10.96.0.1".parse().unwrap()).unwrap();
        let labels = ConnectionLabels::new(
            Reporter::destination,
            &src,
            &dest,
            Some(svc),
            SecurityPolicy::mutual_tls,
        );
        let m = Metrics::default();
        m.connection_opened(&labels, endpoints())
            .closed(100, 2500, None);
        let text = m.encode();
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
                .to_string()
        };
        // Istio's ztunnel's label set, in its order.
        let want = "{reporter=\"destination\",source_workload=\"web\",source_canonical_service=\"web\",\
source_canonical_revision=\"v2\",source_workload_namespace=\"front\",\
source_principal=\"spiffe://cluster.local/ns/front/sa/web\",source_app=\"web\",source_version=\"v2\",\
source_cluster=\"unknown\",destination_service=\"cart.shop.svc.cluster.local\",\
destination_service_namespace=\"shop\",destination_service_name=\"cart\",destination_workload=\"cart\",\
destination_canonical_service=\"cart\",destination_canonical_revision=\"v1\",\
destination_workload_namespace=\"shop\",destination_principal=\"spiffe://cluster.local/ns/shop/sa/cart\",\
destination_app=\"cart\",destination_version=\"v1\",destination_cluster=\"Kubernetes\",\
request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"}";
        assert_eq!(
            line("istio_tcp_received_bytes_total"),
            format!("istio_tcp_received_bytes_total{want} 100")
        );
        assert!(line("istio_tcp_sent_bytes_total").ends_with(" 2500"));
        assert!(line("istio_tcp_connections_opened_total").ends_with(" 1"));
        assert!(line("istio_tcp_connections_closed_total").ends_with(" 1"));
        assert!(line("istio_build{").starts_with("istio_build{component=\"ztunnel\",tag=\""));
    }

    #[test]
    fn a_workload_without_canonical_labels_is_its_workload_at_latest_and_plaintext_proves_nobody() {
        let config: MeshConfig = serde_yaml_ng::from_str(
            "workloads:\n- {uid: shop/db-0, name: db-0, namespace: shop, serviceAccount: db, node: a, ips: [10.1.0.6], workloadName: db}\n",
        )
        .unwrap();
        let state = MeshState::build(&config, &TrustDomain::default()).unwrap();
        let p = PeerLabels::from_workload(state.workload("shop/db-0").unwrap(), "c1");
        assert_eq!(
            (
                p.canonical_service.as_str(),
                p.canonical_revision.as_str(),
                p.app.as_str(),
                p.version.as_str(),
                p.principal.as_str()
            ),
            ("db", "latest", "db", "latest", "unknown")
        );
    }

    #[test]
    fn a_failure_counts_opened_then_closed_and_failed_with_its_flag() {
        let labels = ConnectionLabels::new(
            Reporter::destination,
            &PeerLabels::unknown(),
            &PeerLabels::unknown(),
            None,
            SecurityPolicy::unknown,
        );
        let m = Metrics::default();
        m.connection_failed(
            &labels,
            ResponseFlags::Deny,
            &endpoints(),
            Instant::now(),
            "denied",
        );
        let text = m.encode();
        let count = |name: &str, flags: &str| {
            text.lines()
                .filter(|l| l.starts_with(name))
                .filter(|l| l.contains(&format!("response_flags=\"{flags}\"")))
                .count()
        };
        assert_eq!(
            count("istio_tcp_connections_opened_total", "-"),
            1,
            "{text}"
        );
        assert_eq!(
            count("istio_tcp_connections_closed_total", "DENY"),
            1,
            "{text}"
        );
        assert_eq!(
            count("istio_tcp_connections_failed_total", "DENY"),
            1,
            "{text}"
        );
        assert_eq!(
            count("istio_tcp_connections_failed_total", "-"),
            0,
            "{text}"
        );
    }

    #[test]
    fn a_label_set_is_looked_up_once() {
        let labels = ConnectionLabels::new(
            Reporter::source,
            &PeerLabels::unknown(),
            &PeerLabels::unknown(),
            None,
            SecurityPolicy::unknown,
        );
        let m = Metrics::default();
        let a = m.connection_opened(&labels, endpoints());
        let b = m.connection_opened(&labels, endpoints());
        assert!(Arc::ptr_eq(&a.0.series, &b.0.series));
        a.closed(1, 2, None);
        b.closed(3, 4, Some("reset"));
        let text = m.encode();
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_tcp_connections_closed_total{") && l.ends_with(" 2")),
            "{text}"
        );
    }
}
