//! Issuing: every field of the returned chain, and every reason to refuse.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use ambit_ca::authority::{CertificateAuthority, IssueError};
use ambit_ca::service::status_of;
use ambit_ca::store::{CaMaterial, DirectoryStore, RootStore};
use ambit_core::certificate::{Caller, ValidityLimits};
use ambit_core::TrustDomain;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use support::*;
use x509_parser::extensions::ParsedExtension;
use x509_parser::oid_registry;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

fn parse(der: &[u8]) -> X509Certificate<'_> {
    X509Certificate::from_der(der).unwrap().1
}

#[test]
fn issued_chain_has_every_field_istio_clients_expect() {
    let ca = new_ca();
    let (key_pem, csr) = key_and_csr(CART);
    let t0 = now();
    let chain = ca
        .create_certificate(&workload(CART), &csr, 3600, None, t0)
        .unwrap();

    // Order: leaf first, root last, one PEM certificate per element.
    assert_eq!(chain.len(), 2, "self-signed root: leaf + root");
    for pem in &chain {
        assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 1, "{pem}");
    }
    assert_eq!(chain.last().unwrap(), ca.root_pem());
    let leaf_der = der(&chain[0]);
    let root_der = der(&chain[1]);
    let leaf = parse(&leaf_der);
    let root = parse(&root_der);
    leaf.verify_signature(Some(root.public_key()))
        .expect("leaf signed by root");
    assert_eq!(leaf.issuer(), root.subject());

    // Subject empty, identity only in a critical URI SAN.
    assert_eq!(leaf.subject().iter().count(), 0, "subject must be empty");
    let san_ext = leaf
        .extensions()
        .iter()
        .find(|e| e.oid == oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME)
        .expect("SAN extension");
    assert!(
        san_ext.critical,
        "SAN must be critical with an empty subject"
    );
    let ParsedExtension::SubjectAlternativeName(san) = san_ext.parsed_extension() else {
        panic!("SAN not parsed")
    };
    assert_eq!(san.general_names, vec![GeneralName::URI(CART)]);

    // Usage.
    let ku = leaf.key_usage().unwrap().expect("key usage").value;
    assert!(ku.digital_signature() && ku.key_encipherment());
    assert!(!ku.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().expect("eku").value;
    assert!(eku.server_auth && eku.client_auth);
    let bc = leaf
        .basic_constraints()
        .unwrap()
        .expect("basic constraints")
        .value;
    assert!(!bc.ca);

    // Validity: NotBefore backdated 2 minutes, NotAfter = requested lifetime.
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    let t = t0.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(
        (t - 121..=t - 119).contains(&nb),
        "not_before {nb} vs now {t}"
    );
    assert!(
        (t + 3599..=t + 3601).contains(&na),
        "not_after {na} vs now {t}"
    );

    // The certified key is the CSR's key.
    let key = KeyPair::from_pem(&key_pem).unwrap();
    assert_eq!(
        leaf.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
    );
    // Serial numbers are random and positive.
    assert!(leaf.raw_serial().len() >= 8 && leaf.raw_serial()[0] < 0x80);
}

#[test]
fn lifetime_defaults_to_24h_and_never_outlives_the_issuer() {
    let ca = new_ca();
    let t0 = now();
    let cert = issue_at(&ca, CART, 0, t0);
    let ttl = secs_between(t0, cert.not_after());
    assert!((24 * 3600 - 1..=24 * 3600).contains(&ttl), "{ttl}");

    // A root that ends in one hour caps every leaf at one hour.
    let material = short_lived_root(3600);
    let ca = ca_from(&material);
    let cert = issue_at(&ca, CART, 24 * 3600, now());
    assert!(cert.not_after() <= ca.issuer_not_after());
    assert!(secs_between(now(), cert.not_after()) <= 3600);
}

fn short_lived_root(ttl_secs: u64) -> CaMaterial {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::seconds(ttl_secs as i64);
    let cert = p.self_signed(&key).unwrap();
    CaMaterial {
        ca_cert_pem: cert.pem(),
        ca_key_pem: key.serialize_pem(),
        cert_chain_pem: String::new(),
        root_cert_pem: cert.pem(),
    }
}

/// A CSR built from arbitrary parameters and key.
fn csr_with(sans: Vec<SanType>, key: &KeyPair) -> String {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    p.serialize_request(key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

fn tampered(csr_pem: &str) -> String {
    let mut der = pem::parse(csr_pem).unwrap().into_contents();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der))
}

