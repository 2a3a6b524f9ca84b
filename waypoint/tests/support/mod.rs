//! A waypoint in-process with everything it talks to made real at test time: a test
//! CA (rcgen) that signs the waypoint's CSRs through the real certificate manager,
//! the model, two endpoint "ztunnels" (the `ambit_net` HBONE server relaying to the
//! app, as ztunnel's inbound does) in front of a hyper app server each, and an HBONE
//! client standing in for the client ztunnel.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_core::hbone::{Baggage, ConnectRefusal, Forwarded, HboneTarget};
use ambit_core::model::{MeshConfig, MeshState};
use ambit_core::{SpiffeId, TrustDomain};
use ambit_net::admin::LogLevel;
use ambit_net::ca_client::{CertificateSource, FetchError, FetchRequest};
use ambit_net::cert_manager::{CertificateManager, ManagerConfig, SystemClock};
use ambit_net::hbone::client::{HboneConnection, OutboundRequest, Tunnel, TunnelError};
use ambit_net::hbone::server::{serve_connection, InboundHandler, InboundRequest, TunnelOutcome};
use ambit_net::hbone::H2Settings;
use ambit_net::model_source::ModelSnapshot;
use ambit_net::tls::{self, CertSlot, ClientAuth, WorkloadCert};
use ambit_waypoint::app::{self, Parts};
use ambit_waypoint::http::Limits;
use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

pub const WAYPOINT: &str = "spiffe://cluster.local/ns/shop/sa/waypoint";
pub const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
pub const ECHO: &str = "spiffe://cluster.local/ns/shop/sa/echo";
/// The bound Service and the one that is not bound.
pub const ECHO_VIP: &str = "10.96.0.10:80";
pub const FREE_VIP: &str = "10.96.0.20:80";
/// The app's port behind each endpoint.
pub const APP_PORT: u16 = 8080;

/// A throwaway mesh root.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub root_pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestCa")
    }
}

fn leaf_usages(params: &mut CertificateParams) {
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
}

impl TestCa {
    pub fn new() -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let root = params.self_signed(&key).unwrap();
        TestCa {
            issuer: Issuer::new(params, key),
            root_pem: root.pem(),
        }
    }

    pub fn issue(&self, identity: &str) -> WorkloadCert {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.try_into().unwrap())];
        leaf_usages(&mut params);
        let leaf = params.signed_by(&key, &self.issuer).unwrap();
        WorkloadCert::from_pem(
            &[leaf.pem(), self.root_pem.clone()],
            &key.serialize_pem(),
            None,
        )
        .unwrap()
    }
}

/// Signs the certificate manager's CSRs, as the CA does, counting requests.
#[derive(Debug)]
pub struct SigningSource {
    pub ca: Arc<TestCa>,
    pub requests: Mutex<Vec<SpiffeId>>,
}

impl CertificateSource for SigningSource {
    fn fetch(&self, request: FetchRequest) -> BoxFuture<'_, Result<Vec<String>, FetchError>> {
        Box::pin(async move {
            self.requests.lock().unwrap().push(request.identity.clone());
            let mut csr = CertificateSigningRequestParams::from_pem(&request.csr_pem)
                .map_err(|e| FetchError::BadResponse(e.to_string()))?;
            leaf_usages(&mut csr.params);
            let leaf = csr
                .signed_by(&self.ca.issuer)
                .map_err(|e| FetchError::BadResponse(e.to_string()))?;
            Ok(vec![leaf.pem(), self.ca.root_pem.clone()])
        })
    }
}

/// Two endpoints' loopback addresses, distinct per test so parallel tests never
/// share a port.
pub fn endpoint_ips() -> [IpAddr; 4] {
    let (a, b) = (rand::random::<u8>() % 250 + 1, rand::random::<u8>());
    [2, 3, 4, 5].map(|last| IpAddr::from([127, a, b, last]))
}

