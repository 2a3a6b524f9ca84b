//! What an HTTPRoute rule's `filters` do to a request, as pure functions: the Gateway
//! API's core and extended filters as Istio's waypoints apply them.
//!
//! - `RequestHeaderModifier` / `ResponseHeaderModifier`: `set` replaces every value of
//!   a header, `add` appends one, `remove` deletes the header; applied in that order,
//!   names case-insensitive.
//! - `RequestRedirect`: answered by the waypoint itself (no backend): `Location` from
//!   the request with the scheme, hostname, port and path the filter gives; status 302
//!   unless written. The port follows the Gateway API: the filter's own, else the
//!   scheme's well-known port when it sets a scheme, else the port the request was
//!   addressed to; a well-known port (80 for http, 443 for https) is left out of
//!   `Location`.
//! - `URLRewrite`: the backend receives the rewritten host (`Host`/`:authority`) and
//!   path.
//! - Path modifiers: `ReplaceFullPath` replaces the path; `ReplacePrefixMatch` replaces
//!   the part the rule's `PathPrefix` matched, by whole segments, as the Gateway API's
//!   table says (`/foo` → `/xyz` turns `/foo/bar` into `/xyz/bar`; `/foo` → `/` turns
//!   `/foo/bar` into `/bar` and `/foo` into `/`). The query is kept.
//! - `RequestMirror`: a copy of the request goes to another backend, fire and forget,
//!   for the filter's share of requests ([`Mirror::sampled`]).

use serde::{Deserialize, Serialize};

use super::Backend;

/// A rule's filters, at most one of each kind but mirrors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Filters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
}

impl Filters {
    pub fn is_empty(&self) -> bool {
        *self == Filters::default()
    }
}

/// `set`, `add` and `remove`; names lower case.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderModifier {
    /// Applies the modifier to `headers`. Names and values were checked when the
    /// route was read; one that is not a valid header anyway is skipped.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        use http::header::{HeaderName, HeaderValue};
        let parse = |name: &str, value: &str| {
            Some((
                HeaderName::from_bytes(name.as_bytes()).ok()?,
                HeaderValue::from_str(value).ok()?,
            ))
        };
        for (name, value) in &self.set {
            if let Some((name, value)) = parse(name, value) {
                headers.insert(name, value);
            }
        }
        for (name, value) in &self.add {
            if let Some((name, value)) = parse(name, value) {
                headers.append(name, value);
            }
        }
        for name in &self.remove {
            headers.remove(name.as_str());
        }
    }
}

/// A path modifier of a redirect or rewrite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type", content = "value")]
pub enum PathModifier {
    Full(String),
    /// Replaces what the rule's `PathPrefix` matched.
    Prefix(String),
}

impl PathModifier {
    /// The new path for `path` (without its query), given the prefix the rule matched
    /// (`None`: the rule matched otherwise, where a prefix modifier replaces nothing).
    pub fn apply(&self, path: &str, matched_prefix: Option<&str>) -> String {
        match self {
            PathModifier::Full(p) => p.clone(),
            PathModifier::Prefix(replacement) => {
                let Some(prefix) = matched_prefix else {
                    return path.to_owned();
                };
                let prefix = prefix.trim_end_matches('/');
                let rest = path.strip_prefix(prefix).unwrap_or(path);
                let out = format!("{}{rest}", replacement.trim_end_matches('/'));
                if out.is_empty() {
                    "/".to_owned()
                } else if out.starts_with('/') {
                    out
                } else {
                    format!("/{out}")
                }
            }
        }
    }
}

/// `RequestRedirect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 301, 302 (the default), 303, 307 or 308.
    pub status: u16,
}

/// What a redirect is computed from.
#[derive(Debug, Clone, Copy)]
pub struct RedirectFrom<'a> {
    /// `http` inside the mesh.
    pub scheme: &'a str,
    /// The request's host, without a port.
    pub host: &'a str,
    /// The port the request was addressed to (the Service's).
    pub port: u16,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub matched_prefix: Option<&'a str>,
}

impl Redirect {
    /// The `Location` to answer with.
    pub fn location(&self, from: &RedirectFrom<'_>) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(from.scheme);
        let host = self.hostname.as_deref().unwrap_or(from.host);
        let port = self.port.unwrap_or(match self.scheme.as_deref() {
            Some("http") => 80,
            Some("https") => 443,
            _ => from.port,
        });
        let path = match &self.path {
            Some(m) => m.apply(from.path, from.matched_prefix),
            None => from.path.to_owned(),
        };
        let well_known = matches!((scheme, port), ("http", 80) | ("https", 443));
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let mut out = if well_known {
            format!("{scheme}://{host}{path}")
        } else {
            format!("{scheme}://{host}:{port}{path}")
        };
        if let Some(q) = from.query {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

/// `URLRewrite`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

/// `RequestMirror`: the backend (its weight unused) and the share of requests, in
/// millionths (`percent: 50` is 500,000; every request when not written).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    pub backend: Backend,
    pub share_ppm: u32,
}

impl Mirror {
    pub const ALL: u32 = 1_000_000;

    /// Whether this request is mirrored, given `random` uniform over `u64`.
    pub fn sampled(&self, random: u64) -> bool {
        let point = ((u128::from(random) * u128::from(Mirror::ALL)) >> 64) as u32;
        point < self.share_ppm
    }
}

/// The authority a mirrored request carries: Envoy's (and so Istio's) `-shadow`
/// suffix on the host, so the mirror's backend can tell copies from originals.
pub fn shadow_authority(authority: &str) -> String {
    match split_host_port(authority) {
        (host, Some(port)) => format!("{host}-shadow:{port}"),
        (host, None) => format!("{host}-shadow"),
    }
}

/// An authority's host and port (`[v6]:port` keeps its brackets; a bare IPv6
/// address has no port).
pub fn split_host_port(authority: &str) -> (&str, Option<&str>) {
    match authority.rfind(':') {
        Some(i)
            if authority[i + 1..].bytes().all(|b| b.is_ascii_digit())
                && (authority.starts_with('[') || !authority[..i].contains(':')) =>
        {
            (&authority[..i], Some(&authority[i + 1..]))
        }
        _ => (authority, None),
    }
}
