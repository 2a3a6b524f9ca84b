//! The value forms of L7 policy fields that differ from L4's, each parsed from Istio's
//! notation (so the translation and the wire share one reading) and matched as
//! Istio's waypoints (Envoy) match them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::authz::{ServiceAccountRef, StringMatch};

/// One value of `hosts`/`notHosts`, matched case-insensitively against the request's
/// authority (`:authority` or `Host`, as received, port included): `example.com`
/// matches it with or without a port (`example.com:8080` too), `example.com:8080` only
/// with that port; `*.example.com` matches with or without a port;
/// `example.*` matches any authority starting so; `*` any non-empty one.
///
/// Istio matches an exact host only without a port, so a DENY of `example.com` lets
/// `Host: example.com:80` through. Ambit ignores the port there too: the port in a
/// Host header is the client's to write or leave out, so this allows nothing a client
/// could not get by leaving it out, and closes that gap (decision 0010).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HostMatch(pub StringMatch);

impl HostMatch {
    pub fn parse(value: &str) -> HostMatch {
        HostMatch(StringMatch::parse(value))
    }

    pub fn matches(&self, authority: &str) -> bool {
        let without_port = authority.rsplit_once(':').and_then(|(host, port)| {
            (!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())).then_some(host)
        });
        match &self.0 {
            StringMatch::Exact(h) => {
                authority.eq_ignore_ascii_case(h)
                    || without_port.is_some_and(|host| host.eq_ignore_ascii_case(h))
            }
            StringMatch::Prefix(p) => starts_with_ignore_case(authority, p),
            StringMatch::Suffix(s) => {
                ends_with_ignore_case(authority, s)
                    || without_port.is_some_and(|host| ends_with_ignore_case(host, s))
            }
            StringMatch::Presence => !authority.is_empty(),
        }
    }
}

impl fmt::Display for HostMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

fn starts_with_ignore_case(value: &str, prefix: &str) -> bool {
    value
        .as_bytes()
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
}

fn ends_with_ignore_case(value: &str, suffix: &str) -> bool {
    value
        .len()
        .checked_sub(suffix.len())
        .and_then(|start| value.as_bytes().get(start..))
        .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix.as_bytes()))
}

/// `namespaces` and `source.namespace` as Istio's sidecars and waypoints match them:
/// the peer identity must match `*/ns/<value>/*`, a `*` in the value standing for
/// any characters (`team-*` and `*-prod` as at L4, and `a*b` too, where ztunnel would
/// read a literal star).
pub fn namespace_matches(pattern: &StringMatch, identity: &str) -> bool {
    match pattern {
        // The common case, without building a pattern: some `/ns/<value>/` in it.
        StringMatch::Exact(v) if !v.contains('*') => {
            identity.match_indices("/ns/").any(|(i, _)| {
                identity[i + 4..]
                    .strip_prefix(v.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
            })
        }
        _ => glob(&format!("*/ns/{pattern}/*"), identity),
    }
}

/// `*` matches any run of characters (`/` included); everything else itself.
/// Linear in practice: the classic two-pointer match with one backtrack point.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|b| *b == b'*')
}

/// `serviceAccounts`/`source.serviceAccount` at a waypoint: the peer's namespace and
/// service account, whatever its trust domain.
pub fn service_account_matches(sa: &ServiceAccountRef, peer: &crate::SpiffeId) -> bool {
    peer.namespace() == sa.namespace && peer.service_account() == sa.name
}

/// Reads a service account reference: `ns/sa`, or a bare `sa` in `namespace`.
/// No wildcards, at most 320 characters, at most one `/`.
pub fn parse_service_account(value: &str, namespace: &str) -> Result<ServiceAccountRef, String> {
    let bad = |why: &str| format!("{value:?}: {why}");
    if value.len() > 320 {
        return Err(bad("at most 320 characters"));
    }
    if value.contains('*') {
        return Err(bad("wildcards are not allowed"));
    }
    let (ns, sa) = match value.split_once('/') {
        Some((_, sa)) if sa.contains('/') => return Err(bad("at most one `/` (namespace/name)")),
        Some((ns, sa)) => (ns, sa),
        None => (namespace, value),
    };
    if ns.is_empty() || sa.is_empty() {
        return Err(bad("namespace and name may not be empty"));
    }
    Ok(ServiceAccountRef {
        namespace: ns.to_owned(),
        name: sa.to_owned(),
    })
}

/// Reads a trust domain match: exact, `prefix*`, `*suffix` or `*`; no `/`, at most
/// one `*`, at the start or the end.
pub fn parse_trust_domain(value: &str) -> Result<StringMatch, String> {
    let stars = value.matches('*').count();
    let misplaced = stars == 1 && !(value.starts_with('*') || value.ends_with('*'));
    if value.contains('/') || stars > 1 || misplaced {
        return Err(format!(
            "{value:?}: a trust domain has no `/` and at most one `*`, at its start or end"
        ));
    }
    Ok(StringMatch::parse(value))
}

/// A header name as `request.headers[<name>]` may hold: an HTTP token (RFC 9110:
/// letters, digits and ``!#$%&'*+-.^_`|~``), kept lower-case, since names match
/// case-insensitively.
pub fn parse_header_name(name: &str) -> Result<String, String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() {
        return Err("a header name may not be empty".into());
    }
    if let Some(b) = name.bytes().find(|b| !token(*b)) {
        return Err(format!(
            "header name {name:?}: {:?} is not allowed in a header name",
            char::from(b)
        ));
    }
    Ok(name.to_ascii_lowercase())
}

/// One value of `requestPrincipals` or `request.auth.principal`: the JWT's issuer and
/// subject, written `<iss>/<sub>` and split at the last `/` (an issuer may be a URL).
/// `*` is any principal; without a `/`, `*x` is any issuer with a subject ending in
/// `x`, `x*` an issuer starting with `x` and any subject, and a plain `x` the issuer
/// `x` with an empty subject. Each side of a `/` is a string match (`iss/*`: that
/// issuer, any subject).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub struct RequestPrincipalMatch {
    text: String,
    issuer: Option<StringMatch>,
    subject: Option<StringMatch>,
}

impl RequestPrincipalMatch {
    pub fn parse(value: &str) -> RequestPrincipalMatch {
        let (issuer, subject) = if value == "*" {
            (None, None)
        } else if let Some((iss, sub)) = value.rsplit_once('/') {
            (Some(StringMatch::parse(iss)), Some(StringMatch::parse(sub)))
        } else if let Some(sub) = value.strip_prefix('*') {
            (None, Some(StringMatch::Suffix(sub.to_owned())))
        } else if let Some(iss) = value.strip_suffix('*') {
            (Some(StringMatch::Prefix(iss.to_owned())), None)
        } else {
            (
                Some(StringMatch::Exact(value.to_owned())),
                Some(StringMatch::Exact(String::new())),
            )
        };
        RequestPrincipalMatch {
            text: value.to_owned(),
            issuer,
            subject,
        }
    }

    pub fn matches(&self, issuer: &str, subject: &str) -> bool {
        self.issuer.as_ref().is_none_or(|m| m.matches(issuer))
            && self.subject.as_ref().is_none_or(|m| m.matches(subject))
    }
}

impl From<String> for RequestPrincipalMatch {
    fn from(s: String) -> Self {
        RequestPrincipalMatch::parse(&s)
    }
}

impl From<RequestPrincipalMatch> for String {
    fn from(m: RequestPrincipalMatch) -> Self {
        m.text
    }
}

impl fmt::Display for RequestPrincipalMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}
