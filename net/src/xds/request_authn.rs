//! Waypoints' RequestAuthentications as xDS resources, both ways: a
//! [`RequestAuthnSpec`] becomes a [`RequestAuthentication`] named
//! `requestauthn/<namespace>/<name>`; a received one is read back with the same
//! checks as the control plane's (an inline JWKS must parse, a JWKS URI must be
//! HTTPS), so a resource the control plane could not have produced is rejected alone.

use ambit_core::jwt::{ClaimToHeader, HeaderLocation, Jwks, JwksSource, JwtRule};
use ambit_core::model::RequestAuthnSpec;
use ambit_proto::workload::{self as proto, RequestAuthentication};

use super::l7::{target_from_proto, target_to_proto};

/// The resource name of a RequestAuthentication.
pub fn request_authn_name(namespace: &str, name: &str) -> String {
    format!("requestauthn/{namespace}/{name}")
}

/// The resource of `spec`.
pub fn request_authn_to_proto(spec: &RequestAuthnSpec) -> RequestAuthentication {
    RequestAuthentication {
        name: spec.name.clone(),
        namespace: spec.namespace.clone(),
        targets: spec.targets.iter().map(target_to_proto).collect(),
        rules: spec.rules.iter().map(rule_to_proto).collect(),
        condition: spec
            .condition
            .as_ref()
            .map(super::resources::condition_to_proto),
    }
}

fn rule_to_proto(r: &JwtRule) -> proto::JwtRule {
    let (mut jwks, mut jwks_uri, mut invalid) = (String::new(), String::new(), String::new());
    match &r.jwks {
        JwksSource::Inline(t) => jwks = t.clone(),
        JwksSource::Uri(u) => jwks_uri = u.clone(),
        JwksSource::Invalid(why) => invalid = why.clone(),
    }
    proto::JwtRule {
        issuer: r.issuer.clone(),
        audiences: r.audiences.clone(),
        jwks_uri,
        jwks,
        invalid,
        from_headers: r
            .from_headers
            .iter()
            .map(|h| proto::JwtHeader {
                name: h.name.clone(),
                prefix: h.prefix.clone(),
            })
            .collect(),
        from_params: r.from_params.clone(),
        output_payload_to_header: r.output_payload_to_header.clone().unwrap_or_default(),
        forward_original_token: r.forward_original_token,
        output_claim_to_headers: r
            .output_claim_to_headers
            .iter()
            .map(|c| proto::ClaimToHeader {
                header: c.header.clone(),
                claim: c.claim.clone(),
            })
            .collect(),
        from_cookies: r.from_cookies.clone(),
        space_delimited_claims: r.space_delimited_claims.clone(),
        fetch_timeout_ms: r.fetch_timeout_ms,
    }
}

/// Reads a received resource; the error says what is unusable in it.
pub fn request_authn_from_proto(a: &RequestAuthentication) -> Result<RequestAuthnSpec, String> {
    if a.name.is_empty() || a.namespace.is_empty() {
        return Err("RequestAuthentication without a name or namespace".into());
    }
    let targets = a
        .targets
        .iter()
        .enumerate()
        .map(|(i, t)| target_from_proto(t).map_err(|e| format!("targets[{i}]: {e}")))
        .collect::<Result<_, _>>()?;
    let rules = a
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| rule_from_proto(r).map_err(|e| format!("rules[{i}]: {e}")))
        .collect::<Result<_, _>>()?;
    Ok(RequestAuthnSpec {
        namespace: a.namespace.clone(),
        name: a.name.clone(),
        targets,
        rules,
        condition: a
            .condition
            .as_ref()
            .map(super::resources::condition_from_proto),
    })
}

