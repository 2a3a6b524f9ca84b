//! End-user authentication with JWTs, as a waypoint enforces Istio's
//! RequestAuthentication (`../shared/reference/istio-ambient-api.md` §2.2) the way
//! Envoy's `jwt_authn` filter does under Istio:
//!
//! - each rule ([`JwtRule`]) looks for a token where it says ([`find_token`]; by
//!   default `Authorization: Bearer <t>`, then the `access_token` query parameter);
//! - a request on which no rule finds a token passes with no request identity;
//! - a token found is checked against every rule that found it ([`validate`]): its
//!   form and size, then `iss` (the rule's issuer), `aud` (one of the rule's
//!   audiences, when it lists any), `exp` and `nbf` (60 s of clock skew, the time an
//!   argument), then its signature over the rule's JWKS ([`Jwks`]). One rule accepting
//!   it makes the request's identity ([`RequestAuth`], `iss/sub` for
//!   `requestPrincipals`); none accepting it is a 401 ([`JwtError`] words it as
//!   Envoy does);
//! - an accepted token is removed from the request unless `forwardOriginalToken`
//!   ([`Found::location`] says where it was), and the rule may copy the payload
//!   ([`output_headers`]) into headers.
//!
//! Algorithms: RS256/384/512, PS256/384/512, ES256/384 and EdDSA, verified by the
//! `jsonwebtoken` crate on aws-lc-rs (the workspace's rustls backend). HMAC is refused:
//! a JWKS is public, so a shared secret in one protects nothing.
//!
//! Pure: no IO, no clock. Fetching a remote JWKS is the waypoint's business; it hands
//! the keys in.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::l7::{Claim, Headers, RequestAuth};

/// Allowed clock skew on `exp` and `nbf`, seconds (Envoy's default).
pub const CLOCK_SKEW_SECS: u64 = 60;

/// The largest token looked at, bytes. The waypoint's header limit (60 KiB by
/// default) refuses larger heads before this is reached; this bounds what a larger
/// configured limit could let through.
pub const MAX_TOKEN_BYTES: usize = 64 << 10;

/// One `jwtRules[]` entry of a RequestAuthentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    /// The token's `iss` must be this.
    pub issuer: String,
    /// The token's `aud` must hold one of these; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    pub jwks: JwksSource,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<HeaderLocation>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_cookies: Vec<String>,
    /// Keep the token in the request sent upstream (default: removed).
    #[serde(default, skip_serializing_if = "is_false")]
    pub forward_original_token: bool,
    /// A header to receive the token's payload, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_payload_to_header: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// Claims whose string value is a space-separated list (`scope` and
    /// `permission` always are).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub space_delimited_claims: Vec<String>,
    /// `timeout`: how long a fetch of a `jwksUri` may take, milliseconds; `None`: the
    /// waypoint's own default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_timeout_ms: Option<u64>,
}

fn is_false(b: &bool) -> bool {
    !b
}

/// Where a rule's keys come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum JwksSource {
    /// `jwks`: the JWKS document itself.
    Inline(String),
    /// `jwksUri`: fetched over HTTPS by the waypoint.
    Uri(String),
    /// The policy could not be understood: every token this rule finds is refused,
    /// with this reason in the waypoint's log (requests without one pass, as Istio's).
    Invalid(String),
}

/// `fromHeaders[]`: a header, and what precedes the token in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderLocation {
    /// Lower case.
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

/// `outputClaimToHeaders[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeader {
    /// Lower case.
    pub header: String,
    /// A claim name, nested ones joined by `.`.
    pub claim: String,
}

/// Where a token was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A header (lower-case name): removing the token removes the header.
    Header(String),
    /// A query parameter; left in place, as Envoy leaves it.
    Param(String),
    /// A cookie; left in place, as Envoy leaves it.
    Cookie(String),
}

/// A token one rule found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub token: String,
    pub location: Location,
}

/// Why a token was refused, in Envoy's words (the 401's body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")]
    BadFormat,
    #[error("Jwt is too large")]
    TooLarge,
    #[error("Jwt header is an invalid JSON")]
    BadHeader,
    #[error("Jwt header [alg] field is required and must be a string")]
    UnsupportedAlgorithm,
    #[error("Jwt payload is an invalid JSON")]
    BadPayload,
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    #[error("Audiences in Jwt are not allowed")]
    AudienceNotAllowed,
    #[error("Jwt is expired")]
    Expired,
    #[error("Jwt not yet valid")]
    NotYetValid,
    #[error("Jwks doesn't have key to match kid or alg from Jwt")]
    UnknownKey,
    #[error("Jwt verification fails")]
    VerificationFailed,
    /// The rule's keys are unusable (an invalid policy or JWKS); the reason is logged.
    #[error("Jwt verification fails")]
    NoKeys(String),
    /// The rule's remote JWKS has not been fetched (yet); the reason is logged.
    #[error("Jwks remote fetch is failed")]
    FetchFailed(String),
}

