//! The control plane's xDS benchmark: a synthetic cluster of 10,000 pods and 1,000
//! services served to 100 xDS clients (ztunnel's real client, each publishing its
//! model) in this process, over gRPC on a local socket. It measures:
//! - the initial sync of all clients;
//! - from a change (one pod added, or one service's endpoints changed) to every client
//!   having applied it (it ACKs right after), p50 and p99 over the changes;
//! - heap held by the server's snapshot, and by the MeshState one ztunnel builds from
//!   its model, from jemalloc's statistics.
//!
//! Run: `cargo run --release -p ambit-control --example xds_bench` (no root needed).
//! All clients share this machine's cores with the server; on a cluster each ztunnel
//! has its own node.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_ca::auth::{Authenticator, TokenAuthenticator};
use ambit_control::xds::{Snapshot, XdsServer};
use ambit_core::model::{
    EndpointSpec, MeshConfig, MeshState, Protocol, ServicePort, ServiceSpec, WorkloadSpec,
};
use ambit_core::TrustDomain;
use ambit_net::xds::client::{ClientConfig, XdsClient};
use ambit_proto::xds::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use tokio::sync::watch;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Bytes currently allocated, from jemalloc's statistics.
fn allocated() -> isize {
    tikv_jemalloc_ctl::epoch::advance().unwrap();
    tikv_jemalloc_ctl::stats::allocated::read().unwrap() as isize
}

const PODS: usize = 10_000;
const SERVICES: usize = 1_000;
const CLIENTS: usize = 100;
const CHANGES: usize = 20;
const TOKEN: &str = "xds-bench-node-agent-token";

fn pod(i: usize) -> WorkloadSpec {
    WorkloadSpec {
        uid: format!("ns{}/pod-{i}", i % 50),
        name: format!("pod-{i}"),
        namespace: format!("ns{}", i % 50),
        service_account: format!("sa-{}", i % 200),
        node: format!("node-{}", i % CLIENTS),
        ips: vec![std::net::IpAddr::V4(std::net::Ipv4Addr::from(
            0x0a00_0000 + i as u32 + 2,
        ))],
        protocol: Protocol::Hbone,
        canonical_name: Some(format!("app-{}", i % SERVICES)),
        canonical_revision: Some("v1".into()),
        workload_kind: Some("Deployment".into()),
        workload_name: Some(format!("app-{}", i % SERVICES)),
        healthy: true,
        waypoint: None,
        ambient: true,
        authorization_policies: Vec::new(),
        labels: Default::default(),
    }
}

fn cluster() -> MeshConfig {
    let workloads: Vec<WorkloadSpec> = (0..PODS).map(pod).collect();
    let services = (0..SERVICES)
        .map(|s| ServiceSpec {
            name: format!("app-{s}"),
            namespace: format!("ns{}", s % 50),
            hostname: None,
            vips: vec![std::net::IpAddr::V4(std::net::Ipv4Addr::from(
                0x0a60_0000 + s as u32 + 10,
            ))],
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
                app_protocol: None,
            }],
            endpoints: (0..PODS)
                .filter(|i| i % SERVICES == s)
                .map(|i| EndpointSpec {
                    workload_uid: pod(i).uid,
                    ports: Vec::new(),
                })
                .collect(),
            waypoint: None,
        })
        .collect();
    MeshConfig {
        workloads,
        services,
        ..MeshConfig::default()
    }
}

