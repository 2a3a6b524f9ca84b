//! Helpers shared by the CA's integration tests. Certificates are made at test time.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use ambit_net::token::BearerToken;
use std::time::{Duration, SystemTime};

use ambit_ca::authority::CertificateAuthority;
use ambit_ca::store::CaMaterial;
use ambit_core::certificate::{Caller, ValidityLimits};
use ambit_core::{SpiffeId, TrustDomain};
use ambit_net::cert_manager::new_key_and_csr;
use ambit_net::tls::WorkloadCert;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

pub const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
pub const PAY: &str = "spiffe://cluster.local/ns/shop/sa/pay";
pub const ZTUNNEL: &str = "spiffe://cluster.local/ns/ambit-system/sa/ztunnel";
pub const CONTROL: &str = "spiffe://cluster.local/ns/ambit-system/sa/ambit-control";

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

pub fn now() -> SystemTime {
    SystemTime::now()
}

pub fn root_material() -> CaMaterial {
    CertificateAuthority::generate_root(&TrustDomain::default(), now()).unwrap()
}

pub fn ca_from(material: &CaMaterial) -> CertificateAuthority {
    CertificateAuthority::from_material(
        material,
        TrustDomain::default(),
        ValidityLimits::default(),
        now(),
    )
    .unwrap()
}

pub fn new_ca() -> CertificateAuthority {
    ca_from(&root_material())
}

pub fn workload(identity: &str) -> Caller {
    Caller {
        identity: id(identity),
        node_agent: false,
        node: None,
    }
}

pub fn node_agent() -> Caller {
    Caller {
        identity: id(ZTUNNEL),
        node_agent: true,
        node: Some("node-a".into()),
    }
}

/// (key PEM, CSR PEM) for `identity`, made the way the certificate manager makes them.
pub fn key_and_csr(identity: &str) -> (String, String) {
    new_key_and_csr(&id(identity)).unwrap()
}

/// Issues a certificate for `identity` at time `at` and returns it ready for TLS.
pub fn issue_at(
    ca: &CertificateAuthority,
    identity: &str,
    ttl_secs: i64,
    at: SystemTime,
) -> WorkloadCert {
    let (key, csr) = key_and_csr(identity);
    let chain = ca
        .create_certificate(&workload(identity), &csr, ttl_secs, None, at)
        .unwrap();
    WorkloadCert::from_pem(&chain, &key, None).unwrap()
}

pub fn issue(ca: &CertificateAuthority, identity: &str) -> WorkloadCert {
    issue_at(ca, identity, 3600, now())
}

pub fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

pub fn secs_between(a: SystemTime, b: SystemTime) -> i64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

pub const HOUR: Duration = Duration::from_secs(3600);

pub const WORKLOAD_TOKEN: &str = "workload-token-0123456789";
pub const AGENT_TOKEN: &str = "node-agent-token-0123456789";

pub fn tokens_yaml() -> String {
    format!(
        "- token: \"{WORKLOAD_TOKEN}\"\n  identity: {CART}\n\
         - token: \"{AGENT_TOKEN}\"\n  identity: {ZTUNNEL}\n  nodeAgent: true\n  node: node-a\n"
    )
}

/// Client settings for a CA at `addr` whose root is in `root_dir`.
pub fn client_config(
    addr: std::net::SocketAddr,
    root_dir: &std::path::Path,
    token: Option<&str>,
    impersonate: bool,
) -> ambit_net::ca_client::CaClientConfig {
    let root_pem = std::fs::read_to_string(root_dir.join("root-cert.pem")).unwrap();
    ambit_net::ca_client::CaClientConfig {
        address: addr.to_string(),
        ca_identity: id(CONTROL),
        roots: vec![der(&root_pem)].into(),
        token: token.map(BearerToken::from),
        impersonate,
        timeout: Duration::from_secs(10),
    }
}

/// Asks the CA through `client` for `identity` with a fresh key; returns the raw chain.
pub async fn fetch_raw(
    client: &ambit_net::ca_client::GrpcCaClient,
    identity: &str,
    current: Option<WorkloadCert>,
) -> Result<Vec<String>, ambit_net::ca_client::FetchError> {
    use ambit_net::ca_client::{CertificateSource, FetchRequest};
    let (_, csr_pem) = key_and_csr(identity);
    client
        .fetch(FetchRequest {
            identity: id(identity),
            csr_pem,
            validity: HOUR,
            current,
        })
        .await
}
