//! The delta xDS server and ztunnel's client, talking gRPC over a local socket: the
//! client gets the model, then each change; rejects a resource it cannot use while
//! taking the rest; keeps its model while the server is gone, and resyncs from a new
//! server. Callers that are not node agents are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_ca::auth::{Authenticator, TokenAuthenticator};
use ambit_control::xds::{Snapshot, XdsServer};
use ambit_core::model::MeshConfig;
use ambit_net::xds::client::{ClientConfig, XdsClient};
use ambit_proto::workload::{address, Address, Workload};
use ambit_proto::xds::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const DEADLINE: Duration = Duration::from_secs(10);

fn config(yaml: &str) -> MeshConfig {
    serde_yaml_ng::from_str(yaml).unwrap()
}

fn v1() -> MeshConfig {
    config(
        "workloads:\n\
         - {uid: shop/a, name: a, namespace: shop, node: node-a, ips: [10.1.0.2], protocol: HBONE}\n\
         - {uid: shop/b, name: b, namespace: shop, node: node-b, ips: [10.2.0.2], protocol: HBONE}\n\
         services:\n\
         - {name: web, namespace: shop, hostname: web.shop.svc.cluster.local, vips: [10.96.0.10],\n\
            ports: [{port: 80, targetPort: 8080}], endpoints: [{workloadUid: shop/b}]}\n",
    )
}

fn v2() -> MeshConfig {
    config(
        "workloads:\n\
         - {uid: shop/b, name: b, namespace: shop, node: node-b, ips: [10.2.0.2], protocol: HBONE}\n\
         - {uid: shop/c, name: c, namespace: shop, node: node-a, ips: [10.1.0.3]}\n\
         services:\n\
         - {name: web, namespace: shop, hostname: web.shop.svc.cluster.local, vips: [10.96.0.10],\n\
            ports: [{port: 80, targetPort: 8081}], endpoints: [{workloadUid: shop/b}]}\n",
    )
}

const TOKEN: &str = "node-a-agent-token";
/// A workload's token: authenticated, but not a node agent.
const WORKLOAD_TOKEN: &str = "shop-web-workload-token";

/// Serves `snapshots` on `addr`, to callers with [`TOKEN`], until the task is aborted.
async fn serve(addr: SocketAddr, snapshots: watch::Receiver<Arc<Snapshot>>) -> JoinHandle<()> {
    let tokens = TokenAuthenticator::from_yaml(
        &format!(
            "- token: {TOKEN}\n  identity: spiffe://cluster.local/ns/ambit-system/sa/ztunnel\n  \
             nodeAgent: true\n  node: node-a\n\
             - token: {WORKLOAD_TOKEN}\n  identity: spiffe://cluster.local/ns/shop/sa/web\n"
        ),
        "test",
    )
    .unwrap();
    let authenticators: Vec<Arc<dyn Authenticator>> = vec![Arc::new(tokens)];
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(XdsServer::new(
                snapshots,
                authenticators,
            )))
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    })
}

async fn wait_for_model(model: &mut watch::Receiver<Arc<MeshConfig>>, want: &MeshConfig) {
    let waited = tokio::time::timeout(DEADLINE, model.wait_for(|m| **m == *want))
        .await
        .is_ok();
    assert!(
        waited,
        "the client's model did not become\n{want:#?}\nit is\n{:#?}",
        model.borrow()
    );
}

