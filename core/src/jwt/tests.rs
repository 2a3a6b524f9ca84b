//! Table tests over real keys generated at test time (aws-lc-rs), signed by
//! `jsonwebtoken`.

use super::*;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair as _};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

const NOW: u64 = 1_800_000_000;
const ISS: &str = "https://idp.example.com";

/// A signing key and the JWK of its public half.
struct Signer {
    key: EncodingKey,
    alg: Algorithm,
    jwk: Jwk,
}

fn signer(alg: Algorithm, kid: &str) -> Signer {
    let rng = SystemRandom::new();
    let key = match alg {
        Algorithm::ES256 | Algorithm::ES384 => {
            let a = if alg == Algorithm::ES256 {
                &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING
            } else {
                &aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED_SIGNING
            };
            let doc = EcdsaKeyPair::generate_pkcs8(a, &rng).unwrap();
            EncodingKey::from_ec_der(doc.as_ref())
        }
        Algorithm::EdDSA => {
            let doc = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
            let public = Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
            let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(public.public_key().as_ref());
            let jwk: Jwk = serde_json::from_value(
                json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA"}),
            )
            .unwrap();
            return Signer {
                key: EncodingKey::from_ed_der(doc.as_ref()),
                alg,
                jwk,
            };
        }
        _ => {
            let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
            let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).unwrap();
            let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", der.as_ref().to_vec()));
            EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap()
        }
    };
    let mut jwk = Jwk::from_encoding_key(&key, alg).unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    Signer { key, alg, jwk }
}

impl Signer {
    fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = self.jwk.common.key_id.clone();
        jsonwebtoken::encode(&h, claims, &self.key).unwrap()
    }

    fn jwks(&self) -> Jwks {
        Jwks::parse(&jwks_text(&[self])).unwrap()
    }
}

fn jwks_text(signers: &[&Signer]) -> String {
    serde_json::to_string(&JwkSet {
        keys: signers.iter().map(|s| s.jwk.clone()).collect(),
    })
    .unwrap()
}

fn rule() -> JwtRule {
    JwtRule {
        issuer: ISS.into(),
        audiences: Vec::new(),
        jwks: JwksSource::Inline(String::new()),
        from_headers: Vec::new(),
        from_params: Vec::new(),
        from_cookies: Vec::new(),
        forward_original_token: false,
        output_payload_to_header: None,
        output_claim_to_headers: Vec::new(),
        space_delimited_claims: Vec::new(),
        fetch_timeout_ms: None,
    }
}

fn claims() -> Value {
    json!({"iss": ISS, "sub": "alice", "aud": ["shop", "web"], "azp": "spa",
           "exp": NOW + 3600, "nbf": NOW - 10, "groups": ["admins", "dev"],
           "org": {"team": {"name": "core"}}, "level": 3, "admin": true,
           "scope": "read write", "roles": "a b"})
}

#[test]
fn every_supported_algorithm_verifies_and_a_tampered_token_does_not() {
    for alg in [
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ] {
        let s = signer(alg, "k1");
        let token = s.sign(&claims());
        let auth =
            validate(&token, &rule(), &s.jwks(), NOW).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(
            (auth.issuer.as_str(), auth.subject.as_str()),
            (ISS, "alice")
        );
        // A payload swapped for another one keeps the signature of the first.
        let mut parts: Vec<&str> = token.split('.').collect();
        let other = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(json!({"iss": ISS, "sub": "mallory", "exp": NOW + 3600}).to_string());
        parts[1] = &other;
        let forged = parts.join(".");
        assert_eq!(
            validate(&forged, &rule(), &s.jwks(), NOW),
            Err(JwtError::VerificationFailed),
            "{alg:?}"
        );
        // Another key of the same kind, under the same kid.
        let impostor = signer(alg, "k1");
        assert_eq!(
            validate(&impostor.sign(&claims()), &rule(), &s.jwks(), NOW),
            Err(JwtError::VerificationFailed),
            "{alg:?}"
        );
    }
}

