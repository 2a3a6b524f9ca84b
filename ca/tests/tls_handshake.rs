//! Real TLS handshakes over loopback TCP between peers holding CA-issued certificates,
//! with the mesh's configs: what succeeds, and each way it must fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use ambit_core::TrustDomain;
use ambit_net::tls::{self, CertSlot, ClientAuth, WorkloadCert};
use rustls_pki_types::{CertificateDer, ServerName};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

#[derive(Debug)]
struct Outcome {
    /// Identity the server saw, from the client certificate.
    client_identity: Option<String>,
    version: Option<rustls::ProtocolVersion>,
    alpn: Option<Vec<u8>>,
    kx: Option<String>,
    /// Whether the server asked for another key share (HelloRetryRequest).
    retried: bool,
    /// The leaf certificate the server presented.
    server_leaf: CertificateDer<'static>,
}

/// Runs one handshake and a byte exchange; `Err` carries both sides' errors.
async fn handshake(
    server: &WorkloadCert,
    auth: ClientAuth,
    client: rustls::ClientConfig,
) -> Result<Outcome, String> {
    handshake_with(CertSlot::new(server), server.roots(), auth, client).await
}

async fn handshake_with(
    slot: Arc<CertSlot>,
    roots: &[CertificateDer<'static>],
    auth: ClientAuth,
    client: rustls::ClientConfig,
) -> Result<Outcome, String> {
    let server_cfg = tls::server_config(slot, roots, auth).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = server_cfg;
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor
            .accept(tcp)
            .await
            .map_err(|e| format!("server: {e}"))?;
        let id = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| tls::identity_of(c).unwrap().to_string());
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf)
            .await
            .map_err(|e| format!("server read: {e}"))?;
        tls.write_all(&buf)
            .await
            .map_err(|e| format!("server write: {e}"))?;
        tls.flush()
            .await
            .map_err(|e| format!("server flush: {e}"))?;
        Ok::<_, String>(id)
    });
    let client_side = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let connector = TlsConnector::from(Arc::new(client));
        let name = ServerName::try_from("ignored.invalid").unwrap();
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("client: {e}"))?;
        tls.write_all(b"ping")
            .await
            .map_err(|e| format!("client write: {e}"))?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf)
            .await
            .map_err(|e| format!("client read: {e}"))?;
        assert_eq!(&buf, b"ping");
        let conn = tls.get_ref().1;
        Ok::<_, String>((
            conn.protocol_version(),
            conn.alpn_protocol().map(|a| a.to_vec()),
            conn.negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name())),
            conn.peer_certificates().unwrap()[0].clone().into_owned(),
            conn.handshake_kind() == Some(rustls::HandshakeKind::FullWithHelloRetryRequest),
        ))
    };
    let client_result = tokio::time::timeout(Duration::from_secs(10), client_side)
        .await
        .expect("client side hung");
    let server_result = tokio::time::timeout(Duration::from_secs(10), server_side)
        .await
        .expect("server side hung")
        .unwrap();
    match (client_result, server_result) {
        (Ok((version, alpn, kx, server_leaf, retried)), Ok(client_identity)) => Ok(Outcome {
            client_identity,
            version,
            alpn,
            kx,
            retried,
            server_leaf,
        }),
        (c, s) => Err(format!("{:?} / {:?}", c.err(), s.err())),
    }
}

/// Whether `side` refused a chain that does not lead to its root. Independently
/// generated roots of one trust domain share a subject name, so path building finds
/// the other root by name and fails on its signature (BadSignature); a root with
/// another name is not found at all (UnknownIssuer).
fn untrusted(err: &str, side: &str) -> bool {
    err.contains(&format!("{side}: invalid peer certificate: UnknownIssuer"))
        || err.contains(&format!("{side}: invalid peer certificate: BadSignature"))
}

fn required() -> ClientAuth {
    ClientAuth::Required(TrustDomain::default())
}