#[tokio::test]
async fn a_client_follows_the_model_rejects_what_it_cannot_use_and_resyncs_after_a_restart() {
    let addr: SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let (snapshots, snapshots_rx) = watch::channel(Arc::new(Snapshot::new(1, &v1())));
    let server = serve(addr, snapshots_rx).await;

    let (model_tx, mut model) = watch::channel(Arc::new(MeshConfig::default()));
    let mut client_config = ClientConfig::new("ztunnel~node-a");
    client_config.max_backoff = Duration::from_millis(200);
    client_config.token = Some(TOKEN.into());
    let client = XdsClient::new(client_config, model_tx);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    // Counts the client's connection attempts, to see it retry.
    let (attempts_tx, mut attempts) = watch::channel(0usize);
    let client = tokio::spawn(client.run(move || {
        attempts_tx.send_modify(|n| *n += 1);
        let endpoint = endpoint.clone();
        async move { endpoint.connect().await }
    }));

    // The whole model on connect, then a change as a diff.
    wait_for_model(&mut model, &v1()).await;
    snapshots.send_replace(Arc::new(Snapshot::new(2, &v2())));
    wait_for_model(&mut model, &v2()).await;

    // A resource the client cannot use (a 3-byte address) is rejected on its own; the
    // change that comes with it is taken.
    let mut snapshot = Snapshot::new(3, &v2());
    let bad = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: "shop/bad".into(),
            addresses: vec![vec![10, 1, 0]],
            ..Workload::default()
        })),
    };
    snapshot
        .resources
        .insert("shop/bad".into(), ("1".into(), bad));
    let mut v3 = v2();
    v3.workloads[1].ips = vec!["10.1.0.4".parse().unwrap()];
    let good = Snapshot::new(3, &v3);
    snapshot
        .resources
        .insert("shop/c".into(), good.resources["shop/c"].clone());
    snapshots.send_replace(Arc::new(snapshot));
    wait_for_model(&mut model, &v3).await;

    // The server goes away (its streams end with its snapshots, as they would with its
    // process): the client keeps its model.
    server.abort();
    let _ = server.await;
    drop(snapshots);
    let connected = *attempts.borrow_and_update();
    let retried = tokio::time::timeout(DEADLINE, attempts.wait_for(|n| *n >= connected + 2))
        .await
        .is_ok();
    assert!(retried, "the client did not try to reconnect");
    assert_eq!(**model.borrow(), v3);

    // A new server with a newer model: the client reconnects and catches up.
    let mut v4 = v3.clone();
    v4.workloads.retain(|w| w.uid != "shop/c");
    let (_snapshots, snapshots_rx) = watch::channel(Arc::new(Snapshot::new(1, &v4)));
    let server = serve(addr, snapshots_rx).await;
    wait_for_model(&mut model, &v4).await;

    client.abort();
    server.abort();
}