#[test]
fn refusals_name_the_problem_and_map_to_grpc_codes() {
    use tonic::Code;
    let ca = new_ca();
    let good = key_and_csr(CART).1;
    let other_ca_cert = {
        // A certificate (not a CSR) in a CSR field.
        issue(&new_ca(), CART);
        new_ca().root_pem().to_string()
    };
    // (case, caller, CSR, validity seconds, ImpersonatedIdentity, code, message part)
    type Case<'a> = (&'a str, Caller, String, i64, Option<&'a str>, Code, &'a str);
    let cases: Vec<Case> = vec![
        ("garbage", workload(CART), "hello".into(), 0, None, Code::InvalidArgument, "not a PEM"),
        ("certificate instead of CSR", workload(CART), other_ca_cert, 0, None, Code::InvalidArgument, "not a PEM"),
        ("tampered signature", workload(CART), tampered(&good), 0, None, Code::InvalidArgument, "signature"),
        ("no SAN", workload(CART), csr_with(vec![], &p256()), 0, None, Code::InvalidArgument, "no URI SAN"),
        ("two URI SANs", workload(CART), csr_with(vec![uri(CART), uri(PAY)], &p256()), 0, None, Code::InvalidArgument, "2 URI SANs"),
        ("DNS SAN", workload(CART), csr_with(vec![uri(CART), SanType::DnsName("cart.shop".try_into().unwrap())], &p256()), 0, None, Code::InvalidArgument, "DNS SAN \"cart.shop\""),
        ("not SPIFFE", workload(CART), csr_with(vec![uri("https://cart.shop/")], &p256()), 0, None, Code::InvalidArgument, "must start with \"spiffe://\""),
        ("bad identity path", workload(CART), csr_with(vec![uri("spiffe://cluster.local/cart")], &p256()), 0, None, Code::InvalidArgument, "/ns/<namespace>/sa/<service-account>"),
        ("P-521 key", workload(CART), csr_with(vec![uri(CART)], &KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA512).unwrap()), 0, None, Code::InvalidArgument, "public key is EC on curve"),
        ("negative validity", workload(CART), good.clone(), -5, None, Code::InvalidArgument, "negative"),
        ("validity over 90 days", workload(CART), good.clone(), 91 * 86_400, None, Code::InvalidArgument, "exceeds the maximum of 7776000s"),
        ("bad impersonation value", node_agent(), good.clone(), 0, Some("cart"), Code::InvalidArgument, "ImpersonatedIdentity"),
        ("CSR for someone else", workload(PAY), good.clone(), 0, None, Code::PermissionDenied, "caller spiffe://cluster.local/ns/shop/sa/pay is authorized for spiffe://cluster.local/ns/shop/sa/pay but the CSR asks for spiffe://cluster.local/ns/shop/sa/cart"),
        ("impersonation by a workload", workload(PAY), good.clone(), 0, Some(CART), Code::PermissionDenied, "caller spiffe://cluster.local/ns/shop/sa/pay is not a trusted node agent and may not request a certificate for spiffe://cluster.local/ns/shop/sa/cart"),
        ("node agent, CSR mismatch", node_agent(), good.clone(), 0, Some(PAY), Code::PermissionDenied, "but the CSR asks for"),
        ("foreign trust domain", node_agent(), key_and_csr("spiffe://evil.org/ns/shop/sa/cart").1, 0, Some("spiffe://evil.org/ns/shop/sa/cart"), Code::PermissionDenied, "outside this CA's trust domain cluster.local"),
    ];
    for (name, caller, csr, ttl, imp, code, want) in cases {
        let err = ca
            .create_certificate(&caller, &csr, ttl, imp, now())
            .expect_err(name);
        let status = status_of(&err);
        assert_eq!(status.code(), code, "{name}: {err}");
        assert!(
            status.message().contains(want),
            "{name}: {:?} does not contain {want:?}",
            status.message()
        );
    }
    // Still issues after all those refusals.
    assert!(ca
        .create_certificate(&workload(CART), &good, 0, None, now())
        .is_ok());
}

#[test]
fn node_agent_may_impersonate_and_rsa_csrs_are_accepted() {
    let ca = new_ca();
    let (_, csr) = key_and_csr(PAY);
    let chain = ca
        .create_certificate(&node_agent(), &csr, 0, Some(PAY), now())
        .unwrap();
    assert_eq!(
        ambit_net::tls::identity_of(&der(&chain[0])).unwrap(),
        id(PAY)
    );

    let rsa = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256);
    if let Ok(rsa) = rsa {
        let chain = ca
            .create_certificate(
                &workload(CART),
                &csr_with(vec![uri(CART)], &rsa),
                0,
                None,
                now(),
            )
            .unwrap();
        assert_eq!(chain.len(), 2);
    }
}

