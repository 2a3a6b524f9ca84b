//! End-user authentication (RequestAuthentication, JWT): the first step of the
//! request path, before authorization.
//!
//! [`Authenticator::authenticate`] takes the JWT rules attached to this waypoint's
//! Gateway, its class, or the Service the request is for
//! (`MeshState::jwt_rules_for`, the same attachment as L7 authorization), finds
//! each rule's token (`ambit_core::jwt::find_token`) and checks it with the rule's
//! keys (`ambit_core::jwt`'s parse, claims and signature checks). No token: the request goes on with no request
//! identity. A token no rule accepts: 401 ([`unauthorized`]), as Envoy's `jwt_authn`
//! answers it. A token accepted: its identity goes to authorization, the token is
//! removed unless `forwardOriginalToken`, and the rule's output headers are set.
//!
//! Keys: an inline JWKS is parsed once and kept by its text; a `jwksUri` is fetched
//! over HTTPS (hyper + rustls on aws-lc-rs, the system's roots plus
//! `--jwks-ca-bundle`; within the rule's `timeout`, else `--jwks-fetch-timeout`) on
//! first use, then again every `--jwks-refresh-interval`. A
//! failed fetch keeps the last good keys. A token whose `kid` the keys lack makes one
//! more fetch, at most once per `--jwks-refetch-min-interval` per URI, and is checked
//! again with what it brought.
//!
//! Signatures: a signature check is a pure function of the token and the key set, and
//! the costliest step of a request (an ES256 verification is about a quarter of the
//! waypoint's CPU at 1,000 requests/s with one token). [`Verified`] remembers the
//! tokens whose signature a key set verified, by that key set's identity (the `Arc`
//! held, so new keys, inline or fetched, are new entries); the claims (issuer,
//! audiences, `exp`, `nbf`) are still checked at every request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ambit_core::jwt::{self, Found, Jwks, JwksSource, JwtError, JwtRule, Location};
use ambit_core::l7::RequestAuth;
use ambit_core::model::MeshState;
use ambit_core::waypoint::{BoundTarget, GatewayRef};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

use crate::http::Body;

/// How the waypoint gets remote keys.
#[derive(Debug, Clone)]
pub struct AuthnSettings {
    /// PEM certificates trusted for JWKS servers besides the system's roots.
    pub ca_bundle: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// A remote JWKS is fetched again this often.
    pub refresh_interval: Duration,
    /// An unknown `kid` fetches a JWKS again at most this often.
    pub refetch_min_interval: Duration,
    /// One fetch may take this long.
    pub fetch_timeout: Duration,
}

impl Default for AuthnSettings {
    /// Envoy's: keys kept 10 minutes, fetched within 5 s; a refetch for an unknown
    /// key at most every 10 s.
    fn default() -> Self {
        AuthnSettings {
            ca_bundle: Vec::new(),
            refresh_interval: Duration::from_secs(600),
            refetch_min_interval: Duration::from_secs(10),
            fetch_timeout: Duration::from_secs(5),
        }
    }
}

/// A JWKS document larger than this is refused.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// What authentication made of a request.
#[derive(Debug)]
pub enum Outcome {
    /// No rule found a token: no request identity.
    Anonymous,
    Authenticated(RequestAuth),
    /// A token was found and no rule accepted it.
    Rejected(JwtError),
}

/// The keys of every rule, and the client that fetches remote ones.
pub struct Authenticator {
    settings: AuthnSettings,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    inline: Mutex<HashMap<String, Result<Arc<Jwks>, String>>>,
    remote: Mutex<HashMap<String, Arc<Remote>>>,
    verified: Mutex<Verified>,
}

/// Tokens whose signature was verified, each with the key set that verified it. Only
/// verified tokens enter (a forged one cannot fill it), at most [`VERIFIED_TOKENS`]
/// of at most [`VERIFIED_TOKEN_BYTES`] each (at most 4 MiB); when full it starts over.
#[derive(Default)]
struct Verified {
    tokens: HashMap<String, Arc<Jwks>>,
}