/// The model: the waypoint's own Service, the bound Service `echo` with two
/// endpoints, a bound workload `direct` (the third address), and `free`, bound to
/// nothing, and `legacy`, bound, whose endpoint (the fourth address) is outside the
/// mesh. `canary` (bound) is routed by an HTTPRoute over `echo-v1` (echo-1) and
/// `echo-v2` (echo-2), which are bound to nothing. `guarded` is `echo` declared `http` (HTTP/1.1 upstream) with a DENY policy that refuses `/admin` (after normalization) and DELETE.
pub fn model(ips: [IpAddr; 4]) -> MeshConfig {
    let yaml = format!(
        r#"
workloads:
- {{uid: shop/waypoint-0, name: waypoint-0, namespace: shop, serviceAccount: waypoint, node: a, ips: [127.0.0.1], protocol: HBONE}}
- {{uid: shop/echo-1, name: echo-1, namespace: shop, serviceAccount: echo, node: a, ips: ["{a}"], protocol: HBONE}}
- {{uid: shop/echo-2, name: echo-2, namespace: shop, serviceAccount: echo, node: b, ips: ["{b}"], protocol: HBONE}}
- {{uid: shop/direct-0, name: direct-0, namespace: shop, serviceAccount: echo, node: b, ips: ["{c}"], protocol: HBONE, waypoint: {{address: 10.96.0.99, name: waypoint, namespace: shop}}}}
- {{uid: shop/legacy-0, name: legacy-0, namespace: shop, node: b, ips: ["{d}"]}}
services:
- name: waypoint
  namespace: shop
  vips: [10.96.0.99]
  ports: [{{port: 15008, targetPort: 15008}}]
  endpoints: [{{workloadUid: shop/waypoint-0}}]
- name: echo
  namespace: shop
  vips: [10.96.0.10]
  ports: [{{port: 80, targetPort: {APP_PORT}}}]
  waypoint: {{address: 10.96.0.99, name: waypoint, namespace: shop}}
  endpoints: [{{workloadUid: shop/echo-1}}, {{workloadUid: shop/echo-2}}]
- name: guarded
  namespace: shop
  vips: [10.96.0.40]
  ports: [{{port: 80, targetPort: {APP_PORT}, appProtocol: http}}]
  waypoint: {{address: 10.96.0.99, name: waypoint, namespace: shop}}
  endpoints: [{{workloadUid: shop/echo-1}}, {{workloadUid: shop/echo-2}}]
- name: legacy
  namespace: shop
  vips: [10.96.0.30]
  ports: [{{port: 80, targetPort: {APP_PORT}}}]
  waypoint: {{address: 10.96.0.99, name: waypoint, namespace: shop}}
  endpoints: [{{workloadUid: shop/legacy-0}}]
- name: free
  namespace: shop
  vips: [10.96.0.20]
  ports: [{{port: 80, targetPort: {APP_PORT}}}]
  endpoints: [{{workloadUid: shop/echo-1}}]
- name: canary
  namespace: shop
  vips: [10.96.0.50]
  ports: [{{port: 80, targetPort: {APP_PORT}}}]
  waypoint: {{address: 10.96.0.99, name: waypoint, namespace: shop}}
  endpoints: [{{workloadUid: shop/echo-1}}, {{workloadUid: shop/echo-2}}]
- name: reviews
  namespace: shop
  vips: [10.96.0.61]
  ports: [{{port: 80, targetPort: {APP_PORT}}}]
  waypoint: {{address: 10.96.0.99, name: waypoint, namespace: shop}}
  endpoints: [{{workloadUid: shop/echo-1}}, {{workloadUid: shop/echo-2}}]
- name: echo-v1
  namespace: shop
  vips: [10.96.0.51]
  ports: [{{port: 8080, targetPort: {APP_PORT}}}]
  endpoints: [{{workloadUid: shop/echo-1}}]
- name: echo-v2
  namespace: shop
  vips: [10.96.0.52]
  ports: [{{port: 8080, targetPort: {APP_PORT}}}]
  endpoints: [{{workloadUid: shop/echo-2}}]
waypoints:
- {{name: waypoint, namespace: shop, serviceAccount: waypoint, address: 10.96.0.99, trafficType: all, policies: [shop/no-admin]}}
httpRoutes:
- parents: [{{namespace: shop, name: canary, port: 80}}]
  route:
    namespace: shop
    name: canary
    created: 0
    rules:
    - matches: [{{path: {{type: prefix, value: /}}, headers: [{{name: x-tag, value: {{type: exact, value: v2}}}}]}}]
      backends: [{{namespace: shop, name: echo-v2, port: 8080, weight: 1}}]
    - matches: [{{path: {{type: prefix, value: /split}}}}]
      backends: [{{namespace: shop, name: echo-v1, port: 8080, weight: 3}}, {{namespace: shop, name: echo-v2, port: 8080, weight: 1}}]
    - matches: [{{path: {{type: exact, value: /zero}}}}]
      backends: [{{namespace: shop, name: echo-v1, port: 8080, weight: 0}}]
    - matches: [{{path: {{type: exact, value: /ghost}}}}]
      backends: [{{namespace: shop, name: ghost, port: 8080, weight: 1}}]
    - matches: [{{path: {{type: exact, value: /slow}}}}]
      backends: [{{namespace: shop, name: echo-v1, port: 8080, weight: 1}}]
      requestTimeoutMs: 300
    - matches: [{{path: {{type: prefix, value: /modified}}}}]
      backends: [{{namespace: shop, name: echo-v1, port: 8080, weight: 1}}]
      filters:
        requestHeaders: {{set: [[x-set, new]], add: [[x-add, added]], remove: [x-gone]}}
        responseHeaders: {{set: [[x-served-by, waypoint]], remove: [x-app]}}
        rewrite: {{hostname: rewritten.internal, path: {{type: prefix, value: /}}}}
    - matches: [{{path: {{type: prefix, value: /old}}}}]
      filters:
        redirect: {{scheme: https, path: {{type: prefix, value: /new}}, status: 301}}
    - matches: [{{path: {{type: exact, value: /flaky/500}}}}, {{path: {{type: exact, value: /always/500}}}}]
      backends: [{{namespace: shop, name: echo, port: 80, weight: 1}}]
      retry: {{attempts: 2, codes: [500]}}
    - matches: [{{path: {{type: exact, value: /flaky/503}}}}]
      backends: [{{namespace: shop, name: echo, port: 80, weight: 1}}]
    - matches: [{{path: {{type: prefix, value: /mirrored}}}}]
      backends: [{{namespace: shop, name: echo-v1, port: 8080, weight: 1}}]
      filters:
        rewrite: {{path: {{type: full, value: /sink}}}}
        mirrors: [{{backend: {{namespace: shop, name: echo-v2, port: 8080, weight: 1}}, sharePpm: 1000000}}]
- parents: [{{namespace: shop, name: reviews}}]
  route:
    namespace: shop
    name: reviews
    created: 0
    virtualService: true
    rules:
    - matches: [{{path: {{type: startsWith, value: /}}, headers: [{{name: x-canary, value: {{type: prefix, value: "tr"}}}}]}}]
      backends: [{{namespace: shop, name: echo-v2, port: 8080, weight: 100}}]
    - matches: [{{path: {{type: startsWith, value: /fault/abort}}}}]
      backends: [{{namespace: shop, name: echo-v1, port: 8080, weight: 100}}]
      fault: {{abort: {{httpStatus: 503, sharePpm: 500000}}}}
    - matches: [{{path: {{type: startsWith, value: /fault/grpc}}}}]
      backends: [{{namespace: shop, name: echo-v1, port: 8080, weight: 100}}]
      fault: {{abort: {{grpcStatus: 14, sharePpm: 1000000}}}}
    - matches: [{{path: {{type: startsWith, value: /fault/delay}}}}]
      backends: [{{namespace: shop, name: echo-v1, port: 8080, weight: 100}}]
      fault: {{delay: {{fixedDelayMs: 150, sharePpm: 500000}}}}
    - matches: [{{path: {{type: startsWith, value: /flaky/50}}}}]
      backends: [{{namespace: shop, name: echo, port: 80, weight: 100}}]
      retry: {{attempts: 2, retryOn: ["5xx"]}}
    - matches: [{{path: {{type: exact, value: /slow}}}}]
      backends: [{{namespace: shop, name: echo-v1, port: 8080, weight: 100}}]
      requestTimeoutMs: 300
    - matches: [{{path: {{type: startsWith, value: /}}}}]
      backends: [{{namespace: shop, name: echo-v1, port: 8080, weight: 90}}, {{namespace: shop, name: echo-v2, port: 8080, weight: 10}}]
- parents: [{{namespace: shop, name: canary, port: 80}}]
  route:
    namespace: other
    name: consumer
    created: 0
    rules:
    - backends: [{{namespace: shop, name: echo-v1, port: 8080, weight: 1}}]
l7Policies:
- targets: [{{kind: Service, namespace: shop, name: guarded}}]
  policy:
    namespace: shop
    name: no-admin
    action: DENY
    rules:
    - to: [{{paths: ["/admin", "/admin/*"]}}, {{methods: [DELETE]}}]
"#,
        a = ips[0],
        b = ips[1],
        c = ips[2],
        d = ips[3],
    );
    serde_yaml_ng::from_str(&yaml).unwrap()
}