impl JwtError {
    /// A stable label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::BadFormat => "malformed",
            JwtError::TooLarge => "too_large",
            JwtError::BadHeader => "bad_header",
            JwtError::UnsupportedAlgorithm => "unsupported_alg",
            JwtError::BadPayload => "bad_payload",
            JwtError::UnknownIssuer => "wrong_issuer",
            JwtError::AudienceNotAllowed => "wrong_audience",
            JwtError::Expired => "expired",
            JwtError::NotYetValid => "not_yet_valid",
            JwtError::UnknownKey => "unknown_key",
            JwtError::VerificationFailed => "bad_signature",
            JwtError::NoKeys(_) => "no_keys",
            JwtError::FetchFailed(_) => "jwks_fetch_failed",
        }
    }

    /// How specific it is when several rules refused one token: the error of a rule
    /// whose issuer matched says more than "not my issuer".
    fn rank(&self) -> u8 {
        match self {
            JwtError::UnknownIssuer => 0,
            JwtError::NoKeys(_) | JwtError::FetchFailed(_) => 1,
            _ => 2,
        }
    }
}

/// Of the errors every rule gave one token, the one to answer with.
pub fn most_specific(errors: impl IntoIterator<Item = JwtError>) -> Option<JwtError> {
    let mut best: Option<JwtError> = None;
    for e in errors {
        if best.as_ref().is_none_or(|b| e.rank() > b.rank()) {
            best = Some(e);
        }
    }
    best
}

/// The token `rule` finds in a request, if any: its headers (Envoy's defaults when
/// the rule names no location), then its query parameters, then its cookies.
pub fn find_token(rule: &JwtRule, headers: &dyn Headers, query: Option<&str>) -> Option<Found> {
    let defaults =
        rule.from_headers.is_empty() && rule.from_params.is_empty() && rule.from_cookies.is_empty();
    let default_header = [HeaderLocation {
        name: "authorization".into(),
        prefix: "Bearer ".into(),
    }];
    let default_param = ["access_token".to_owned()];
    let (from_headers, from_params): (&[HeaderLocation], &[String]) = if defaults {
        (&default_header, &default_param)
    } else {
        (&rule.from_headers, &rule.from_params)
    };
    for h in from_headers {
        let mut found = None;
        headers.for_each_value(&h.name, &mut |v| {
            if found.is_some() {
                return;
            }
            let Ok(v) = std::str::from_utf8(v) else {
                return;
            };
            let v = v.trim();
            let rest = if h.prefix.is_empty() {
                Some(v)
            } else {
                v.get(..h.prefix.len())
                    .filter(|p| p.eq_ignore_ascii_case(&h.prefix))
                    .map(|_| &v[h.prefix.len()..])
            };
            if let Some(t) = rest.map(str::trim).filter(|t| !t.is_empty()) {
                found = Some(t.to_owned());
            }
        });
        if let Some(token) = found {
            return Some(Found {
                token,
                location: Location::Header(h.name.clone()),
            });
        }
    }
    if let Some(query) = query {
        for name in from_params {
            let value = query.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k == name && !v.is_empty()).then_some(v)
            });
            if let Some(v) = value {
                return Some(Found {
                    token: v.to_owned(),
                    location: Location::Param(name.clone()),
                });
            }
        }
    }
    for name in &rule.from_cookies {
        let mut found = None;
        headers.for_each_value("cookie", &mut |v| {
            if found.is_some() {
                return;
            }
            let Ok(v) = std::str::from_utf8(v) else {
                return;
            };
            found = v.split(';').find_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                (k == name && !v.is_empty()).then(|| v.to_owned())
            });
        });
        if let Some(token) = found {
            return Some(Found {
                token,
                location: Location::Cookie(name.clone()),
            });
        }
    }
    None
}

/// A JWKS, parsed: the keys it holds that can verify one of the algorithms above.
/// Keys of another kind (HMAC secrets, unknown types) are skipped, as Envoy skips them.
#[derive(Clone)]
pub struct Jwks {
    keys: Vec<Key>,
}

#[derive(Clone)]
struct Key {
    kid: Option<String>,
    /// The JWK's `alg`, when it names one: the token's must be the same.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| (&k.kid, &k.alg)))
            .finish()
    }
}

/// A JWKS that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("not a JWKS: {0}")]
    NotJwks(String),
    #[error("no usable key (RSA, EC P-256/P-384 or Ed25519)")]
    NoUsableKey,
}

