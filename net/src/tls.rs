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
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

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

/// Hex SHA-256 of a certificate's DER: how the admin endpoints name roots.
pub fn sha256_hex(cert: &CertificateDer<'_>) -> String {
    ::aws_lc_rs::digest::digest(&::aws_lc_rs::digest::SHA256, cert.as_ref())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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

/// The mesh roots a client of the control plane trusts: fixed, or the PEM file of a
/// component's `--ca-root` read again for every new connection, so a trust bundle
/// published there (the ConfigMap `istio-ca-root-cert` in a cluster) is picked up
/// without a restart. A file that cannot be read keeps the roots read before.
#[derive(Debug, Clone)]
pub struct TrustSource {
    path: Option<std::path::PathBuf>,
    last: Arc<RwLock<Vec<CertificateDer<'static>>>>,
}

impl TrustSource {
    /// Reads `path` now; an error names the file and what is wrong with it.
    pub fn file(path: &std::path::Path) -> Result<Self, String> {
        let roots = read_roots(path)?;
        Ok(TrustSource {
            path: Some(path.to_owned()),
            last: Arc::new(RwLock::new(roots)),
        })
    }

    /// The roots now.
    pub fn current(&self) -> Vec<CertificateDer<'static>> {
        if let Some(path) = &self.path {
            match read_roots(path) {
                Ok(roots) => {
                    let mut last = self.last.write().unwrap_or_else(|p| p.into_inner());
                    if *last != roots {
                        tracing::info!(file = %path.display(), roots = roots.len(), "mesh roots changed");
                        last.clone_from(&roots);
                    }
                    return roots;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the mesh roots; keeping the ones read before")
                }
            }
        }
        self.last.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl From<Vec<CertificateDer<'static>>> for TrustSource {
    fn from(roots: Vec<CertificateDer<'static>>) -> Self {
        TrustSource {
            path: None,
            last: Arc::new(RwLock::new(roots)),
        }
    }
}

impl WorkloadCert {
    /// Builds from a CA response (`chain_pems`: leaf first, then intermediates, and
    /// last the trust bundle: one element holding every mesh root, as Istio's CA
    /// answers) and the PEM private key. The last element is taken as the roots unless
    /// `roots` are given; a lone element holding several certificates ends with its
    /// root.
    pub fn from_pem(
        chain_pems: &[String],
        key_pem: &str,
        roots: Option<Vec<CertificateDer<'static>>>,
    ) -> Result<Self, TlsError> {
        let mut elements = Vec::new();
        for (index, pem) in chain_pems.iter().enumerate() {
            let mut certs = Vec::new();
            for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                certs.push(der.map_err(|e| TlsError::BadCertificatePem {
                    index,
                    reason: e.to_string(),
                })?);
            }
            elements.push(certs);
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::BadKeyPem(e.to_string()))?;
        let roots = match roots {
            Some(roots) => roots,
            None if elements.len() > 1 => elements.last().cloned().unwrap_or_default(),
            None => match elements.first() {
                Some(only) if only.len() > 1 => vec![only[only.len() - 1].clone()],
                _ => return Err(TlsError::NoRoots),
            },
        };
        let mut chain: Vec<CertificateDer<'static>> = elements.into_iter().flatten().collect();
        // Roots are trust anchors, not part of what we present.
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

    /// The leaf's serial number, in hex (as `openssl x509 -serial` prints it).
    pub fn serial_hex(&self) -> Option<String> {
        let leaf = self.certified.cert.first()?;
        let (_, cert) = X509Certificate::from_der(leaf.as_ref()).ok()?;
        Some(
            cert.raw_serial()
                .iter()
                .map(|b| format!("{b:02X}"))
                .collect(),
        )
    }

    /// Certificates presented to peers: leaf first, then intermediates.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The root of the bundle the presented chain ends at: the one whose subject key
    /// identifier is the authority key identifier of the chain's last certificate.
    pub fn issuing_root(&self) -> Option<&CertificateDer<'static>> {
        let top = self.chain().last()?;
        let (_, top) = X509Certificate::from_der(top).ok()?;
        let wanted = top
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            })?;
        self.roots.iter().find(|root| {
            X509Certificate::from_der(root).is_ok_and(|(_, r)| {
                r.extensions().iter().any(|e| {
                    matches!(e.parsed_extension(),
                        ParsedExtension::SubjectKeyIdentifier(k) if k.0 == wanted.as_slice())
                })
            })
        })
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

