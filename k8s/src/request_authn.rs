//! RequestAuthentication → what waypoints enforce (`ambit_core::model::RequestAuthnSpec`,
//! `ambit_core::jwt`), with Istio's semantics (`../shared/reference/istio-ambient-api.md`
//! §2.2):
//!
//! - Only `targetRefs` (or the deprecated `targetRef`) policies are for waypoints, with
//!   the same targets as an AuthorizationPolicy ([`crate::authz::Targets`]). A
//!   `selector` or namespace-wide policy is for sidecars, which ambient does not have:
//!   it is kept out of the model and its condition says so.
//! - `jwksUri` must be HTTPS (the waypoint fetches it); `jwks` must be a JWKS with a
//!   key Ambit can verify with. Neither (OIDC discovery) is not supported.
//! - A rule that cannot be used (a bad JWKS, no key source, an `http://` URI) refuses
//!   every token it finds: a request carrying one gets 401, a request without one
//!   passes, as Istio does with an invalid JWKS. A policy that cannot be read at all
//!   (an unknown field, a bad target, a missing issuer) becomes one such rule at
//!   Envoy's default token locations, at the targets that are valid.
//! - `timeout` bounds the waypoint's fetch of the rule's `jwksUri` (a duration as
//!   Istio writes them, at least 1 ms; unset: the waypoint's `--jwks-fetch-timeout`).
//!
//! Pure: the caller gives the object.

use ambit_core::jwt::{ClaimToHeader, HeaderLocation, Jwks, JwksSource, JwtRule};
use ambit_core::model::{PolicyCondition, RequestAuthnSpec};
use serde::Deserialize;
use serde_json::Value;

use crate::authz::{Acceptance, Targets, MAX_TARGETS};
use crate::resources::ObjectKey;
use crate::security::RequestAuthentication;

