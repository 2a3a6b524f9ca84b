//! The cost of authenticating one request at a waypoint: finding the token, checking
//! its claims and signature and mapping it to a request identity, for ES256 and
//! RS256 (2048-bit) tokens with keys made at bench time. Measured here, never
//! asserted: the waypoint's request path adds this to every request carrying a token.
//!
//! Run: `cargo bench -p ambit-core --bench jwt`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ambit_core::jwt::{find_token, validate, Jwks, JwksSource, JwtRule};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use criterion::{criterion_group, criterion_main, Criterion};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const NOW: u64 = 1_800_000_000;

fn signed(alg: Algorithm) -> (String, Jwks) {
    let key = match alg {
        Algorithm::ES256 => {
            let doc = EcdsaKeyPair::generate_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &SystemRandom::new(),
            )
            .unwrap();
            EncodingKey::from_ec_der(doc.as_ref())
        }
        _ => {
            let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
            let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).unwrap();
            let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", der.as_ref().to_vec()));
            EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap()
        }
    };
    let mut jwk = Jwk::from_encoding_key(&key, alg).unwrap();
    jwk.common.key_id = Some("k1".into());
    let jwks = Jwks::parse(&serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap()).unwrap();
    let mut h = Header::new(alg);
    h.kid = Some("k1".into());
    let claims = serde_json::json!({"iss": "https://idp", "sub": "alice", "aud": "web",
        "exp": NOW + 3600, "groups": ["admins", "dev"], "org": {"team": "core"}});
    (jsonwebtoken::encode(&h, &claims, &key).unwrap(), jwks)
}

fn bench(c: &mut Criterion) {
    let rule = JwtRule {
        issuer: "https://idp".into(),
        audiences: vec!["web".into()],
        jwks: JwksSource::Uri("https://idp/jwks".into()),
        from_headers: Vec::new(),
        from_params: Vec::new(),
        from_cookies: Vec::new(),
        forward_original_token: false,
        output_payload_to_header: None,
        output_claim_to_headers: Vec::new(),
        space_delimited_claims: Vec::new(),
        fetch_timeout_ms: None,
    };
    for (name, alg) in [("es256", Algorithm::ES256), ("rs256", Algorithm::RS256)] {
        let (token, jwks) = signed(alg);
        let header = format!("Bearer {token}");
        let headers: &[(&str, &str)] = &[("authorization", &header)];
        c.bench_function(&format!("jwt/{name}"), |b| {
            b.iter(|| {
                let found = find_token(&rule, &headers, None).unwrap();
                validate(&found.token, &rule, &jwks, NOW).unwrap()
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