impl Jwks {
    /// Reads a JWKS document (`{"keys": [...]}`).
    pub fn parse(text: &str) -> Result<Jwks, JwksError> {
        #[derive(Deserialize)]
        struct Doc {
            keys: Vec<Value>,
        }
        let doc: Doc = serde_json::from_str(text).map_err(|e| JwksError::NotJwks(e.to_string()))?;
        let keys: Vec<Key> = doc.keys.into_iter().filter_map(key).collect();
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey);
        }
        Ok(Jwks { keys })
    }

    /// How many usable keys it holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether it has a key with id `kid`.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

fn key(value: Value) -> Option<Key> {
    // A key naming an algorithm Ambit does not verify is skipped.
    let alg = match value.get("alg") {
        None => None,
        Some(a) => Some(
            a.as_str()?
                .parse::<Algorithm>()
                .ok()
                .filter(|a| supported(*a))?,
        ),
    };
    let jwk: Jwk = serde_json::from_value(value).ok()?;
    if !matches!(
        jwk.algorithm,
        AlgorithmParameters::RSA(_)
            | AlgorithmParameters::EllipticCurve(_)
            | AlgorithmParameters::OctetKeyPair(_)
    ) {
        return None;
    }
    Some(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        key: DecodingKey::from_jwk(&jwk).ok()?,
    })
}

fn supported(alg: Algorithm) -> bool {
    use Algorithm::*;
    matches!(
        alg,
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 | ES256 | ES384 | EdDSA
    )
}

/// A token split and decoded, not yet trusted.
#[derive(Debug, Clone)]
pub struct Token<'t> {
    pub alg: Algorithm,
    pub kid: Option<String>,
    /// The payload's claims.
    pub claims: serde_json::Map<String, Value>,
    /// The payload as JSON bytes.
    pub payload: Vec<u8>,
    /// `header.payload`, what the signature covers.
    signed: &'t str,
    signature: &'t str,
}

/// Splits and decodes `raw`: three base64url sections, a JSON header naming a
/// supported algorithm, a JSON object as payload.
pub fn parse_token(raw: &str) -> Result<Token<'_>, JwtError> {
    if raw.len() > MAX_TOKEN_BYTES {
        return Err(JwtError::TooLarge);
    }
    let mut parts = raw.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::BadFormat);
    };
    if h.is_empty() || p.is_empty() || s.is_empty() {
        return Err(JwtError::BadFormat);
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.decode(h).map_err(|_| JwtError::BadHeader)?;
    let header: Value = serde_json::from_slice(&header).map_err(|_| JwtError::BadHeader)?;
    let header = header.as_object().ok_or(JwtError::BadHeader)?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(JwtError::UnsupportedAlgorithm)?;
    let alg: Algorithm = alg.parse().map_err(|_| JwtError::UnsupportedAlgorithm)?;
    if !supported(alg) {
        return Err(JwtError::UnsupportedAlgorithm);
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(JwtError::BadHeader),
    };
    let payload = b64.decode(p).map_err(|_| JwtError::BadPayload)?;
    let claims: Value = serde_json::from_slice(&payload).map_err(|_| JwtError::BadPayload)?;
    let Value::Object(claims) = claims else {
        return Err(JwtError::BadPayload);
    };
    b64.decode(s).map_err(|_| JwtError::BadFormat)?;
    Ok(Token {
        alg,
        kid,
        claims,
        payload,
        signed: &raw[..h.len() + 1 + p.len()],
        signature: s,
    })
}

/// The claims `rule` requires, at `now` (seconds since the Unix epoch): issuer,
/// audiences, then `exp` and `nbf` within [`CLOCK_SKEW_SECS`].
pub fn check_claims(token: &Token<'_>, rule: &JwtRule, now: u64) -> Result<(), JwtError> {
    let claims = &token.claims;
    if claims.get("iss").and_then(Value::as_str) != Some(rule.issuer.as_str()) {
        return Err(JwtError::UnknownIssuer);
    }
    if !rule.audiences.is_empty() {
        let auds = audiences(claims);
        if !auds.iter().any(|a| rule.audiences.contains(a)) {
            return Err(JwtError::AudienceNotAllowed);
        }
    }
    let time = |name: &str| -> Result<Option<u64>, JwtError> {
        match claims.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                .map(Some)
                .ok_or(JwtError::BadPayload),
        }
    };
    if let Some(exp) = time("exp")? {
        if now > exp.saturating_add(CLOCK_SKEW_SECS) {
            return Err(JwtError::Expired);
        }
    }
    if let Some(nbf) = time("nbf")? {
        if now.saturating_add(CLOCK_SKEW_SECS) < nbf {
            return Err(JwtError::NotYetValid);
        }
    }
    Ok(())
}

