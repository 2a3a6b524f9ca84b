//! Certificate verification by SPIFFE identity: the chain must reach a mesh root
//! (webpki path building, validity, key usage), and the leaf's single URI SAN is the
//! peer's identity. Host names play no part.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit_core::{IdentityError, SpiffeId, TrustDomain};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::TrustAnchor;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use super::TlsError;

/// Why a certificate does not name exactly one valid SPIFFE identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertIdentityError {
    #[error("certificate is not valid DER X.509: {0}")]
    Malformed(String),
    #[error("certificate has no URI SAN naming a SPIFFE identity")]
    NoUriSan,
    #[error("certificate has {0} URI SANs; a mesh certificate has exactly one")]
    SeveralUriSans(usize),
    #[error("certificate's URI SAN is not a mesh identity: {0}")]
    BadIdentity(#[from] IdentityError),
}

/// The SPIFFE identity in a certificate's single URI SAN. DNS names are ignored.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, CertIdentityError> {
    let (_, x509) =
        X509Certificate::from_der(cert).map_err(|e| CertIdentityError::Malformed(e.to_string()))?;
    let mut uris = Vec::new();
    for ext in x509.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push(*uri);
                }
            }
        }
    }
    match uris.as_slice() {
        [] => Err(CertIdentityError::NoUriSan),
        [uri] => Ok(SpiffeId::parse(uri)?),
        several => Err(CertIdentityError::SeveralUriSans(several.len())),
    }
}

/// NotBefore and NotAfter of a certificate.
pub(crate) fn validity_of(
    cert: &CertificateDer<'_>,
) -> Result<(SystemTime, SystemTime), CertIdentityError> {
    let (_, x509) =
        X509Certificate::from_der(cert).map_err(|e| CertIdentityError::Malformed(e.to_string()))?;
    let to_system = |secs: i64| {
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    let v = x509.validity();
    Ok((
        to_system(v.not_before.timestamp()),
        to_system(v.not_after.timestamp()),
    ))
}

/// What the verifier accepts as the peer's identity.
#[derive(Debug, Clone)]
enum Accept {
    /// Servers: exactly these identities.
    OneOf(BTreeSet<SpiffeId>),
    /// Clients: any identity in this trust domain.
    TrustDomain(TrustDomain),
}

/// Verifies mesh peers: chain to a mesh root, then identity.
pub struct PeerVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
    accept: Accept,
    mandatory: bool,
}

impl fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerVerifier")
            .field("anchors", &self.anchors.len())
            .field("accept", &self.accept)
            .field("mandatory", &self.mandatory)
            .finish()
    }
}

/// A rejection with a message naming what was wrong, carried through rustls.
#[derive(Debug)]
struct Rejected(String);

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Rejected {}

fn reject(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Rejected(msg)))))
}

impl PeerVerifier {
    /// For a client: the server must present one of `expected`.
    pub fn for_servers(
        roots: &[CertificateDer<'static>],
        provider: &CryptoProvider,
        expected: impl IntoIterator<Item = SpiffeId>,
    ) -> Result<Self, TlsError> {
        Ok(PeerVerifier {
            anchors: anchors(roots)?,
            algorithms: provider.signature_verification_algorithms,
            accept: Accept::OneOf(expected.into_iter().collect()),
            mandatory: true,
        })
    }

    /// For a server: a client certificate must be from `trust_domain`; whether one is
    /// required at all is `mandatory`.
    pub fn for_clients(
        roots: &[CertificateDer<'static>],
        provider: &CryptoProvider,
        trust_domain: TrustDomain,
        mandatory: bool,
    ) -> Result<Self, TlsError> {
        Ok(PeerVerifier {
            anchors: anchors(roots)?,
            algorithms: provider.signature_verification_algorithms,
            accept: Accept::TrustDomain(trust_domain),
            mandatory,
        })
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let cert = EndEntityCert::try_from(end_entity).map_err(|e| map_webpki(e, "parse"))?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| map_webpki(e, "verify chain"))?;
        let identity = identity_of(end_entity).map_err(|e| reject(format!("peer {e}")))?;
        match &self.accept {
            Accept::OneOf(expected) if !expected.contains(&identity) => {
                let list: Vec<String> = expected.iter().map(|i| i.to_string()).collect();
                Err(reject(format!(
                    "peer identity {identity} is not the expected {}",
                    list.join(" or ")
                )))
            }
            Accept::TrustDomain(td) if !identity.in_trust_domain(td) => Err(reject(format!(
                "peer identity {identity} is not in trust domain {td}"
            ))),
            _ => Ok(identity),
        }
    }
}

fn anchors(roots: &[CertificateDer<'static>]) -> Result<Vec<TrustAnchor<'static>>, TlsError> {
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    roots
        .iter()
        .enumerate()
        .map(|(index, der)| {
            webpki::anchor_from_trusted_cert(der)
                .map(|a| a.to_owned())
                .map_err(|e| TlsError::BadRoot {
                    index,
                    reason: e.to_string(),
                })
        })
        .collect()
}

fn map_webpki(e: webpki::Error, stage: &str) -> rustls::Error {
    use webpki::Error as W;
    let kind = match e {
        W::BadDer | W::BadDerTime => CertificateError::BadEncoding,
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        W::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => return reject(format!("cannot {stage} peer certificate: {other:?}")),
    };
    rustls::Error::InvalidCertificate(kind)
}

/// The handshake-signature methods that `ServerCertVerifier` and `ClientCertVerifier`
/// both require, written once: whichever side the peer is on, its signature is checked
/// with the provider's algorithms. Expands inside each of the two impls below.
macro_rules! handshake_signature_methods {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(message, cert, dss, &self.algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    };
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now, KeyUsage::server_auth())
            .map(|_| ServerCertVerified::assertion())
    }

    handshake_signature_methods!();
}

impl ClientCertVerifier for PeerVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now, KeyUsage::client_auth())
            .map(|_| ClientCertVerified::assertion())
    }

    handshake_signature_methods!();
}
