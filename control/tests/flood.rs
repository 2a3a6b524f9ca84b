//! Idle clients cannot take port 15012 down: a flood of TLS clients that present no
//! certificate and send nothing, all from one address, is bounded at accept and each
//! connection left is closed once it has carried no authenticated request in time;
//! meanwhile a legitimate CA request and an xDS stream from elsewhere succeed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/control.rs"]
mod control;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_ca::server::{AUTHENTICATE_WITHIN, HANDSHAKE_TIMEOUT, MAX_PER_SOURCE};
use control::{ca_client, control_identity, request, roots_in, until, xds_model, Control};
use futures::StreamExt;
use tokio::io::AsyncReadExt;

const NODE_A: &str = "node-a-agent-token-for-flood-tests";
const WORKLOAD: &str = "shop-web-token-for-flood-tests";
/// Idle clients in the flood: more than one address may hold, within the test's
/// descriptors (each costs two: the client's and the server's).
const FLOOD: usize = 2_000;

/// One idle client from `source`: TLS completed without a certificate, nothing sent.
async fn idle_client(
    addr: SocketAddr,
    source: std::net::IpAddr,
    config: Arc<tokio_rustls::rustls::ClientConfig>,
) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let tcp = socket.connect(addr).await.ok()?;
    let name = rustls_pki_types::ServerName::try_from("ambit-control").unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_idle_tls_clients_is_bounded_and_closed_while_others_are_served() {
    ambit_net::process::raise_nofile_limit().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let k8s = dir.path().join("k8s");
    std::fs::create_dir(&k8s).unwrap();
    std::fs::write(
        k8s.join("pods.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: shop}\n\
         spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: c, image: c}]}\n\
         status: {podIP: 10.1.0.2}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokens.yaml"),
        format!(
            "- token: {NODE_A}\n  identity: spiffe://cluster.local/ns/ambit-system/sa/ztunnel\n  nodeAgent: true\n  node: node-a\n\
             - token: {WORKLOAD}\n  identity: spiffe://cluster.local/ns/shop/sa/web\n"
        ),
    )
    .unwrap();
    let control = Control::local_in(dir.path()).await;
    let roots = roots_in(&dir.path().join("ca/root-cert.pem"));
    let config =
        Arc::new(ambit_net::tls::client_config(None, &roots, [control_identity()]).unwrap());

    // The flood, from 127.0.0.2: only MAX_PER_SOURCE get through TLS, the rest are
    // closed at accept.
    let source: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let held: Vec<_> = futures::stream::iter(
        (0..FLOOD).map(|_| idle_client(control.addr, source, config.clone())),
    )
    .buffer_unordered(256)
    .filter_map(|c| async move { c })
    .collect()
    .await;
    eprintln!("{} of {FLOOD} idle clients completed TLS", held.len());
    assert!(
        held.len() <= MAX_PER_SOURCE,
        "{} idle connections from one address were taken",
        held.len()
    );

    // Meanwhile, from 127.0.0.1: a certificate, and the model over xDS.
    let chain = request(
        &ca_client(control.addr, roots.clone(), WORKLOAD, false),
        "spiffe://cluster.local/ns/shop/sa/web",
    )
    .await
    .unwrap();
    assert!(!chain.is_empty());
    let (mut model, xds) = xds_model(control.addr, roots.clone(), NODE_A);
    until(&mut model, "the model under the flood", |m| {
        m.workloads.iter().any(|w| w.uid == "shop/web-1")
    })
    .await;

    // Every idle connection is closed by the server: none authenticated a request.
    // (What the server sends first, its h2 settings, is read and dropped.)
    let deadline = HANDSHAKE_TIMEOUT + AUTHENTICATE_WITHIN + Duration::from_secs(10);
    for mut conn in held {
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(deadline, async {
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "an idle, unauthenticated connection was kept open"
        );
    }

    // The xDS client still follows the directory.
    std::fs::write(
        k8s.join("more.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web-2, namespace: shop}\n\
         spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: c, image: c}]}\n\
         status: {podIP: 10.1.0.3}\n",
    )
    .unwrap();
    until(&mut model, "a change after the flood", |m| {
        m.workloads.iter().any(|w| w.uid == "shop/web-2")
    })
    .await;
    // And the port still takes new clients from the flood's address.
    assert!(idle_client(control.addr, source, config).await.is_some());
    xds.abort();
    control.stop().await;
}