const VERIFIED_TOKENS: usize = 1024;
const VERIFIED_TOKEN_BYTES: usize = 4096;

impl Verified {
    /// Whether `keys` (this very set) verified `token`'s signature before.
    fn holds(&self, token: &str, keys: &Arc<Jwks>) -> bool {
        self.tokens
            .get(token)
            .is_some_and(|by| Arc::ptr_eq(by, keys))
    }

    fn insert(&mut self, token: &str, keys: &Arc<Jwks>) {
        if token.len() > VERIFIED_TOKEN_BYTES {
            return;
        }
        if self.tokens.len() >= VERIFIED_TOKENS {
            self.tokens.clear();
        }
        self.tokens.insert(token.to_owned(), keys.clone());
    }
}

/// A token one rule accepted: the request's identity and the rule's output headers.
#[derive(Debug)]
struct Accepted {
    auth: RequestAuth,
    outputs: Vec<(String, String)>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// One remote JWKS.
#[derive(Default)]
struct Remote {
    keys: Mutex<Option<Arc<Jwks>>>,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
    last_attempt: Mutex<Option<Instant>>,
    /// The rule's `timeout` for a fetch, as last seen; `None`: the waypoint's.
    timeout: Mutex<Option<Duration>>,
}

/// Why the TLS client for JWKS servers could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AuthnSetupError {
    #[error("a certificate of the JWKS CA bundle: {0}")]
    BadCertificate(rustls::Error),
    #[error("TLS client: {0}")]
    Tls(rustls::Error),
}

impl Authenticator {
    pub fn new(settings: AuthnSettings) -> Result<Arc<Self>, AuthnSetupError> {
        let mut roots = rustls::RootCertStore::empty();
        // System roots that do not parse are skipped, as every TLS client does.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        for cert in &settings.ca_bundle {
            roots
                .add(cert.clone())
                .map_err(AuthnSetupError::BadCertificate)?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(AuthnSetupError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        Ok(Arc::new(Authenticator {
            settings,
            client,
            inline: Mutex::default(),
            remote: Mutex::default(),
            verified: Mutex::default(),
        }))
    }

    /// Authenticates a request for `target` at waypoint `gateway`: `headers` are the
    /// request's (the token is taken out of them and the outputs put in when one is
    /// accepted), `query` its query string.
    pub async fn authenticate(
        self: &Arc<Self>,
        state: &MeshState,
        gateway: &GatewayRef,
        target: &BoundTarget,
        headers: &mut HeaderMap,
        query: Option<&str>,
    ) -> Outcome {
        let service = match target {
            BoundTarget::Service { service, .. } => {
                Some((service.spec.namespace.as_str(), service.spec.name.as_str()))
            }
            BoundTarget::Workload { .. } => None,
        };
        let found: Vec<(&JwtRule, Found)> = state
            .jwt_rules_for((gateway.namespace.as_str(), gateway.name.as_str()), service)
            .filter_map(|(_, rule)| Some((rule, jwt::find_token(rule, &*headers, query)?)))
            .collect();
        if found.is_empty() {
            return Outcome::Anonymous;
        }
        let mut errors = Vec::new();
        for (rule, token) in &found {
            match self.check(rule, &token.token).await {
                Ok(accepted) => {
                    self.accepted(rule, token, accepted.outputs, headers);
                    return Outcome::Authenticated(accepted.auth);
                }
                Err(e) => errors.push(e),
            }
        }
        Outcome::Rejected(jwt::most_specific(errors).unwrap_or(JwtError::VerificationFailed))
    }

    /// One token against one rule, with the rule's keys (fetched again once for a key
    /// they lack).
    async fn check(self: &Arc<Self>, rule: &JwtRule, token: &str) -> Result<Accepted, JwtError> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match &rule.jwks {
            JwksSource::Invalid(why) => Err(JwtError::NoKeys(why.clone())),
            JwksSource::Inline(text) => {
                let keys = self.inline_keys(text).map_err(JwtError::NoKeys)?;
                self.validate(token, rule, &keys, now)
            }
            JwksSource::Uri(uri) => {
                let remote = self.remote(uri);
                *remote.timeout.lock().unwrap_or_else(|p| p.into_inner()) =
                    rule.fetch_timeout_ms.map(Duration::from_millis);
                let keys = self.keys_of(uri, &remote).await?;
                match self.validate(token, rule, &keys, now) {
                    Err(JwtError::UnknownKey) => {
                        let keys = self
                            .refetch(uri, &remote)
                            .await
                            .ok_or(JwtError::UnknownKey)?;
                        self.validate(token, rule, &keys, now)
                    }
                    other => other,
                }
            }
        }
    }

