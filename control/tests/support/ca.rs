//! The CA as a node agent or a workload calls it, for the control plane's tests.
// Each test binary uses its own part of this.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use ambit_core::SpiffeId;
use ambit_net::ca_client::{
    CaClientConfig, CertificateSource, FetchError, FetchRequest, GrpcCaClient,
};
use ambit_net::cert_manager::new_key_and_csr;
use rustls_pki_types::CertificateDer;

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
        roots,
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
        roots,
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