/// The signature, by the key `kid` names, else by any key fit for the algorithm.
/// [`JwtError::UnknownKey`]: no such key (a remote JWKS may be worth fetching again).
pub fn verify_signature(token: &Token<'_>, jwks: &Jwks) -> Result<(), JwtError> {
    let fits =
        |k: &&Key| k.alg.is_none_or(|a| a == token.alg) && k.key.family() == token.alg.family();
    let candidates: Vec<&Key> = match &token.kid {
        Some(kid) => jwks
            .keys
            .iter()
            .filter(|k| k.kid.as_deref() == Some(kid))
            .filter(fits)
            .collect(),
        None => jwks.keys.iter().filter(fits).collect(),
    };
    if candidates.is_empty() {
        return Err(JwtError::UnknownKey);
    }
    for k in candidates {
        if jsonwebtoken::crypto::verify(token.signature, token.signed.as_bytes(), &k.key, token.alg)
            .unwrap_or(false)
        {
            return Ok(());
        }
    }
    Err(JwtError::VerificationFailed)
}

/// The whole check of one token against one rule with its keys, at `now`: the
/// request's identity when it passes.
pub fn validate(raw: &str, rule: &JwtRule, jwks: &Jwks, now: u64) -> Result<RequestAuth, JwtError> {
    let token = parse_token(raw)?;
    check_claims(&token, rule, now)?;
    verify_signature(&token, jwks)?;
    Ok(request_auth(&token, rule))
}

fn audiences(claims: &serde_json::Map<String, Value>) -> Vec<String> {
    match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(l)) => l
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// What an accepted token tells authorization: `iss`, `sub`, `aud`, `azp` and every
/// claim (numbers and booleans as their JSON text, lists of them as lists of text,
/// objects nested; the rule's space-delimited claims split into lists).
pub fn request_auth(token: &Token<'_>, rule: &JwtRule) -> RequestAuth {
    let claims = &token.claims;
    let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
    let mut mapped = BTreeMap::new();
    for (name, value) in claims {
        let claim = if rule.space_delimited_claims.iter().any(|c| c == name) {
            value.as_str().map(|s| {
                Claim::List(
                    s.split(' ')
                        .filter(|p| !p.is_empty())
                        .map(str::to_owned)
                        .collect(),
                )
            })
        } else {
            None
        };
        if let Some(c) = claim.or_else(|| to_claim(value, 0)) {
            mapped.insert(name.clone(), c);
        }
    }
    RequestAuth {
        issuer: text("iss").unwrap_or_default(),
        subject: text("sub").unwrap_or_default(),
        audiences: audiences(claims),
        presenter: text("azp"),
        claims: mapped,
    }
}

/// Nesting deeper than this is dropped (serde_json itself stops at 128).
const MAX_CLAIM_DEPTH: usize = 16;

fn to_claim(value: &Value, depth: usize) -> Option<Claim> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(Claim::String(s.clone())),
        Value::Bool(_) | Value::Number(_) => Some(Claim::String(value.to_string())),
        Value::Array(list) => Some(Claim::List(
            list.iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Bool(_) | Value::Number(_) => Some(v.to_string()),
                    _ => None,
                })
                .collect(),
        )),
        Value::Object(map) if depth < MAX_CLAIM_DEPTH => Some(Claim::Object(
            map.iter()
                .filter_map(|(k, v)| Some((k.clone(), to_claim(v, depth + 1)?)))
                .collect(),
        )),
        Value::Object(_) => None,
    }
}

/// The headers an accepted token adds to the request (`outputPayloadToHeader`: the
/// payload, base64url; `outputClaimToHeaders`: string, number and boolean claims,
/// nested via `.`; a claim that is missing or of another type adds nothing).
pub fn output_headers(token: &Token<'_>, rule: &JwtRule) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(h) = &rule.output_payload_to_header {
        out.push((
            h.clone(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&token.payload),
        ));
    }
    for c in &rule.output_claim_to_headers {
        let mut value = None;
        let mut at: Option<&serde_json::Map<String, Value>> = Some(&token.claims);
        let mut parts = c.claim.split('.').peekable();
        while let Some(part) = parts.next() {
            let v = at.and_then(|m| m.get(part));
            if parts.peek().is_none() {
                value = v;
            } else {
                at = v.and_then(Value::as_object);
            }
        }
        let text = match value {
            Some(Value::String(s)) => Some(s.clone()),
            Some(v @ (Value::Bool(_) | Value::Number(_))) => Some(v.to_string()),
            _ => None,
        };
        if let Some(t) = text {
            out.push((c.header.clone(), t));
        }
    }
    out
}

/// The realm of a 401's `WWW-Authenticate`, as Envoy writes it: `Bearer
/// realm="<scheme>://<host><path>", error="invalid_token"` (the path without its
/// query).
pub fn www_authenticate(scheme: &str, host: &str, path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    format!("Bearer realm=\"{scheme}://{host}{path}\", error=\"invalid_token\"")
}

#[cfg(test)]
mod tests;
