//! ztunnel's telemetry as a user's Prometheus and log collector see it, end to end in a
//! local mesh (needs root): one connection on each path (HBONE, plaintext in,
//! passthrough out, denied by policy, failed to connect), then `/metrics` of both
//! nodes' ztunnels checked against a table of what Istio writes, and their JSON access
//! logs (`--log-format json`) read line by line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};

use ambit_localmesh::{PodSpec, Protocol, ServiceSpec};
use support::{apply, eventually, Harness, DEADLINE, TEST_LOG};

/// Istio's label set of its TCP metrics, as Istio's ztunnel writes it. Source:
/// istio.io, "Istio Standard Metrics" (docs/reference/config/metrics: Labels, with the
/// canonical service and revision labels), and istio/ztunnel's
/// `src/proxy/metrics.rs` (`CommonTrafficLabels`: the same names, the order they are
/// written in).
const ISTIO_TCP_LABELS: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/server";
const SERVICE: &str = "server.shop.svc.cluster.local";

/// One expected series: on `node`'s ztunnel, the series of `istio_tcp_*` whose labels
/// are exactly these (every label Istio writes; the others below are the same for all
/// rows), and how many connections it counts as opened, closed and failed.
///
/// What each label must say comes from the same page of Istio's documentation:
/// principals are "set when peer authentication is used" (so `unknown` for a peer in
/// plaintext, whatever the model says it runs as); `connection_security_policy` is
/// `mutual_tls` when the mesh secured the connection, else `unknown`; canonical
/// service and revision come from `service.istio.io/canonical-name` /
/// `app.kubernetes.io/version` (else the workload's name / `latest`); `response_flags`
/// are Envoy's `%RESPONSE_FLAGS%` as Istio's ztunnel uses them (`-`, `DENY` for
/// authorization policy, `CONNECT` for an upstream that could not be connected).
struct Row {
    path: &'static str,
    node: &'static str,
    reporter: &'static str,
    source: (&'static str, &'static str, &'static str, &'static str), // workload, namespace, canonical revision, principal
    destination: (&'static str, &'static str, &'static str, &'static str), // workload, canonical service, canonical revision, principal
    service: &'static str,
    security: &'static str,
    flags: &'static str,
    /// opened (counted with `-`), closed, failed (counted with `flags`).
    counts: (f64, f64, f64),
    /// Request and response bytes, when the connection carried any.
    bytes: Option<(f64, f64)>,
}

const TABLE: &[Row] = &[
    Row {
        path: "HBONE",
        node: "node-a",
        reporter: "source",
        source: ("client", "shop", "v1", CLIENT),
        destination: ("server", "store", "v2", SERVER),
        service: SERVICE,
        security: "mutual_tls",
        flags: "-",
        counts: (1.0, 1.0, 0.0),
        bytes: Some((100.0, 100.0)),
    },
    Row {
        path: "HBONE",
        node: "node-b",
        reporter: "destination",
        source: ("client", "shop", "v1", CLIENT),
        destination: ("server", "store", "v2", SERVER),
        service: SERVICE,
        security: "mutual_tls",
        flags: "-",
        counts: (1.0, 1.0, 0.0),
        bytes: Some((100.0, 100.0)),
    },
    Row {
        path: "plaintext",
        node: "node-b",
        reporter: "destination",
        source: ("outsider", "legacy", "latest", "unknown"),
        destination: ("server", "store", "v2", "unknown"),
        service: SERVICE,
        security: "unknown",
        flags: "-",
        counts: (1.0, 1.0, 0.0),
        bytes: Some((100.0, 100.0)),
    },
    Row {
        path: "passthrough",
        node: "node-a",
        reporter: "source",
        source: ("client", "shop", "v1", "unknown"),
        destination: ("outsider", "outsider", "latest", "unknown"),
        service: "unknown",
        security: "unknown",
        flags: "-",
        counts: (1.0, 1.0, 0.0),
        bytes: Some((100.0, 100.0)),
    },
    Row {
        path: "denied",
        node: "node-b",
        reporter: "destination",
        source: ("client", "shop", "v1", CLIENT),
        destination: ("server", "store", "v2", SERVER),
        service: SERVICE,
        security: "mutual_tls",
        flags: "DENY",
        counts: (1.0, 1.0, 1.0),
        bytes: None,
    },
    Row {
        path: "denied",
        node: "node-a",
        reporter: "source",
        source: ("client", "shop", "v1", CLIENT),
        destination: ("server", "store", "v2", SERVER),
        service: SERVICE,
        security: "mutual_tls",
        flags: "DENY",
        counts: (1.0, 1.0, 1.0),
        bytes: None,
    },
    Row {
        path: "failed",
        node: "node-b",
        reporter: "destination",
        source: ("client", "shop", "v1", CLIENT),
        destination: ("server", "store", "v2", SERVER),
        service: SERVICE,
        security: "mutual_tls",
        flags: "CONNECT",
        counts: (1.0, 1.0, 1.0),
        bytes: None,
    },
    Row {
        path: "failed",
        node: "node-a",
        reporter: "source",
        source: ("client", "shop", "v1", CLIENT),
        destination: ("server", "store", "v2", SERVER),
        service: SERVICE,
        security: "mutual_tls",
        flags: "CONNECT",
        counts: (1.0, 1.0, 1.0),
        bytes: None,
    },
];