/// A running waypoint and its surroundings.
pub struct Mesh {
    pub ca: Arc<TestCa>,
    pub ips: [IpAddr; 4],
    pub hbone: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
    /// Identities that opened tunnels at the endpoints' ztunnels.
    pub upstream_peers: Arc<Mutex<Vec<(SpiffeId, HboneTarget)>>>,
    pub stop: tokio::sync::watch::Sender<bool>,
}

impl Mesh {
    pub async fn start(limits: Limits) -> Mesh {
        Mesh::start_edited(limits, |_| {}).await
    }

    /// [`Mesh::start`] with the model changed by `edit` first.
    pub async fn start_edited(limits: Limits, edit: impl FnOnce(&mut MeshConfig)) -> Mesh {
        let ca = Arc::new(TestCa::new());
        let ips = endpoint_ips();
        let upstream_peers = Arc::new(Mutex::new(Vec::new()));
        for (ip, name) in [(ips[0], "echo-1"), (ips[1], "echo-2"), (ips[2], "direct-0")] {
            start_app(SocketAddr::new(ip, APP_PORT), name).await;
            start_ztunnel(&ca, ip, upstream_peers.clone()).await;
        }
        // Outside the mesh: the app alone, no ztunnel.
        start_app(SocketAddr::new(ips[3], APP_PORT), "legacy-0").await;
        let mut config = model(ips);
        edit(&mut config);
        let td = TrustDomain::default();
        let state = MeshState::build(&config, &td).unwrap();
        let snapshot = ModelSnapshot {
            state: Arc::new(state),
            config: Arc::new(config),
            ..ModelSnapshot::empty(&td)
        };
        let (_model_tx, model) = tokio::sync::watch::channel(snapshot);
        // Kept alive with the mesh: the waypoint's model never changes in these tests.
        std::mem::forget(_model_tx);
        let certs = Arc::new(CertificateManager::new(
            Arc::new(SigningSource {
                ca: ca.clone(),
                requests: Mutex::new(Vec::new()),
            }),
            Arc::new(SystemClock),
            ManagerConfig::default(),
        ));
        let listen = || async { TcpListener::bind("127.0.0.1:0").await.unwrap() };
        let (hbone, admin, metrics, readiness) = (
            listen().await,
            listen().await,
            listen().await,
            listen().await,
        );
        let addrs = (
            hbone.local_addr().unwrap(),
            admin.local_addr().unwrap(),
            metrics.local_addr().unwrap(),
            readiness.local_addr().unwrap(),
        );
        let parts = Parts {
            gateway: "shop/waypoint".parse().unwrap(),
            identity: SpiffeId::parse(WAYPOINT).unwrap(),
            trust_domain: td,
            certs,
            model,
            xds_metrics: Default::default(),
            model_synced: Box::pin(async {}),
            hbone,
            admin,
            metrics,
            readiness,
            limits,
            detection_timeout: Duration::from_millis(300),
            instance_ip: Some("127.0.0.1".parse().unwrap()),
            drain_deadline: Duration::from_secs(1),
            logging: LogLevel::new("info", Box::new(|_| Ok(()))),
            authn: Default::default(),
        };
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            app::serve(parts, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
            .unwrap();
        });
        let mesh = Mesh {
            ca,
            ips,
            hbone: addrs.0,
            admin: addrs.1,
            metrics: addrs.2,
            readiness: addrs.3,
            upstream_peers,
            stop,
        };
        mesh.wait_ready().await;
        mesh
    }

    /// Polls readiness until 200, with a deadline.
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = http_get(self.readiness, "/healthz/ready").await;
            if status == 200 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "waypoint never became ready: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// An HBONE connection to the waypoint as the client ztunnel would open it.
    pub async fn client(&self) -> HboneConnection {
        self.client_as(CLIENT).await
    }

    /// An HBONE connection to the waypoint as the client ztunnel of `identity`.
    pub async fn client_as(&self, identity: &str) -> HboneConnection {
        let cert = self.ca.issue(identity);
        let config = tls::client_config(
            Some(&cert),
            cert.roots(),
            [SpiffeId::parse(WAYPOINT).unwrap()],
        )
        .unwrap();
        let tcp = TcpStream::connect(self.hbone).await.unwrap();
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("waypoint.invalid").unwrap(), tcp)
            .await
            .unwrap();
        HboneConnection::handshake(tls, H2Settings::default())
            .await
            .unwrap()
    }
}