#[test]
fn claims_are_checked_against_the_rule_and_the_clock() {
    let s = signer(Algorithm::ES256, "k1");
    let jwks = s.jwks();
    let with = |patch: Value| {
        let mut c = claims();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        s.sign(&c)
    };
    let audiences = JwtRule {
        audiences: vec!["web".into()],
        ..rule()
    };
    let other_aud = JwtRule {
        audiences: vec!["billing".into()],
        ..rule()
    };
    let plain = rule();
    let cases: Vec<(&str, String, &JwtRule, Result<(), JwtError>)> = vec![
        ("valid", with(json!({})), &audiences, Ok(())),
        (
            "no exp, no nbf",
            with(json!({"exp": null, "nbf": null})),
            &plain,
            Ok(()),
        ),
        (
            "expired within skew",
            with(json!({"exp": NOW - 59})),
            &plain,
            Ok(()),
        ),
        (
            "expired",
            with(json!({"exp": NOW - 61})),
            &plain,
            Err(JwtError::Expired),
        ),
        (
            "nbf within skew",
            with(json!({"nbf": NOW + 59})),
            &plain,
            Ok(()),
        ),
        (
            "not yet valid",
            with(json!({"nbf": NOW + 61})),
            &plain,
            Err(JwtError::NotYetValid),
        ),
        (
            "exp not a number",
            with(json!({"exp": "soon"})),
            &plain,
            Err(JwtError::BadPayload),
        ),
        (
            "wrong issuer",
            with(json!({"iss": "https://evil"})),
            &plain,
            Err(JwtError::UnknownIssuer),
        ),
        (
            "no issuer",
            with(json!({"iss": null})),
            &plain,
            Err(JwtError::UnknownIssuer),
        ),
        (
            "wrong audience",
            with(json!({})),
            &other_aud,
            Err(JwtError::AudienceNotAllowed),
        ),
        (
            "audience as a string",
            with(json!({"aud": "web"})),
            &audiences,
            Ok(()),
        ),
        (
            "no audience",
            with(json!({"aud": null})),
            &audiences,
            Err(JwtError::AudienceNotAllowed),
        ),
    ];
    for (name, token, rule, want) in cases {
        assert_eq!(
            validate(&token, rule, &jwks, NOW).map(|_| ()),
            want,
            "{name}"
        );
    }
}