impl Row {
    /// Every label of the series, with `flags` as its `response_flags`.
    fn labels(&self, flags: &str) -> BTreeMap<String, String> {
        let (src_workload, src_ns, src_rev, src_principal) = self.source;
        let (dst_workload, dst_service, dst_rev, dst_principal) = self.destination;
        let (svc_name, svc_ns) = if self.service == "unknown" {
            ("unknown", "unknown")
        } else {
            ("server", "shop")
        };
        let dst_ns = if dst_workload == "outsider" {
            "legacy"
        } else {
            "shop"
        };
        [
            ("reporter", self.reporter),
            ("source_workload", src_workload),
            ("source_canonical_service", src_workload),
            ("source_canonical_revision", src_rev),
            ("source_workload_namespace", src_ns),
            ("source_principal", src_principal),
            ("source_app", src_workload),
            ("source_version", src_rev),
            ("source_cluster", "Kubernetes"),
            ("destination_service", self.service),
            ("destination_service_namespace", svc_ns),
            ("destination_service_name", svc_name),
            ("destination_workload", dst_workload),
            ("destination_canonical_service", dst_service),
            ("destination_canonical_revision", dst_rev),
            ("destination_workload_namespace", dst_ns),
            ("destination_principal", dst_principal),
            ("destination_app", dst_service),
            ("destination_version", dst_rev),
            ("destination_cluster", "Kubernetes"),
            ("request_protocol", "tcp"),
            ("response_flags", flags),
            ("connection_security_policy", self.security),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }
}

/// One sample of an exposition: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let mut map = BTreeMap::new();
            // Label values here never hold `",`: split on it.
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once("=\"")?;
                map.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
            }
            Some((name.to_owned(), map, value))
        })
        .collect()
}

/// The value of the series `name` with exactly `labels`, if there is one.
fn value(samples: &[Sample], name: &str, labels: &BTreeMap<String, String>) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| n == name && l == labels)
        .map(|(_, _, v)| *v)
}

