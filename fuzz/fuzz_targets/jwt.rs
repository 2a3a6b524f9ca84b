//! Tokens arrive from any HTTP client (a header, a query parameter, a cookie) and
//! JWKS documents from any HTTPS server a policy names. Parsing either, checking a
//! token's claims, mapping them to a request identity, copying them into headers and
//! verifying a signature must never panic; a token that parses is three sections
//! no larger than the limit.
#![no_main]

use ambit_core::jwt::{self, ClaimToHeader, JwksSource, JwtRule};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    // The first line may be a JWKS; the rest is the token.
    let (jwks, token) = text.split_once('\n').unwrap_or(("", text));
    let rule = JwtRule {
        issuer: "https://issuer".into(),
        audiences: vec!["aud".into()],
        jwks: JwksSource::Inline(jwks.into()),
        from_headers: Vec::new(),
        from_params: Vec::new(),
        from_cookies: Vec::new(),
        forward_original_token: false,
        output_payload_to_header: Some("x-payload".into()),
        output_claim_to_headers: vec![ClaimToHeader {
            header: "x-claim".into(),
            claim: "a.b.c".into(),
        }],
        space_delimited_claims: vec!["roles".into()],
        fetch_timeout_ms: None,
    };
    if let Ok(t) = jwt::parse_token(token) {
        assert!(token.len() <= jwt::MAX_TOKEN_BYTES);
        assert_eq!(token.split('.').count(), 3);
        let _ = jwt::check_claims(&t, &rule, 1_800_000_000);
        let _ = jwt::request_auth(&t, &rule);
        let _ = jwt::output_headers(&t, &rule);
        if let Ok(keys) = jwt::Jwks::parse(jwks) {
            let _ = jwt::verify_signature(&t, &keys);
        }
    }
    let headers: &[(&str, &str)] = &[("authorization", token), ("cookie", token)];
    let _ = jwt::find_token(&rule, &headers, Some(token));
});
