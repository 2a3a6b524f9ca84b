//! `deploy/observability/`: every metric and label the Grafana dashboards query is one
//! the component registers (its registry's exposition, with a sample of every
//! family), or one the scrape configuration adds (`pod`, `node`, ...), and the
//! Prometheus Operator's monitors add every scrape label the dashboards use. No
//! root needed; `telemetry.rs` checks ztunnel's dashboard against a real scrape too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use ambit_ztunnel::metrics::{
    ConnectionLabels, DenialLabels, Endpoints, Metrics, PeerLabels, RefusalLabels, Reporter,
    ResponseFlags, SecurityPolicy,
};
use support::promql::{dashboard_uses, exposed, missing};

fn observability(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/observability")
        .join(file)
}

fn dashboard(name: &str) -> serde_json::Value {
    let path = observability(&format!("grafana/{name}"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// The labels the plain Prometheus job adds to every series (its `target_label`s),
/// and Prometheus's own `instance` and `job`.
fn scrape_labels() -> BTreeSet<String> {
    let text = std::fs::read_to_string(observability("prometheus-scrape.yaml")).unwrap();
    let config: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let mut labels: BTreeSet<String> = ["instance", "job"].map(String::from).into();
    for job in config["scrape_configs"].as_sequence().unwrap() {
        for relabel in job["relabel_configs"].as_sequence().unwrap() {
            if let Some(target) = relabel["target_label"].as_str() {
                if !target.starts_with("__") {
                    labels.insert(target.to_owned());
                }
            }
        }
    }
    labels
}

/// ztunnel's registry with one sample in every family.
pub fn ztunnel_exposition() -> String {
    let xds = ambit_net::xds::client::XdsMetrics::default();
    xds.terminated(ambit_net::xds::client::TerminationReason::Error);
    xds.received(&ambit_proto::xds::DeltaDiscoveryResponse::default());
    let m = Metrics::new(&xds);
    let labels = ConnectionLabels::new(
        Reporter::source,
        &PeerLabels::unknown(),
        &PeerLabels::unknown(),
        None,
        SecurityPolicy::unknown,
    );
    let endpoints = Endpoints {
        src: "10.0.0.1:1".parse().unwrap(),
        dst: "10.0.0.2:2".parse().unwrap(),
        hbone: None,
        src_pod: None,
        dst_pod: None,
    };
    m.connection_opened(&labels, endpoints.clone())
        .closed(1, 1, None);
    m.connection_failed(
        &labels,
        ResponseFlags::Deny,
        &endpoints,
        Instant::now(),
        "x",
    );
    m.denied(&DenialLabels {
        destination_workload_namespace: "shop".into(),
        destination_workload: "web".into(),
        policy: "shop/deny".into(),
        reason: "denied".into(),
        when: "connect".into(),
    });
    m.refused(&RefusalLabels::new(Reporter::destination, None, "denied"));
    m.sockets(Reporter::source).inc();
    m.active_proxies.inc();
    m.proxies_started.inc();
    m.proxies_stopped.inc();
    m.encode()
}

#[test]
fn the_ztunnel_dashboard_queries_only_what_ztunnel_exports() {
    let uses = dashboard_uses(&dashboard("ztunnel.json"));
    assert!(uses.len() >= 10, "{uses:?}");
    let lacking = missing(&uses, &exposed(&ztunnel_exposition()), &scrape_labels());
    assert!(
        lacking.is_empty(),
        "the ztunnel dashboard asks for {lacking:#?}"
    );
}

#[test]
fn the_waypoint_dashboard_queries_only_what_the_waypoint_exports() {
    let uses = dashboard_uses(&dashboard("waypoint.json"));
    let mut metrics = ambit_waypoint::metrics::Metrics::new();
    let xds = ambit_net::xds::client::XdsMetrics::default();
    xds.terminated(ambit_net::xds::client::TerminationReason::Error);
    xds.received(&ambit_proto::xds::DeltaDiscoveryResponse::default());
    metrics.register_xds(&xds);
    metrics.record(
        &ambit_waypoint::metrics::RequestLabels {
            reporter: "waypoint",
            source_workload: "client".into(),
            source_workload_namespace: "shop".into(),
            source_principal: "spiffe://cluster.local/ns/shop/sa/client".into(),
            source_app: "client".into(),
            source_version: "v1".into(),
            destination_workload: "web".into(),
            destination_workload_namespace: "shop".into(),
            destination_principal: "spiffe://cluster.local/ns/shop/sa/web".into(),
            destination_service: "web.shop.svc.cluster.local".into(),
            destination_service_name: "web".into(),
            destination_service_namespace: "shop".into(),
            request_protocol: "http",
            response_code: 200,
            grpc_response_status: String::new(),
            response_flags: "-".into(),
            connection_security_policy: "mutual_tls",
        },
        1.0,
        10,
        20,
    );
    let lacking = missing(&uses, &exposed(&metrics.encode()), &scrape_labels());
    assert!(
        lacking.is_empty(),
        "the waypoint dashboard asks for {lacking:#?}"
    );
}

#[test]
fn a_dashboard_asking_for_what_is_not_exported_is_caught() {
    let mut uses = support::promql::Uses::new();
    support::promql::add(
        &mut uses,
        "sum by (pod, flavour) (rate(istio_tcp_connections_opened_total{reporter=\"source\",colour=~\"x\"}[5m])) / sum(rate(istio_nonexistent_total[1m]))",
    );
    let lacking = missing(&uses, &exposed(&ztunnel_exposition()), &scrape_labels());
    assert_eq!(
        lacking,
        [
            "metric istio_nonexistent_total",
            "label colour of istio_tcp_connections_opened_total",
            "label flavour of istio_tcp_connections_opened_total",
        ],
    );
}

/// The Prometheus Operator's path gives the dashboards the scrape labels they use:
/// the operator's own (`namespace`, `pod`, `service`, `container`, `endpoint`) and the
/// monitors' `targetLabel`s.
#[test]
fn the_monitors_add_every_scrape_label_the_dashboards_use() {
    let text = std::fs::read_to_string(observability("servicemonitor.yaml")).unwrap();
    let mut operator: BTreeSet<String> = [
        "instance",
        "job",
        "namespace",
        "pod",
        "service",
        "container",
        "endpoint",
    ]
    .map(String::from)
    .into();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let object = serde_yaml_ng::Value::deserialize(doc).unwrap();
        let spec = &object["spec"];
        let endpoints = spec["endpoints"]
            .as_sequence()
            .or(spec["podMetricsEndpoints"].as_sequence());
        for endpoint in endpoints.into_iter().flatten() {
            for relabel in endpoint["relabelings"].as_sequence().into_iter().flatten() {
                operator.insert(relabel["targetLabel"].as_str().unwrap().to_owned());
            }
        }
    }
    let scrape = scrape_labels();
    for name in ["ztunnel.json", "waypoint.json"] {
        for (metric, labels) in dashboard_uses(&dashboard(name)) {
            for label in labels.intersection(&scrape) {
                assert!(
                    operator.contains(label),
                    "{name}: {label} of {metric} comes from the scrape job, but not from the monitors"
                );
            }
        }
    }
}

use serde::Deserialize as _;