const DENY_8081: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-8081, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {ports: [\"8081\"]}}]
";

#[tokio::test(flavor = "multi_thread")]
async fn every_path_is_counted_with_istios_labels_and_logged_once_as_json() {
    let mesh = support::two_nodes();
    let client = mesh
        .add_pod(
            "node-a",
            PodSpec::new("shop", "client")
                .service_account("client")
                .label("app", "client")
                .label("version", "v1"),
        )
        .unwrap();
    let server = mesh
        .add_pod(
            "node-b",
            PodSpec::new("shop", "server")
                .service_account("server")
                .label("service.istio.io/canonical-name", "store")
                .label("app", "not-the-canonical-name")
                .label("app.kubernetes.io/version", "v2"),
        )
        .unwrap();
    // Outside the mesh: not enrolled, plain TCP in the model.
    let outsider = mesh
        .add_pod(
            "node-a",
            PodSpec::new("legacy", "outsider").service_account("outsider"),
        )
        .unwrap();
    mesh.set_protocol(&client, Protocol::Hbone).unwrap();
    mesh.set_protocol(&server, Protocol::Hbone).unwrap();
    let service = mesh
        .add_service(
            ServiceSpec::new("shop", "server")
                .port(80, 8080)
                .port(81, 8081)
                .port(82, 9999)
                .endpoints([&server]),
        )
        .unwrap();
    let h = Harness::start_with(mesh, TEST_LOG, &["--log-format", "json"]);
    apply(&h, "deny-8081.yaml", Some(DENY_8081));
    let _echo = h.serve(&server, &["echo", "--port", "8080"]);
    let _outside_echo = h.serve(&outsider, &["echo", "--port", "9090"]);
    h.enrol(&client).await;
    h.enrol(&server).await;
    eventually(
        DEADLINE,
        || async {
            h.config_dump("node-b")
                .await
                .contains("deny-8081")
                .then_some(())
        },
        || format!("the policy never reached node-b\n{}", h.logs()),
    )
    .await;

    let send = |from, to: std::net::SocketAddr| {
        h.run_app(
            from,
            &["send", "--to", &to.to_string(), "--bytes", "100"],
            DEADLINE,
        )
    };
    // One connection on each path.
    let hbone = send(&client, service.addr(80));
    assert!(hbone.status.success(), "HBONE: {}\n{}", hbone.log, h.logs());
    let plain = send(&outsider, server.addr(8080));
    assert!(
        plain.status.success(),
        "plaintext: {}\n{}",
        plain.log,
        h.logs()
    );
    let pass = send(&client, outsider.addr(9090));
    assert!(
        pass.status.success(),
        "passthrough: {}\n{}",
        pass.log,
        h.logs()
    );
    let denied = send(&client, service.addr(81));
    assert!(
        !denied.status.success(),
        "denied got through: {}",
        denied.log
    );
    let failed = send(&client, service.addr(82));
    assert!(!failed.status.success(), "nothing listens: {}", failed.log);

    for node in ["node-a", "node-b"] {
        let rows: Vec<&Row> = TABLE.iter().filter(|r| r.node == node).collect();
        // Closed counts come when the connection's end reached ztunnel: poll.
        let text = eventually(
            DEADLINE,
            || async {
                let text = h.metrics(node).await;
                let s = samples(&text);
                rows.iter()
                    .all(|r| {
                        value(&s, "istio_tcp_connections_closed_total", &r.labels(r.flags))
                            == Some(r.counts.1)
                    })
                    .then_some(text)
            },
            || format!("{node}: not every path counted\n{}", h.logs()),
        )
        .await;
        let s = samples(&text);
        for r in &rows {
            let what = format!("{} ({} on {node})", r.path, r.reporter);
            // Opened is counted before the outcome is known, with `-`: the paths that
            // differ only by their outcome share that series.
            let opened_want: f64 = rows
                .iter()
                .filter(|o| o.labels("-") == r.labels("-"))
                .map(|o| o.counts.0)
                .sum();
            let opened = value(&s, "istio_tcp_connections_opened_total", &r.labels("-"));
            assert_eq!(opened, Some(opened_want), "{what} opened:\n{text}");
            let failed = value(&s, "istio_tcp_connections_failed_total", &r.labels(r.flags));
            assert_eq!(failed.unwrap_or(0.0), r.counts.2, "{what} failed:\n{text}");
            if let Some((request, response)) = r.bytes {
                let labels = r.labels(r.flags);
                assert_eq!(
                    value(&s, "istio_tcp_received_bytes_total", &labels),
                    Some(request),
                    "{what} request bytes:\n{text}"
                );
                assert_eq!(
                    value(&s, "istio_tcp_sent_bytes_total", &labels),
                    Some(response),
                    "{what} response bytes:\n{text}"
                );
            }
        }
        // Every TCP series carries Istio's label set, no more and no less.
        let want: BTreeSet<&str> = ISTIO_TCP_LABELS.into_iter().collect();
        for (name, labels, _) in s.iter().filter(|(n, _, _)| n.starts_with("istio_tcp_")) {
            if name == "istio_tcp_sockets_open" {
                continue;
            }
            let have: BTreeSet<&str> = labels.keys().map(String::as_str).collect();
            assert_eq!(have, want, "{name} on {node}");
        }
        // And ztunnel's other Istio metrics.
        for name in [
            "istio_build",
            "istio_xds_message_total",
            "istio_xds_message_bytes_total",
            "istio_tcp_sockets_open",
            "workload_manager_active_proxy_count",
        ] {
            assert!(
                s.iter().any(|(n, _, _)| n == name),
                "no {name} on {node}:\n{text}"
            );
        }
        let build = s.iter().find(|(n, _, _)| n == "istio_build").unwrap();
        assert_eq!(
            build.1.get("component").map(String::as_str),
            Some("ztunnel")
        );
        assert!(value(&s, "istio_xds_message_total", &url_labels()).unwrap_or(0.0) >= 1.0);
    }

    // Every metric and label the Grafana dashboard of deploy/observability/ queries is
    // in these real scrapes, but for what only other events make (an xDS stream that
    // ended, a pod that left).
    let mut scraped = support::promql::Uses::new();
    for node in ["node-a", "node-b"] {
        for (metric, labels) in support::promql::exposed(&h.metrics(node).await) {
            scraped.entry(metric).or_default().extend(labels);
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/observability/grafana/ztunnel.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut uses = support::promql::dashboard_uses(&dashboard);
    for only_later in [
        "istio_xds_connection_terminations_total",
        "workload_manager_proxies_stopped_total",
    ] {
        uses.remove(only_later);
    }
    // `pod` is the scrape's label (deploy/observability/prometheus-scrape.yaml).
    let scrape: BTreeSet<String> = ["pod".to_owned()].into();
    let lacking = support::promql::missing(&uses, &scraped, &scrape);
    assert!(lacking.is_empty(), "the dashboard asks for {lacking:?}");

    // The access logs: one JSON line per connection, with Istio's fields.
    let lines = |node: &str| -> Vec<serde_json::Value> {
        h.ztunnel(node)
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .collect()
    };
    let (a, b) = eventually(
        DEADLINE,
        || async {
            let (a, b) = (lines("node-a"), lines("node-b"));
            // node-a: HBONE, passthrough, denied, failed; node-b: HBONE, plaintext,
            // denied, failed.
            (a.len() >= 4 && b.len() >= 4).then_some((a, b))
        },
        || format!("not every connection logged\n{}", h.logs()),
    )
    .await;
    for v in a.iter().chain(&b) {
        for field in [
            "src.addr",
            "dst.addr",
            "direction",
            "error",
            "timestamp",
            "level",
            "message",
        ] {
            if field == "error" && v["level"] == "INFO" {
                continue;
            }
            assert!(v.get(field).is_some(), "no {field} in {v}");
        }
    }
    let find = |lines: &[serde_json::Value], key: &str, val: &str| -> serde_json::Value {
        let found: Vec<_> = lines.iter().filter(|v| v[key] == val).collect();
        assert_eq!(found.len(), 1, "{key}={val}: {found:?}");
        found[0].clone()
    };
    // The HBONE connection, as the source saw it...
    let out = find(&a, "dst.hbone_addr", &server.addr(8080).to_string());
    let want_out = serde_json::json!({
        "level": "INFO",
        "message": "connection complete",
        "direction": "outbound",
        "src.workload": "client",
        "src.namespace": "shop",
        "src.identity": CLIENT,
        "dst.addr": server.addr(15008).to_string(),
        "dst.workload": "server",
        "dst.namespace": "shop",
        "dst.identity": SERVER,
        "dst.service": SERVICE,
        "bytes_sent": 100,
        "bytes_recv": 100,
    });
    assert_fields(&out, &want_out);
    assert!(out["duration"].as_str().unwrap().ends_with("ms"), "{out}");
    // ...and the destination.
    let inbound: Vec<_> = b
        .iter()
        .filter(|v| v["direction"] == "inbound" && v["level"] == "INFO")
        .cloned()
        .collect();
    let hbone_in = find(&inbound, "src.identity", CLIENT);
    assert_fields(
        &hbone_in,
        &serde_json::json!({
            "dst.addr": server.addr(8080).to_string(),
            "dst.hbone_addr": server.addr(8080).to_string(),
            "dst.identity": SERVER,
            "dst.service": SERVICE,
            "src.workload": "client",
        }),
    );
    // A plaintext client proved no identity, and nor did the server to it.
    let plain_in = find(&inbound, "src.workload", "outsider");
    assert_fields(
        &plain_in,
        &serde_json::json!({"src.identity": "-", "dst.identity": "-", "dst.hbone_addr": "-"}),
    );
    // The denied and failed connections are logged at error with why.
    let errors: Vec<_> = b.iter().filter(|v| v["level"] == "ERROR").collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors
            .iter()
            .any(|v| v["error"].as_str().unwrap().contains("deny-8081")),
        "{errors:?}"
    );
}

fn url_labels() -> BTreeMap<String, String> {
    [(
        "url".to_owned(),
        ambit_proto::workload::ADDRESS_TYPE_URL.to_owned(),
    )]
    .into_iter()
    .collect()
}

/// Every field of `want` is in `line` with that value.
fn assert_fields(line: &serde_json::Value, want: &serde_json::Value) {
    for (k, v) in want.as_object().unwrap() {
        assert_eq!(&line[k], v, "{k} in {line}");
    }
}