/// A CONNECT to `target` as the client ztunnel sends it.
pub async fn connect(conn: &HboneConnection, target: &str) -> Result<Tunnel, TunnelError> {
    conn.connect(&OutboundRequest {
        target: HboneTarget::parse_authority(target).unwrap(),
        forwarded: Forwarded {
            for_addr: "10.1.0.5:40000".parse().unwrap(),
            host: Some("echo.shop.svc.cluster.local".into()),
        },
        baggage: Baggage::default(),
        traceparent: None,
    })
    .await
}

/// A GET on a plain HTTP/1 operations port.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(tcp) = TcpStream::connect(addr).await else {
        return (0, "not listening".into());
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(
            Request::get(path)
                .header("host", "localhost")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The endpoint's ztunnel: HBONE on `ip:15008` with the endpoint's certificate,
/// relaying each tunnel to its target, recording who opened it.
async fn start_ztunnel(ca: &TestCa, ip: IpAddr, peers: Arc<Mutex<Vec<(SpiffeId, HboneTarget)>>>) {
    let cert = ca.issue(ECHO);
    let server_tls = tls::server_config(
        CertSlot::new(&cert),
        cert.roots(),
        ClientAuth::Required(TrustDomain::default()),
    )
    .unwrap();
    let listener = TcpListener::bind(SocketAddr::new(ip, 15008)).await.unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, peer_addr) = listener.accept().await.unwrap();
            let (server_tls, peers) = (server_tls.clone(), peers.clone());
            tokio::spawn(async move {
                let (tls, peer) =
                    ambit_net::hbone::server::accept_tls(&server_tls, tcp, Duration::from_secs(5))
                        .await
                        .unwrap();
                let _ = serve_connection(
                    tls,
                    peer,
                    peer_addr,
                    H2Settings::default(),
                    Relay { peers },
                    std::future::pending(),
                )
                .await;
            });
        }
    });
}

