//! The CA served over gRPC/TLS in-process, called by the mesh's own CA client and
//! certificate manager: tokens, impersonation, mTLS renewal, and refusals as a client
//! sees them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ambit_ca::config::Config;
use ambit_net::ca_client::{
    CaClientConfig, CertificateSource, FetchError, FetchRequest, GrpcCaClient,
};
use ambit_net::cert_manager::{new_key_and_csr, CertificateManager, ManagerConfig, SystemClock};
use clap::Parser;
use support::*;
use tokio::sync::oneshot;

struct Running {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

impl Running {
    fn root_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    fn client(&self, token: Option<&str>, impersonate: bool) -> CaClientConfig {
        client_config(self.addr, &self.root_dir(), token, impersonate)
    }
}

async fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(&tokens, tokens_yaml()).unwrap();
    let config = Config::try_parse_from([
        "ambit-ca",
        "--root-dir",
        dir.path().join("ca").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--tokens",
        tokens.to_str().unwrap(),
    ])
    .unwrap();
    let (addr_tx, addr_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(ambit_ca::app::run(
        config,
        move |addr| {
            let _ = addr_tx.send(addr);
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    let addr = addr_rx.await.expect("CA did not start");
    Running {
        addr,
        dir,
        stop: Some(stop_tx),
        task,
    }
}

fn manager(config: CaClientConfig) -> CertificateManager {
    let client = GrpcCaClient::new(config).unwrap();
    CertificateManager::new(
        Arc::new(client),
        Arc::new(SystemClock),
        ManagerConfig::default(),
    )
}

#[tokio::test]
async fn workload_token_gets_its_own_certificate_through_the_manager() {
    let ca = start().await;
    let m = manager(ca.client(Some(WORKLOAD_TOKEN), false));
    let cert = m.fetch(&id(CART)).await.unwrap();
    assert_eq!(cert.identity(), &id(CART));
    assert_eq!(m.cached(&id(CART)).unwrap().not_after(), cert.not_after());
    let ttl = secs_between(now(), cert.not_after());
    assert!((86_000..=86_400).contains(&ttl), "{ttl}");
}

#[tokio::test]
async fn node_agent_token_gets_certificates_for_other_identities() {
    let ca = start().await;
    let m = manager(ca.client(Some(AGENT_TOKEN), true));
    let (cart, pay) = (id(CART), id(PAY));
    let (a, b) = tokio::join!(m.fetch(&cart), m.fetch(&pay));
    assert_eq!(a.unwrap().identity(), &id(CART));
    assert_eq!(b.unwrap().identity(), &id(PAY));
    assert_eq!(m.identities(), vec![id(CART), id(PAY)]);
}

#[tokio::test]
async fn renewal_over_mtls_needs_no_token() {
    let ca = start().await;
    let with_token = GrpcCaClient::new(ca.client(Some(AGENT_TOKEN), true)).unwrap();
    let chain = {
        let (key, csr_pem) = new_key_and_csr(&id(PAY)).unwrap();
        let chain = with_token
            .fetch(FetchRequest {
                identity: id(PAY),
                csr_pem,
                validity: HOUR,
                current: None,
            })
            .await
            .unwrap();
        ambit_net::tls::WorkloadCert::from_pem(&chain, &key, None).unwrap()
    };
    let no_token = GrpcCaClient::new(ca.client(None, false)).unwrap();
    let renewed = fetch_raw(&no_token, PAY, Some(chain.clone()))
        .await
        .unwrap();
    assert_eq!(
        ambit_net::tls::identity_of(&der(&renewed[0])).unwrap(),
        id(PAY)
    );

    // The certificate proves only its own identity.
    let err = fetch_raw(&no_token, CART, Some(chain)).await.unwrap_err();
    match err {
        FetchError::Refused { code, message } => {
            assert_eq!(code, tonic::Code::PermissionDenied);
            assert!(message.contains(PAY) && message.contains(CART), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn refusals_reach_the_client_with_their_codes() {
    let ca = start().await;
    let bad_token = GrpcCaClient::new(ca.client(Some("not-a-known-token-000"), false)).unwrap();
    match fetch_raw(&bad_token, CART, None).await.unwrap_err() {
        FetchError::Refused { code, message } => {
            assert_eq!(code, tonic::Code::Unauthenticated);
            assert!(message.contains("token is not recognised"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let workload = GrpcCaClient::new(ca.client(Some(WORKLOAD_TOKEN), true)).unwrap();
    match fetch_raw(&workload, PAY, None).await.unwrap_err() {
        FetchError::Refused { code, message } => {
            assert_eq!(code, tonic::Code::PermissionDenied);
            assert!(message.contains("is not a trusted node agent"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let none = GrpcCaClient::new(ca.client(None, false)).unwrap();
    assert!(matches!(
        fetch_raw(&none, CART, None).await.unwrap_err(),
        FetchError::NoCredentials(_)
    ));
}

#[tokio::test]
async fn client_refuses_a_ca_with_an_unexpected_identity() {
    let ca = start().await;
    let mut cfg = ca.client(Some(WORKLOAD_TOKEN), false);
    cfg.ca_identity = id("spiffe://cluster.local/ns/ambit-system/sa/impostor");
    let client = GrpcCaClient::new(cfg).unwrap();
    let err = fetch_raw(&client, CART, None).await.unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Connect { .. }
                | FetchError::Refused {
                    code: tonic::Code::Unavailable,
                    ..
                }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn bad_requests_do_not_disturb_good_ones() {
    let ca = start().await;
    let good = GrpcCaClient::new(ca.client(Some(WORKLOAD_TOKEN), false)).unwrap();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let client = good.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                fetch_raw(&client, CART, None).await.map(|_| true)
            } else {
                // Garbage CSR.
                client
                    .fetch(FetchRequest {
                        identity: id(CART),
                        csr_pem: "junk".into(),
                        validity: HOUR,
                        current: None,
                    })
                    .await
                    .map(|_| false)
            }
        }));
    }
    let mut ok = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        match (i % 2, t.await.unwrap()) {
            (0, Ok(true)) => ok += 1,
            (
                1,
                Err(FetchError::Refused {
                    code: tonic::Code::InvalidArgument,
                    ..
                }),
            ) => {}
            (_, other) => panic!("request {i}: {other:?}"),
        }
    }
    assert_eq!(ok, 20);
}

#[tokio::test]
async fn plaintext_client_gets_no_answer() {
    use ambit_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
    let ca = start().await;
    let attempt = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", ca.addr))?
            .connect()
            .await?;
        let mut client = IstioCertificateServiceClient::new(channel);
        let (_, csr) = new_key_and_csr(&id(CART)).unwrap();
        let mut req = tonic::Request::new(ambit_proto::ca::IstioCertificateRequest {
            csr,
            ..Default::default()
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {WORKLOAD_TOKEN}").parse().unwrap(),
        );
        client.create_certificate(req).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    let result = tokio::time::timeout(std::time::Duration::from_secs(15), attempt)
        .await
        .expect("plaintext attempt hung");
    assert!(
        result.is_err(),
        "a plaintext client was issued a certificate"
    );
    // And the CA still serves TLS clients afterwards.
    let good = GrpcCaClient::new(ca.client(Some(WORKLOAD_TOKEN), false)).unwrap();
    fetch_raw(&good, CART, None).await.unwrap();
}

#[tokio::test]
async fn unreachable_ca_is_a_connect_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("root-cert.pem"), new_ca().root_pem()).unwrap();
    let client =
        GrpcCaClient::new(client_config(addr, dir.path(), Some(WORKLOAD_TOKEN), false)).unwrap();
    let err = fetch_raw(&client, CART, None).await.unwrap_err();
    assert!(
        matches!(&err, FetchError::Connect { address, .. } if *address == addr.to_string()),
        "{err:?}"
    );
}
