//! The signing authority: CA material validated once at load, then
//! `create_certificate` — the synchronous core of `CreateCertificate` — which parses
//! and verifies the CSR, decides the identity with `ambit_core::certificate`, and signs
//! a leaf whose every field the CA sets itself.
//!
//! The leaf: NotBefore now − 2 min, NotAfter now + the requested TTL (default 24 h,
//! at most 90 days) and never past the issuer chain's NotAfter; a critical URI SAN, an
//! empty subject, KeyUsage digitalSignature + keyEncipherment, EKU serverAuth +
//! clientAuth, CA:FALSE and a random 128-bit serial.

use std::time::{Duration, SystemTime};

use ambit_core::certificate::{
    self, AuthorizationError, Caller, ValidityError, ValidityLimits, WorkloadPlacement,
};
use ambit_core::{IdentityError, SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::sync::Arc;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::csr::{parse_csr, CsrError, ParsedCsr};
use crate::store::CaMaterial;

/// Lifetime of a generated self-signed root.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Why a certificate was not issued. Maps one-to-one onto a gRPC status class.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("invalid CSR: {0}")]
    Csr(#[from] CsrError),
    #[error("invalid ImpersonatedIdentity metadata: {0}")]
    Impersonation(String),
    #[error("invalid validity_duration: {0}")]
    Validity(ValidityError),
    #[error("{0}")]
    Denied(#[from] AuthorizationError),
    #[error("CA cannot issue: {0}")]
    Unavailable(String),
    #[error("signing failed: {0}")]
    Signing(#[from] rcgen::Error),
}

/// Why CA material cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaLoadError {
    #[error("{file}: no PEM certificate found: {reason}")]
    NoCertificate { file: &'static str, reason: String },
    #[error("{file}: certificate {index} is not valid X.509: {reason}")]
    BadCertificate {
        file: &'static str,
        index: usize,
        reason: String,
    },
    #[error("ca-key.pem: not a usable private key: {0}")]
    BadKey(rcgen::Error),
    #[error("ca-key.pem does not belong to the certificate in ca-cert.pem")]
    KeyMismatch,
    #[error("ca-cert.pem is not a CA certificate (basicConstraints CA:TRUE is missing)")]
    NotCa,
    #[error("issuing chain is broken: {child} is not signed by {parent}")]
    BrokenChain { child: String, parent: String },
    #[error("ca-cert.pem expired at {0:?}")]
    Expired(SystemTime),
    #[error("cannot prepare the issuer: {0}")]
    Issuer(rcgen::Error),
    #[error("cannot generate a root: {0}")]
    Generate(rcgen::Error),
}

/// A loaded, validated certificate authority.
#[derive(Debug)]
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    /// The earliest NotAfter along the issuing chain: no leaf outlives it.
    issuer_not_after: SystemTime,
    /// What follows a leaf in a response before the bundle: intermediates, one PEM
    /// each.
    chain_pems: Vec<String>,
    /// The root the issuing chain ends at, PEM.
    root_pem: String,
    /// Every root the mesh trusts (`root-cert.pem`: the signing root and, during a
    /// rotation, the other one), DER and as one PEM text, the last element of a
    /// response.
    bundle: Vec<CertificateDer<'static>>,
    bundle_pem: String,
    /// The latest NotAfter this CA's signing root has put on a workload certificate,
    /// shared by every instance signing with the same material.
    issued_until: Arc<std::sync::Mutex<Option<SystemTime>>>,
    limits: ValidityLimits,
    /// Where workloads run, for node authorization; without it a node agent may
    /// impersonate any identity in the trust domain.
    placement: Option<Arc<dyn WorkloadPlacement>>,
}

impl CertificateAuthority {
    /// Generates a self-signed ECDSA P-256 root valid for ten years from `now`.
    pub fn generate_root(
        trust_domain: &TrustDomain,
        now: SystemTime,
    ) -> Result<CaMaterial, CaLoadError> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaLoadError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain.as_str());
        dn.push(DnType::CommonName, "Ambit root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = OffsetDateTime::from(now - Duration::from_secs(120));
        params.not_after = OffsetDateTime::from(now + ROOT_TTL);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(CaLoadError::Generate)?;
        let pem = cert.pem();
        Ok(CaMaterial {
            ca_cert_pem: pem.clone(),
            ca_key_pem: key.serialize_pem(),
            cert_chain_pem: String::new(),
            root_cert_pem: pem,
        })
    }

    /// Validates `material` (key matches certificate, CA flag, every link of the chain
    /// signed by the next, not expired at `now`) and prepares it for signing.
    pub fn from_material(
        material: &CaMaterial,
        trust_domain: TrustDomain,
        limits: ValidityLimits,
        now: SystemTime,
    ) -> Result<Self, CaLoadError> {
        let ca_cert = first_cert("ca-cert.pem", &material.ca_cert_pem)?;
        let roots = all_certs("root-cert.pem", &material.root_cert_pem)?;
        if roots.is_empty() {
            return Err(CaLoadError::NoCertificate {
                file: "root-cert.pem",
                reason: "file is empty".into(),
            });
        }
        let key = KeyPair::from_pem(&material.ca_key_pem).map_err(CaLoadError::BadKey)?;

        let (_, parsed) =
            X509Certificate::from_der(&ca_cert).map_err(|e| CaLoadError::BadCertificate {
                file: "ca-cert.pem",
                index: 0,
                reason: e.to_string(),
            })?;
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        {
            return Err(CaLoadError::KeyMismatch);
        }
        if !parsed.is_ca() {
            return Err(CaLoadError::NotCa);
        }

        // Issuer chain after a leaf: ca-cert, then the rest of cert-chain.pem, then the
        // root of root-cert.pem it reaches (the file may hold several: a rotation's).
        let mut chain = vec![ca_cert.clone()];
        for cert in all_certs("cert-chain.pem", &material.cert_chain_pem)? {
            if !chain.contains(&cert) {
                chain.push(cert);
            }
        }
        let top = chain.last().cloned().unwrap_or_else(|| ca_cert.clone());
        let root = match roots.iter().find(|r| **r == top) {
            Some(root) => root.clone(),
            None => {
                let signer = roots.iter().find(|r| signs(r, &top));
                match signer {
                    Some(root) => {
                        chain.push(root.clone());
                        root.clone()
                    }
                    None => {
                        return Err(CaLoadError::BrokenChain {
                            child: subject_of(&top),
                            parent: "any certificate in root-cert.pem".into(),
                        })
                    }
                }
            }
        };
        let mut issuer_not_after = None::<SystemTime>;
        for (i, der) in chain.iter().enumerate() {
            let (_, cert) =
                X509Certificate::from_der(der).map_err(|e| CaLoadError::BadCertificate {
                    file: "cert-chain.pem",
                    index: i,
                    reason: e.to_string(),
                })?;
            let parent_der = chain.get(i + 1).unwrap_or(der);
            let (_, parent) =
                X509Certificate::from_der(parent_der).map_err(|e| CaLoadError::BadCertificate {
                    file: "cert-chain.pem",
                    index: i + 1,
                    reason: e.to_string(),
                })?;
            if cert.verify_signature(Some(parent.public_key())).is_err() {
                return Err(CaLoadError::BrokenChain {
                    child: cert.subject().to_string(),
                    parent: parent.subject().to_string(),
                });
            }
            let not_after = SystemTime::UNIX_EPOCH
                + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
            issuer_not_after = Some(issuer_not_after.map_or(not_after, |t| t.min(not_after)));
        }
        let issuer_not_after = issuer_not_after.unwrap_or(now);
        if issuer_not_after <= now {
            return Err(CaLoadError::Expired(issuer_not_after));
        }
        let issuer = Issuer::from_ca_cert_der(&ca_cert, key).map_err(CaLoadError::Issuer)?;
        Ok(CertificateAuthority {
            trust_domain,
            issuer,
            issuer_not_after,
            chain_pems: chain[..chain.len() - 1].iter().map(to_pem).collect(),
            root_pem: to_pem(&root),
            bundle_pem: roots.iter().map(to_pem).collect(),
            bundle: roots,
            issued_until: Arc::default(),
            limits,
            placement: None,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The mesh root, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Every root the mesh trusts, PEM, one after the other.
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// Every root the mesh trusts.
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// The latest NotAfter the signing root has put on a workload certificate, as far
    /// as this process knows.
    pub fn issued_until(&self) -> Option<SystemTime> {
        *self
            .issued_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts the certificates `other` signed as this one's: both sign with the same
    /// material (only the bundle changed), or `other` was the same CA before a restart.
    pub fn share_issued_with(mut self, other: &Arc<std::sync::Mutex<Option<SystemTime>>>) -> Self {
        self.issued_until = other.clone();
        self
    }

    /// What [`CertificateAuthority::share_issued_with`] takes.
    pub fn issued_tracker(&self) -> Arc<std::sync::Mutex<Option<SystemTime>>> {
        self.issued_until.clone()
    }

    /// Whether `other` signs with the same key, certificate and chain.
    pub fn same_signer(&self, other: &CertificateAuthority) -> bool {
        self.chain_pems == other.chain_pems && self.root_pem == other.root_pem
    }

    pub fn issuer_not_after(&self) -> SystemTime {
        self.issuer_not_after
    }

    /// Serves one `CreateCertificate` call for an authenticated `caller`: returns the
    /// chain, leaf first and root last, one PEM certificate per element.
    pub fn create_certificate(
        &self,
        caller: &Caller,
        csr_pem: &str,
        validity_secs: i64,
        impersonate: Option<&str>,
        now: SystemTime,
    ) -> Result<Vec<String>, IssueError> {
        let csr = parse_csr(csr_pem)?;
        let impersonate = impersonate
            .map(SpiffeId::parse)
            .transpose()
            .map_err(|e: IdentityError| IssueError::Impersonation(e.to_string()))?;
        let identity = certificate::authorize(
            caller,
            impersonate.as_ref(),
            &csr.identity,
            &self.trust_domain,
            self.placement.as_deref(),
        )?;
        self.sign(&csr, &identity, validity_secs, now)
    }

    /// Applies node authorization with `placement` from now on.
    pub fn with_placement(mut self, placement: Arc<dyn WorkloadPlacement>) -> Self {
        self.placement = Some(placement);
        self
    }

    /// Signs `csr` for `identity` (already authorized).
    pub fn sign(
        &self,
        csr: &ParsedCsr,
        identity: &SpiffeId,
        validity_secs: i64,
        now: SystemTime,
    ) -> Result<Vec<String>, IssueError> {
        let params = self.leaf_params(identity, &[], validity_secs, now)?;
        let public_key = SubjectPublicKeyInfo::from_der(&csr.public_key_der)?;
        let not_after = SystemTime::from(params.not_after);
        let leaf = params.signed_by(&public_key, &self.issuer)?;
        let mut issued = self
            .issued_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *issued = Some(issued.map_or(not_after, |t| t.max(not_after)));
        Ok(self.response_chain(leaf.pem()))
    }

    /// Issues a certificate and a fresh P-256 key for the CA's own use (its serving
    /// certificate), with `dns_names` beside the identity (those that are IP
    /// addresses as IP SANs). Returns (chain, key PEM).
    pub fn issue_own(
        &self,
        identity: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(Vec<String>, String), IssueError> {
        let params = self.leaf_params(identity, dns_names, ttl.as_secs() as i64, now)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf = params.signed_by(&key, &self.issuer)?;
        Ok((self.response_chain(leaf.pem()), key.serialize_pem()))
    }

    fn response_chain(&self, leaf_pem: String) -> Vec<String> {
        let mut out = Vec::with_capacity(2 + self.chain_pems.len());
        out.push(leaf_pem);
        out.extend(self.chain_pems.iter().cloned());
        out.push(self.bundle_pem.clone());
        out
    }

    fn leaf_params(
        &self,
        identity: &SpiffeId,
        dns_names: &[String],
        validity_secs: i64,
        now: SystemTime,
    ) -> Result<CertificateParams, IssueError> {
        let validity =
            certificate::leaf_validity(now, validity_secs, &self.limits, self.issuer_not_after)
                .map_err(|e| match e {
                    ValidityError::IssuerExpired => IssueError::Unavailable(e.to_string()),
                    e => IssueError::Validity(e),
                })?;
        let mut params = CertificateParams::default();
        // Empty subject: the identity lives only in the (then critical) URI SAN.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.as_str().try_into()?)];
        for name in dns_names {
            // An address is an IP SAN: a client reaching the CA by IP checks that.
            let san = match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into()?),
            };
            params.subject_alt_names.push(san);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = OffsetDateTime::from(validity.not_before);
        params.not_after = OffsetDateTime::from(validity.not_after);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }
}

/// A random positive 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // keep it 16 bytes long and positive
    SerialNumber::from_slice(&bytes)
}

fn to_pem(der: &CertificateDer<'_>) -> String {
    let block = pem::Pem::new("CERTIFICATE", der.as_ref().to_vec());
    pem::encode_config(
        &block,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Whether `parent` signed `child`.
fn signs(parent: &CertificateDer<'_>, child: &CertificateDer<'_>) -> bool {
    let (Ok((_, parent)), Ok((_, child))) = (
        X509Certificate::from_der(parent),
        X509Certificate::from_der(child),
    ) else {
        return false;
    };
    child.verify_signature(Some(parent.public_key())).is_ok()
}

fn subject_of(der: &CertificateDer<'_>) -> String {
    X509Certificate::from_der(der)
        .map(|(_, c)| c.subject().to_string())
        .unwrap_or_else(|_| "a certificate that does not parse".into())
}

fn all_certs(file: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, CaLoadError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .enumerate()
        .map(|(index, r)| {
            r.map_err(|e| CaLoadError::BadCertificate {
                file,
                index,
                reason: e.to_string(),
            })
        })
        .collect()
}

fn first_cert(file: &'static str, pem: &str) -> Result<CertificateDer<'static>, CaLoadError> {
    all_certs(file, pem)?
        .into_iter()
        .next()
        .ok_or(CaLoadError::NoCertificate {
            file,
            reason: "file holds no CERTIFICATE block".into(),
        })
}