#[derive(Clone)]
struct Relay {
    peers: Arc<Mutex<Vec<(SpiffeId, HboneTarget)>>>,
}

impl InboundHandler for Relay {
    type Upstream = TcpStream;
    type Tunnel = ();

    async fn connect(&self, request: &InboundRequest) -> Result<(TcpStream, ()), ConnectRefusal> {
        self.peers
            .lock()
            .unwrap()
            .push((request.peer.clone(), request.target));
        let app = TcpStream::connect(request.target.addr())
            .await
            .map_err(|e| ConnectRefusal::UpstreamConnect {
                target: request.target,
                reason: e.to_string(),
            })?;
        Ok((app, ()))
    }

    fn finished(&self, (): (), _outcome: TunnelOutcome) {}
    fn refused(&self, _request: Option<&InboundRequest>, _refusal: &ConnectRefusal) {}
}

type AppBody = BoxBody<Bytes, hyper::Error>;

/// The app behind an endpoint (HTTP/1.1 and HTTP/2): `/name` answers its name and
/// what it saw; `/echo` streams the request body back; `/grpc` answers a message
/// and trailers; `/slow` answers after 2 s; an `Upgrade` is answered 101 and echoed.
async fn start_app(addr: SocketAddr, name: &'static str) {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| app(name, request));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
}

/// What the test apps' `/sink` saw, each line prefixed by the app's name.
static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn seen_log(line: String) {
    SEEN.lock().unwrap().push(line);
}

/// The apps' log lines containing `marker`.
pub fn seen(marker: &str) -> Vec<String> {
    SEEN.lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(marker))
        .cloned()
        .collect()
}

fn full(body: impl Into<Bytes>) -> AppBody {
    Full::new(body.into()).map_err(|n| match n {}).boxed()
}

