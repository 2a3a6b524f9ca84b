//! The control plane as its tests drive it: started in process and stopped, and called
//! as a node agent or a workload would (the CA, xDS, the redirection service).
// Each test binary uses its own part of this.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_core::model::MeshConfig;
use ambit_core::SpiffeId;
use ambit_net::ca_client::{
    CaClientConfig, CertificateSource, FetchError, FetchRequest, GrpcCaClient,
};
use ambit_net::cert_manager::new_key_and_csr;
use ambit_net::xds::client::{ClientConfig, XdsClient};
use clap::Parser;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::sync::{oneshot, watch};

/// How long anything the tests wait for may take.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A running ambit-control; stopped (aborted) when dropped.
pub struct Control {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Control {
    /// Starts `run` (an `ambit_control::app` entry point given where to report its
    /// address and what ends it) and waits until it serves.
    pub async fn start<Fut>(
        run: impl FnOnce(Box<dyn FnOnce(SocketAddr) + Send>, oneshot::Receiver<()>) -> Fut,
    ) -> Control
    where
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (addr_tx, addr_rx) = oneshot::channel::<SocketAddr>();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(
            Box::new(move |addr| {
                let _ = addr_tx.send(addr);
            }),
            stopped,
        ));
        let addr = tokio::time::timeout(DEADLINE, addr_rx)
            .await
            .expect("ambit-control did not start serving")
            .unwrap();
        Control {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// Local mode with `args` (after the program name).
    pub async fn local(args: &[&str]) -> Control {
        let config = ambit_control::config::Config::try_parse_from(
            std::iter::once("ambit-control").chain(args.iter().copied()),
        )
        .unwrap();
        Control::start(|on_listening, stopped| {
            ambit_control::app::run(config, on_listening, async move {
                let _ = stopped.await;
            })
        })
        .await
    }

    /// Local mode on `dir` as the tests lay it out: YAML in `k8s/`, the root in `ca/`,
    /// the tokens in `tokens.yaml`, polled every 50 ms, on a free port.
    pub async fn local_in(dir: &Path) -> Control {
        let path = |p: &str| dir.join(p).to_string_lossy().into_owned();
        let (k8s, ca, tokens) = (path("k8s"), path("ca"), path("tokens.yaml"));
        Control::local(&[
            "--local-dir",
            &k8s,
            "--poll",
            "50ms",
            "--root-dir",
            &ca,
            "--tokens",
            &tokens,
            "--listen",
            "127.0.0.1:0",
        ])
        .await
    }

    /// Stops it and checks it exits cleanly.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let result = tokio::time::timeout(DEADLINE, &mut self.task)
            .await
            .expect("ambit-control did not stop");
        result.unwrap().unwrap();
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The certificates of PEM text.
pub fn roots(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The certificates of a PEM file.
pub fn roots_in(path: &Path) -> Vec<CertificateDer<'static>> {
    roots(&std::fs::read_to_string(path).unwrap())
}

/// A ztunnel's xDS client on node-a with `token`; its model follows the server.
pub fn xds_model(
    addr: SocketAddr,
    roots: Vec<CertificateDer<'static>>,
    token: &str,
) -> (
    watch::Receiver<Arc<MeshConfig>>,
    tokio::task::JoinHandle<()>,
) {
    xds_model_of_any(vec![addr], roots, token)
}

/// The same, reaching one of several replicas as a Service's address would: each
/// (re)connection goes to the next of `addrs` in turn, the first to the first.
pub fn xds_model_of_any(
    addrs: Vec<SocketAddr>,
    roots: Vec<CertificateDer<'static>>,
    token: &str,
) -> (
    watch::Receiver<Arc<MeshConfig>>,
    tokio::task::JoinHandle<()>,
) {
    let attempts = std::sync::atomic::AtomicUsize::new(0);
    let (tx, rx) = watch::channel(Arc::new(MeshConfig::default()));
    let mut config = ClientConfig::new("ztunnel~node-a");
    config.token = Some(token.into());
    config.max_backoff = Duration::from_millis(200);
    let roots = ambit_net::tls::TrustSource::from(roots);
    let connect = move || {
        let n = attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let addr = addrs[n % addrs.len()];
        let channel = ambit_net::ca_client::tls_channel(
            &addr.to_string(),
            &control_identity(),
            &roots,
            None,
            Duration::from_secs(5),
        );
        async move { channel }
    };
    (rx, tokio::spawn(XdsClient::new(config, tx).run(connect)))
}

/// Waits until `ok(model)`, reporting the delay seen.
pub async fn until(
    model: &mut watch::Receiver<Arc<MeshConfig>>,
    what: &str,
    ok: impl Fn(&MeshConfig) -> bool,
) {
    let start = Instant::now();
    let seen = tokio::time::timeout(DEADLINE, model.wait_for(|m| ok(m)))
        .await
        .is_ok();
    assert!(
        seen,
        "{what}: not seen in {DEADLINE:?}; model:\n{:#?}",
        model.borrow()
    );
    eprintln!("{what}: seen after {:?}", start.elapsed());
}

/// The identity ambit-control serves as.
pub fn control_identity() -> SpiffeId {
    SpiffeId::parse("spiffe://cluster.local/ns/ambit-system/sa/ambit-control").unwrap()
}

/// A client of the CA at `addr` whose certificate chains to `roots`, sending `token`;
/// `impersonate` names the requested identity, as a node agent does.
pub fn ca_client(
    addr: SocketAddr,
    roots: Vec<CertificateDer<'static>>,
    token: &str,
    impersonate: bool,
) -> GrpcCaClient {
    GrpcCaClient::new(CaClientConfig {
        address: addr.to_string(),
        ca_identity: control_identity(),
        roots: roots.into(),
        token: Some(token.into()),
        impersonate,
        timeout: Duration::from_secs(10),
    })
    .unwrap()
}

/// Asks for an hour's certificate for `identity`, with a fresh key.
pub async fn request(client: &GrpcCaClient, identity: &str) -> Result<Vec<String>, FetchError> {
    let identity = SpiffeId::parse(identity).unwrap();
    let (_key, csr_pem) = new_key_and_csr(&identity).unwrap();
    client
        .fetch(FetchRequest {
            identity,
            csr_pem,
            validity: Duration::from_secs(3600),
            current: None,
        })
        .await
}

/// A client of the control plane's node-agent service.
pub fn redirection_client(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
) -> ambit_proto::nodeagent::redirection_client::RedirectionClient<tonic::transport::Channel> {
    let channel = ambit_net::ca_client::tls_channel(
        &addr.to_string(),
        &control_identity(),
        &roots.to_vec().into(),
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    ambit_proto::nodeagent::redirection_client::RedirectionClient::new(channel)
}

/// `message` with `authorization: Bearer <token>`.
fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// Reports pod `namespace/name`'s redirection to the control plane at `addr`, as the
/// node agent holding `token` does.
pub async fn report(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    token: &str,
    pod: (&str, &str),
    enabled: bool,
) -> Result<(), tonic::Status> {
    redirection_client(addr, roots)
        .report(with_token(
            ambit_proto::nodeagent::RedirectionReport {
                namespace: pod.0.into(),
                name: pod.1.into(),
                uid: String::new(),
                enabled,
            },
            token,
        ))
        .await
        .map(|_| ())
}

/// Asks whether pod `namespace/name` is to be captured: `(known, ambient)`.
pub async fn enrolment(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    token: &str,
    pod: (&str, &str),
) -> Result<(bool, bool), tonic::Status> {
    let answer = redirection_client(addr, roots)
        .enrolment(with_token(
            ambit_proto::nodeagent::EnrolmentQuery {
                namespace: pod.0.into(),
                name: pod.1.into(),
                uid: String::new(),
            },
            token,
        ))
        .await?
        .into_inner();
    Ok((answer.known, answer.ambient))
}