#[tokio::test]
async fn a_caller_without_credentials_gets_nothing() {
    let addr: SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let (_snapshots, snapshots_rx) = watch::channel(Arc::new(Snapshot::new(1, &v1())));
    let server = serve(addr, snapshots_rx).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        ambit_proto::xds::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::new(
            channel,
        );
    let first = ambit_proto::xds::DeltaDiscoveryRequest {
        type_url: ambit_proto::workload::ADDRESS_TYPE_URL.into(),
        ..Default::default()
    };
    let status = client
        .delta_aggregated_resources(tokio_stream::iter([first]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");
    server.abort();
}

#[tokio::test]
async fn a_workload_may_not_subscribe_to_the_model() {
    let addr: SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let (_snapshots, snapshots_rx) = watch::channel(Arc::new(Snapshot::new(1, &v1())));
    let server = serve(addr, snapshots_rx).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        ambit_proto::xds::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::new(
            channel,
        );
    let mut request = tonic::Request::new(tokio_stream::iter([
        ambit_proto::xds::DeltaDiscoveryRequest {
            type_url: ambit_proto::workload::ADDRESS_TYPE_URL.into(),
            ..Default::default()
        },
    ]));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {WORKLOAD_TOKEN}").parse().unwrap(),
    );
    let status = client
        .delta_aggregated_resources(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    assert!(
        status
            .message()
            .contains("spiffe://cluster.local/ns/shop/sa/web"),
        "{status}"
    );
    server.abort();
}

/// A waypoint's token (its service account, not a node agent).
const WAYPOINT_TOKEN: &str = "shop-waypoint-token";

fn waypoint_model() -> MeshConfig {
    config(
        "waypoints:\n\
         - {name: waypoint, namespace: shop, trafficType: all, serviceAccount: waypoint,\n\
            address: 10.96.0.100, policies: [shop/gw-policy]}\n\
         workloads:\n\
         - {uid: shop/wp-1, name: wp-1, namespace: shop, serviceAccount: waypoint, node: node-a, ips: [10.1.0.100], protocol: HBONE}\n\
         - {uid: shop/a, name: a, namespace: shop, node: node-a, ips: [10.1.0.2], protocol: HBONE}\n\
         - {uid: shop/b, name: b, namespace: shop, node: node-b, ips: [10.2.0.2], protocol: HBONE}\n\
         - {uid: shop/c, name: c, namespace: shop, node: node-b, ips: [10.2.0.3], protocol: HBONE,\n\
            waypoint: {address: 10.96.0.100, name: waypoint, namespace: shop}}\n\
         services:\n\
         - {name: waypoint, namespace: shop, vips: [10.96.0.100], ports: [{port: 15008, targetPort: 15008}],\n\
            endpoints: [{workloadUid: shop/wp-1}]}\n\
         - {name: web, namespace: shop, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080}],\n\
            endpoints: [{workloadUid: shop/b}], waypoint: {address: 10.96.0.100, name: waypoint, namespace: shop}}\n\
         - {name: other, namespace: shop, vips: [10.96.0.11], ports: [{port: 80, targetPort: 8080}],\n\
            endpoints: [{workloadUid: shop/a}]}\n",
    )
}

/// The names of the resources the first response of a stream, subscribed with
/// `token`, carries; or the stream's refusal.
async fn first_names(addr: SocketAddr, token: &str) -> Result<Vec<String>, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        ambit_proto::xds::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::new(
            channel,
        );
    let (requests, rx) = tokio::sync::mpsc::channel(1);
    requests
        .send(ambit_proto::xds::DeltaDiscoveryRequest {
            type_url: ambit_proto::workload::ADDRESS_TYPE_URL.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut responses = client
        .delta_aggregated_resources(request)
        .await?
        .into_inner();
    let first = tokio::time::timeout(DEADLINE, responses.message())
        .await
        .expect("no first response")?
        .expect("stream ended");
    drop(requests);
    Ok(first.resources.into_iter().map(|r| r.name).collect())
}

#[tokio::test]
async fn a_waypoint_sees_only_what_it_serves_and_node_agents_never_see_l7_policies() {
    let addr: SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let mut snapshot = Snapshot::new(1, &waypoint_model());
    // L7 policies travel as `l7authz/<namespace>/<name>`: one attached to the
    // waypoint, one not.
    for name in ["l7authz/shop/gw-policy", "l7authz/other/p"] {
        let resource = snapshot.resources["shop/a"].clone();
        snapshot.resources.insert(name.into(), resource);
    }
    let (_snapshots, snapshots_rx) = watch::channel(Arc::new(snapshot));
    let tokens = TokenAuthenticator::from_yaml(
        &format!(
            "- token: {TOKEN}\n  identity: spiffe://cluster.local/ns/ambit-system/sa/ztunnel\n  \
             nodeAgent: true\n  node: node-a\n\
             - token: {WAYPOINT_TOKEN}\n  identity: spiffe://cluster.local/ns/shop/sa/waypoint\n\
             - token: {WORKLOAD_TOKEN}\n  identity: spiffe://cluster.local/ns/shop/sa/web\n\
             - token: elsewhere-trust-domain\n  identity: spiffe://other.domain/ns/shop/sa/waypoint\n"
        ),
        "test",
    )
    .unwrap();
    let authenticators: Vec<Arc<dyn Authenticator>> = vec![Arc::new(tokens)];
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(
                XdsServer::new(snapshots_rx, authenticators)
                    .with_trust_domain("cluster.local".parse().unwrap()),
            ))
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });

    let waypoint = first_names(addr, WAYPOINT_TOKEN).await.unwrap();
    assert_eq!(
        waypoint,
        [
            "l7authz/shop/gw-policy",
            "shop/b",
            "shop/c",
            "shop/waypoint.shop.svc.cluster.local",
            "shop/web.shop.svc.cluster.local",
            "shop/wp-1",
            "waypoint/shop/waypoint",
        ]
    );
    let agent = first_names(addr, TOKEN).await.unwrap();
    assert!(
        agent.iter().all(|n| !n.starts_with("l7authz/")),
        "{agent:?}"
    );
    assert!(agent.contains(&"shop/a".to_owned()), "{agent:?}");
    assert!(
        agent.contains(&"waypoint/shop/waypoint".to_owned()),
        "{agent:?}"
    );
    // A workload, and the waypoint's account name in another trust domain: refused.
    for token in [WORKLOAD_TOKEN, "elsewhere-trust-domain"] {
        let status = first_names(addr, token).await.unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{token}: {status}"
        );
    }
    server.abort();
}

/// Opens a delta xDS stream with `token`, sending what `requests` yields.
async fn raw_stream(
    addr: SocketAddr,
    token: &str,
    requests: tokio::sync::mpsc::Receiver<ambit_proto::xds::DeltaDiscoveryRequest>,
) -> Result<tonic::Streaming<ambit_proto::xds::DeltaDiscoveryResponse>, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        ambit_proto::xds::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::new(
            channel,
        );
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(requests));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    Ok(client
        .delta_aggregated_resources(request)
        .await?
        .into_inner())
}