    /// `ambit_core::jwt::validate`'s checks in its order (form, claims at `now`,
    /// signature), the signature taken from [`Verified`] when `keys` verified this
    /// token before.
    fn validate(
        &self,
        raw: &str,
        rule: &JwtRule,
        keys: &Arc<Jwks>,
        now: u64,
    ) -> Result<Accepted, JwtError> {
        let token = jwt::parse_token(raw)?;
        jwt::check_claims(&token, rule, now)?;
        let seen = self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .holds(raw, keys);
        if !seen {
            jwt::verify_signature(&token, keys)?;
            self.verified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(raw, keys);
        }
        Ok(Accepted {
            auth: jwt::request_auth(&token, rule),
            outputs: jwt::output_headers(&token, rule),
        })
    }

    fn inline_keys(&self, text: &str) -> Result<Arc<Jwks>, String> {
        let mut inline = self.inline.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = inline.get(text) {
            return k.clone();
        }
        let parsed = Jwks::parse(text)
            .map(Arc::new)
            .map_err(|e| format!("inline jwks: {e}"));
        // Bounded by the policies in the model; a policy changed many times leaves a
        // few stale entries behind, which a restart clears.
        inline.insert(text.to_owned(), parsed.clone());
        parsed
    }

    /// The entry of `uri`, made (and its refresher started) on first use.
    fn remote(self: &Arc<Self>, uri: &str) -> Arc<Remote> {
        let mut remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = remote.get(uri) {
            return r.clone();
        }
        let entry = Arc::new(Remote::default());
        remote.insert(uri.to_owned(), entry.clone());
        let this = Arc::downgrade(self);
        let (uri, weak) = (uri.to_owned(), Arc::downgrade(&entry));
        let every = self.settings.refresh_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let (Some(this), Some(entry)) = (this.upgrade(), weak.upgrade()) else {
                    return;
                };
                let _one = entry.fetching.lock().await;
                this.fetch_into(&uri, &entry).await;
            }
        });
        entry
    }

    /// The keys of `uri`: those held, else fetched now.
    async fn keys_of(&self, uri: &str, remote: &Remote) -> Result<Arc<Jwks>, JwtError> {
        if let Some(k) = remote
            .keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok(k);
        }
        let _one = remote.fetching.lock().await;
        if let Some(k) = remote
            .keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok(k);
        }
        self.fetch_into(uri, remote)
            .await
            .ok_or_else(|| JwtError::FetchFailed(format!("no keys from {uri} yet")))
    }

    /// Fetches `uri` again for a key its keys lack, unless it was tried too recently;
    /// the keys it got, if it did.
    async fn refetch(&self, uri: &str, remote: &Remote) -> Option<Arc<Jwks>> {
        {
            let last = remote
                .last_attempt
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|at| at.elapsed() < self.settings.refetch_min_interval) {
                return None;
            }
        }
        let _one = remote.fetching.lock().await;
        tracing::info!(uri, "a token's key id is unknown: fetching the JWKS again");
        self.fetch_into(uri, remote).await
    }

    /// One fetch of `uri` into `remote`: the new keys, or `None` (the old ones stay).
    async fn fetch_into(&self, uri: &str, remote: &Remote) -> Option<Arc<Jwks>> {
        *remote
            .last_attempt
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let timeout = remote
            .timeout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(self.settings.fetch_timeout);
        match tokio::time::timeout(timeout, self.fetch(uri)).await {
            Ok(Ok(keys)) => {
                tracing::info!(uri, keys = keys.len(), "JWKS fetched");
                let keys = Arc::new(keys);
                *remote.keys.lock().unwrap_or_else(|p| p.into_inner()) = Some(keys.clone());
                Some(keys)
            }
            Ok(Err(e)) => {
                tracing::warn!(uri, error = %e, "JWKS fetch failed; the last good keys stay");
                None
            }
            Err(_) => {
                tracing::warn!(
                    uri,
                    ?timeout,
                    "JWKS fetch timed out; the last good keys stay"
                );
                None
            }
        }
    }

    async fn fetch(&self, uri: &str) -> Result<Jwks, String> {
        let uri: http::Uri = uri.parse().map_err(|e| format!("bad URI: {e}"))?;
        let response = self
            .client
            .get(uri)
            .await
            .map_err(|e| format!("{e}: {}", source_chain(&e)))?;
        if response.status() != StatusCode::OK {
            return Err(format!("status {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        let text = std::str::from_utf8(&body).map_err(|_| "body is not UTF-8".to_owned())?;
        Jwks::parse(text).map_err(|e| e.to_string())
    }

    /// An accepted token: out of the request unless the rule forwards it, the rule's
    /// outputs in.
    fn accepted(
        &self,
        rule: &JwtRule,
        found: &Found,
        outputs: Vec<(String, String)>,
        headers: &mut HeaderMap,
    ) {
        if !rule.forward_original_token {
            // Query parameters and cookies are left as they are, as Envoy leaves them.
            if let Location::Header(name) = &found.location {
                headers.remove(name.as_str());
            }
        }
        for (name, value) in outputs {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                headers.insert(name, value);
            }
        }
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut at = e.source();
    while let Some(s) = at {
        out.push(s.to_string());
        at = s.source();
    }
    out.join(": ")
}

/// The answer to a refused token, as Envoy's `jwt_authn` writes it: 401, `WWW-Authenticate:
/// Bearer realm="<scheme>://<host><path>", error="invalid_token"`, the reason as the
/// body; to gRPC clients, `grpc-status: 16` (UNAUTHENTICATED) in a trailers-only
/// response.
pub fn unauthorized(error: &JwtError, host: &str, path: &str, grpc: bool) -> Response<Body> {
    let challenge = HeaderValue::from_str(&jwt::www_authenticate("http", host, path))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer error=\"invalid_token\""));
    let message = error.to_string();
    let mut response = if grpc {
        let mut r = Response::new(Empty::<Bytes>::new().map_err(|n| match n {}).boxed());
        let h = r.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static("16"));
        if let Ok(m) = HeaderValue::from_str(&message) {
            h.insert("grpc-message", m);
        }
        r
    } else {
        let mut r = Response::new(
            Full::new(Bytes::from(message))
                .map_err(|n| match n {})
                .boxed(),
        );
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        r
    };
    response
        .headers_mut()
        .insert(http::header::WWW_AUTHENTICATE, challenge);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    use jsonwebtoken::jwk::Jwk;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};

    /// An ES256 key: the signing half, and a JWKS with its public half.
    fn key(kid: &str) -> (EncodingKey, String) {
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let key = EncodingKey::from_ec_der(doc.as_ref());
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some(kid.into());
        (key, serde_json::json!({ "keys": [jwk] }).to_string())
    }

    fn sign(key: &EncodingKey, kid: &str, exp: u64) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        let claims = serde_json::json!({"iss": "https://idp", "sub": "alice", "exp": exp});
        jsonwebtoken::encode(&h, &claims, key).unwrap()
    }

    fn rule(jwks: &str) -> JwtRule {
        JwtRule {
            issuer: "https://idp".into(),
            audiences: Vec::new(),
            jwks: JwksSource::Inline(jwks.into()),
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

    #[test]
    fn a_remembered_signature_counts_only_for_the_key_set_that_verified_it() {
        let a = Authenticator::new(AuthnSettings::default()).unwrap();
        let (k1, jwks1) = key("k1");
        let (_, jwks2) = key("k1");
        let (keys1, keys2) = (
            Arc::new(Jwks::parse(&jwks1).unwrap()),
            Arc::new(Jwks::parse(&jwks2).unwrap()),
        );
        let now = 1_000_000;
        let token = sign(&k1, "k1", now + 600);
        let r = rule(&jwks1);
        // Verified, then remembered: the same answer again.
        for _ in 0..2 {
            let ok = a.validate(&token, &r, &keys1, now).unwrap();
            assert_eq!(
                (ok.auth.issuer.as_str(), ok.auth.subject.as_str()),
                ("https://idp", "alice")
            );
        }
        assert!(a.verified.lock().unwrap().holds(&token, &keys1));
        // Another key set with the same key id does not inherit it: the signature is
        // checked against its key and fails.
        assert_eq!(
            a.validate(&token, &r, &keys2, now).unwrap_err(),
            JwtError::VerificationFailed
        );
        // The claims are checked at every request: once expired, refused, remembered
        // signature or not.
        assert_eq!(
            a.validate(&token, &r, &keys1, now + 600 + jwt::CLOCK_SKEW_SECS + 1)
                .unwrap_err(),
            JwtError::Expired
        );
        // A tampered token never enters.
        let tampered = format!("{}A", &token[..token.len() - 1]);
        let tampered = if tampered == token {
            format!("{}B", &token[..token.len() - 1])
        } else {
            tampered
        };
        assert!(a.validate(&tampered, &r, &keys1, now).is_err());
        assert!(!a.verified.lock().unwrap().holds(&tampered, &keys1));
    }

    #[tokio::test]
    async fn a_rules_timeout_bounds_its_jwks_fetch() {
        // A JWKS server that accepts and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                open.push(s);
            }
        });
        let a = Authenticator::new(AuthnSettings {
            fetch_timeout: Duration::from_secs(600),
            ..AuthnSettings::default()
        })
        .unwrap();
        let mut r = rule("");
        r.jwks = JwksSource::Uri(format!("https://{addr}/jwks"));
        r.fetch_timeout_ms = Some(100);
        let (k, _) = key("k1");
        let token = sign(&k, "k1", 4_000_000_000);
        let got = tokio::time::timeout(Duration::from_secs(60), a.check(&r, &token))
            .await
            .expect("the rule's 100 ms fetch timeout did not apply (the waypoint's is 600 s)");
        assert!(matches!(got, Err(JwtError::FetchFailed(_))), "{got:?}");
        held.abort();
    }

    #[test]
    fn the_remembered_signatures_are_bounded() {
        let mut v = Verified::default();
        let keys = Arc::new(Jwks::parse(&key("k").1).unwrap());
        for i in 0..VERIFIED_TOKENS + 10 {
            v.insert(&format!("token-{i}"), &keys);
        }
        assert!(v.tokens.len() <= VERIFIED_TOKENS);
        v.insert(&"x".repeat(VERIFIED_TOKEN_BYTES + 1), &keys);
        assert!(!v.holds(&"x".repeat(VERIFIED_TOKEN_BYTES + 1), &keys));
    }

    #[tokio::test]
    async fn a_refused_token_is_401_with_envoys_challenge_or_grpc_16() {
        let r = unauthorized(&JwtError::Expired, "web.shop", "/a?b=c", false);
        assert_eq!(r.status(), 401);
        assert_eq!(
            r.headers()["www-authenticate"],
            r#"Bearer realm="http://web.shop/a", error="invalid_token""#
        );
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"Jwt is expired");
        let g = unauthorized(&JwtError::VerificationFailed, "rpc", "/x.Y/Z", true);
        assert_eq!(g.status(), 200);
        assert_eq!(g.headers()["grpc-status"], "16");
        assert_eq!(g.headers()["grpc-message"], "Jwt verification fails");
    }
}