/// A mesh TLS server presenting the certificate in `slot`, trusting `roots` until
/// [`ServerTls::trust`] changes them.
pub fn server_config(
    slot: Arc<CertSlot>,
    roots: &[CertificateDer<'static>],
    client_auth: ClientAuth,
) -> Result<ServerTls, TlsError> {
    let configs = ServerConfigs::build(&slot, roots, &client_auth)?;
    Ok(ServerTls {
        inner: Arc::new(ServerTlsInner {
            slot,
            client_auth,
            configs: RwLock::new(Arc::new(configs)),
        }),
    })
}

/// The server side of mesh TLS: [`ServerTls::accept`] picks the configuration by
/// what the client offers. Clones share their roots: [`ServerTls::trust`] on one is
/// seen by every clone's next handshake.
#[derive(Clone, Debug)]
pub struct ServerTls {
    inner: Arc<ServerTlsInner>,
}

#[derive(Debug)]
struct ServerTlsInner {
    slot: Arc<CertSlot>,
    client_auth: ClientAuth,
    configs: RwLock<Arc<ServerConfigs>>,
}

#[derive(Debug)]
struct ServerConfigs {
    roots: Vec<CertificateDer<'static>>,
    /// For clients offering X25519MLKEM768: that group alone, so one that sent only an
    /// X25519 key share is asked for a hybrid one (HelloRetryRequest).
    hybrid: Arc<ServerConfig>,
    /// For clients that do not offer it: X25519.
    classical: Arc<ServerConfig>,
}

impl ServerConfigs {
    fn build(
        slot: &Arc<CertSlot>,
        roots: &[CertificateDer<'static>],
        client_auth: &ClientAuth,
    ) -> Result<Self, TlsError> {
        let classical = provider();
        let hybrid = Arc::new(CryptoProvider {
            kx_groups: vec![aws_lc_rs::kx_group::X25519MLKEM768],
            ..(*classical).clone()
        });
        Ok(ServerConfigs {
            roots: roots.to_vec(),
            hybrid: Arc::new(one_server_config(
                hybrid,
                slot.clone(),
                roots,
                client_auth.clone(),
            )?),
            classical: Arc::new(one_server_config(
                classical,
                slot.clone(),
                roots,
                client_auth.clone(),
            )?),
        })
    }
}

impl ServerTls {
    /// Runs the server handshake on `io`: with X25519MLKEM768 whenever the client's
    /// `supported_groups` lists it, whatever its key shares and their order.
    pub async fn accept<IO>(&self, io: IO) -> std::io::Result<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let start = LazyConfigAcceptor::new(Acceptor::default(), io).await?;
        let configs = self
            .inner
            .configs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let config = if offers_hybrid(&start.client_hello()) {
            &configs.hybrid
        } else {
            &configs.classical
        };
        start.into_stream(config.clone()).await
    }

    /// Trusts `roots` for client certificates from the next handshake on (a new trust
    /// bundle, e.g. during a root rotation); established connections are unaffected.
    /// Returns whether they changed.
    pub fn trust(&self, roots: &[CertificateDer<'static>]) -> Result<bool, TlsError> {
        if self.roots() == roots {
            return Ok(false);
        }
        let configs = ServerConfigs::build(&self.inner.slot, roots, &self.inner.client_auth)?;
        *self
            .inner
            .configs
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(configs);
        Ok(true)
    }

    /// Presents `cert` and trusts its roots from the next handshake on.
    pub fn rotate(&self, cert: &WorkloadCert) -> Result<bool, TlsError> {
        self.inner.slot.replace(cert);
        self.trust(cert.roots())
    }

    /// The roots client certificates must chain to.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.inner
            .configs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .roots
            .clone()
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