#[test]
fn expired_issuer_makes_the_ca_unavailable_not_the_caller_wrong() {
    let material = short_lived_root(60);
    let ca = ca_from(&material);
    let later = now() + Duration::from_secs(3600);
    let err = ca
        .create_certificate(&workload(CART), &key_and_csr(CART).1, 0, None, later)
        .unwrap_err();
    assert!(matches!(err, IssueError::Unavailable(_)), "{err}");
    assert_eq!(status_of(&err).code(), tonic::Code::Unavailable);
}

/// A corporate root, an intermediate for the mesh under it, in Istio's plug-in layout.
fn plugin_material() -> (CaMaterial, String) {
    let root_key = p256();
    let mut rp = CertificateParams::default();
    rp.distinguished_name = DistinguishedName::new();
    rp.distinguished_name.push(DnType::CommonName, "Corp Root");
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rp.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = rp.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(rp, root_key);

    let int_key = p256();
    let mut ip = CertificateParams::default();
    ip.distinguished_name = DistinguishedName::new();
    ip.distinguished_name
        .push(DnType::CommonName, "Mesh Intermediate");
    ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let int = ip.signed_by(&int_key, &root_issuer).unwrap();
    (
        CaMaterial {
            ca_cert_pem: int.pem(),
            ca_key_pem: int_key.serialize_pem(),
            // Istio's sample layout: intermediate then root.
            cert_chain_pem: format!("{}{}", int.pem(), root.pem()),
            root_cert_pem: root.pem(),
        },
        root.pem(),
    )
}

#[test]
fn plug_in_intermediate_issues_chains_that_verify_to_the_corporate_root() {
    let dir = tempfile::tempdir().unwrap();
    let (material, root_pem) = plugin_material();
    DirectoryStore::new(dir.path()).save(&material).unwrap();
    let loaded = DirectoryStore::new(dir.path()).load().unwrap().unwrap();
    let ca = ca_from(&loaded);
    let (key, csr) = key_and_csr(CART);
    let chain = ca
        .create_certificate(&workload(CART), &csr, 0, None, now())
        .unwrap();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(chain[1], material.ca_cert_pem);
    assert_eq!(chain[2], root_pem);
    // Usable for TLS with the corporate root as the only trust anchor.
    let cert = ambit_net::tls::WorkloadCert::from_pem(&chain, &key, None).unwrap();
    assert_eq!(cert.chain().len(), 2, "presents leaf + intermediate");
    assert_eq!(cert.roots(), &[der(&root_pem)]);
}

#[test]
fn unusable_material_is_refused_with_the_reason() {
    let td = TrustDomain::default();
    let lim = ValidityLimits::default();
    let good = root_material();
    let other = root_material();
    let (plugin, _) = plugin_material();
    let leaf = issue(&new_ca(), CART);
    let leaf_pem = pem::encode(&pem::Pem::new("CERTIFICATE", leaf.chain()[0].to_vec()));
    let cases: Vec<(&str, CaMaterial, &str)> = vec![
        (
            "key of another CA",
            CaMaterial {
                ca_key_pem: other.ca_key_pem.clone(),
                ..good.clone()
            },
            "does not belong",
        ),
        (
            "no certificate",
            CaMaterial {
                ca_cert_pem: "junk".into(),
                ..good.clone()
            },
            "ca-cert.pem",
        ),
        (
            "bad key",
            CaMaterial {
                ca_key_pem: "junk".into(),
                ..good.clone()
            },
            "ca-key.pem",
        ),
        (
            "leaf as CA",
            CaMaterial {
                ca_cert_pem: leaf_pem,
                ..good.clone()
            },
            "does not belong",
        ),
        (
            "wrong root",
            CaMaterial {
                root_cert_pem: other.root_cert_pem.clone(),
                cert_chain_pem: String::new(),
                ..plugin.clone()
            },
            "is not signed by",
        ),
    ];
    for (name, m, want) in cases {
        let e = CertificateAuthority::from_material(&m, td.clone(), lim, now())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{name}: {e}");
    }
}

#[test]
fn directory_store_generates_once_keeps_key_private_and_reports_partial_dirs() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let store = DirectoryStore::new(dir.path().join("ca"));
    assert!(store.load().unwrap().is_none());
    let m = root_material();
    store.save(&m).unwrap();
    let mode = std::fs::metadata(dir.path().join("ca/ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(store.load().unwrap().unwrap(), m);

    std::fs::remove_file(dir.path().join("ca/ca-key.pem")).unwrap();
    let e = store.load().unwrap_err().to_string();
    assert!(
        e.contains("has ca-cert.pem, root-cert.pem but not ca-key.pem"),
        "{e}"
    );
}