fn rule_from_proto(r: &proto::JwtRule) -> Result<JwtRule, String> {
    let jwks = match (
        r.jwks.is_empty(),
        r.jwks_uri.is_empty(),
        r.invalid.is_empty(),
    ) {
        (false, true, true) => {
            Jwks::parse(&r.jwks).map_err(|e| format!("jwks: {e}"))?;
            JwksSource::Inline(r.jwks.clone())
        }
        (true, false, true) => {
            if !r.jwks_uri.starts_with("https://") {
                return Err(format!("jwks_uri {:?} is not HTTPS", r.jwks_uri));
            }
            JwksSource::Uri(r.jwks_uri.clone())
        }
        (true, true, false) => JwksSource::Invalid(r.invalid.clone()),
        _ => return Err("exactly one of jwks, jwks_uri and invalid must be set".into()),
    };
    if r.issuer.is_empty() && !matches!(jwks, JwksSource::Invalid(_)) {
        return Err("a rule without an issuer".into());
    }
    let header_name = |n: &str| {
        http::HeaderName::from_bytes(n.as_bytes())
            .map(|h| h.as_str().to_owned())
            .map_err(|_| format!("{n:?} is not a header name"))
    };
    Ok(JwtRule {
        issuer: r.issuer.clone(),
        audiences: r.audiences.clone(),
        jwks,
        from_headers: r
            .from_headers
            .iter()
            .map(|h| {
                Ok(HeaderLocation {
                    name: header_name(&h.name)?,
                    prefix: h.prefix.clone(),
                })
            })
            .collect::<Result<_, String>>()?,
        from_params: r.from_params.clone(),
        from_cookies: r.from_cookies.clone(),
        forward_original_token: r.forward_original_token,
        output_payload_to_header: if r.output_payload_to_header.is_empty() {
            None
        } else {
            Some(header_name(&r.output_payload_to_header)?)
        },
        output_claim_to_headers: r
            .output_claim_to_headers
            .iter()
            .map(|c| {
                Ok(ClaimToHeader {
                    header: header_name(&c.header)?,
                    claim: c.claim.clone(),
                })
            })
            .collect::<Result<_, String>>()?,
        space_delimited_claims: r.space_delimited_claims.clone(),
        fetch_timeout_ms: match r.fetch_timeout_ms {
            Some(0) => return Err("a fetch timeout of 0 ms".into()),
            t => t,
        },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::xds::{from_resources, to_resources};
    use ambit_proto::workload::address;

    fn spec() -> RequestAuthnSpec {
        serde_yaml_ng::from_str(
            r#"
namespace: shop
name: jwt
targets:
- {kind: Service, namespace: shop, name: web}
- {kind: Gateway, namespace: shop, name: waypoint}
rules:
- issuer: https://idp.example.com
  audiences: [web]
  jwks: !uri "https://idp.example.com/jwks.json"
  fromHeaders: [{name: x-jwt, prefix: "Token "}]
  fromParams: [jwt]
  fromCookies: [session]
  forwardOriginalToken: true
  outputPayloadToHeader: x-jwt-payload
  outputClaimToHeaders: [{header: x-sub, claim: sub}]
  spaceDelimitedClaims: [roles]
- issuer: https://other
  jwks: !inline '{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}'
- issuer: ""
  jwks: !invalid "spec.jwtRules[0].jwks: not JSON"
condition: {accepted: true, reason: Accepted, message: enforced by the waypoint}
"#,
        )
        .unwrap()
    }

    #[test]
    fn a_request_authentication_survives_the_wire_and_a_bad_one_is_rejected_alone() {
        let config = ambit_core::model::MeshConfig {
            request_authns: vec![spec()],
            ..Default::default()
        };
        let mut resources = to_resources(&config);
        assert!(resources.contains_key("requestauthn/shop/jwt"));
        let (received, errors) = from_resources(&resources);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(received, config);

        let Some(address::Type::RequestAuthentication(a)) =
            &mut resources.get_mut("requestauthn/shop/jwt").unwrap().r#type
        else {
            panic!()
        };
        for (breaks, want) in [
            (
                (|r: &mut proto::JwtRule| r.jwks_uri = "http://plain".into())
                    as fn(&mut proto::JwtRule),
                "not HTTPS",
            ),
            (|r| r.jwks = "{}".into(), "exactly one"),
            (
                |r| r.from_headers[0].name = "bad header".into(),
                "header name",
            ),
            (|r| r.issuer.clear(), "without an issuer"),
        ] {
            let mut broken = a.clone();
            breaks(&mut broken.rules[0]);
            let e = request_authn_from_proto(&broken).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        let mut bad_jwks = a.clone();
        bad_jwks.rules[1].jwks = "{\"keys\": []}".into();
        assert!(request_authn_from_proto(&bad_jwks)
            .unwrap_err()
            .contains("no usable key"));
        a.rules[0].jwks_uri = "ftp://x".into();
        let (received, errors) = from_resources(&resources);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(received.request_authns.is_empty());
    }
}
