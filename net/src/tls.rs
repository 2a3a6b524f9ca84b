//! TLS for the mesh: rustls with aws-lc-rs, TLS 1.3 only, ALPN `h2`, the post-quantum
//! hybrid X25519MLKEM768 key exchange preferred with X25519 as fallback, and peers
//! authenticated by SPIFFE identity rather than host name.
//!
//! The server gets the hybrid group from every client that supports it
//! ([`ServerTls::accept`]): rustls alone takes the first group of the client's
//! `supported_groups` it knows, so a client listing X25519 first (or sending only an
//! X25519 key share while listing both, as Istio's ztunnel does) would settle for
//! classical X25519. A client that does not offer X25519MLKEM768 at all still gets
//! X25519: the mesh's own clients always offer it, and refusing would cut off foreign
//! clients without post-quantum support rather than protect a mesh hop.
//!
//! Two verifiers: the client checks that the server's chain reaches the mesh root and
//! that its URI SAN is one of the identities it expects for that destination (DNS
//! names are ignored); the server checks that a client's chain reaches the mesh root
//! and that its identity is in the mesh's trust domain, with the client certificate
//! either required (HBONE) or optional (the CA, where a first request carries only a
//! token).

mod verify;

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use ambit_core::{SpiffeId, TrustDomain};
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, NamedGroup, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

pub use verify::{identity_of, CertIdentityError, PeerVerifier};

/// ALPN protocol spoken over every mesh TLS connection.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate chain is empty")]
    EmptyChain,
    #[error("certificate {index} of the chain is not valid PEM: {reason}")]
    BadCertificatePem { index: usize, reason: String },
    #[error("private key is not valid PEM: {0}")]
    BadKeyPem(String),
    #[error("private key is not usable for TLS: {0}")]
    UnusableKey(rustls::Error),
    #[error("no trusted root certificates given")]
    NoRoots,
    #[error("root certificate {index} cannot be a trust anchor: {reason}")]
    BadRoot { index: usize, reason: String },
    #[error("leaf certificate: {0}")]
    LeafIdentity(#[from] CertIdentityError),
    #[error("cannot build TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The crypto provider for every mesh connection: aws-lc-rs with TLS 1.3 cipher
/// suites only and X25519MLKEM768 preferred over X25519.
pub fn provider() -> Arc<CryptoProvider> {
    let base = aws_lc_rs::default_provider();
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
            aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
            aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        kx_groups: vec![
            aws_lc_rs::kx_group::X25519MLKEM768,
            aws_lc_rs::kx_group::X25519,
        ],
        ..base
    })
}

/// A workload's certificate and key, plus the roots it trusts: what a proxy needs to
/// speak mTLS as that workload.
#[derive(Clone)]
pub struct WorkloadCert {
    identity: SpiffeId,
    certified: Arc<CertifiedKey>,
    roots: Arc<[CertificateDer<'static>]>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.certified.cert.len())
            .finish()
    }
}

/// The mesh root certificate(s) in the PEM file `path` (a component's `--ca-root`):
/// at least one, or an error naming the file and what is wrong with it.
pub fn read_roots(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    if roots.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(roots)
}

impl WorkloadCert {
    /// Builds from a CA response (`chain_pems`: leaf first, root last; the last element
    /// is taken as a root unless `roots` are given) and the PEM private key.
    pub fn from_pem(
        chain_pems: &[String],
        key_pem: &str,
        roots: Option<Vec<CertificateDer<'static>>>,
    ) -> Result<Self, TlsError> {
        let mut chain = Vec::new();
        for (index, pem) in chain_pems.iter().enumerate() {
            for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                chain.push(der.map_err(|e| TlsError::BadCertificatePem {
                    index,
                    reason: e.to_string(),
                })?);
            }
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::BadKeyPem(e.to_string()))?;
        let roots = match roots {
            Some(roots) => roots,
            None if chain.len() > 1 => vec![chain[chain.len() - 1].clone()],
            None => return Err(TlsError::NoRoots),
        };
        // The root is a trust anchor, not part of what we present.
        while chain.len() > 1 && chain.last().is_some_and(|c| roots.contains(c)) {
            chain.pop();
        }
        Self::from_der(chain, key, roots)
    }

    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, TlsError> {
        let leaf = chain.first().ok_or(TlsError::EmptyChain)?;
        if roots.is_empty() {
            return Err(TlsError::NoRoots);
        }
        let identity = identity_of(leaf)?;
        let (not_before, not_after) = verify::validity_of(leaf)?;
        let signing_key = provider()
            .key_provider
            .load_private_key(key)
            .map_err(TlsError::UnusableKey)?;
        Ok(WorkloadCert {
            identity,
            certified: Arc::new(CertifiedKey::new(chain, signing_key)),
            roots: roots.into(),
            not_before,
            not_after,
        })
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Certificates presented to peers: leaf first, then intermediates.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    /// Time left before expiry at `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or(Duration::ZERO)
    }
}