fn mesh_client(
    cert: Option<&WorkloadCert>,
    roots: &[CertificateDer<'static>],
    expect: &str,
) -> rustls::ClientConfig {
    tls::client_config(cert, roots, [id(expect)]).unwrap()
}

#[tokio::test]
async fn mutual_tls_13_with_expected_identity_succeeds_with_pq_key_exchange() {
    let ca = new_ca();
    let server = issue(&ca, PAY);
    let client = issue(&ca, CART);
    let out = handshake(
        &server,
        required(),
        mesh_client(Some(&client), client.roots(), PAY),
    )
    .await
    .unwrap();
    assert_eq!(out.version, Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(out.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(out.kx.as_deref(), Some("X25519MLKEM768"));
    assert_eq!(out.client_identity.as_deref(), Some(CART));
}

#[tokio::test]
async fn client_accepts_any_of_several_expected_identities() {
    let ca = new_ca();
    let server = issue(&ca, PAY);
    let client = issue(&ca, CART);
    let cfg = tls::client_config(Some(&client), client.roots(), [id(ZTUNNEL), id(PAY)]).unwrap();
    handshake(&server, required(), cfg).await.unwrap();
}

#[tokio::test]
async fn wrong_expected_identity_fails_naming_both() {
    let ca = new_ca();
    let server = issue(&ca, PAY);
    let client = issue(&ca, CART);
    let err = handshake(
        &server,
        required(),
        mesh_client(Some(&client), client.roots(), ZTUNNEL),
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("peer identity spiffe://cluster.local/ns/shop/sa/pay is not the expected spiffe://cluster.local/ns/ambit-system/sa/ztunnel"),
        "{err}"
    );
}

#[tokio::test]
async fn server_from_untrusted_root_is_rejected() {
    let server = issue(&new_ca(), PAY);
    let mesh = new_ca();
    let client = issue(&mesh, CART);
    let err = handshake(
        &server,
        required(),
        mesh_client(Some(&client), client.roots(), PAY),
    )
    .await
    .unwrap_err();
    assert!(untrusted(&err, "client"), "{err}");
}

#[tokio::test]
async fn client_from_untrusted_root_is_rejected_by_server() {
    let ca = new_ca();
    let server = issue(&ca, PAY);
    let stranger = issue(&new_ca(), CART);
    // The client trusts the server's root but presents a certificate from another.
    let err = handshake(
        &server,
        required(),
        mesh_client(Some(&stranger), server.roots(), PAY),
    )
    .await
    .unwrap_err();
    assert!(untrusted(&err, "server"), "{err}");
}

#[tokio::test]
async fn expired_certificate_is_rejected() {
    let ca = new_ca();
    let expired = issue_at(&ca, PAY, 3600, now() - Duration::from_secs(2 * 86_400));
    let client = issue(&ca, CART);
    let err = handshake(
        &expired,
        required(),
        mesh_client(Some(&client), client.roots(), PAY),
    )
    .await
    .unwrap_err();
    assert!(err.contains("Expired"), "{err}");

    // And an expired client certificate is refused by the server.
    let server = issue(&ca, PAY);
    let old_client = issue_at(&ca, CART, 3600, now() - Duration::from_secs(2 * 86_400));
    let err = handshake(
        &server,
        required(),
        mesh_client(Some(&old_client), client.roots(), PAY),
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("server: invalid peer certificate: Expired"),
        "{err}"
    );
}

#[tokio::test]
async fn missing_client_certificate_fails_when_required_and_passes_when_optional() {
    let ca = new_ca();
    let server = issue(&ca, PAY);
    let err = handshake(&server, required(), mesh_client(None, server.roots(), PAY))
        .await
        .unwrap_err();
    assert!(err.contains("server: peer sent no certificates"), "{err}");

    let out = handshake(
        &server,
        ClientAuth::Optional(TrustDomain::default()),
        mesh_client(None, server.roots(), PAY),
    )
    .await
    .unwrap();
    assert_eq!(out.client_identity, None);
}

#[tokio::test]
async fn client_from_another_trust_domain_is_rejected() {
    let ca = new_ca();
    let server = issue(&ca, PAY);
    // Same root, but the server only admits peers of trust domain "other.org".
    let client = issue(&ca, CART);
    let err = handshake(
        &server,
        ClientAuth::Required(TrustDomain::parse("other.org").unwrap()),
        mesh_client(Some(&client), client.roots(), PAY),
    )
    .await
    .unwrap_err();
    assert!(err.contains("is not in trust domain other.org"), "{err}");
}

/// A verifier that accepts anything, so the only reason to fail is the TLS version.
#[derive(Debug)]
struct AcceptAll(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAll {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A mesh-verifying client whose `supported_groups` (and so its one key share) follow
/// `groups`.
fn client_with_groups(
    cert: &WorkloadCert,
    expect: &str,
    groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        kx_groups: groups,
        ..(*tls::provider()).clone()
    });
    let verifier = tls::PeerVerifier::for_servers(cert.roots(), &provider, [id(expect)]).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    config
}

/// Issue 12 item 3: a client that supports X25519MLKEM768 but leads with X25519 (its
/// only key share is X25519, as Istio's ztunnel sends) is asked for the hybrid share.
#[tokio::test]
async fn a_client_offering_the_hybrid_group_gets_it_even_with_only_an_x25519_share() {
    use rustls::crypto::aws_lc_rs::kx_group::{X25519, X25519MLKEM768};
    let ca = new_ca();
    let server = issue(&ca, PAY);
    let client = client_with_groups(&server, PAY, vec![X25519, X25519MLKEM768]);
    let out = handshake(
        &server,
        ClientAuth::Optional(TrustDomain::default()),
        client,
    )
    .await
    .unwrap();
    assert_eq!(out.kx.as_deref(), Some("X25519MLKEM768"));
    assert!(out.retried, "no HelloRetryRequest: {out:?}");

    // The mesh's own client leads with the hybrid share: no extra round trip.
    let cart = issue(&ca, CART);
    let out = handshake(
        &server,
        required(),
        mesh_client(Some(&cart), cart.roots(), PAY),
    )
    .await
    .unwrap();
    assert_eq!(out.kx.as_deref(), Some("X25519MLKEM768"));
    assert!(!out.retried, "{out:?}");
}

/// A client with no post-quantum group at all still connects, with X25519 (a decision:
/// see `ambit_net::tls`).
#[tokio::test]
async fn a_classical_only_client_still_gets_x25519() {
    use rustls::crypto::aws_lc_rs::kx_group::X25519;
    let ca = new_ca();
    let server = issue(&ca, PAY);
    let client = client_with_groups(&server, PAY, vec![X25519]);
    let out = handshake(
        &server,
        ClientAuth::Optional(TrustDomain::default()),
        client,
    )
    .await
    .unwrap();
    assert_eq!(out.kx.as_deref(), Some("X25519"));
}

#[tokio::test]
async fn tls12_only_client_is_refused() {
    let ca = new_ca();
    let server = issue(&ca, PAY);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAll(provider)))
        .with_no_client_auth();
    let err = handshake(
        &server,
        ClientAuth::Optional(TrustDomain::default()),
        client,
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("ProtocolVersion") || err.contains("protocol version"),
        "{err}"
    );
}

#[tokio::test]
async fn replaced_server_certificate_is_presented_by_new_handshakes() {
    let ca = new_ca();
    let first = issue(&ca, PAY);
    let second = issue(&ca, PAY);
    let client = issue(&ca, CART);
    let slot = CertSlot::new(&first);
    let cfg = || mesh_client(Some(&client), client.roots(), PAY);
    let out = handshake_with(slot.clone(), first.roots(), required(), cfg())
        .await
        .unwrap();
    assert_eq!(out.server_leaf, first.chain()[0]);
    slot.replace(&second);
    let out = handshake_with(slot, first.roots(), required(), cfg())
        .await
        .unwrap();
    assert_eq!(out.server_leaf, second.chain()[0]);
}

/// Issue 19: Istio's ztunnel checks the CA's serving certificate against the host in
/// `CA_ADDRESS` with the Web PKI rules. Reached by an address given with `--ip-san`,
/// the certificate verifies; by another address, it does not; its DNS names still do.
#[test]
fn the_serving_certificate_verifies_by_the_ip_addresses_it_was_given() {
    let ca = new_ca();
    let identity = id("spiffe://cluster.local/ns/ambit-system/sa/ambit-control");
    let names = [
        "ambit-control.ambit-system.svc".to_owned(),
        "127.0.0.1".to_owned(),
        "fd00::7".to_owned(),
    ];
    let cert = ambit_ca::server::serving_cert(&ca, &identity, &names, now()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for root in cert.roots() {
        roots.add(root.clone()).unwrap();
    }
    use rustls::client::danger::ServerCertVerifier;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
    )
    .build()
    .unwrap();
    let (leaf, intermediates) = cert.chain().split_first().unwrap();
    let verify = |name: &str| {
        let name = ServerName::try_from(name.to_owned()).unwrap();
        verifier
            .verify_server_cert(
                leaf,
                intermediates,
                &name,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    for ok in ["127.0.0.1", "fd00::7", "ambit-control.ambit-system.svc"] {
        assert_eq!(verify(ok), Ok(()), "{ok}");
    }
    for bad in ["127.0.0.2", "10.0.0.1", "ambit-control"] {
        let e = verify(bad).unwrap_err();
        assert!(e.contains("not valid for name"), "{bad}: {e}");
    }
}
