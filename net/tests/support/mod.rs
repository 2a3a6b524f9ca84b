//! Test certificates for net's component tests, made at test time with rcgen.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use ambit_net::tls::WorkloadCert;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A throwaway mesh root that issues SPIFFE leaf certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
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
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf = params.signed_by(&key, &self.issuer).unwrap();
        WorkloadCert::from_pem(
            &[leaf.pem(), self.root_pem.clone()],
            &key.serialize_pem(),
            None,
        )
        .unwrap()
    }
}
