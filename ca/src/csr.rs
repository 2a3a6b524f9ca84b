//! Parsing a certificate signing request from an untrusted caller into what the CA
//! needs from it: the requested identity and the public key. Nothing else in a CSR is
//! trusted; the CA sets every other field of the certificate itself.

use ambit_core::{IdentityError, SpiffeId};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension};
use x509_parser::public_key::PublicKey;

/// Why a CSR is unusable. Each message names the problem for the caller to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is not a PEM \"CERTIFICATE REQUEST\" block: {0}")]
    NotPem(String),
    #[error("CSR is not valid DER PKCS#10: {0}")]
    Malformed(String),
    #[error("CSR has {0} bytes of trailing data after the request")]
    TrailingData(usize),
    #[error("CSR signature does not verify with the CSR's own public key")]
    BadSignature,
    #[error("CSR has no URI SAN; it must carry exactly one, the SPIFFE identity requested")]
    NoUriSan,
    #[error("CSR has {0} URI SANs; it must carry exactly one")]
    SeveralUriSans(usize),
    #[error("CSR carries a {kind} SAN {value:?}; only a single URI SAN is allowed")]
    OtherSan { kind: &'static str, value: String },
    #[error("CSR's URI SAN is not a valid identity: {0}")]
    BadIdentity(#[from] IdentityError),
    #[error("CSR public key is {0}; use ECDSA P-256 or P-384, or RSA of 2048 to 8192 bits")]
    UnsupportedKey(String),
}

/// The parts of a verified CSR the CA uses.
#[derive(Debug, Clone)]
pub struct ParsedCsr {
    pub identity: SpiffeId,
    /// DER SubjectPublicKeyInfo of the key to certify.
    pub public_key_der: Vec<u8>,
}

/// Parses and verifies a PEM CSR.
pub fn parse_csr(pem: &str) -> Result<ParsedCsr, CsrError> {
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CsrError::NotPem(e.to_string()))?;
    parse_csr_der(der.as_ref())
}

/// Parses and verifies a DER CSR.
pub fn parse_csr_der(der: &[u8]) -> Result<ParsedCsr, CsrError> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::TrailingData(rest.len()));
    }
    let info = &csr.certification_request_info;
    check_key(info)?;
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    let mut uris = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                let (kind, value) = match name {
                    GeneralName::URI(uri) => {
                        uris.push(*uri);
                        continue;
                    }
                    GeneralName::DNSName(d) => ("DNS", d.to_string()),
                    GeneralName::RFC822Name(e) => ("email", e.to_string()),
                    GeneralName::IPAddress(ip) => ("IP", format!("{ip:?}")),
                    other => ("other", format!("{other:?}")),
                };
                return Err(CsrError::OtherSan { kind, value });
            }
        }
    }
    let identity = match uris.as_slice() {
        [] => return Err(CsrError::NoUriSan),
        [uri] => SpiffeId::parse(uri)?,
        several => return Err(CsrError::SeveralUriSans(several.len())),
    };
    Ok(ParsedCsr {
        identity,
        public_key_der: info.subject_pki.raw.to_vec(),
    })
}

fn check_key(
    info: &x509_parser::certification_request::X509CertificationRequestInfo<'_>,
) -> Result<(), CsrError> {
    let spki = &info.subject_pki;
    let parsed = spki
        .parsed()
        .map_err(|e| CsrError::UnsupportedKey(format!("unparseable ({e})")))?;
    match parsed {
        PublicKey::EC(point) => {
            // Curve is the algorithm parameter: P-256 or P-384 only.
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            match curve.as_str() {
                "1.2.840.10045.3.1.7" | "1.3.132.0.34" => Ok(()),
                other => Err(CsrError::UnsupportedKey(format!(
                    "EC on curve {other} ({} bits)",
                    point.key_size()
                ))),
            }
        }
        PublicKey::RSA(rsa) => {
            let bits = rsa.key_size();
            if (2048..=8192).contains(&bits) {
                Ok(())
            } else {
                Err(CsrError::UnsupportedKey(format!("RSA {bits} bits")))
            }
        }
        other => Err(CsrError::UnsupportedKey(
            format!("{other:?}").chars().take(40).collect(),
        )),
    }
}