/// A server certificate that can be replaced while the server runs (rotation): new
/// handshakes pick up the new certificate, established connections are unaffected.
#[derive(Debug)]
pub struct CertSlot {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertSlot {
    pub fn new(cert: &WorkloadCert) -> Arc<Self> {
        Arc::new(CertSlot {
            current: RwLock::new(cert.certified_key()),
        })
    }

    pub fn replace(&self, cert: &WorkloadCert) {
        let mut slot = self.current.write().unwrap_or_else(|p| p.into_inner());
        *slot = cert.certified_key();
    }

    fn get(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// What a server requires of its clients.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    /// A client certificate chaining to the mesh root, from this trust domain (HBONE).
    Required(TrustDomain),
    /// As `Required` when a certificate is presented, but a client may present none
    /// (the CA, where a first request authenticates with a token instead).
    Optional(TrustDomain),
}

/// A mesh TLS server presenting the certificate in `slot`, trusting `roots`.
pub fn server_config(
    slot: Arc<CertSlot>,
    roots: &[CertificateDer<'static>],
    client_auth: ClientAuth,
) -> Result<ServerTls, TlsError> {
    let classical = provider();
    let hybrid = Arc::new(CryptoProvider {
        kx_groups: vec![aws_lc_rs::kx_group::X25519MLKEM768],
        ..(*classical).clone()
    });
    Ok(ServerTls {
        hybrid: Arc::new(one_server_config(
            hybrid,
            slot.clone(),
            roots,
            client_auth.clone(),
        )?),
        classical: Arc::new(one_server_config(classical, slot, roots, client_auth)?),
    })
}

/// The server side of mesh TLS: [`ServerTls::accept`] picks the configuration by
/// what the client offers.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// For clients offering X25519MLKEM768: that group alone, so one that sent only an
    /// X25519 key share is asked for a hybrid one (HelloRetryRequest).
    hybrid: Arc<ServerConfig>,
    /// For clients that do not offer it: X25519.
    classical: Arc<ServerConfig>,
}

impl ServerTls {
    /// Runs the server handshake on `io`: with X25519MLKEM768 whenever the client's
    /// `supported_groups` lists it, whatever its key shares and their order.
    pub async fn accept<IO>(&self, io: IO) -> std::io::Result<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let start = LazyConfigAcceptor::new(Acceptor::default(), io).await?;
        let config = if offers_hybrid(&start.client_hello()) {
            &self.hybrid
        } else {
            &self.classical
        };
        start.into_stream(config.clone()).await
    }
}

fn offers_hybrid(hello: &ClientHello<'_>) -> bool {
    hello
        .named_groups()
        .is_some_and(|groups| groups.contains(&NamedGroup::X25519MLKEM768))
}

fn one_server_config(
    provider: Arc<CryptoProvider>,
    slot: Arc<CertSlot>,
    roots: &[CertificateDer<'static>],
    client_auth: ClientAuth,
) -> Result<ServerConfig, TlsError> {
    let (trust_domain, mandatory) = match client_auth {
        ClientAuth::Required(td) => (td, true),
        ClientAuth::Optional(td) => (td, false),
    };
    let verifier = PeerVerifier::for_clients(roots, &provider, trust_domain, mandatory)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(slot);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Mesh clients make a configuration per connection and never resume, so tickets
    // would cost every handshake a message and the server nothing but work.
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Client configuration that accepts only a server whose identity is in `expected`,
/// presenting `cert` as the client certificate when given.
pub fn client_config(
    cert: Option<&WorkloadCert>,
    roots: &[CertificateDer<'static>],
    expected: impl IntoIterator<Item = SpiffeId>,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = PeerVerifier::for_servers(roots, &provider, expected)?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match cert {
        Some(cert) => builder.with_client_cert_resolver(Arc::new(ClientCert(cert.certified_key()))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // A configuration serves one connection (its expected identities are that
    // destination's), so a resumption cache would never be used; left enabled it is
    // a 13 KiB allocation that every pooled connection keeps.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Presents one fixed certificate as the client certificate.
#[derive(Debug)]
struct ClientCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