async fn app(
    name: &'static str,
    mut request: Request<Incoming>,
) -> Result<Response<AppBody>, Infallible> {
    let seen = |r: &Request<Incoming>| {
        let h = |n: &str| {
            r.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        format!(
            "{name} {:?} host={} tp={} rid={} authority={} path={} xff={}",
            r.version(),
            h("host"),
            h("traceparent"),
            h("x-request-id"),
            r.uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or("-".into()),
            r.uri().path_and_query().map_or("-", |p| p.as_str()),
            h("x-forwarded-for")
        )
    };
    if request.headers().contains_key("upgrade") {
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("upgrade", "echo")
            .header("connection", "upgrade")
            .body(full(""))
            .unwrap();
        return Ok(response);
    }
    let header = |r: &Request<Incoming>, n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let response = match request.uri().path() {
        "/echo" => Response::new(request.into_body().boxed()),
        // Every request header, one `name: value` per line.
        "/headers" => {
            let lines: Vec<String> = request
                .headers()
                .iter()
                .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap_or("?")))
                .collect();
            Response::builder()
                .header("x-app", name)
                .body(full(lines.join("\n")))
                .unwrap()
        }
        // Reads the whole body and records the request in the app's log; a copy
        // (`-shadow` host) asked to stall never reads its body.
        "/sink" => {
            let host = header(&request, "host");
            let authority = request.uri().authority().map(|a| a.to_string());
            let host = authority.unwrap_or(host);
            if host.contains("-shadow") && request.headers().contains_key("x-stall-shadow") {
                seen_log(format!("{name} {} stalled host={host}", request.method()));
                tokio::time::sleep(Duration::from_secs(60)).await;
                return Ok(Response::new(full("stalled")));
            }
            let method = request.method().clone();
            let bytes = request
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .map_err(|e| e.to_string());
            seen_log(format!("{name} {method} /sink host={host} body={bytes:?}"));
            Response::new(full(format!("got {bytes:?}")))
        }
        // echo-1 fails with the status named in the path; echo-2 answers 200.
        // Each request is logged.
        "/flaky/503" | "/flaky/500" | "/always/500" => {
            let path = request.uri().path().to_owned();
            seen_log(format!("{name} {path}"));
            let failing = name == "echo-1" || path.starts_with("/always");
            let status = match (failing, path.ends_with("503")) {
                (false, _) => StatusCode::OK,
                (true, true) => StatusCode::SERVICE_UNAVAILABLE,
                (true, false) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            Response::builder().status(status).body(full(name)).unwrap()
        }
        // echo-1 answers 503, echo-2 200; each request is logged.
        p if p.starts_with("/dr/") => {
            seen_log(format!("{name} {p}"));
            let status = if name == "echo-1" {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            Response::builder().status(status).body(full(name)).unwrap()
        }
        // The app's log of `/sink` requests.
        "/seen" => Response::new(full(
            SEEN.lock()
                .unwrap()
                .iter()
                .filter(|l| l.starts_with(name))
                .cloned()
                .collect::<Vec<_>>()
                .join("\n"),
        )),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Response::new(full("slow"))
        }
        "/grpc" => {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            trailers.insert("grpc-message", "done".parse().unwrap());
            let frames: Vec<Result<Frame<Bytes>, hyper::Error>> = vec![
                Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
                Ok(Frame::trailers(trailers)),
            ];
            let body = StreamBody::new(futures::stream::iter(frames));
            Response::builder()
                .header("content-type", "application/grpc")
                .body(BodyExt::boxed(body))
                .unwrap()
        }
        _ => Response::new(full(seen(&request))),
    };
    Ok(response)
}

pub type Sender1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// An HTTP/1.1 client inside a tunnel to `target`.
pub async fn http1_client(conn: &HboneConnection, target: &str) -> Sender1 {
    let tunnel = connect(conn, target).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel.stream))
        .await
        .unwrap();
    let open = tunnel.open;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
        drop(open);
    });
    sender
}

/// An HTTP/2 client (prior knowledge) inside a tunnel to `target`.
pub async fn http2_client<B>(
    conn: &HboneConnection,
    target: &str,
) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tunnel = connect(conn, target).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tunnel.stream))
            .await
            .unwrap();
    let open = tunnel.open;
    tokio::spawn(async move {
        let _ = connection.await;
        drop(open);
    });
    sender
}

/// A body's bytes.
pub async fn text(response: Response<Incoming>) -> String {
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}