/// The same cluster as the Kubernetes objects the control plane keeps: 50 ambient
/// namespaces, 10,000 running pods with their redirection reported, 1,000 ClusterIP
/// services selecting them.
fn kubernetes_cluster() -> ambit_control::Resources {
    fn yaml<T: serde::de::DeserializeOwned>(text: String) -> T {
        serde_yaml_ng::from_str(&text).unwrap()
    }
    let mut r = ambit_control::Resources::default();
    for n in 0..50 {
        let ns: k8s_openapi::api::core::v1::Namespace = yaml(format!(
            "metadata: {{name: ns{n}, labels: {{istio.io/dataplane-mode: ambient}}}}"
        ));
        r.namespaces.insert(format!("ns{n}"), ns);
    }
    for i in 0..PODS {
        let p = pod(i);
        let object: k8s_openapi::api::core::v1::Pod = yaml(format!(
            "metadata: {{name: {}, namespace: {}, labels: {{app: app-{}}}, annotations: {{ambient.istio.io/redirection: enabled}}}}\n\
             spec: {{nodeName: {}, serviceAccountName: {}, containers: [{{name: app, image: app}}]}}\n\
             status: {{phase: Running, podIP: {}}}",
            p.name, p.namespace, i % SERVICES, p.node, p.service_account, p.ips[0]
        ));
        r.pods
            .insert(ambit_control::ObjectKey::new(&p.namespace, &p.name), object);
    }
    for s in 0..SERVICES {
        let object: k8s_openapi::api::core::v1::Service = yaml(format!(
            "metadata: {{name: app-{s}, namespace: ns{}}}\n\
             spec: {{clusterIP: {}, selector: {{app: app-{s}}}, ports: [{{port: 80, targetPort: 8080}}]}}",
            s % 50,
            std::net::Ipv4Addr::from(0x0a60_0000 + s as u32 + 10)
        ));
        r.services.insert(
            ambit_control::ObjectKey::new(&format!("ns{}", s % 50), &format!("app-{s}")),
            object,
        );
    }
    r
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize)
        .saturating_sub(1)
        .min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    // What one ztunnel holds for the whole model, measured before anything else runs:
    // its client's resources, the MeshConfig they make, and the MeshState built from it.
    let before = allocated();
    let mut config = cluster();
    let config_bytes = allocated() - before;
    let before = allocated();
    let held = ambit_net::xds::to_resources(&config);
    let held_bytes = allocated() - before;
    let before = allocated();
    let state = MeshState::build(&config, &TrustDomain::default()).unwrap();
    let state_bytes = allocated() - before;
    drop((held, state));
    let before = allocated();
    let snapshot = Arc::new(Snapshot::new(1, &config));
    let snapshot_bytes = allocated() - before;
    let resources = snapshot.resources.len();
    let (snapshots, snapshots_rx) = watch::channel(snapshot);

    let tokens = TokenAuthenticator::from_yaml(
        &format!("- token: {TOKEN}\n  identity: spiffe://cluster.local/ns/ambit-system/sa/ztunnel\n  nodeAgent: true\n  node: node-0\n"),
        "bench",
    )
    .unwrap();
    let authenticators: Vec<Arc<dyn Authenticator>> = vec![Arc::new(tokens)];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(XdsServer::new(
                snapshots_rx,
                authenticators,
            )))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let start = Instant::now();
    let mut models = Vec::new();
    for c in 0..CLIENTS {
        let (tx, rx) = watch::channel(Arc::new(MeshConfig::default()));
        let mut client_config = ClientConfig::new(&format!("ztunnel~node-{c}"));
        client_config.token = Some(TOKEN.into());
        let client = XdsClient::new(client_config, tx);
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        tokio::spawn(client.run(move || {
            let endpoint = endpoint.clone();
            async move { endpoint.connect().await }
        }));
        models.push(rx);
    }
    for m in &mut models {
        m.wait_for(|c| c.workloads.len() == PODS).await.unwrap();
    }
    let initial = start.elapsed();

    let mut delays = Vec::new();
    for change in 0..CHANGES {
        let marker;
        if change % 2 == 0 {
            // One pod added.
            let mut p = pod(PODS + change);
            p.uid = format!("ns0/new-{change}");
            marker = p.uid.clone();
            config.workloads.push(p);
        } else {
            // One service's endpoints changed: a pod added to app-0.
            let uid = format!("ns0/new-{}", change - 1);
            config.services[0].endpoints.push(EndpointSpec {
                workload_uid: uid.clone(),
                ports: Vec::new(),
            });
            marker = format!("endpoint:{uid}");
        }
        let t = Instant::now();
        snapshots.send_replace(Arc::new(Snapshot::new(2 + change as u64, &config)));
        for m in &mut models {
            let marker = marker.clone();
            m.wait_for(|c| match marker.strip_prefix("endpoint:") {
                Some(uid) => c.services.iter().any(|s| {
                    s.name == "app-0" && s.endpoints.iter().any(|e| e.workload_uid == uid)
                }),
                None => c.workloads.iter().any(|w| w.uid == marker),
            })
            .await
            .unwrap();
        }
        delays.push(t.elapsed());
    }
    delays.sort();

    // The control plane's own step before a push, in Kubernetes mode: the watchers'
    // objects translated into the model and made into a snapshot.
    let before = allocated();
    let objects = kubernetes_cluster();
    let objects_bytes = allocated() - before;
    let mut rebuilds = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let translation = ambit_control::translate(&objects);
        let snapshot = Snapshot::new(1, &translation.config);
        rebuilds.push(t.elapsed());
        assert_eq!(translation.config.workloads.len(), PODS);
        assert!(translation.skipped.is_empty(), "{:?}", translation.skipped);
        drop(snapshot);
    }
    rebuilds.sort();
    println!("# xDS benchmark ({PODS} pods, {SERVICES} services, {resources} resources, {CLIENTS} clients in one process)\n");
    println!("| figure | value |\n|---|---|");
    println!(
        "| initial sync of all clients | {:.0} ms |",
        initial.as_secs_f64() * 1000.0
    );
    println!(
        "| change to all clients applied, p50 | {:.0} ms |",
        percentile(&delays, 0.5).as_secs_f64() * 1000.0
    );
    println!(
        "| change to all clients applied, p99 | {:.0} ms |",
        percentile(&delays, 0.99).as_secs_f64() * 1000.0
    );
    println!(
        "| translation + snapshot from the Kubernetes objects, median of 5 | {:.0} ms |",
        percentile(&rebuilds, 0.5).as_secs_f64() * 1000.0
    );
    println!(
        "| Kubernetes mode, change to all applied: debounce ({} ms quiet) + translation + p50 push | {:.0} ms |",
        ambit_control::kubernetes::DEBOUNCE_QUIET.as_millis(),
        (ambit_control::kubernetes::DEBOUNCE_QUIET + percentile(&rebuilds, 0.5) + percentile(&delays, 0.5)).as_secs_f64() * 1000.0
    );
    println!(
        "| the control plane's objects (10,000 pods, 1,000 services) | {:.1} MB |",
        objects_bytes as f64 / 1e6
    );
    println!(
        "| server snapshot heap | {:.1} MB |",
        snapshot_bytes as f64 / 1e6
    );
    println!(
        "| one ztunnel's model: resources {:.1} MB + MeshConfig {:.1} MB + MeshState {:.1} MB | {:.1} MB |",
        held_bytes as f64 / 1e6,
        config_bytes as f64 / 1e6,
        state_bytes as f64 / 1e6,
        (held_bytes + config_bytes + state_bytes) as f64 / 1e6
    );
}