async fn next(
    responses: &mut tonic::Streaming<ambit_proto::xds::DeltaDiscoveryResponse>,
) -> ambit_proto::xds::DeltaDiscoveryResponse {
    tokio::time::timeout(DEADLINE, responses.message())
        .await
        .expect("no response in time")
        .unwrap()
        .unwrap()
}

/// Issue 19: Istio's ztunnel subscribes to Istio's two types on one aggregated stream;
/// each gets its first response at once (even empty), then changes as diffs; workloads
/// may not subscribe.
#[tokio::test]
async fn an_istio_client_gets_both_istio_types_on_one_stream_then_their_changes() {
    use ambit_proto::istio_security::{Authorization, AUTHORIZATION_TYPE_URL};
    use ambit_proto::istio_workload::{self as iw, ADDRESS_TYPE_URL};
    use ambit_proto::xds::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
    use prost::Message;
    let addr: SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let (snapshots, snapshots_rx) = watch::channel(Arc::new(Snapshot::new(1, &v1())));
    let server = serve(addr, snapshots_rx).await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let subscribe = |type_url: &str| DeltaDiscoveryRequest {
        type_url: type_url.into(),
        ..Default::default()
    };
    tx.send(subscribe(ADDRESS_TYPE_URL)).await.unwrap();
    tx.send(subscribe(AUTHORIZATION_TYPE_URL)).await.unwrap();
    let mut responses = raw_stream(addr, TOKEN, rx).await.unwrap();
    let names = |r: &DeltaDiscoveryResponse| {
        let mut n: Vec<String> = r.resources.iter().map(|r| r.name.clone()).collect();
        n.sort();
        n
    };
    let mut first: Vec<DeltaDiscoveryResponse> =
        vec![next(&mut responses).await, next(&mut responses).await];
    first.sort_by(|a, b| a.type_url.cmp(&b.type_url));
    assert_eq!(first[0].type_url, AUTHORIZATION_TYPE_URL);
    assert!(first[0].resources.is_empty(), "{:?}", first[0]);
    assert_eq!(first[1].type_url, ADDRESS_TYPE_URL);
    assert_eq!(
        names(&first[1]),
        ["shop/a", "shop/b", "shop/web.shop.svc.cluster.local"]
    );
    let b = first[1]
        .resources
        .iter()
        .find(|r| r.name == "shop/b")
        .unwrap();
    let any = b.resource.as_ref().unwrap();
    assert_eq!(any.type_url, ADDRESS_TYPE_URL);
    let Some(iw::address::Type::Workload(w)) = iw::Address::decode(&any.value[..]).unwrap().r#type
    else {
        panic!("shop/b is not a workload")
    };
    assert_eq!(
        (w.uid.as_str(), w.trust_domain.as_str(), w.node.as_str()),
        ("shop/b", "cluster.local", "node-b")
    );
    assert_eq!(
        w.services["shop/web.shop.svc.cluster.local"].ports[0].target_port,
        8080
    );
    for r in &first {
        tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }

    // A change: shop/a leaves, shop/c comes, the service's port moves, a policy comes.
    let mut v3 = v2();
    v3.policies = config(
        "policies:\n\
         - {scope: NAMESPACE, namespace: shop, name: deny-all, action: DENY, rules: [{}]}\n",
    )
    .policies;
    snapshots.send_replace(Arc::new(Snapshot::new(2, &v3)));
    let mut changed = [next(&mut responses).await, next(&mut responses).await];
    changed.sort_by(|a, b| a.type_url.cmp(&b.type_url));
    assert_eq!(names(&changed[0]), ["shop/deny-all"]);
    let policy =
        Authorization::decode(&changed[0].resources[0].resource.as_ref().unwrap().value[..])
            .unwrap();
    assert_eq!(policy.action(), ambit_proto::istio_security::Action::Deny);
    assert_eq!(
        names(&changed[1]),
        ["shop/b", "shop/c", "shop/web.shop.svc.cluster.local"]
    );
    assert_eq!(changed[1].removed_resources, ["shop/a"]);

    // A workload's token may not subscribe to the mesh in Istio's types either.
    let (tx2, rx2) = tokio::sync::mpsc::channel(1);
    tx2.send(subscribe(ADDRESS_TYPE_URL)).await.unwrap();
    let status = raw_stream(addr, WORKLOAD_TOKEN, rx2).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    server.abort();
}