#[test]
fn malformed_tokens_are_refused_with_envoys_words() {
    let s = signer(Algorithm::ES256, "k1");
    let jwks = s.jwks();
    let good = s.sign(&claims());
    let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let hs = format!(
        "{}.{}.c2ln",
        b64(r#"{"alg":"HS256"}"#),
        b64(r#"{"iss":"x"}"#)
    );
    let none = format!(
        "{}.{}.c2ln",
        b64(r#"{"alg":"none"}"#),
        b64(r#"{"iss":"x"}"#)
    );
    let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
    let cases: Vec<(&str, String, JwtError)> = vec![
        ("one part", "abc".into(), JwtError::BadFormat),
        ("four parts", format!("{good}.x"), JwtError::BadFormat),
        (
            "empty signature",
            good.rsplit_once('.').unwrap().0.to_owned() + ".",
            JwtError::BadFormat,
        ),
        (
            "header not base64",
            format!("%%%.{}", &good[good.find('.').unwrap() + 1..]),
            JwtError::BadHeader,
        ),
        (
            "header not JSON",
            format!("{}.e30.c2ln", b64("nope")),
            JwtError::BadHeader,
        ),
        ("HMAC", hs, JwtError::UnsupportedAlgorithm),
        ("alg none", none, JwtError::UnsupportedAlgorithm),
        (
            "payload not JSON",
            format!("{}.{}.c2ln", b64(r#"{"alg":"ES256"}"#), b64("[")),
            JwtError::BadPayload,
        ),
        (
            "payload not an object",
            format!("{}.{}.c2ln", b64(r#"{"alg":"ES256"}"#), b64("[1]")),
            JwtError::BadPayload,
        ),
        ("too large", huge, JwtError::TooLarge),
    ];
    for (name, token, want) in cases {
        assert_eq!(
            validate(&token, &rule(), &jwks, NOW).map(|_| ()),
            Err(want.clone()),
            "{name}"
        );
        assert!(!want.to_string().is_empty());
    }
    assert_eq!(
        JwtError::VerificationFailed.to_string(),
        "Jwt verification fails"
    );
}

#[test]
fn keys_are_chosen_by_kid_else_by_algorithm() {
    let a = signer(Algorithm::ES256, "a");
    let b = signer(Algorithm::ES256, "b");
    let both = Jwks::parse(&jwks_text(&[&a, &b])).unwrap();
    assert!(validate(&b.sign(&claims()), &rule(), &both, NOW).is_ok());
    // A kid the set does not have: worth fetching the set again.
    assert_eq!(
        validate(&b.sign(&claims()), &rule(), &a.jwks(), NOW).map(|_| ()),
        Err(JwtError::UnknownKey)
    );
    // No kid: every key fit for the algorithm is tried.
    let mut h = Header::new(Algorithm::ES256);
    h.kid = None;
    let no_kid = jsonwebtoken::encode(&h, &claims(), &b.key).unwrap();
    assert!(validate(&no_kid, &rule(), &both, NOW).is_ok());
    // A key of another family never verifies.
    let ed = signer(Algorithm::EdDSA, "a");
    assert_eq!(
        validate(&ed.sign(&claims()), &rule(), &a.jwks(), NOW).map(|_| ()),
        Err(JwtError::UnknownKey)
    );
}

#[test]
fn a_jwks_without_usable_keys_is_an_error() {
    for (text, ok) in [
        (r#"{"keys": []}"#, false),
        (r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#, false),
        (r#"{"keys": [{"kty": "XYZ"}]}"#, false),
        ("not json", false),
        (r#"{"nokeys": 1}"#, false),
    ] {
        assert_eq!(Jwks::parse(text).is_ok(), ok, "{text}");
    }
    let a = signer(Algorithm::ES256, "a");
    let mut text: Value = serde_json::from_str(&jwks_text(&[&a])).unwrap();
    text["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}));
    let jwks = Jwks::parse(&text.to_string()).unwrap();
    assert_eq!(jwks.len(), 1, "the HMAC key is skipped");
    assert!(jwks.has_kid("a") && !jwks.has_kid("hmac"));
}

#[test]
fn claims_become_the_request_identity() {
    let s = signer(Algorithm::ES256, "k1");
    let r = JwtRule {
        space_delimited_claims: vec!["roles".into()],
        fetch_timeout_ms: None,
        ..rule()
    };
    let auth = validate(&s.sign(&claims()), &r, &s.jwks(), NOW).unwrap();
    assert_eq!(auth.audiences, ["shop", "web"]);
    assert_eq!(auth.presenter.as_deref(), Some("spa"));
    let list = |l: &[&str]| Claim::List(l.iter().map(|s| s.to_string()).collect());
    assert_eq!(auth.claims["groups"], list(&["admins", "dev"]));
    assert_eq!(auth.claims["roles"], list(&["a", "b"]));
    assert_eq!(auth.claims["scope"], Claim::String("read write".into()));
    assert_eq!(auth.claims["level"], Claim::String("3".into()));
    assert_eq!(auth.claims["admin"], Claim::String("true".into()));
    let Claim::Object(org) = &auth.claims["org"] else {
        panic!("{:?}", auth.claims["org"]);
    };
    assert!(matches!(&org["team"], Claim::Object(t) if t["name"] == Claim::String("core".into())));
}

#[test]
fn tokens_are_found_where_the_rule_says() {
    let headers =
        |h: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> { h.to_vec() };
    let custom = JwtRule {
        from_headers: vec![HeaderLocation {
            name: "x-jwt".into(),
            prefix: "Token ".into(),
        }],
        from_params: vec!["jwt".into()],
        from_cookies: vec!["session".into()],
        ..rule()
    };
    let header = |n: &str| Some(Location::Header(n.into()));
    type Case = (
        &'static str,
        JwtRule,
        Vec<(&'static str, &'static str)>,
        Option<&'static str>,
        Option<(&'static str, Option<Location>)>,
    );
    let cases: Vec<Case> = vec![
        (
            "default header",
            rule(),
            headers(&[("Authorization", "Bearer t1")]),
            None,
            Some(("t1", header("authorization"))),
        ),
        (
            "default prefix any case",
            rule(),
            headers(&[("authorization", "bearer  t1 ")]),
            None,
            Some(("t1", header("authorization"))),
        ),
        (
            "basic is not a token",
            rule(),
            headers(&[("authorization", "Basic dXNlcg==")]),
            None,
            None,
        ),
        (
            "default param",
            rule(),
            headers(&[]),
            Some("a=1&access_token=t2"),
            Some(("t2", Some(Location::Param("access_token".into())))),
        ),
        (
            "header before param",
            rule(),
            headers(&[("authorization", "Bearer t1")]),
            Some("access_token=t2"),
            Some(("t1", header("authorization"))),
        ),
        (
            "custom header",
            custom.clone(),
            headers(&[("x-jwt", "Token t3"), ("authorization", "Bearer t1")]),
            None,
            Some(("t3", header("x-jwt"))),
        ),
        (
            "custom rule ignores the defaults",
            custom.clone(),
            headers(&[("authorization", "Bearer t1")]),
            Some("access_token=t2"),
            None,
        ),
        (
            "custom param",
            custom.clone(),
            headers(&[]),
            Some("jwt=t4"),
            Some(("t4", Some(Location::Param("jwt".into())))),
        ),
        (
            "cookie",
            custom.clone(),
            headers(&[("cookie", "a=b; session=t5")]),
            None,
            Some(("t5", Some(Location::Cookie("session".into())))),
        ),
        (
            "empty param",
            rule(),
            headers(&[]),
            Some("access_token="),
            None,
        ),
        (
            "nothing",
            rule(),
            headers(&[("cookie", "session=x")]),
            None,
            None,
        ),
    ];
    for (name, r, h, query, want) in cases {
        let hs: &[(&str, &str)] = &h;
        let got = find_token(&r, &hs, query);
        assert_eq!(
            got.map(|f| (f.token, Some(f.location))),
            want.map(|(t, l)| (t.to_owned(), l)),
            "{name}"
        );
    }
}

#[test]
fn outputs_and_realm() {
    let s = signer(Algorithm::ES256, "k1");
    let token = s.sign(&claims());
    let parsed = parse_token(&token).unwrap();
    let r = JwtRule {
        output_payload_to_header: Some("x-jwt-payload".into()),
        output_claim_to_headers: vec![
            ClaimToHeader {
                header: "x-sub".into(),
                claim: "sub".into(),
            },
            ClaimToHeader {
                header: "x-team".into(),
                claim: "org.team.name".into(),
            },
            ClaimToHeader {
                header: "x-level".into(),
                claim: "level".into(),
            },
            ClaimToHeader {
                header: "x-groups".into(),
                claim: "groups".into(),
            },
            ClaimToHeader {
                header: "x-none".into(),
                claim: "org.missing".into(),
            },
        ],
        ..rule()
    };
    let out = output_headers(&parsed, &r);
    let payload = &out[0].1;
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&decoded).unwrap(), claims());
    assert_eq!(
        out[1..].to_vec(),
        vec![
            ("x-sub".to_owned(), "alice".to_owned()),
            ("x-team".to_owned(), "core".to_owned()),
            ("x-level".to_owned(), "3".to_owned()),
        ]
    );
    assert_eq!(
        www_authenticate("http", "web.shop:80", "/api?x=1"),
        r#"Bearer realm="http://web.shop:80/api", error="invalid_token""#
    );
}

#[test]
fn the_most_specific_error_is_answered() {
    assert_eq!(
        most_specific([
            JwtError::UnknownIssuer,
            JwtError::Expired,
            JwtError::UnknownIssuer
        ]),
        Some(JwtError::Expired)
    );
    assert_eq!(
        most_specific([JwtError::UnknownIssuer]),
        Some(JwtError::UnknownIssuer)
    );
    assert_eq!(most_specific([]), None);
}