/// One RequestAuthentication, translated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranslatedRequestAuthn {
    /// What waypoints enforce; `None`: nothing (no `targetRefs`).
    pub spec: Option<RequestAuthnSpec>,
    /// Its `WaypointAccepted` condition as far as the policy alone decides it.
    pub acceptance: Acceptance,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    selector: Option<Value>,
    target_ref: Option<Value>,
    target_refs: Option<Vec<Value>>,
    jwt_rules: Option<Vec<RuleSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleSpec {
    issuer: Option<String>,
    audiences: Option<Vec<String>>,
    jwks_uri: Option<String>,
    jwks: Option<String>,
    from_headers: Option<Vec<HeaderSpec>>,
    from_params: Option<Vec<String>>,
    from_cookies: Option<Vec<String>>,
    output_payload_to_header: Option<String>,
    forward_original_token: Option<bool>,
    output_claim_to_headers: Option<Vec<ClaimSpec>>,
    space_delimited_claims: Option<Vec<String>>,
    timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderSpec {
    name: Option<String>,
    prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimSpec {
    header: Option<String>,
    claim: Option<String>,
}

/// Translates one RequestAuthentication as the source kept it (one marked
/// unreadable fails closed at its targets).
pub fn translate(
    key: &ObjectKey,
    object: &RequestAuthentication,
    root_namespace: &str,
) -> TranslatedRequestAuthn {
    let spec = &object.spec;
    let Some(targets) = Targets::read(spec, key, root_namespace) else {
        return TranslatedRequestAuthn {
            spec: None,
            acceptance: Acceptance {
                accepted: false,
                reason: "UnsupportedValue",
                message: "without targetRefs it is for sidecars: ambient waypoints enforce a RequestAuthentication only through targetRefs".into(),
            },
        };
    };
    let invalid = |message: String| closed(key, targets.valid.clone(), message);
    if let Some(why) = &object.unreadable {
        return invalid(format!("unreadable: {why}"));
    }
    if let Some(e) = &targets.error {
        return invalid(e.clone());
    }
    if targets.written > MAX_TARGETS {
        return invalid(format!(
            "spec.targetRefs: at most {MAX_TARGETS} entries, not {}",
            targets.written
        ));
    }
    let parsed: Spec = match serde_path_to_error::deserialize(spec.clone()) {
        Ok(p) => p,
        Err(e) => return invalid(format!("spec.{e}")),
    };
    if parsed.selector.is_some() || (parsed.target_ref.is_some() && parsed.target_refs.is_some()) {
        return invalid("spec: only one of selector, targetRef and targetRefs may be set".into());
    }
    let mut rules = Vec::new();
    let mut notes = Vec::new();
    for (i, r) in parsed.jwt_rules.unwrap_or_default().iter().enumerate() {
        let path = format!("spec.jwtRules[{i}]");
        match rule(r, &path, &mut notes) {
            Ok(r) => rules.push(r),
            Err(e) => return invalid(e),
        }
    }
    let refused: Vec<&str> = rules
        .iter()
        .filter_map(|r| match &r.jwks {
            JwksSource::Invalid(why) => Some(why.as_str()),
            _ => None,
        })
        .collect();
    let acceptance = if refused.is_empty() {
        let mut message = "enforced by the waypoint".to_owned();
        for n in &notes {
            message.push_str("; ");
            message.push_str(n);
        }
        Acceptance {
            accepted: true,
            reason: "Accepted",
            message,
        }
    } else {
        Acceptance {
            accepted: false,
            reason: "Invalid",
            message: format!(
                "{}; the waypoint refuses every token those rules find (401), requests without one pass",
                refused.join("; ")
            ),
        }
    };
    TranslatedRequestAuthn {
        spec: Some(spec_of(key, targets.valid, rules, &acceptance)),
        acceptance,
    }
}

fn spec_of(
    key: &ObjectKey,
    targets: Vec<ambit_core::model::PolicyTarget>,
    rules: Vec<JwtRule>,
    acceptance: &Acceptance,
) -> RequestAuthnSpec {
    RequestAuthnSpec {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        targets,
        rules,
        condition: Some(PolicyCondition {
            accepted: acceptance.accepted,
            reason: acceptance.reason.to_owned(),
            message: acceptance.message.clone(),
        }),
    }
}

/// A policy that cannot be understood: one rule at Envoy's default locations that
/// refuses every token, at its valid targets.
fn closed(
    key: &ObjectKey,
    targets: Vec<ambit_core::model::PolicyTarget>,
    message: String,
) -> TranslatedRequestAuthn {
    let nowhere = if targets.is_empty() {
        " (it has no valid target, so it applies nowhere)"
    } else {
        ""
    };
    let acceptance = Acceptance {
        accepted: false,
        reason: "Invalid",
        message: format!(
            "{message}; the waypoint refuses every bearer token at its targets (401), requests without one pass{nowhere}"
        ),
    };
    let rule = JwtRule {
        issuer: String::new(),
        audiences: Vec::new(),
        jwks: JwksSource::Invalid(message),
        from_headers: Vec::new(),
        from_params: Vec::new(),
        from_cookies: Vec::new(),
        forward_original_token: false,
        output_payload_to_header: None,
        output_claim_to_headers: Vec::new(),
        space_delimited_claims: Vec::new(),
        fetch_timeout_ms: None,
    };
    TranslatedRequestAuthn {
        spec: Some(spec_of(key, targets, vec![rule], &acceptance)),
        acceptance,
    }
}

fn header_name(value: Option<&str>, path: &str) -> Result<String, String> {
    let v = value
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("{path}: is required"))?;
    http::HeaderName::from_bytes(v.as_bytes())
        .map(|h| h.as_str().to_owned())
        .map_err(|_| format!("{path}: {v:?} is not a header name"))
}

/// One rule; `Err` when its token locations or outputs cannot be read (the whole
/// policy then fails closed), an `Invalid` key source when only its keys cannot.
fn rule(r: &RuleSpec, path: &str, notes: &mut Vec<String>) -> Result<JwtRule, String> {
    let issuer = r
        .issuer
        .clone()
        .filter(|i| !i.is_empty())
        .ok_or_else(|| format!("{path}.issuer: is required"))?;
    let mut from_headers = Vec::new();
    for (i, h) in r.from_headers.iter().flatten().enumerate() {
        from_headers.push(HeaderLocation {
            name: header_name(h.name.as_deref(), &format!("{path}.fromHeaders[{i}].name"))?,
            prefix: h.prefix.clone().unwrap_or_default(),
        });
    }
    let from_params = r.from_params.clone().unwrap_or_default();
    if let Some(i) = from_params.iter().position(String::is_empty) {
        return Err(format!("{path}.fromParams[{i}]: may not be empty"));
    }
    let from_cookies = r.from_cookies.clone().unwrap_or_default();
    if let Some(i) = from_cookies.iter().position(String::is_empty) {
        return Err(format!("{path}.fromCookies[{i}]: may not be empty"));
    }
    let output_payload_to_header = match &r.output_payload_to_header {
        None => None,
        Some(h) if h.is_empty() => None,
        Some(h) => Some(header_name(
            Some(h),
            &format!("{path}.outputPayloadToHeader"),
        )?),
    };
    let mut output_claim_to_headers = Vec::new();
    for (i, c) in r.output_claim_to_headers.iter().flatten().enumerate() {
        let at = format!("{path}.outputClaimToHeaders[{i}]");
        let claim = c
            .claim
            .clone()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| format!("{at}.claim: is required"))?;
        output_claim_to_headers.push(ClaimToHeader {
            header: header_name(c.header.as_deref(), &format!("{at}.header"))?,
            claim,
        });
    }
    let fetch_timeout_ms = match &r.timeout {
        None => None,
        Some(t) => match crate::virtual_service::duration_ms(t) {
            Ok(ms) if ms >= 1 => Some(ms),
            Ok(_) => return Err(format!("{path}.timeout: {t:?}: must be at least 1ms")),
            Err(e) => return Err(format!("{path}.timeout: {t:?} {e}")),
        },
    };
    let jwks = match (&r.jwks, &r.jwks_uri) {
        (Some(_), Some(_)) => {
            JwksSource::Invalid(format!("{path}: jwks and jwksUri are mutually exclusive"))
        }
        (Some(text), None) => match Jwks::parse(text) {
            Ok(_) => {
                if serde_json::from_str::<Value>(text).is_ok_and(|v| {
                    v["keys"]
                        .as_array()
                        .is_some_and(|k| k.iter().any(|k| k.get("d").is_some()))
                }) {
                    notes.push(format!(
                        "{path}.jwks holds a private key: only public keys belong in a JWKS"
                    ));
                }
                JwksSource::Inline(text.clone())
            }
            Err(e) => JwksSource::Invalid(format!("{path}.jwks: {e}")),
        },
        (None, Some(uri)) if uri.starts_with("https://") && uri.len() > "https://".len() => {
            JwksSource::Uri(uri.clone())
        }
        (None, Some(uri)) => JwksSource::Invalid(format!(
            "{path}.jwksUri: {uri:?}: only HTTPS URIs are fetched"
        )),
        (None, None) => JwksSource::Invalid(format!(
            "{path}: neither jwks nor jwksUri is set, and OIDC discovery is not supported"
        )),
    };
    Ok(JwtRule {
        issuer,
        audiences: r.audiences.clone().unwrap_or_default(),
        jwks,
        from_headers,
        from_params,
        from_cookies,
        forward_original_token: r.forward_original_token.unwrap_or(false),
        output_payload_to_header,
        output_claim_to_headers,
        space_delimited_claims: r.space_delimited_claims.clone().unwrap_or_default(),
        fetch_timeout_ms,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ambit_core::model::TargetKind;
    use serde_json::json;

    const JWKS: &str = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"k"}]}"#;

    fn run(spec: Value) -> TranslatedRequestAuthn {
        let object = RequestAuthentication {
            spec,
            ..Default::default()
        };
        translate(&ObjectKey::new("shop", "jwt"), &object, "istio-system")
    }

    #[test]
    fn a_valid_policy_keeps_every_field() {
        let t = run(json!({
            "targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
            "jwtRules": [{
                "issuer": "https://idp", "audiences": ["web"], "jwksUri": "https://idp/jwks",
                "fromHeaders": [{"name": "X-JWT", "prefix": "Token "}], "fromParams": ["t"],
                "fromCookies": ["s"], "forwardOriginalToken": true,
                "outputPayloadToHeader": "x-payload",
                "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"}],
                "spaceDelimitedClaims": ["roles"], "timeout": "3s"
            }, {"issuer": "https://other", "jwks": JWKS}]
        }));
        assert!(t.acceptance.accepted, "{:?}", t.acceptance);
        let spec = t.spec.unwrap();
        assert_eq!(spec.targets[0].kind, TargetKind::Service);
        let r = &spec.rules[0];
        assert_eq!(r.jwks, JwksSource::Uri("https://idp/jwks".into()));
        assert_eq!(r.from_headers[0].name, "x-jwt");
        assert!(r.forward_original_token);
        assert_eq!(r.output_claim_to_headers[0].header, "x-sub");
        assert_eq!(r.fetch_timeout_ms, Some(3_000));
        assert_eq!(spec.rules[1].jwks, JwksSource::Inline(JWKS.into()));
        assert_eq!(spec.rules[1].fetch_timeout_ms, None);
    }

    #[test]
    fn bad_keys_refuse_tokens_and_a_bad_policy_fails_closed_at_its_targets() {
        let target =
            json!([{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}]);
        for (rules, want) in [
            (json!([{"issuer": "i", "jwks": "{not json"}]), "not a JWKS"),
            (
                json!([{"issuer": "i", "jwks": "{\"keys\": []}"}]),
                "no usable key",
            ),
            (
                json!([{"issuer": "i", "jwksUri": "http://idp/jwks"}]),
                "only HTTPS",
            ),
            (json!([{"issuer": "i"}]), "OIDC discovery"),
            (
                json!([{"issuer": "i", "jwks": JWKS, "jwksUri": "https://x"}]),
                "mutually exclusive",
            ),
        ] {
            let t = run(json!({"targetRefs": target, "jwtRules": rules}));
            assert!(!t.acceptance.accepted);
            assert!(
                t.acceptance.message.contains(want),
                "{}",
                t.acceptance.message
            );
            let spec = t.spec.unwrap();
            assert!(matches!(&spec.rules[0].jwks, JwksSource::Invalid(m) if m.contains(want)));
            assert_eq!(
                spec.rules[0].issuer, "i",
                "its locations stay the rule's own"
            );
        }
        for (spec, want) in [
            (
                json!({"targetRefs": target, "jwtRules": [{"jwks": JWKS}]}),
                "issuer: is required",
            ),
            (
                json!({"targetRefs": target, "jwtRules": [{"issuer": "i", "jwks": JWKS, "bogus": 1}]}),
                "unknown field",
            ),
            (
                json!({"targetRefs": target, "jwtRules": [{"issuer": "i", "jwks": JWKS, "fromHeaders": [{"prefix": "x"}]}]}),
                "fromHeaders[0].name",
            ),
            (
                json!({"targetRefs": target, "selector": {"matchLabels": {"a": "b"}}}),
                "only one of",
            ),
            (
                json!({"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}, {"kind": "Pod", "name": "p"}]}),
                "cannot be targeted",
            ),
        ] {
            let t = run(spec);
            assert_eq!(t.acceptance.reason, "Invalid");
            assert!(
                t.acceptance.message.contains(want),
                "{}",
                t.acceptance.message
            );
            let spec = t.spec.unwrap();
            assert_eq!(spec.targets.len(), 1, "fails closed at the valid targets");
            assert_eq!(spec.rules.len(), 1);
            assert!(
                spec.rules[0].from_headers.is_empty(),
                "Envoy's default locations"
            );
            assert!(matches!(spec.rules[0].jwks, JwksSource::Invalid(_)));
        }
        let unreadable = RequestAuthentication {
            spec: json!({"targetRefs": target}),
            unreadable: Some("bad YAML".into()),
            ..Default::default()
        };
        let t = translate(&ObjectKey::new("shop", "jwt"), &unreadable, "istio-system");
        assert!(t.acceptance.message.contains("bad YAML"));
        assert!(t.spec.is_some());
    }

    #[test]
    fn a_selector_policy_is_not_for_waypoints_and_says_so() {
        let t = run(
            json!({"selector": {"matchLabels": {"app": "web"}}, "jwtRules": [{"issuer": "i", "jwks": JWKS}]}),
        );
        assert!(t.spec.is_none());
        assert_eq!(t.acceptance.reason, "UnsupportedValue");
        let t = run(
            json!({"targetRefs": [{"kind": "Service", "name": "web"}], "jwtRules": [{"issuer": "i", "jwks": JWKS.replace("\"kid\"", "\"d\":\"x\",\"kid\"")}]}),
        );
        assert!(t.acceptance.accepted);
        assert!(
            t.acceptance.message.contains("private key"),
            "{}",
            t.acceptance.message
        );
    }
}
